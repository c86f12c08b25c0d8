"""2:4 packing (the sparse-24-bitmask layout): round trips, the stored positions, clear errors."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from helpers import bits, random_24

from llmprune.errors import LLMPruneError
from llmprune.packing import is_24, pack_24, stored_positions, unpack_24

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 4), (3, 12), (5, 20), (2, 8), (300, 64), (7, 36)]


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
