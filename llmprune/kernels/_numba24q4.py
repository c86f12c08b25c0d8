"""The numba kernels behind ``kernels.numba24q4`` (imported only when that backend runs: numba is optional).

Arrays are in the layout of ``numba24q4``: ``panels`` uint8 ``[blocks, chunks, 4, 48]`` and ``meta``
float32 ``[blocks, chunks, 4, 2, H]``; the kernels view them as one row per (block, chunk, row of the
block), the order they lie in memory. The claim loop, the residue split of ``x`` and the flags are
``_numba24``'s.

Everything that decodes a byte tests its bits (``pick``, ``place``: ``_numba24.has_bits``) or converts
the whole byte to float and splits it with a floor: integer arithmetic would be widened to 64 bits by
numba and LLVM would then vectorise 8 lanes at a time instead of 16.

``CHUNK`` and ``PAD`` come from ``numba24q4`` and are frozen into the compiled code; numba's disk cache
only notices edits to this file, so whoever changes them must touch this file too.
"""
import numpy as np
from numba import njit

from ._numba24 import _FLAGS, A1, A2, B2, B3, copy_columns, in_place, interleave, pick, place, residues, run_claims
from .numba24q4 import CHUNK, PAD

SIXTEENTH = np.float32(1 / 16)
SIXTEEN = np.float32(16)
# The bits pick tests (``_numba24.A1`` ...) in the nibble of groups 0-15 of a chunk (LOW) and 16-31 (HIGH).
LOW_A1, LOW_A2, LOW_B2, LOW_B3 = A1, A2, B2, B3
HIGH_A1, HIGH_A2, HIGH_B2, HIGH_B3 = A1 << 4, A2 << 4, B2 << 4, B3 << 4


@njit(inline="always", **_FLAGS)
def _codes(byte):
    """A code byte's two codes ``(low nibble, high nibble)`` as float32."""
    value = np.float32(byte)
    high = np.floor(value * SIXTEENTH)
    return value - SIXTEEN * high, high


@njit(inline="always", **_FLAGS)
def _group(pos, a1, a2, b2, b3, code, scale, offset, inputs):
    """One group's share of a row's dot product: its two codes dequantized in registers (``code·scale +
    offset``, exact in float32: the code, the integer zero point and an fp16 scale make products of at
    most 24 significant bits) times the two of its ``inputs`` (four residues) its positions name."""
    xa, xb = pick(pos, a1, a2, b2, b3, inputs)
    low, high = _codes(code)
    return (low * scale + offset) * xa + (high * scale + offset) * xb


@njit(inline="always", **_FLAGS)
def _planes(pos, a1, a2, b2, b3, code, scale, offset):
    """One group's two dequantized weights at their positions: ``(w0, w1, w2, w3)``."""
    low, high = _codes(code)
    return place(pos, a1, a2, b2, b3, low * scale + offset, high * scale + offset)


@njit(**_FLAGS)
def split(x, panels, meta):
    """``x`` ``[M, in]`` as ``residues``, ``in`` checked against the groups the panels hold (those before
    the padding nibbles of the last chunk)."""
    chunks = panels.shape[1]
    groups = (chunks - 1) * CHUNK
    last = panels[0, chunks - 1, 0]
    for lane in range(16):
        if last[lane] & 15 != PAD:
            groups += 1
        if last[lane] >> 4 != PAD:
            groups += 1
    return residues(x, groups, chunks * CHUNK)


@njit(inline="always", **_FLAGS)
def _row(acc, r, rows, row, l, grid, low, high):
    """Lane l of chunk row ``row`` into ``acc[r]``: groups l and 16 + l, with the inputs ``low`` and
    ``high`` (their four residues) and ``grid`` = (scale, offset) of each."""
    pos = rows[row, l]
    acc[r, l] += _group(pos, LOW_A1, LOW_A2, LOW_B2, LOW_B3, rows[row, 16 + l], grid[0], grid[1], low)
    acc[r, 16 + l] += _group(pos, HIGH_A1, HIGH_A2, HIGH_B2, HIGH_B3, rows[row, 32 + l], grid[2], grid[3], high)


@njit(inline="always", **_FLAGS)
def _pairs(grid, row, lanes):
    """(scale, offset) of groups 0-15 and of groups 16-31 of a chunk row with one or two pairs."""
    return grid[row, 0, 0], grid[row, 1, 0], grid[row, 0, lanes - 1], grid[row, 1, lanes - 1]


@njit(inline="always", **_FLAGS)
def _dot(operands, start, stop, y):
    """Blocks ``[start, stop)`` of ``y``: ``y[m, 4·blk + r]``, row ``4·blk + r`` of the weight dotted with
    ``x[m]``, dequantizing as it goes.

    One block of 4 output rows at a time: its panels are one contiguous stream, read from memory for
    the first row of x and from L1 for the others; lane l of a chunk handles groups l and 16 + l of all
    4 rows, which share their inputs, with the scales and offsets loaded once per chunk (or as vectors
    when the grid is finer than 64 columns, ``H`` = 32)."""
    panels, meta, xs = operands
    chunks = panels.shape[1]
    lanes = meta.shape[4]
    rows = panels.reshape(panels.shape[0] * chunks * 4, 48)
    grid = meta.reshape(meta.shape[0] * chunks * 4, 2, lanes)
    acc = np.empty((4, CHUNK), dtype=np.float32)
    for blk in range(start, min(stop, panels.shape[0])):
        for m in range(xs.shape[0]):
            x0, x1, x2, x3 = xs[m, 0], xs[m, 1], xs[m, 2], xs[m, 3]
            acc[:] = 0
            row = blk * chunks * 4
            for c in range(chunks):
                if lanes == CHUNK:
                    for r in range(4):
                        for l in range(16):
                            g = CHUNK * c + l
                            pairs = (grid[row + r, 0, l], grid[row + r, 1, l], grid[row + r, 0, 16 + l],
                                     grid[row + r, 1, 16 + l])
                            _row(acc, r, rows, row + r, l, pairs, (x0[g], x1[g], x2[g], x3[g]),
                                 (x0[g + 16], x1[g + 16], x2[g + 16], x3[g + 16]))
                else:
                    pairs0, pairs1 = _pairs(grid, row, lanes), _pairs(grid, row + 1, lanes)
                    pairs2, pairs3 = _pairs(grid, row + 2, lanes), _pairs(grid, row + 3, lanes)
                    for l in range(16):
                        g = CHUNK * c + l
                        low = (x0[g], x1[g], x2[g], x3[g])
                        high = (x0[g + 16], x1[g + 16], x2[g + 16], x3[g + 16])
                        _row(acc, 0, rows, row, l, pairs0, low, high)
                        _row(acc, 1, rows, row + 1, l, pairs1, low, high)
                        _row(acc, 2, rows, row + 2, l, pairs2, low, high)
                        _row(acc, 3, rows, row + 3, l, pairs3, low, high)
                row += 4
            for r in range(4):
                y[m, 4 * blk + r] = acc[r].sum()


@njit(**_FLAGS)
def gemm(state, panels, meta, xs, y, spare, caller):
    """``y`` ``[M, out]`` = ``x·Wᵀ`` from the residues ``xs`` (``spare``: where helpers write)."""
    return run_claims(_dot, copy_columns, (panels, meta, xs), state, y, spare, caller, True)


@njit(inline="always", **_FLAGS)
def _dense(operands, start, stop, out):
    """Rows ``4·start`` to ``4·stop`` of the dense weight (the panels without their padding): each half
    chunk as four position planes, then interleaved into its 64 columns."""
    panels, meta = operands
    chunks = panels.shape[1]
    lanes = meta.shape[4]
    columns = out.shape[1]
    rows = panels.reshape(panels.shape[0] * chunks * 4, 48)
    grid = meta.reshape(meta.shape[0] * chunks * 4, 2, lanes)
    low = np.empty((4, 16), dtype=np.float32)  # position planes of groups 0-15 of a chunk
    high = np.empty((4, 16), dtype=np.float32)  # and of groups 16-31
    scale = np.empty(CHUNK, dtype=np.float32)
    offset = np.empty(CHUNK, dtype=np.float32)
    for blk in range(start, min(stop, panels.shape[0])):
        for r in range(4):
            dense = out[4 * blk + r]
            for c in range(chunks):
                row = (blk * chunks + c) * 4 + r
                if lanes == CHUNK:
                    scale[:] = grid[row, 0]
                    offset[:] = grid[row, 1]
                else:
                    scale[:16], scale[16:] = grid[row, 0, 0], grid[row, 0, lanes - 1]
                    offset[:16], offset[16:] = grid[row, 1, 0], grid[row, 1, lanes - 1]
                for l in range(16):
                    low[0, l], low[1, l], low[2, l], low[3, l] = _planes(
                        rows[row, l], LOW_A1, LOW_A2, LOW_B2, LOW_B3, rows[row, 16 + l], scale[l], offset[l])
                    high[0, l], high[1, l], high[2, l], high[3, l] = _planes(
                        rows[row, l], HIGH_A1, HIGH_A2, HIGH_B2, HIGH_B3, rows[row, 32 + l], scale[16 + l],
                        offset[16 + l])
                begin = 128 * c
                interleave(low, dense, begin, min(64, columns - begin))
                if begin + 64 < columns:
                    interleave(high, dense, begin + 64, min(64, columns - begin - 64))


@njit(**_FLAGS)
def expand(state, panels, meta, out, caller):
    """The dense weight into ``out`` ``[out_features, in_features]``."""
    return run_claims(_dense, in_place, (panels, meta), state, out, out, caller, False)
