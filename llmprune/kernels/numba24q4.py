"""A numba 2:4 + INT4 kernel for CPU decode: ``y = x·Wᵀ (+ b)`` from 4-bit codes, their positions and a
per-group scale grid, dequantized in registers.

Batch-1 decode is memory-bound. Dense float32 costs 16 bytes per group of 4 inputs; this layout costs
1.5 (two 4-bit codes, 4 bits of positions) plus the grid: 8 bytes of scale and offset per row and 128
columns when ``group_size`` is a multiple of 128 (1.75 per group, a byte ceiling of 9.1×), per 64
columns when it is a multiple of 64 (2.0, 8×), and per group of 4 otherwise (9.5, 1.7×: such fine
grids carry more scale than code).

Layout (built once at load time from an ``Int24``), in panels of 4 output rows × chunks of 32 groups
of 4 inputs (128 columns); ``in`` is padded up to a multiple of 128:

- ``values`` uint8 ``[out/4, chunks, 4, 48]``, per block of 4 rows, chunk and row, 48 bytes:
  - bytes 0-15, positions: byte l holds the nibble ``a | b << 2`` of group l in its low 4 bits and that
    of group 16 + l in its high 4 bits, ``a < b`` the positions (0-3) of the group's two codes;
    nibble 15 marks a padding group;
  - bytes 16-47, codes: byte 16 + j holds the code at position a of group j in its low 4 bits, the
    code at position b in its high 4 bits (padding: 0).
- ``meta`` float32 ``[out/4, chunks, 4, 2, H]``: ``[..., 0, :]`` scales, ``[..., 1, :]`` offsets
  ``−zero·scale`` (both 0 for padding), from the ``Int24``'s float16 grid; ``H`` = 1: one pair per
  chunk row, ``H`` = 2: one per 64 columns (groups 0-15, then 16-31), ``H`` = 32: one per group.
  The weight is ``code·scale + offset``, which equals ``Int24.dequantize()`` exactly (see ``grid_problem``).

Why it is fast: as in ``numba24``, a block's panel is one contiguous stream, and ``x`` is split into
its four residues mod 4 so the inputs are picked with blends, 16 groups per AVX-512 vector, shared by
the block's 4 rows; the codes are converted and scaled in registers. At one row of x the kernel is
bound by those instructions more than by memory (eval/results/q4_kernels.md). More rows than
``numba24.fused_rows`` (prefill) expand the weight to dense a tile at a time and run torch's GEMM
(``numba24.expanded_linear``).
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from ..packing import Int24
from .numba24 import Bound, expand, run

CHUNK = 32  # groups of 4 inputs per chunk: two AVX-512 vectors of float32
PAD = 15  # position nibble of a padding group
MAX_ZERO = 4096  # |zero point| up to which code·scale + offset is exact in float32


def grid_problem(q: Int24) -> str | None:
    """Why ``q`` does not fit the chunk layout below, shared with ``triton24q4`` (None when it does)."""
    out_features, in_features = q.shape
    if q.bits != 4:
        return f"{q.bits}-bit codes (the kernel takes 4-bit codes)"
    if in_features % 4:
        return f"in_features {in_features} is not a multiple of 4"
    if q.group_size <= 0 or q.group_size % 4:
        return f"group_size {q.group_size} is not a positive multiple of 4"
    grid = (out_features, -(-in_features // q.group_size))
    if tuple(q.scales.shape) != grid or tuple(q.zeros.shape) != grid:
        return f"scales {tuple(q.scales.shape)} and zeros {tuple(q.zeros.shape)} do not match the grid {grid}"
    zeros, scales = q.zeros.float(), q.scales.float()
    if not (scales.isfinite().all() and (zeros == zeros.round()).all() and (zeros.abs() <= MAX_ZERO).all()):
        # code·scale and zero·scale are then exact in float32: code·scale − zero·scale is (code − zero)·scale
        return f"the kernel needs finite scales and integer zero points of magnitude at most {MAX_ZERO}"
    return None


def unavailable(q: Int24) -> str | None:
    """Why the CPU 2:4 + INT4 kernel cannot run ``q`` (None when it can)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return "numba is not installed (pip install numba, or llmprune[kernels])"
    if q.codes.device.type != "cpu":
        return f"weight is on {q.codes.device.type}; the numba kernel runs on CPU"
    if q.shape[0] % 4:
        return f"out_features {q.shape[0]} is not a multiple of 4"
    return grid_problem(q)


def chunk_rows(q: Int24, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` as rows of chunks: (uint8 ``[out, chunks, 48]``, float32 ``[out, chunks, 2, H]``), the bytes
    and grid of the layout above before the rows are grouped into panels of 4 (``triton24q4`` keeps
    them row by row)."""
    problem = grid_problem(q)
    if problem is not None:
        raise LLMPruneError(f"{name}: the 2:4+INT4 kernel layout cannot hold this weight: {problem}")
    if q.codes.dtype != torch.uint8 or q.positions.dtype != torch.uint8 or (q.codes > 15).any():
        raise LLMPruneError(f"{name}: codes and positions must be uint8, codes 0-15")
    first, second = q.positions[:, 0::2], q.positions[:, 1::2]
    if not (first < second).all() or (second > 3).any():
        raise LLMPruneError(f"{name}: positions must be two ascending values 0-3 in every group of 4")
    out_features, in_features = q.shape
    device = q.codes.device
    groups = in_features // 4
    chunks = -(-groups // CHUNK)
    codes = torch.zeros(out_features, chunks * CHUNK, dtype=torch.uint8, device=device)
    codes[:, :groups] = q.codes[:, 0::2] | (q.codes[:, 1::2] << 4)
    nibbles = torch.full((out_features, chunks * CHUNK), PAD, dtype=torch.uint8, device=device)
    nibbles[:, :groups] = first | (second << 2)
    nibbles = nibbles.reshape(out_features, chunks, 2, 16)
    rows = torch.cat([nibbles[:, :, 0] | (nibbles[:, :, 1] << 4), codes.reshape(out_features, chunks, CHUNK)], -1)

    if q.scales.shape[1] == 1 or q.group_size % 128 == 0:
        lanes = 1
    elif q.group_size % 64 == 0:
        lanes = 2
    else:
        lanes = CHUNK
    starts = torch.arange(chunks * lanes, device=device) * (128 // lanes)  # the first column each pair covers
    index = (starts // q.group_size).clamp(max=q.scales.shape[1] - 1)
    real = starts < in_features
    scales = q.scales.float()
    offsets = -(q.zeros.float() * scales)
    pairs = torch.stack([torch.where(real, scales[:, index], 0.0), torch.where(real, offsets[:, index], 0.0)], 1)
    return rows, pairs.reshape(out_features, 2, chunks, lanes).transpose(1, 2)


def stored_in_features(last: torch.Tensor, chunks: int) -> int:
    """``in_features`` of a layout whose last chunk has the position bytes ``last`` (16, one row's)."""
    real = int(((last & 15) != PAD).sum()) + int(((last >> 4) != PAD).sum())
    return 4 * ((chunks - 1) * CHUNK + real)


def to_layout(q: Int24, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``Int24`` → (``values`` uint8 ``[out/4, chunks, 4, 48]``, ``meta`` float32 ``[out/4, chunks, 4, 2, H]``)."""
    out_features = q.shape[0]
    if out_features % 4:
        raise LLMPruneError(f"{name}: the numba 2:4+INT4 layout needs out_features divisible by 4; "
                            f"it has {out_features}")
    rows, grid = chunk_rows(q, name)
    blocks, chunks = out_features // 4, rows.shape[1]
    values = rows.reshape(blocks, 4, chunks, 48).transpose(1, 2).contiguous()
    return values, grid.reshape(blocks, 4, chunks, 2, grid.shape[-1]).transpose(1, 2).contiguous()


def _compiled():
    """The compiled kernels (numba is optional: imported on first use, compiled then and cached on disk)."""
    from . import _numba24q4

    return _numba24q4


def in_features(values: torch.Tensor, meta: torch.Tensor) -> int:
    """The weight's ``in``, read off the padding nibbles of the last chunk."""
    return stored_in_features(values[0, -1, 0, :16], values.shape[1])


KERNEL = "numba 2:4+INT4 kernel"


def from_layout(values: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of ``to_layout``: the dense ``[out, in]`` weight, equal to ``Int24.dequantize()`` (and to
    its ``.to(dtype)``)."""
    return expand(_compiled(), values, meta, in_features(values, meta), dtype)


def linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[..., in]`` times the 2:4 + INT4 weight in ``(values, meta)`` layout, transposed, plus
    ``bias`` (inference only: no gradient flows through the fused kernel). Any dtype of ``x`` (a
    checkpoint's: the codes do not change with it) as ``numba24.run`` takes it."""
    return run(_compiled(), KERNEL, x, values, meta, in_features(values, meta), bias)


def bind(values: torch.Tensor, meta: torch.Tensor) -> Bound:
    """``linear`` for this layout, prepared once (see ``numba24.Bound``)."""
    return Bound(_compiled(), KERNEL, values, meta, in_features(values, meta))
