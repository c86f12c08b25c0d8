"""A Triton 2:4 GEMM, made for decode: ``y = x·Wᵀ (+ b)`` reading only the kept values and 2-bit positions.

Layout (built once at load time from the packed checkpoint's values and bitmask):

- ``values`` ``[out, in/2]``: the two stored values of every group of 4, in column order (exactly
  ``.compressed`` of the ``sparse-24-bitmask`` format).
- ``meta`` int32 ``[out, in/32]``: the position (0-3) of each stored value inside its group, 2 bits
  each, 16 per word, value ``k`` of a row in bits ``2·(k mod 16)`` of word ``k // 16``.

So a weight costs ``itemsize/2 + 1/8`` bytes per dense element instead of ``itemsize``: 9/16 in fp16,
the bound a memory-bound GEMV can gain. The kernel (``_triton_jit.gemm24``) expands each step's kept
values into a dense tile in registers and multiplies it with a contiguous slice of ``x``, for several
rows of ``x`` at once. Correctness is tested on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
           block_n: int | None = None, block_m: int | None = None, steps: int | None = None,
           expand_from: int | None = None) -> torch.Tensor:
    """``x`` ``[..., in]`` times the 2:4 weight in ``(values, meta)`` layout, transposed, plus ``bias``.
    Block sizes not given come from ``_triton_jit.blocks`` for the rows of ``x`` (tensor cores from ``DOT_M`` rows on);
    from ``expand_from`` rows on (default ``PREFILL_M``), the weight is expanded for the call and cuBLAS multiplies."""
    from . import _triton_jit

    out_features, half = values.shape
    flat = x.reshape(-1, half * 2).contiguous()
    if flat.shape[0] >= (expand_from or _triton_jit.PREFILL_M):
        dense = torch.empty(out_features, 2 * half, dtype=x.dtype, device=x.device)
        grid = (-(-out_features // _triton_jit.EXPAND_ROWS), -(-half // (_triton_jit.COLUMNS // 2)))
        _triton_jit.expand24[grid](values, meta, dense, out_features, half, BLOCK_N=_triton_jit.EXPAND_ROWS)
        return F.linear(x, dense, bias)
    y = torch.empty(flat.shape[0], out_features, dtype=x.dtype, device=x.device)
    shape = _triton_jit.blocks(flat.shape[0], x.dtype, "2:4", block_n, block_m, steps)
    grid = (-(-out_features // shape.block_n), -(-flat.shape[0] // shape.block_m))
    _triton_jit.gemm24[grid](flat, values, meta, bias if bias is not None else values, y, flat.shape[0], out_features,
                             half, flat.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=shape.block_m,
                             BLOCK_N=shape.block_n, STEPS=shape.steps, USE_DOT=shape.use_dot,
                             num_warps=shape.num_warps)
    return y.reshape(*x.shape[:-1], out_features)
