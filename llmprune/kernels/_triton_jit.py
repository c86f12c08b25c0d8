"""The Triton JIT code of both 2:4 kernels (``triton24``: float values, ``triton24q4``: 4-bit codes), in one
module that imports triton at its top: the kernel modules import it on first use, so triton stays optional.

Both kernels work the same way. A program owns ``BLOCK_M`` rows of ``x`` and ``BLOCK_N`` output rows. Per
step it loads the packed weights of ``STEPS`` chunks of 128 input columns for its output rows
(contiguous), expands them in registers into the dense ``[BLOCK_N, 128·STEPS]`` tile (``_expand``: each
group's two kept values moved to their positions, zeros elsewhere) and multiplies it with the
``[BLOCK_M, 128·STEPS]`` slice of ``x``, a contiguous load shared by all its output rows. So the weights are
read once for all rows of ``x`` in the program, and ``x`` is never gathered element by element. Small ``M``
(decode) reduce with elementwise products; from ``DOT_M`` rows on, 16-bit inputs go through ``tl.dot``
(tensor cores); from ``PREFILL_M`` rows on the callers expand the weight and use cuBLAS instead.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

COLUMNS = tl.constexpr(128)  # input columns per chunk: a chunk row of the INT4 layout, 64 kept values of the float one
# Rows of x from which 16-bit inputs use tl.dot, in tiles of at least 16 rows (its smallest side; fewer rows
# are masked). On an H200 the elementwise product over 8 rows took 1.5-7x as long as the 16-row dot tile
# over 16 (eval/RESULTS.md, "GPU, second session").
DOT_M = 8
DOT_TILE = 16  # tl.dot's smallest tile side
# Rows of x from which the kernels' ``linear`` expands the weight for the call (``expand24``/``expand24q4``)
# and lets cuBLAS multiply: the tl.dot path measured 0.18-0.26x (2:4) and 0.03-0.06x (2:4 + INT4) of dense
# fp16 on an H200 from M = 64 to 4096 (eval/RESULTS.md), while expanding reads the packed weight once and
# writes the dense one, about 1.3 dense GEMVs (an estimate from the byte counts: not yet timed on the GPU).
PREFILL_M = 128


class Blocks(NamedTuple):
    block_m: int  # rows of x per program
    block_n: int  # output rows per program
    steps: int  # chunks of COLUMNS per loop iteration
    use_dot: bool
    num_warps: int


def blocks(m: int, dtype: torch.dtype, block_n: int | None = None, block_m: int | None = None,
           steps: int | None = None) -> Blocks:
    """The launch shape for ``m`` rows of ``x`` (any of the three sizes may be given). Decode is bound by
    memory latency: each program's loop issues one step's loads at a time, so a step spans several chunks
    to keep bytes in flight, over few output rows per program (many programs). Measured on an H200
    (``scripts/tune_triton.py``, fp16, Llama-2-7B shapes, eval/RESULTS.md): 8 output rows and 4 chunks per
    step were fastest at M = 1 and 8 rows, 8 chunks at M = 4, in both kernels, among 8-32 rows and 1-8
    chunks; up to 1.6× the first guess (16 rows, 4 chunks). From ``DOT_M`` rows on, 16-bit inputs take
    tensor-core tiles."""
    if m >= DOT_M and dtype in (torch.float16, torch.bfloat16):
        default = Blocks(DOT_TILE if m < 64 else 64, 64, 1, True, 4)
    else:
        rows = min(triton.next_power_of_2(m), 8)
        default = Blocks(rows, 8, 8 if 1 < rows <= 4 else 4, False, 4)
    chosen = default._replace(**{k: v for k, v in (("block_m", block_m), ("block_n", block_n), ("steps", steps)) if v})
    # the elementwise product holds block_m·block_n·steps·COLUMNS floats: 8 warps from 64 per thread at 4 on
    wide = not chosen.use_dot and chosen.block_m * chosen.block_n * chosen.steps * COLUMNS.value >= 64 * 4 * 32
    return chosen._replace(use_dot=chosen.use_dot and chosen.block_m >= DOT_TILE, num_warps=8 if wide else 4)


@triton.jit
def _expand(first, first_pos, second, second_pos, ROWS: tl.constexpr, GROUPS: tl.constexpr):
    """[ROWS, GROUPS] first and second kept values of each group of 4 and their positions (0-3, first <
    second) → the dense float32 [ROWS, 4·GROUPS] tile."""
    d0 = tl.where(first_pos == 0, first, 0.0)
    d1 = tl.where(first_pos == 1, first, tl.where(second_pos == 1, second, 0.0))
    d2 = tl.where(first_pos == 2, first, tl.where(second_pos == 2, second, 0.0))
    d3 = tl.where(second_pos == 3, second, 0.0)
    # join stacks on a new last axis: [.., l, i] = (d0, d2)[l] if i == 0 else (d1, d3)[l], i.e. d(2l + i)
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (ROWS, 4 * GROUPS))


@triton.jit
def _accumulate(acc, x, dense, USE_DOT: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x [BLOCK_M, C] · dense [BLOCK_N, C]ᵀ, summed in float32."""
    if USE_DOT:
        acc += tl.dot(x, tl.trans(dense.to(x.dtype)))
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * dense[None, :, :], axis=2)
    return acc


@triton.jit
def _store(acc, bias_ptr, y_ptr, ms, rows, m_rows, out_features, stride_y, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < out_features, other=0.0).to(tl.float32)[None, :]
    ok = (ms < m_rows)[:, None] & (rows < out_features)[None, :]
    tl.store(y_ptr + ms[:, None] * stride_y + rows[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _tile24(values_ptr, meta_ptr, rows, row_ok, start, half, BLOCK_N: tl.constexpr, STEPS: tl.constexpr):
    """The dense float32 [BLOCK_N, STEPS·COLUMNS] tile of ``rows`` from kept value ``start`` on: ``values``
    [out, in/2] (the kept values, column order), ``meta`` int32 [out, in/32] (2-bit positions)."""
    kept = start + tl.arange(0, STEPS * COLUMNS // 2)
    values = tl.load(values_ptr + rows[:, None] * half + kept[None, :],
                     mask=row_ok[:, None] & (kept < half)[None, :], other=0.0).to(tl.float32)
    words_per_row = half // 16
    word_index = start // 16 + tl.arange(0, STEPS * COLUMNS // 32)
    words = tl.load(meta_ptr + rows[:, None] * words_per_row + word_index[None, :],
                    mask=row_ok[:, None] & (word_index < words_per_row)[None, :], other=0)
    positions = (words[:, :, None] >> (tl.arange(0, 16) * 2)[None, None, :]) & 3
    first, second = tl.split(tl.reshape(values, (BLOCK_N, STEPS * COLUMNS // 4, 2)))
    first_pos, second_pos = tl.split(tl.reshape(positions, (BLOCK_N, STEPS * COLUMNS // 4, 2)))
    return _expand(first, first_pos, second, second_pos, BLOCK_N, STEPS * COLUMNS // 4)


@triton.jit
def _tile24q4(values_ptr, meta_ptr, rows, row_ok, first_chunk, chunks, PAD: tl.constexpr, LANES: tl.constexpr,
              BLOCK_N: tl.constexpr, STEPS: tl.constexpr):
    """The dense float32 [BLOCK_N, STEPS·COLUMNS] tile of ``rows`` from chunk ``first_chunk`` on: ``values``
    uint8 [out, chunks, 48] (16 position bytes, 32 code bytes per 128 columns), ``meta`` float32
    [out, chunks, 2, LANES] (scales, then offsets ``−zero·scale``): the ``triton24q4`` layout."""
    lane = tl.arange(0, 32)
    grid_lane = (lane * LANES) >> 5  # the group's (scale, offset) in its chunk row
    chunk = first_chunk + tl.arange(0, STEPS)
    ok = (row_ok[:, None] & (chunk < chunks)[None, :])[:, :, None]  # [BLOCK_N, STEPS, 1]
    row_chunk = (rows[:, None] * chunks + chunk[None, :])[:, :, None]
    positions = tl.load(values_ptr + row_chunk * 48 + tl.arange(0, 16)[None, None, :], mask=ok, other=PAD | PAD << 4)
    codes = tl.reshape(tl.load(values_ptr + row_chunk * 48 + 16 + lane[None, None, :], mask=ok, other=0),
                       (BLOCK_N, STEPS * 32))
    # byte l holds group l in its low nibble and group 16 + l in its high one
    nibbles = tl.reshape(tl.permute(tl.join(positions & 15, positions >> 4), (0, 1, 3, 2)), (BLOCK_N, STEPS * 32))
    if LANES == 1:  # one (scale, offset) per chunk row (group size 128): load it once, not once per group
        scale = tl.load(meta_ptr + row_chunk * 2, mask=ok, other=0.0)
        offset = tl.load(meta_ptr + row_chunk * 2 + 1, mask=ok, other=0.0)
        scale = tl.reshape(tl.broadcast_to(scale, (BLOCK_N, STEPS, 32)), (BLOCK_N, STEPS * 32))
        offset = tl.reshape(tl.broadcast_to(offset, (BLOCK_N, STEPS, 32)), (BLOCK_N, STEPS * 32))
    else:
        grid = meta_ptr + row_chunk * (2 * LANES) + grid_lane[None, None, :]
        scale = tl.reshape(tl.load(grid, mask=ok, other=0.0), (BLOCK_N, STEPS * 32))
        offset = tl.reshape(tl.load(grid + LANES, mask=ok, other=0.0), (BLOCK_N, STEPS * 32))
    real = nibbles != PAD
    first = tl.where(real, (codes & 15).to(tl.float32) * scale + offset, 0.0)
    second = tl.where(real, (codes >> 4).to(tl.float32) * scale + offset, 0.0)
    return _expand(first, nibbles & 3, second, nibbles >> 2, BLOCK_N, STEPS * 32)


@triton.jit
def gemm24(x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, m_rows, out_features, half, stride_x, stride_y,
           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
           USE_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, half, STEPS * COLUMNS // 2):
        dense = _tile24(values_ptr, meta_ptr, rows, rows < out_features, start, half, BLOCK_N, STEPS)
        columns = 2 * start + tl.arange(0, STEPS * COLUMNS)
        x = tl.load(x_ptr + ms[:, None] * stride_x + columns[None, :],
                    mask=(ms < m_rows)[:, None] & (columns < 2 * half)[None, :], other=0.0)
        acc = _accumulate(acc, x, dense, USE_DOT)
    _store(acc, bias_ptr, y_ptr, ms, rows, m_rows, out_features, stride_y, HAS_BIAS)


@triton.jit
def gemm24q4(x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, m_rows, out_features, chunks, x_features, stride_x,
             stride_y, PAD: tl.constexpr, LANES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, STEPS: tl.constexpr, USE_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for first_chunk in range(0, chunks, STEPS):
        dense = _tile24q4(values_ptr, meta_ptr, rows, rows < out_features, first_chunk, chunks, PAD, LANES,
                          BLOCK_N, STEPS)
        columns = first_chunk * COLUMNS + tl.arange(0, STEPS * COLUMNS)
        x = tl.load(x_ptr + ms[:, None] * stride_x + columns[None, :],
                    mask=(ms < m_rows)[:, None] & (columns < x_features)[None, :], other=0.0)
        acc = _accumulate(acc, x, dense, USE_DOT)
    _store(acc, bias_ptr, y_ptr, ms, rows, m_rows, out_features, stride_y, HAS_BIAS)


@triton.jit
def expand24(values_ptr, meta_ptr, out_ptr, out_features, half, BLOCK_N: tl.constexpr):
    """The dense [out, in] weight into ``out`` (its dtype), one tile per program: for prefill."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.program_id(1) * (COLUMNS // 2)
    dense = _tile24(values_ptr, meta_ptr, rows, rows < out_features, start, half, BLOCK_N, 1)
    columns = 2 * start + tl.arange(0, COLUMNS)
    tl.store(out_ptr + rows[:, None] * (2 * half) + columns[None, :], dense.to(out_ptr.dtype.element_ty),
             mask=(rows < out_features)[:, None] & (columns < 2 * half)[None, :])


@triton.jit
def expand24q4(values_ptr, meta_ptr, out_ptr, out_features, chunks, in_features, PAD: tl.constexpr,
               LANES: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dense dequantized [out, in] weight into ``out`` (its dtype), one tile per program: for prefill."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dense = _tile24q4(values_ptr, meta_ptr, rows, rows < out_features, tl.program_id(1), chunks, PAD, LANES,
                      BLOCK_N, 1)
    columns = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
    tl.store(out_ptr + rows[:, None] * in_features + columns[None, :], dense.to(out_ptr.dtype.element_ty),
             mask=(rows < out_features)[:, None] & (columns < in_features)[None, :])


EXPAND_ROWS = 32  # output rows per program of the expand kernels (a [32, 128] tile)
