"""The Triton JIT code of both 2:4 kernels (``triton24``: float values, ``triton24q4``: 4-bit codes), in one
module that imports triton at its top: the kernel modules import it on first use, so triton stays optional.

Both kernels work the same way. A program owns ``BLOCK_M`` rows of ``x`` and ``BLOCK_N`` output rows, and
per step reads the packed weights of ``STEPS`` chunks of 128 input columns for its output rows: each
group's two kept values and their positions (``_kept24``, ``_kept24q4``). With several rows of ``x`` it
expands them in registers into the dense ``[BLOCK_N, 128·STEPS]`` tile (``_expand``) and multiplies that
with the contiguous ``[BLOCK_M, 128·STEPS]`` slice of ``x``: the weights are read once for all rows of
``x`` in the program; from ``DOT_M`` rows on, 16-bit inputs go through ``tl.dot`` (tensor cores). With one
row (decode) it picks each kept value's input instead (``_accumulate``). From ``PREFILL_M`` rows on the
callers expand the whole weight and use cuBLAS.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

COLUMNS = tl.constexpr(128)  # input columns per chunk: a chunk row of the INT4 layout, 64 kept values of the float one
# Rows of x from which 16-bit inputs use tl.dot, in tiles of at least 16 rows (its smallest side; fewer rows
# are masked). On an H200 the elementwise product over 8 rows took 1.5-7x as long as the 16-row dot tile
# over 16 (eval/RESULTS.md, "GPU, second session"), so from 5 rows on (the elementwise path would round them
# up to 8) the dot tile is the cheaper of the two.
DOT_M = 5
DOT_TILE = 16  # tl.dot's smallest tile side
# Rows of x from which the kernels' ``linear`` expands the weight for the call (``expand24``/``expand24q4``)
# and lets cuBLAS multiply. H200, fp16, 7B shapes (eval/RESULTS.md, "GPU, third session"): at 16 rows the
# dot tile took 19-47 µs (2:4) and 23-53 µs (2:4 + INT4) where expanding and cuBLAS took 25-72 µs; past 16
# rows the dot path needs a second tile and reads the weight again, while expanding costs the same at any M.
# 32 is an estimate of the crossover between those two measurements (M = 17-63 not yet timed).
PREFILL_M = 32
# (output rows per program, chunks per loop step) of each kernel: for one row of x, for 2-4 rows, for the
# tensor-core tile. The fastest on an H200 (scripts/tune_triton.py, fp16, the three Llama-2-7B shapes;
# eval/RESULTS.md, "GPU, third session"), among 1-16 rows and 1-32 chunks; they differ per kernel.
LAUNCH = {"2:4": ((1, 8), (4, 16), (16, 2)), "2:4+int4": ((8, 4), (8, 16), (16, 1))}


class Blocks(NamedTuple):
    block_m: int  # rows of x per program
    block_n: int  # output rows per program
    steps: int  # chunks of COLUMNS per loop iteration
    use_dot: bool
    num_warps: int


def blocks(m: int, dtype: torch.dtype, kernel: str = "2:4", block_n: int | None = None, block_m: int | None = None,
           steps: int | None = None) -> Blocks:
    """The launch shape of ``kernel`` ("2:4" or "2:4+int4", keys of ``LAUNCH``) for ``m`` rows of ``x`` (any
    of the three sizes may be given). Decode is bound by memory latency: each program's loop issues one
    step's loads at a time, so a step spans several chunks to keep bytes in flight, over few output rows per
    program (many programs); ``LAUNCH`` holds the measured sizes. From ``DOT_M`` rows on, 16-bit inputs
    take tensor-core tiles; 8 rows of float32 x keep the first guess (8 output rows, 4 chunks: not timed)."""
    one, few, tile = LAUNCH[kernel]
    if m >= DOT_M and dtype in (torch.float16, torch.bfloat16):
        default = Blocks(DOT_TILE if m < 64 else 64, *tile, True, 4)
    else:
        rows = min(triton.next_power_of_2(m), 8)
        default = Blocks(rows, *(one if rows == 1 else few if rows <= 4 else (8, 4)), False, 4)
    chosen = default._replace(**{k: v for k, v in (("block_m", block_m), ("block_n", block_n), ("steps", steps)) if v})
    # the elementwise product holds block_m·block_n·steps·COLUMNS floats: 8 warps from 64 per thread at 4 on
    # (the one-row path holds a quarter of that plus as many partial sums; LAUNCH was swept under this rule)
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
def _accumulate(acc, x_ptr, ms, m_ok, first_column, x_features, stride_x, first, first_pos, second, second_pos,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, USE_DOT: tl.constexpr):
    """acc + x · Wᵀ over the ``GROUPS`` groups of 4 columns from ``first_column``, W given by its kept values
    and their positions ([BLOCK_N, GROUPS] each), summed in float32. With several rows of x, W is expanded
    into its dense tile once for all of them: through ``tl.dot`` (tensor cores) or elementwise. One row of x
    (decode) picks each kept value's input instead, from four strided loads of x, and adds into one partial
    sum per group: nothing is rearranged or reduced across threads inside the loop (H200, M = 1: the best
    configurations 1.07-1.24x faster than the expanded tile's; slower with more rows, each paying for the
    picking that one shared tile does once)."""
    if BLOCK_M == 1:
        columns = 4 * tl.arange(0, GROUPS) + first_column  # each group's first column
        row = x_ptr + ms[:, None] * stride_x + columns[None, :]
        ok = m_ok[:, None] & (columns < x_features)[None, :]
        x0 = tl.load(row, mask=ok, other=0.0).to(tl.float32)[:, None, :]
        x1 = tl.load(row + 1, mask=ok, other=0.0).to(tl.float32)[:, None, :]
        x2 = tl.load(row + 2, mask=ok, other=0.0).to(tl.float32)[:, None, :]
        x3 = tl.load(row + 3, mask=ok, other=0.0).to(tl.float32)[:, None, :]
        p, q = first_pos[None, :, :], second_pos[None, :, :]  # first < second: p in 0-2, q in 1-3
        x_first = tl.where(p == 0, x0, tl.where(p == 1, x1, x2))
        x_second = tl.where(q == 3, x3, tl.where(q == 2, x2, x1))
        acc += first[None, :, :] * x_first + second[None, :, :] * x_second
    else:
        columns = tl.arange(0, 4 * GROUPS) + first_column
        x = tl.load(x_ptr + ms[:, None] * stride_x + columns[None, :],
                    mask=m_ok[:, None] & (columns < x_features)[None, :], other=0.0)
        dense = _expand(first, first_pos, second, second_pos, BLOCK_N, GROUPS)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(dense.to(x.dtype)))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * dense[None, :, :], axis=2)
    return acc


@triton.jit
def _zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """The accumulator ``_accumulate`` adds to: for one row of x, one partial sum per group, reduced once in
    ``_store``."""
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_M, BLOCK_N, GROUPS], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return acc


@triton.jit
def _store(acc, bias_ptr, y_ptr, ms, rows, m_rows, out_features, stride_y, HAS_BIAS: tl.constexpr,
           BLOCK_M: tl.constexpr):
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < out_features, other=0.0).to(tl.float32)[None, :]
    ok = (ms < m_rows)[:, None] & (rows < out_features)[None, :]
    tl.store(y_ptr + ms[:, None] * stride_y + rows[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _kept24(values_ptr, meta_ptr, rows, row_ok, start, half, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
            PER_GROUP: tl.constexpr):
    """First and second kept values of each group of ``rows`` from kept value ``start`` on, as float32, and
    their positions (0-3): [BLOCK_N, STEPS·COLUMNS/4] each. ``values`` [out, in/2] (the kept values, column
    order), ``meta`` int32 [out, in/32] (2-bit positions). ``PER_GROUP`` loads them group by group (each
    lane reads its group's values and meta word: no rearrangement; fastest for one row of x, 12.7 against
    16 µs); otherwise one contiguous load is split in registers (2.4x faster for the tile paths, H200)."""
    if PER_GROUP:
        groups = start // 2 + tl.arange(0, STEPS * COLUMNS // 4)
        ok = row_ok[:, None] & (groups < half // 2)[None, :]
        kept = values_ptr + rows[:, None] * half + 2 * groups[None, :]
        first = tl.load(kept, mask=ok, other=0.0).to(tl.float32)
        second = tl.load(kept + 1, mask=ok, other=0.0).to(tl.float32)
        # a meta word holds the 16 positions of 8 groups, 2 bits each, in kept-value order
        words = tl.load(meta_ptr + rows[:, None] * (half // 16) + (groups // 8)[None, :], mask=ok, other=0)
        shift = 4 * (groups % 8)[None, :]
        first_pos = (words >> shift) & 3
        second_pos = (words >> (shift + 2)) & 3
    else:
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
    return first, first_pos, second, second_pos


@triton.jit
def _kept24q4(values_ptr, meta_ptr, rows, row_ok, first_chunk, chunks, PAD: tl.constexpr, LANES: tl.constexpr,
              BLOCK_N: tl.constexpr, STEPS: tl.constexpr):
    """As ``_kept24``, from chunk ``first_chunk`` on, dequantized: ``values`` uint8 [out, chunks, 48] (16
    position bytes, 32 code bytes per 128 columns), ``meta`` float32 [out, chunks, 2, LANES] (scales, then
    offsets ``−zero·scale``): the ``triton24q4`` layout. A padding group's values are 0."""
    lane = tl.arange(0, 32)
    chunk = first_chunk + tl.arange(0, STEPS)
    ok = (row_ok[:, None] & (chunk < chunks)[None, :])[:, :, None]  # [BLOCK_N, STEPS, 1]
    row_chunk = (rows[:, None] * chunks + chunk[None, :])[:, :, None]
    # byte l holds group l in its low nibble and group 16 + l in its high one: each lane reads its group's
    # byte (lanes l and 16 + l the same one) and shifts, so the groups stay in order without a shuffle
    positions = tl.load(values_ptr + row_chunk * 48 + (lane % 16)[None, None, :], mask=ok, other=PAD | PAD << 4)
    nibbles = tl.reshape((positions >> (4 * (lane // 16))[None, None, :]) & 15, (BLOCK_N, STEPS * 32))
    codes = tl.reshape(tl.load(values_ptr + row_chunk * 48 + 16 + lane[None, None, :], mask=ok, other=0),
                       (BLOCK_N, STEPS * 32))
    if LANES == 1:  # one (scale, offset) per chunk row (group size 128): load it once, not once per group
        scale = tl.load(meta_ptr + row_chunk * 2, mask=ok, other=0.0)
        offset = tl.load(meta_ptr + row_chunk * 2 + 1, mask=ok, other=0.0)
        scale = tl.reshape(tl.broadcast_to(scale, (BLOCK_N, STEPS, 32)), (BLOCK_N, STEPS * 32))
        offset = tl.reshape(tl.broadcast_to(offset, (BLOCK_N, STEPS, 32)), (BLOCK_N, STEPS * 32))
    else:
        grid = meta_ptr + row_chunk * (2 * LANES) + ((lane * LANES) >> 5)[None, None, :]  # the group's lane
        scale = tl.reshape(tl.load(grid, mask=ok, other=0.0), (BLOCK_N, STEPS * 32))
        offset = tl.reshape(tl.load(grid + LANES, mask=ok, other=0.0), (BLOCK_N, STEPS * 32))
    real = nibbles != PAD
    first = tl.where(real, (codes & 15).to(tl.float32) * scale + offset, 0.0)
    second = tl.where(real, (codes >> 4).to(tl.float32) * scale + offset, 0.0)
    return first, nibbles & 3, second, nibbles >> 2


@triton.jit
def gemm24(x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, m_rows, out_features, half, stride_x, stride_y,
           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
           USE_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = _zeros(BLOCK_M, BLOCK_N, STEPS * COLUMNS // 4)
    for start in range(0, half, STEPS * COLUMNS // 2):
        first, first_pos, second, second_pos = _kept24(values_ptr, meta_ptr, rows, rows < out_features, start,
                                                       half, BLOCK_N, STEPS, BLOCK_M == 1)
        acc = _accumulate(acc, x_ptr, ms, ms < m_rows, 2 * start, 2 * half, stride_x, first, first_pos, second,
                          second_pos, BLOCK_M, BLOCK_N, STEPS * COLUMNS // 4, USE_DOT)
    _store(acc, bias_ptr, y_ptr, ms, rows, m_rows, out_features, stride_y, HAS_BIAS, BLOCK_M)


@triton.jit
def gemm24q4(x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, m_rows, out_features, chunks, x_features, stride_x,
             stride_y, PAD: tl.constexpr, LANES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, STEPS: tl.constexpr, USE_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = _zeros(BLOCK_M, BLOCK_N, STEPS * COLUMNS // 4)
    for first_chunk in range(0, chunks, STEPS):
        first, first_pos, second, second_pos = _kept24q4(values_ptr, meta_ptr, rows, rows < out_features,
                                                         first_chunk, chunks, PAD, LANES, BLOCK_N, STEPS)
        acc = _accumulate(acc, x_ptr, ms, ms < m_rows, first_chunk * COLUMNS, x_features, stride_x, first,
                          first_pos, second, second_pos, BLOCK_M, BLOCK_N, STEPS * COLUMNS // 4, USE_DOT)
    _store(acc, bias_ptr, y_ptr, ms, rows, m_rows, out_features, stride_y, HAS_BIAS, BLOCK_M)


@triton.jit
def expand24(values_ptr, meta_ptr, out_ptr, out_features, half, BLOCK_N: tl.constexpr):
    """The dense [out, in] weight into ``out`` (its dtype), one tile per program: for prefill."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.program_id(1) * (COLUMNS // 2)
    first, first_pos, second, second_pos = _kept24(values_ptr, meta_ptr, rows, rows < out_features, start, half,
                                                   BLOCK_N, 1, False)
    dense = _expand(first, first_pos, second, second_pos, BLOCK_N, COLUMNS // 4)
    columns = 2 * start + tl.arange(0, COLUMNS)
    tl.store(out_ptr + rows[:, None] * (2 * half) + columns[None, :], dense.to(out_ptr.dtype.element_ty),
             mask=(rows < out_features)[:, None] & (columns < 2 * half)[None, :])


@triton.jit
def expand24q4(values_ptr, meta_ptr, out_ptr, out_features, chunks, in_features, PAD: tl.constexpr,
               LANES: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dense dequantized [out, in] weight into ``out`` (its dtype), one tile per program: for prefill."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first, first_pos, second, second_pos = _kept24q4(values_ptr, meta_ptr, rows, rows < out_features,
                                                     tl.program_id(1), chunks, PAD, LANES, BLOCK_N, 1)
    dense = _expand(first, first_pos, second, second_pos, BLOCK_N, COLUMNS // 4)
    columns = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
    tl.store(out_ptr + rows[:, None] * in_features + columns[None, :], dense.to(out_ptr.dtype.element_ty),
             mask=(rows < out_features)[:, None] & (columns < in_features)[None, :])


EXPAND_ROWS = 32  # output rows per program of the expand kernels (a [32, 128] tile)
