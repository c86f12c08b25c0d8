"""2:4 packing (sparse-24-bitmask layout) and the SparseLinear inference module."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmprune.errors import LLMPruneError
from llmprune.formats.sparse24 import is_24, pack_24, stored_positions, unpack_24
from llmprune.sparse_linear import SparseLinear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 4), (3, 12), (5, 20), (2, 8), (300, 64), (7, 36)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the 2:4 semi-structured kernels need one")


def random_24(out_features: int, in_features: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Random weight with exactly two zeros at random positions in every group of 4."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    order = torch.rand(out_features, in_features // 4, 4, generator=gen).argsort(-1)
    drop = torch.zeros(out_features, in_features // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return weight.masked_fill(drop.reshape(out_features, in_features), 0).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that -0.0 != +0.0 and NaN == NaN."""
    return tensor.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[tensor.element_size()])


def group_bit_counts(bitmask: torch.Tensor, in_features: int) -> np.ndarray:
    mask = np.unpackbits(bitmask.numpy(), axis=1, count=in_features, bitorder="little")
    return mask.reshape(mask.shape[0], -1, 4).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_unpack_is_bit_exact(dtype, shape):
    weight = random_24(*shape, dtype=dtype, seed=shape[0] * 100 + shape[1])
    compressed, bitmask = pack_24(weight)
    out_features, in_features = shape
    assert compressed.dtype == dtype and tuple(compressed.shape) == (out_features, in_features // 2)
    assert bitmask.dtype == torch.uint8 and tuple(bitmask.shape) == (out_features, (in_features + 7) // 8)
    assert (group_bit_counts(bitmask, in_features) == 2).all()
    restored = unpack_24(compressed, bitmask, shape)
    assert restored.dtype == dtype
    assert torch.equal(bits(restored), bits(weight))


def test_bitmask_is_little_endian_within_a_byte():
    weight = torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4, 5, 6, 0, 0]])
    compressed, bitmask = pack_24(weight)
    # kept columns 0, 2, 5, 7 → bits 0, 2, 5, 7 of byte 0; columns 8, 9 → bits 0, 1 of byte 1
    assert bitmask.tolist() == [[1 + 4 + 32 + 128, 1 + 2]]
    assert compressed.tolist() == [[1, 2, 3, 4, 5, 6]]
    legacy = np.packbits(weight.numpy() != 0, axis=-1, bitorder="little")
    assert bitmask.numpy().tolist() == legacy.tolist()


def test_groups_with_more_than_two_zeros_store_two_positions():
    weight = torch.tensor([
        [0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 3.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0],
    ])
    keep = stored_positions(weight)
    # non-zeros first, then the lowest-index zeros
    assert keep.int().tolist() == [[1, 0, 1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0]]
    compressed, bitmask = pack_24(weight)
    assert compressed.tolist() == [[0.0, 5.0, 0.0, 0.0], [0.0, 3.0, 1.0, 2.0]]
    assert torch.equal(bits(unpack_24(compressed, bitmask, (2, 8))), bits(weight))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_groups_random_round_trip(dtype):
    weight = random_24(64, 40, dtype=dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    weight[torch.rand(weight.shape, generator=gen) < 0.3] = 0  # many groups now hold 3 or 4 zeros
    compressed, bitmask = pack_24(weight)
    assert tuple(compressed.shape) == (64, 20)
    assert (group_bit_counts(bitmask, 40) == 2).all()
    assert torch.equal(bits(unpack_24(compressed, bitmask, torch.tensor([[64], [40]]))), bits(weight))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_zero_is_canonicalised(dtype):
    weight = torch.tensor([[-0.0, 1.0, -0.0, 2.0, -0.0, -0.0, -0.0, -3.0]], dtype=dtype)
    compressed, bitmask = pack_24(weight)
    assert not torch.signbit(compressed[compressed == 0]).any()
    restored = unpack_24(compressed, bitmask, (1, 8))
    expected = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, -3.0]], dtype=dtype)
    assert torch.equal(bits(restored), bits(expected))


def test_special_values_survive():
    weight = torch.tensor([[float("nan"), 0.0, float("inf"), 0.0, 0.0, -float("inf"), 1e-45, 0.0]])
    compressed, bitmask = pack_24(weight)
    assert torch.equal(bits(unpack_24(compressed, bitmask, (1, 8))), bits(weight))


def test_non_24_weight_is_refused_by_name():
    weight = random_24(4, 8)
    weight[2, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert not is_24(weight)
    with pytest.raises(LLMPruneError, match=r"model\.layers\.3\.mlp\.up_proj\.weight.*row 2, columns 4\.\.7"):
        pack_24(weight, "model.layers.3.mlp.up_proj.weight")


def test_in_features_not_divisible_by_4_is_refused():
    with pytest.raises(LLMPruneError, match="lm_head.weight.*divisible by 4"):
        pack_24(torch.zeros(2, 10), "lm_head.weight")
    assert not is_24(torch.zeros(2, 10))


def test_is_24():
    weight = random_24(8, 16)
    assert is_24(weight) and is_24(torch.zeros(3, 4))
    weight[0, 0:3] = 1.0
    assert not is_24(weight)


def test_unpack_rejects_corrupt_bitmask_and_shapes():
    compressed, bitmask = pack_24(random_24(4, 16))
    bad = bitmask.clone()
    bad[1, 0] |= 0b1111  # group 0 of row 1 now marks 4 positions (or 3, whatever it held)
    with pytest.raises(LLMPruneError, match=r"up_proj\.bitmask is corrupt.*row 1, columns 0\.\.3"):
        unpack_24(compressed, bad, (4, 16), "up_proj")
    with pytest.raises(LLMPruneError, match=r"up_proj\.compressed has shape"):
        unpack_24(compressed[:, :4], bitmask, (4, 16), "up_proj")
    with pytest.raises(LLMPruneError, match=r"up_proj\.bitmask is"):
        unpack_24(compressed, bitmask.to(torch.int8), (4, 16), "up_proj")
    with pytest.raises(LLMPruneError, match=r"up_proj\.shape"):
        unpack_24(compressed, bitmask, (4, 16, 1), "up_proj")


def test_packing_is_vectorised_and_fast_enough():
    import time

    weight = random_24(1024, 2048, dtype=torch.float16)
    started = time.perf_counter()
    compressed, bitmask = pack_24(weight)
    restored = unpack_24(compressed, bitmask, weight.shape)
    assert time.perf_counter() - started < 5.0  # a Python loop over 2M elements takes minutes
    assert torch.equal(bits(restored), bits(weight))


# --------------------------------------------------------------------------- SparseLinear

def test_sparse_linear_dense_backend_matches_nn_linear_exactly():
    linear = nn.Linear(32, 24)
    with torch.no_grad():
        linear.weight.copy_(random_24(24, 32, seed=5))
    compressed, bitmask = pack_24(linear.weight)
    sparse = SparseLinear.from_packed(compressed, bitmask, (24, 32), bias=linear.bias, name="proj")
    x = torch.randn(3, 7, 32)
    assert sparse.backend == "dense" and sparse.fallback_reason is None
    assert torch.equal(sparse(x), linear(x))
    assert torch.equal(sparse.weight, linear.weight)
    assert (sparse.in_features, sparse.out_features) == (32, 24)
    assert "backend=dense" in repr(sparse) and "in_features=32" in repr(sparse)


def test_sparse_linear_replaces_conv1d_exactly():
    conv = Conv1D(24, 32)  # GPT-2 layout: weight [in=32, out=24]
    with torch.no_grad():
        conv.weight.copy_(random_24(24, 32, seed=6).T)
        conv.bias.normal_()
    sparse = SparseLinear(conv.weight.T, conv.bias, transposed=True, name="c_fc")
    x = torch.randn(2, 5, 32)
    assert torch.equal(sparse(x), conv(x))
    state = sparse.state_dict()
    assert tuple(state["weight"].shape) == (32, 24) and torch.equal(state["weight"], conv.weight)


def test_sparse_linear_state_dict_is_dense_and_loads_back():
    weight = random_24(16, 8, seed=7)
    sparse = SparseLinear(weight, torch.zeros(16))
    state = sparse.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], weight)
    other = SparseLinear(torch.zeros(16, 8), torch.zeros(16))
    other.load_state_dict({"weight": weight, "bias": torch.ones(16)})
    assert torch.equal(other.weight, weight) and torch.equal(other.bias, torch.ones(16))
    compressed, bitmask = pack_24(weight)
    other = SparseLinear(torch.zeros(16, 8), torch.zeros(16))
    other.load_state_dict({"compressed": compressed, "bitmask": bitmask, "shape": torch.tensor([16, 8]),
                           "bias": torch.zeros(16)})
    assert torch.equal(other.weight, weight)
    dense = random_24(16, 8)
    dense[0, :4] = 1.0
    with pytest.raises(RuntimeError, match="not 2:4"):
        other.load_state_dict({"weight": dense, "bias": torch.zeros(16)})


def test_sparse_linear_refuses_non_24_and_unknown_backend():
    weight = random_24(4, 8)
    weight[0, :3] = 1.0
    with pytest.raises(LLMPruneError, match="q_proj is not 2:4"):
        SparseLinear(weight, name="q_proj")
    with pytest.raises(LLMPruneError, match="unknown SparseLinear backend"):
        SparseLinear(random_24(4, 8), backend="cusparse")


@pytest.mark.parametrize("backend, reason", [("auto", "float32|numba is not installed"), ("semi-structured", "CUDA")])
def test_semi_structured_falls_back_to_dense_off_cuda(backend, reason):
    weight = random_24(64, 64, dtype=torch.float16)  # auto on CPU asks the numba kernel, which takes float32
    sparse = SparseLinear(weight, backend=backend, name="mlp.up_proj")
    assert sparse.backend == "dense" and re.search(reason, sparse.fallback_reason)
    assert f"asked {backend}" in repr(sparse)
    x = torch.randn(4, 64, dtype=torch.float16)
    assert torch.equal(sparse(x), torch.nn.functional.linear(x, weight))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_semi_structured_backend_on_cuda(dtype):
    from llmprune.sparse_linear import semi_structured_unavailable

    weight = random_24(128, 256, dtype=dtype).cuda()
    reason = semi_structured_unavailable(weight)
    if reason is not None:
        pytest.skip(f"2:4 kernels unavailable on this GPU: {reason}")
    bias = torch.randn(128, dtype=dtype, device="cuda")
    sparse = SparseLinear(weight, bias, backend="semi-structured", name="up_proj")
    assert sparse.backend == "semi-structured", sparse.fallback_reason
    x = torch.randn(3, 5, 256, dtype=dtype, device="cuda")
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(sparse(x).float(), expected, rtol=2e-2, atol=2e-2)
    assert torch.equal(bits(sparse.weight), bits(weight))
    assert torch.equal(sparse.state_dict()["weight"], weight)
    small = SparseLinear(random_24(8, 12, dtype=dtype).cuda(), backend="auto", name="tiny")
    assert small.backend == "dense" and "multiple" in small.fallback_reason
