"""SparseLinear: exact on the dense backend, the replaced module's layout and state dict, backend choice
and fallbacks (the CUDA kernels where a GPU is present)."""
from __future__ import annotations

import re

import pytest
import torch
from helpers import bits, random_24, random_int24
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmprune.errors import LLMPruneError
from llmprune.packing import pack_24, unpack_24
from llmprune.sparse_linear import SparseLinear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the 2:4 semi-structured kernels need one")


def test_sparse_linear_dense_backend_matches_nn_linear_exactly():
    linear = nn.Linear(32, 24)
    with torch.no_grad():
        linear.weight.copy_(random_24(24, 32, seed=5))
    compressed, bitmask = pack_24(linear.weight)
    sparse = SparseLinear(unpack_24(compressed, bitmask, (24, 32)), bias=linear.bias, name="proj")
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


def test_sparse_linear_state_dict_is_the_dense_weight():
    weight = random_24(16, 8, seed=7)
    sparse = SparseLinear(weight, torch.zeros(16))
    state = sparse.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], weight)


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
    from llmprune.kernels.semi_structured import unavailable

    weight = random_24(128, 256, dtype=dtype).cuda()
    reason = unavailable(weight)
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
    small = SparseLinear(random_24(8, 12, dtype=dtype).cuda(), backend="semi-structured", name="tiny")
    assert small.backend == "dense" and "multiple" in small.fallback_reason


@pytest.mark.parametrize("quantized", [False, True], ids=["2:4", "2:4+int4"])
def test_numba_bound_call_equals_the_generic_path_and_follows_the_tensors(quantized: bool) -> None:
    """The numba backends bind their call once (numpy views, compiled kernels); whatever the fast path does
    not take goes the generic way, and a replaced layout or a move rebinds."""
    pytest.importorskip("numba")
    from llmprune.kernels import numba24, numba24q4

    weight = random_int24(64, 256, 128, seed=7) if quantized else random_24(64, 256, seed=7)
    bias = torch.randn(64)
    sparse = SparseLinear(weight, bias, backend="numba", name="proj")
    assert sparse.backend == "numba"
    kernel = numba24q4 if quantized else numba24
    dense = sparse.weight.clone()
    for rows in (1, 3, numba24.MAX_FUSED_ROWS, numba24.MAX_FUSED_ROWS + 1):  # the last one expands
        x = torch.randn(rows, 256)
        assert torch.equal(sparse(x), kernel.linear(x, sparse.kernel, sparse.meta, bias))
        torch.testing.assert_close(sparse(x), x @ dense.T + bias, rtol=1e-5, atol=1e-5)
    bound = sparse._bound
    x = torch.randn(2, 256, requires_grad=True)
    assert torch.equal(sparse(x), sparse(x.detach()))  # autograd input: the generic path
    sparse.kernel.data = sparse.kernel.data.clone()  # the storage replaced: the bound views would be stale
    assert torch.equal(sparse(x.detach()), kernel.linear(x.detach(), sparse.kernel, sparse.meta, bias))
    sparse.to("cpu", torch.float32)
    assert "_bound" not in sparse.__dict__
    sparse(x.detach())
    assert sparse._bound is not bound
    with pytest.raises(LLMPruneError, match="float32"):
        sparse(x.detach().double())


@pytest.mark.parametrize("quantized", [False, True], ids=["2:4", "2:4+int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_numba_layer_cast_to_half_keeps_its_layout(quantized: bool, dtype) -> None:
    """``model.to(bfloat16)`` casts the bias, never the kernel's layout (float32 values, uint8 positions or
    codes, float32 grid), and the layer then takes half inputs: decode rows give the float32 result in the
    input's dtype, prefill rows in bfloat16 the dense bfloat16 product (float16: the float32 result)."""
    pytest.importorskip("numba")
    from llmprune.kernels import numba24, numba24q4

    weight = random_int24(64, 256, 128, seed=5) if quantized else random_24(64, 256, seed=5)
    single = SparseLinear(weight, torch.randn(64), backend="numba", name="proj")
    half = SparseLinear(weight, single.bias.detach().clone(), backend="numba", name="proj")
    names = ("kernel", "meta") + (("int_codes", "int_bitmask", "int_scales", "int_zeros") if quantized else ())
    layout = {name: (getattr(half, name).dtype, getattr(half, name).clone()) for name in names}
    half.to(dtype)
    assert half.bias.dtype == dtype and half.backend == "numba"
    for name, (before, values) in layout.items():
        assert getattr(half, name).dtype == before and torch.equal(getattr(half, name), values), name
    kernel = numba24q4 if quantized else numba24
    for rows in (1, 20):  # fused, expanded
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
        with torch.inference_mode():
            y = half(x)
            if rows > numba24.MAX_FUSED_ROWS and dtype == torch.bfloat16:
                expected = torch.nn.functional.linear(x, single.weight.to(dtype), half.bias)
            else:
                expected = kernel.linear(x.float(), single.kernel, single.meta, half.bias.float()).to(dtype)
        assert y.dtype == dtype and torch.equal(y, expected), rows
        torch.testing.assert_close(y.float(), x.float() @ single.weight.T + half.bias.float(), rtol=2e-2, atol=0.1)
    dense = SparseLinear(weight, backend="dense", name="proj").to(dtype)  # the dense path is cast as before,
    assert dense.kernel.dtype == dtype  # the compact INT4 form is not
    assert not quantized or (dense.int_scales.dtype == torch.float16 and torch.equal(dense.quantized().scales,
                                                                                      weight.scales))


def test_auto_on_cuda_is_dense_for_fp_and_triton_for_int4() -> None:
    """What ``auto`` resolves to per device (no GPU needed: only the choice is tested). On CUDA a 2:4 fp
    weight runs dense (no sparse kernel beat cuBLAS on the H200, eval/RESULTS.md), a 4-bit one stays 4-bit."""
    from llmprune.kernels import auto_backend

    assert auto_backend(torch.device("cuda")) == "dense"
    assert auto_backend(torch.device("cuda"), quantized=True) == "triton"
    assert auto_backend(torch.device("cpu")) == auto_backend(torch.device("cpu"), quantized=True) == "numba"


@pytest.mark.parametrize("backend, quantized", [("dense", False), ("dense", True), ("numba", False), ("numba", True)],
                         ids=["dense", "dense-int4", "numba", "numba-int4"])
@torch.inference_mode()
def test_torch_compile_takes_a_whole_model_in_one_graph(backend: str, quantized: bool) -> None:
    """torch.compile(fullgraph=True), the way to CUDA graphs (mode="reduce-overhead") and HF's compiled static-cache
    generate(): kernel layers are one opaque operator each (``llmprune::kernel_linear``), never a graph break."""
    if backend == "numba":
        pytest.importorskip("numba")
    from conftest import tiny_model

    from llmprune.eval.speed import sparse_copy

    model = sparse_copy(tiny_model().eval(), backend, int4=quantized)
    assert {m.backend for m in model.modules() if isinstance(m, SparseLinear)} == {backend}
    ids = torch.tensor([[5, 17, 3, 9, 11]])
    expected = model(ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids).logits, expected, rtol=1e-5, atol=1e-5)
    hybrid = SparseLinear(torch.randn(8, 16) * torch.tensor([1.0, 0.0, 1.0, 0.0] * 2 + [1.0] * 8), backend=backend,
                          dense_ranges=((8, 16),))
    x = torch.randn(3, 16)
    torch.testing.assert_close(torch.compile(hybrid, backend="aot_eager", fullgraph=True)(x), hybrid(x))
