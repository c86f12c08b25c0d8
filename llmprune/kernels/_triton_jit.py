"""The Triton JIT code of both 2:4 kernels (``triton24``: float values, ``triton24q4``: 4-bit codes), in one
module that imports triton at its top: the kernel modules import it on first use, so triton stays optional.

Both kernels work the same way. A program owns ``BLOCK_M`` rows of ``x`` and ``BLOCK_N`` output rows. Per
step it loads the packed weights of 128 input columns for its output rows (contiguous), expands them in
registers into the dense ``[BLOCK_N, 128]`` tile (``_expand``: each group's two kept values moved to
their positions, zeros elsewhere) and multiplies it with the ``[BLOCK_M, 128]`` slice of ``x``, a
contiguous load shared by all its output rows. So the weights are read once for all rows of ``x`` in the
program, and ``x`` is never gathered element by element. Small ``M`` (decode) reduce with elementwise
products; from ``DOT_M`` rows on, 16-bit inputs go through ``tl.dot`` (tensor cores), which makes the same
kernel fit prefill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

COLUMNS = tl.constexpr(128)  # input columns per step: a chunk row of the INT4 layout, 64 kept values of the float one
DOT_M = 16  # rows of x from which 16-bit inputs use tl.dot (its smallest tile side)


def blocks(m: int, dtype: torch.dtype) -> tuple[int, int, bool]:
    """``(BLOCK_M, BLOCK_N, USE_DOT)`` for ``m`` rows of ``x``: at M = 1, 16 output rows per program (256
    programs for 4096 outputs: every multiprocessor busy), fewer as more rows of x share the elementwise
    product (at most 8·8·128 elements), tensor-core tiles from ``DOT_M`` rows on."""
    if m >= DOT_M and dtype in (torch.float16, torch.bfloat16):
        return (16 if m < 64 else 64), 64, True
    block_m = min(triton.next_power_of_2(m), 8)
    return block_m, 16 if block_m <= 2 else 8, False


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
def gemm24(x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, m_rows, out_features, half, stride_x, stride_y,
           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr):
    """``values`` [out, in/2] (the kept values, column order), ``meta`` int32 [out, in/32] (2-bit positions)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < out_features
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    words_per_row = half // 16
    for start in range(0, half, COLUMNS // 2):
        kept = start + tl.arange(0, COLUMNS // 2)
        values = tl.load(values_ptr + rows[:, None] * half + kept[None, :],
                         mask=row_ok[:, None] & (kept < half)[None, :], other=0.0).to(tl.float32)
        word_index = start // 16 + tl.arange(0, COLUMNS // 32)
        words = tl.load(meta_ptr + rows[:, None] * words_per_row + word_index[None, :],
                        mask=row_ok[:, None] & (word_index < words_per_row)[None, :], other=0)
        positions = (words[:, :, None] >> (tl.arange(0, 16) * 2)[None, None, :]) & 3
        first, second = tl.split(tl.reshape(values, (BLOCK_N, COLUMNS // 4, 2)))
        first_pos, second_pos = tl.split(tl.reshape(positions, (BLOCK_N, COLUMNS // 4, 2)))
        dense = _expand(first, first_pos, second, second_pos, BLOCK_N, COLUMNS // 4)
        columns = 2 * start + tl.arange(0, COLUMNS)
        x = tl.load(x_ptr + ms[:, None] * stride_x + columns[None, :],
                    mask=(ms < m_rows)[:, None] & (columns < 2 * half)[None, :], other=0.0)
        acc = _accumulate(acc, x, dense, USE_DOT)
    _store(acc, bias_ptr, y_ptr, ms, rows, m_rows, out_features, stride_y, HAS_BIAS)


@triton.jit
def gemm24q4(x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, m_rows, out_features, chunks, x_features, stride_x,
             stride_y, PAD: tl.constexpr, LANES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr):
    """``values`` uint8 [out, chunks, 48] (16 position bytes, 32 code bytes per 128 columns), ``meta`` float32
    [out, chunks, 2, LANES] (scales, then offsets ``−zero·scale``): the ``triton24q4`` layout."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < out_features
    lane = tl.arange(0, 32)
    grid_lane = (lane * LANES) >> 5  # the group's (scale, offset) in its chunk row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for chunk in range(0, chunks):
        row_chunk = rows * chunks + chunk
        positions = tl.load(values_ptr + row_chunk[:, None] * 48 + tl.arange(0, 16)[None, :], mask=row_ok[:, None],
                            other=PAD | PAD << 4)
        codes = tl.load(values_ptr + row_chunk[:, None] * 48 + 16 + lane[None, :], mask=row_ok[:, None], other=0)
        # byte l holds group l in its low nibble and group 16 + l in its high one
        nibbles = tl.reshape(tl.permute(tl.join(positions & 15, positions >> 4), (0, 2, 1)), (BLOCK_N, 32))
        grid = meta_ptr + row_chunk[:, None] * (2 * LANES) + grid_lane[None, :]
        scale = tl.load(grid, mask=row_ok[:, None], other=0.0)
        offset = tl.load(grid + LANES, mask=row_ok[:, None], other=0.0)
        real = nibbles != PAD
        first = tl.where(real, (codes & 15).to(tl.float32) * scale + offset, 0.0)
        second = tl.where(real, (codes >> 4).to(tl.float32) * scale + offset, 0.0)
        dense = _expand(first, nibbles & 3, second, nibbles >> 2, BLOCK_N, 32)
        columns = chunk * COLUMNS + tl.arange(0, COLUMNS)
        x = tl.load(x_ptr + ms[:, None] * stride_x + columns[None, :],
                    mask=(ms < m_rows)[:, None] & (columns < x_features)[None, :], other=0.0)
        acc = _accumulate(acc, x, dense, USE_DOT)
    _store(acc, bias_ptr, y_ptr, ms, rows, m_rows, out_features, stride_y, HAS_BIAS)
