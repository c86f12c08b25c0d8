"""The Triton 2:4 decode kernel: its layout round trip, and its results against the dense masked matmul,
run on CPU with TRITON_INTERPRET=1 (in a subprocess, since the flag must be set before triton loads)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.packing import pack_24
from llmprune.kernels.triton24 import from_layout, to_layout
from llmprune.patterns import NM


def random_24(rows: int, columns: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    return (weight * NM(2, 4).keep_mask(weight.abs())).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layout_round_trips_and_matches_the_packed_values(dtype) -> None:
    weight = random_24(7, 96, dtype)
    weight[0, :4] = 0  # a group with four zeros still stores two positions
    values, meta = to_layout(weight)
    assert values.shape == (7, 48) and meta.shape == (7, 3) and meta.dtype == torch.int32
    assert torch.equal(from_layout(values, meta), weight)
    assert torch.equal(values, pack_24(weight)[0])  # the same values as the checkpoint's .compressed
    with pytest.raises(LLMPruneError, match="divisible by 32"):
        to_layout(random_24(4, 48))


KERNEL_CHECK = textwrap.dedent('''
    import torch
    from llmprune.kernels.triton24 import linear, to_layout
    from llmprune.patterns import NM
    from llmprune.sparse_linear import SparseLinear

    gen = torch.Generator().manual_seed(0)
    tolerance = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 2e-2)}
    for rows, columns, m, dtype, bias in [(40, 64, 1, torch.float16, True), (64, 96, 3, torch.bfloat16, False),
                                          (33, 160, 2, torch.float32, True), (96, 256, 1, torch.float16, False),
                                          (40, 192, 5, torch.float32, False),   # rows of x not a multiple of the block
                                          (72, 128, 20, torch.float16, True),   # tensor-core tiles (tl.dot)
                                          (16, 96, 70, torch.float16, True),   # several dot row blocks
                                          (24, 64, 130, torch.float32, True)]:  # prefill: expanded, then F.linear
        # (bfloat16 tl.dot is checked on CUDA only: the interpreter's float32 → bfloat16 cast is wrong)
        weight = torch.randn(rows, columns, generator=gen)
        weight = (weight * NM(2, 4).keep_mask(weight.abs())).to(dtype)
        x = torch.randn(m, columns, generator=gen).to(dtype)
        b = torch.randn(rows, generator=gen).to(dtype) if bias else None
        expected = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float()).to(dtype)
        rtol, atol = tolerance[dtype]
        torch.testing.assert_close(linear(x, *to_layout(weight), b), expected, rtol=rtol, atol=atol)
        module = SparseLinear(weight, b, backend="triton")
        assert module.backend == "triton", module.fallback_reason
        assert torch.equal(module.weight, weight)
        torch.testing.assert_close(module(x[None]), expected[None], rtol=rtol, atol=atol)
    # torch.compile(fullgraph=True) sees the kernel as one operator (llmprune::kernel_linear)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x[None]), module(x[None]), rtol=0, atol=0)
    odd = SparseLinear((torch.ones(8, 48) * NM(2, 4).keep_mask(torch.rand(8, 48))), backend="triton")
    assert odd.backend == "dense" and "multiple of 32" in odd.fallback_reason
    print("KERNEL OK")
''')


def test_kernel_matches_dense_under_the_interpreter() -> None:
    pytest.importorskip("triton", reason="triton is not installed; the kernel test needs its interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "KERNEL OK" in proc.stdout, proc.stderr[-3000:]


def test_triton_backend_falls_back_on_cpu_without_the_interpreter(monkeypatch) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from llmprune.sparse_linear import SparseLinear

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = SparseLinear(random_24(8, 64), backend="triton")
    assert module.backend == "dense" and "runs on CUDA" in module.fallback_reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available: the compiled kernel runs on GPUs only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_backend_on_cuda(dtype) -> None:
    pytest.importorskip("triton")
    from llmprune.sparse_linear import SparseLinear

    weight = random_24(4096, 4096, dtype).cuda()
    module = SparseLinear(weight, backend="triton")
    assert module.backend == "triton"
    for m in (1, 4, 16, 100, 200):
        x = torch.randn(m, 4096, device="cuda", dtype=dtype)
        torch.testing.assert_close(module(x), torch.nn.functional.linear(x, weight), rtol=2e-2, atol=2e-2)
