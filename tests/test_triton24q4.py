"""The Triton 2:4 + INT4 decode kernel: its layout (the numba kernel's chunk rows) and exact round trip,
and its results against ``x @ Int24.dequantize().T``, run on CPU with TRITON_INTERPRET=1 (in a
subprocess, since the flag must be set before triton loads)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import random_int24

from llmprune.errors import LLMPruneError
from llmprune.kernels import numba24q4, triton24q4


@pytest.mark.parametrize("rows, columns, group_size", [(8, 136, 4), (12, 576, 128), (20, 392, 64), (5, 100, 100)])
def test_layout_is_the_numba_chunk_rows_and_round_trips(rows, columns, group_size) -> None:
    q = random_int24(rows, columns, group_size, seed=columns)
    values, meta = triton24q4.to_layout(q)
    chunks = -(-columns // 128)
    assert values.shape == (rows, chunks, 48) and meta.shape[:3] == (rows, chunks, 2)
    assert torch.equal(triton24q4.from_layout(values, meta), q.dequantize())
    if rows % 4 == 0:  # the numba panels hold the same bytes, 4 rows at a time
        panels, grid = numba24q4.to_layout(q)
        assert torch.equal(panels.transpose(1, 2).reshape(values.shape), values)
        assert torch.equal(grid.transpose(1, 2).reshape(meta.shape), meta)
    with pytest.raises(LLMPruneError, match="ascending"):
        triton24q4.to_layout(q._replace(positions=q.positions.flip(1)))


KERNEL_CHECK = textwrap.dedent('''
    import sys
    import torch
    from llmprune.errors import LLMPruneError
    from llmprune.kernels import triton24q4

    cases = torch.load(sys.argv[1], weights_only=False)
    for q, x, bias, expected, tolerance in cases:
        assert triton24q4.unavailable(q) is None, triton24q4.unavailable(q)
        y = triton24q4.linear(x, *triton24q4.to_layout(q), bias)
        assert y.dtype == x.dtype and y.shape == expected.shape
        torch.testing.assert_close(y, expected, rtol=tolerance, atol=tolerance, equal_nan=True)
    q, x = cases[0][:2]
    try:
        triton24q4.linear(torch.zeros(1, 264), *triton24q4.to_layout(q))
        raise AssertionError("a wrong input size was not refused")
    except LLMPruneError as exc:
        assert "input features" in str(exc)
    print("KERNEL OK")
''')


def test_kernel_matches_the_dequantized_matmul_under_the_interpreter(tmp_path) -> None:
    pytest.importorskip("triton", reason="triton is not installed; the kernel test needs its interpreter")
    generator = torch.Generator().manual_seed(0)
    tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # 16-bit: the weights rounded or not
    cases = []
    for rows, columns, group_size, batch, dtype, bias, symmetric in [
            (8, 136, 4, (1,), torch.float32, True, False),      # a scale per group, a padded chunk
            (12, 576, 128, (2,), torch.float16, False, True),   # a half-padded last chunk
            (20, 392, 64, (2, 2), torch.bfloat16, True, False),  # 3-D x, a scale per 64 columns
            (5, 100, 100, (1,), torch.float32, False, True),    # group_size = in; out need not be a multiple of 4
            (40, 640, 128, (8,), torch.float16, True, False),   # several chunks, several rows of x
            (24, 256, 128, (5,), torch.float32, True, False),   # rows of x not a multiple of the block
            (72, 384, 128, (20,), torch.float16, True, False),  # tensor-core tiles (tl.dot), partial row blocks
            (16, 256, 32, (3, 24), torch.float16, False, True),  # 72 rows of x: several dot blocks
            (12, 136, 4, (2, 70), torch.float32, True, False)]:  # prefill (140 rows): dequantized, then F.linear
        # (bfloat16 tl.dot is checked on CUDA only: the interpreter's float32 → bfloat16 cast is wrong)
        q = random_int24(rows, columns, group_size, seed=rows, symmetric=symmetric)
        x = torch.randn(*batch, columns, generator=generator).to(dtype)
        b = torch.randn(rows, generator=generator).to(dtype) if bias else None
        # the weights rounded to x's dtype, as the dense backend holds them and tensor-core tiles take them
        expected = F.linear(x.float(), q.dequantize().to(dtype).float(), None if b is None else b.float()).to(dtype)
        cases.append((q, x, b, expected, tolerance[dtype]))
    q = random_int24(8, 16, 16)
    x = torch.randn(1, 16, generator=generator)
    x[0, 5] = float("nan")  # decode reads only the stored positions' inputs: NaN reaches the rows storing it,
    stores_it = (q.columns() == 5).any(1)  # as in the numba kernel (a pruned weight is absent, not a zero)
    expected = F.linear(x.nan_to_num(0.0), q.dequantize())
    expected[0, stores_it] = float("nan")
    assert stores_it.any() and not stores_it.all()
    cases.append((q, x, None, expected, 1e-5))
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK, str(tmp_path / "cases.pt")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "KERNEL OK" in proc.stdout, proc.stderr[-3000:]


def test_unavailable_says_why(monkeypatch) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = random_int24(8, 64, 32)
    assert "runs on CUDA" in triton24q4.unavailable(q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton24q4.unavailable(q) is None
    assert "zero points" in triton24q4.unavailable(q._replace(zeros=q.zeros + 0.5))
    assert "4-bit" in triton24q4.unavailable(q._replace(bits=8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available: the kernel compiles for GPUs only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton24q4_on_cuda(dtype) -> None:
    pytest.importorskip("triton")
    q = random_int24(4096, 4096, 128)
    q = q._replace(**{field: getattr(q, field).cuda() for field in ("codes", "positions", "scales", "zeros")})
    values, meta = triton24q4.to_layout(q)
    weight = q.dequantize()
    for m in (1, 4, 16, 100, 200):
        x = torch.randn(m, 4096, device="cuda", dtype=dtype)
        expected = F.linear(x.float(), weight)
        got = triton24q4.linear(x, values, meta)
        assert got.dtype == dtype
        # relative to the output's norm: from 16 rows on, tensor cores take the weights rounded to x's dtype, as
        # the dense backend holds them; elementwise, bfloat16's 8-bit mantissa alone moved single outputs by
        # 0.19 (H200, m = 16), past any fixed absolute tolerance that would still catch a wrong kernel
        assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2, m
