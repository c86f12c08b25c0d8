"""A Triton 2:4 + INT4 GEMM, made for decode: ``y = x·Wᵀ (+ b)`` from 4-bit codes, their positions and a
per-group scale grid, dequantized in registers (float16, bfloat16 or float32 ``x``, float32 sums).

Layout: the chunk rows of ``numba24q4`` (its docstring has them byte for byte), kept row by row rather
than in panels of 4 rows:

- ``values`` uint8 ``[out, chunks, 48]``: per row and chunk of 32 groups of 4 inputs (128 columns),
  16 position bytes (the nibble ``a | b << 2`` of group l in the low 4 bits of byte l, of group 16 + l
  in the high 4 bits; 15 marks padding) and 32 code bytes (group j: code at position a in the low 4
  bits, at position b in the high 4 bits);
- ``meta`` float32 ``[out, chunks, 2, H]``: scales and offsets ``−zero·scale``, one pair per chunk row
  (``H`` = 1), per 64 columns (2) or per group (32).

A weight costs 1.75 bytes per group of 4 inputs with a 128-column grid against 8 in float16: a byte
ceiling of 4.6× for a memory-bound GEMV (5.3× without the grid). The kernel (``_triton_jit.gemm24q4``)
dequantizes one chunk row per step into a dense tile in registers and multiplies it with a contiguous
slice of ``x``, for several rows of ``x`` at once. Correctness is tested on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import LLMPruneError
from ..packing import Int24
from .numba24q4 import CHUNK, PAD, chunk_rows, grid_problem, stored_in_features


def unavailable(q: Int24) -> str | None:
    """Why the Triton 2:4 + INT4 kernel cannot run ``q`` (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if q.codes.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"weight is on {q.codes.device.type}; the Triton kernel runs on CUDA "
                "(or on CPU with TRITON_INTERPRET=1)")
    return grid_problem(q)


def to_layout(q: Int24, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``Int24`` → (``values`` uint8 ``[out, chunks, 48]``, ``meta`` float32 ``[out, chunks, 2, H]``)."""
    rows, grid = chunk_rows(q, name)
    return rows.contiguous(), grid.contiguous()


def from_layout(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_layout``: the dense float32 ``[out, in]`` weight, equal to ``Int24.dequantize()``."""
    out_features, chunks, _ = values.shape
    positions, codes = values[..., :16], values[..., 16:]
    nibbles = torch.cat([positions & 15, positions >> 4], -1).long()  # [out, chunks, 32]: group j of each chunk
    lane = (torch.arange(CHUNK, device=values.device) * meta.shape[-1]) >> 5
    scale, offset = meta[:, :, 0, lane], meta[:, :, 1, lane]
    dense = torch.zeros(out_features, chunks, CHUNK, 4, dtype=torch.float32, device=values.device)
    dense.scatter_(3, (nibbles & 3)[..., None], ((codes & 15).float() * scale + offset)[..., None])
    dense.scatter_(3, (nibbles >> 2)[..., None], ((codes >> 4).float() * scale + offset)[..., None])
    in_features = stored_in_features(values[0, -1, :16], chunks)
    return dense.reshape(out_features, -1)[:, :in_features].contiguous()


def linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
           block_n: int | None = None, block_m: int | None = None, steps: int | None = None,
           expand_from: int | None = None) -> torch.Tensor:
    """``x`` ``[..., in]`` times the 2:4 + INT4 weight in ``(values, meta)`` layout, transposed, plus
    ``bias``, in ``x``'s dtype. ``in`` is checked against the number of chunks (the exact count sits in
    the padding nibbles on the device, and reading it back would synchronise every call); inputs are
    read only up to ``x``'s width. Block sizes not given come from ``_triton_jit.blocks`` for the rows of ``x``;
    from ``expand_from`` rows on (default ``PREFILL_M``), the weight is dequantized for the call and cuBLAS multiplies."""
    from . import _triton_jit

    out_features, chunks, _ = values.shape
    x_features = x.shape[-1]
    if -(-x_features // (4 * CHUNK)) != chunks:
        raise LLMPruneError(f"x has {x_features} input features; this 2:4+INT4 weight takes "
                            f"{4 * CHUNK * (chunks - 1) + 4} to {4 * CHUNK * chunks}")
    if x.device != values.device or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LLMPruneError(f"the Triton 2:4+INT4 kernel takes float16, bfloat16 or float32 x on the weight's "
                            f"device ({values.device}); got {x.dtype} on {x.device}")
    flat = x.reshape(-1, x_features).contiguous()
    if flat.shape[0] >= (expand_from or _triton_jit.PREFILL_M):
        dense = torch.empty(out_features, x_features, dtype=x.dtype, device=x.device)
        grid = (-(-out_features // _triton_jit.EXPAND_ROWS), chunks)
        _triton_jit.expand24q4[grid](values, meta, dense, out_features, chunks, x_features, PAD=PAD,
                                     LANES=meta.shape[-1], BLOCK_N=_triton_jit.EXPAND_ROWS)
        return F.linear(x, dense, bias)
    y = torch.empty(flat.shape[0], out_features, dtype=x.dtype, device=x.device)
    shape = _triton_jit.blocks(flat.shape[0], x.dtype, "2:4+int4", block_n, block_m, steps)
    grid = (-(-out_features // shape.block_n), -(-flat.shape[0] // shape.block_m))
    _triton_jit.gemm24q4[grid](flat, values, meta, bias if bias is not None else meta, y, flat.shape[0], out_features,
                               chunks, x_features, flat.stride(0), y.stride(0), PAD=PAD, LANES=meta.shape[-1],
                               HAS_BIAS=bias is not None, BLOCK_M=shape.block_m, BLOCK_N=shape.block_n,
                               STEPS=shape.steps, USE_DOT=shape.use_dot, num_warps=shape.num_warps)
    return y.reshape(*x.shape[:-1], out_features)
