"""A Triton 2:4 skinny GEMM for decode: ``y = x·Wᵀ (+ b)`` reading only the kept values and 2-bit positions.

Layout (built once at load time from the packed checkpoint's values and bitmask):

- ``values`` ``[out, in/2]``: the two stored values of every group of 4, in column order (exactly
  ``.compressed`` of the ``sparse-24-bitmask`` format).
- ``meta`` int32 ``[out, in/32]``: the position (0-3) of each stored value inside its group, 2 bits
  each, 16 per word, value ``k`` of a row in bits ``2·(k mod 16)`` of word ``k // 16``.

So a weight costs ``itemsize/2 + 1/8`` bytes per dense element instead of ``itemsize``: 9/16 in fp16,
the bound a memory-bound GEMV can gain. Each program computes ``BLOCK_N`` output rows of one row of
``x``: it streams ``BLOCK_K`` values and their metadata words per step (contiguous, vectorised loads),
expands the positions, gathers the matching inputs from ``x`` (a few KiB, cache-resident) and
accumulates in float32. Correctness is tested on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from ..packing import stored_positions

PER_WORD = 16  # 2-bit positions per int32 metadata word
ALIGN = 2 * PER_WORD  # in_features must be a multiple of this


def unavailable(weight: torch.Tensor) -> str | None:
    """Why the Triton 2:4 kernel cannot run ``weight`` ``[out, in]`` (None when it can)."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if weight.device.type != "cuda" and not interpret:
        return f"weight is on {weight.device.type}; the Triton kernel runs on CUDA (or on CPU with TRITON_INTERPRET=1)"
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {weight.dtype} (the Triton kernel takes float16, bfloat16 or float32)"
    if weight.shape[1] % ALIGN:
        return f"in_features {weight.shape[1]} is not a multiple of {ALIGN}"
    return None


def to_layout(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 ``[out, in]`` → (``values`` ``[out, in/2]``, ``meta`` int32 ``[out, in/32]``)."""
    out_features, in_features = weight.shape
    if in_features % ALIGN:
        raise LLMPruneError(f"{name}: the Triton 2:4 layout needs in_features divisible by {ALIGN}; it has {in_features}")
    stored = stored_positions(weight, name)  # exactly two per group, ascending
    columns = stored.nonzero()[:, 1].reshape(out_features, in_features // 2)
    values = weight.gather(1, columns) + 0.0  # −0.0 → +0.0
    positions = (columns % 4).to(torch.int64).reshape(out_features, -1, PER_WORD)
    shifts = torch.arange(PER_WORD, device=weight.device, dtype=torch.int64) * 2
    words = (positions << shifts).sum(-1)  # < 2**32
    meta = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return values.contiguous(), meta.contiguous()


def from_layout(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_layout``: the dense ``[out, in]`` weight."""
    out_features, half = values.shape
    shifts = torch.arange(PER_WORD, device=meta.device, dtype=torch.int32) * 2
    positions = ((meta[..., None] >> shifts) & 3).reshape(out_features, half).to(torch.int64)
    columns = torch.arange(half, device=values.device).div(2, rounding_mode="floor") * 4 + positions
    return torch.zeros(out_features, half * 2, dtype=values.dtype, device=values.device).scatter_(1, columns, values)


def _kernel():
    """Compile lazily: importing triton is slow and optional."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv24(x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, out_features, half, stride_x, stride_y,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        row_ok = rows < out_features
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        words_per_row = half // 16
        for start in range(0, half, BLOCK_K):
            kept = start + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (kept < half)[None, :]
            values = tl.load(values_ptr + rows[:, None] * half + kept[None, :], mask=ok, other=0.0)
            word_index = start // 16 + tl.arange(0, BLOCK_K // 16)
            words = tl.load(meta_ptr + rows[:, None] * words_per_row + word_index[None, :],
                            mask=row_ok[:, None] & (word_index < words_per_row)[None, :], other=0)
            shifts = tl.arange(0, 16) * 2
            positions = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 3, (BLOCK_N, BLOCK_K))
            columns = (kept // 2)[None, :] * 4 + positions
            inputs = tl.load(x_ptr + m * stride_x + columns, mask=ok, other=0.0)
            acc += tl.sum(values.to(tl.float32) * inputs.to(tl.float32), axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv24


_COMPILED = None


def linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
              block_n: int = 32, block_k: int = 128) -> torch.Tensor:
    """``x`` ``[..., in]`` times the 2:4 weight in ``(values, meta)`` layout, transposed, plus ``bias``."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernel()
    out_features, half = values.shape
    flat = x.reshape(-1, half * 2).contiguous()
    y = torch.empty(flat.shape[0], out_features, dtype=x.dtype, device=x.device)
    grid = ((out_features + block_n - 1) // block_n, flat.shape[0])
    _COMPILED[grid](flat, values, meta, bias if bias is not None else values, y, out_features, half,
                    flat.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], out_features)
