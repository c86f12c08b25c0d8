"""The numba kernels behind ``kernels.cpu24`` (imported only when that backend runs: numba is optional).

Arrays are in the panel layout of ``cpu24``: ``values`` ``[blocks, chunks, 4, 2, 16]`` and ``meta``
``[blocks, chunks, 4, 16]``; ``x`` is ``[M, in]``.
``fastmath`` is limited to reassociation and contraction, so sums may be reordered and fused into FMAs
(what lets LLVM vectorise the reductions) while NaN and inf keep their meaning.
"""
import numpy as np
from numba import njit, prange

_FLAGS = dict(fastmath={"reassoc", "contract"}, cache=True, boundscheck=False, nogil=True)


@njit(inline="always", **_FLAGS)
def _pick(code, p0, p1, p2, p3):
    """The two inputs a group's byte ``a | b << 2`` names, as selects (no branches, no gathers)."""
    a = code & 3
    b = code >> 2
    xa = p1 if a == 1 else p0
    xa = p2 if a == 2 else xa
    xb = p2 if b == 2 else p1
    xb = p3 if b == 3 else xb
    return xa, xb


@njit(parallel=True, **_FLAGS)
def gemm(values, meta, x, y):
    """y[m, 4·blk + r] = Σ over groups of the two kept values times the inputs their positions name.

    One block of 4 output rows per iteration: its panel is one contiguous stream (what the hardware
    prefetcher follows best), read from memory for the first row of x and from cache for the others;
    the 4 × 16 partial sums stay in L1 until the block is done."""
    blocks, chunks = values.shape[0], values.shape[1]
    groups = (chunks - 1) * 16  # the real groups: the last chunk's codes before its padding (255)
    while groups < chunks * 16 and meta[0, chunks - 1, 0, groups - (chunks - 1) * 16] != 255:
        groups += 1
    if x.shape[1] != 4 * groups:
        raise ValueError("the 2:4 weight takes a different number of input features")
    # the inputs as their residues mod 4 (xs[m, p, c, lane] = x[m, 4·(16c + lane) + p]), zero-padded
    xs = np.zeros((x.shape[0], 4, chunks, 16), dtype=np.float32)
    for m in range(x.shape[0]):
        for g in range(groups):
            for p in range(4):
                xs[m, p, g // 16, g % 16] = x[m, 4 * g + p]
    acc = np.empty((blocks, 4, 16), dtype=np.float32)
    for blk in prange(blocks):
        part = acc[blk]
        for m in range(x.shape[0]):
            residues = xs[m]
            part[:] = 0
            for c in range(chunks):
                for r in range(4):
                    for lane in range(16):
                        xa, xb = _pick(meta[blk, c, r, lane], residues[0, c, lane], residues[1, c, lane],
                                       residues[2, c, lane], residues[3, c, lane])
                        part[r, lane] += values[blk, c, r, 0, lane] * xa + values[blk, c, r, 1, lane] * xb
            for r in range(4):
                y[m, 4 * blk + r] = part[r].sum()



@njit(parallel=True, **_FLAGS)
def expand(values, meta, out):
    """The dense weight into ``out`` ``[out_features, in_features]`` (the panels without their padding).

    Each chunk is built as four position planes (contiguous in the 16 groups, so the selects vectorise)
    and then interleaved into the row; writing the row directly made LLVM use scatters, which were slower."""
    groups = out.shape[1] // 4
    zero = np.float32(0.0)
    for blk in prange(values.shape[0]):
        planes = np.empty((4, 16), dtype=np.float32)
        for r in range(4):
            row = out[4 * blk + r]
            for c in range(values.shape[1]):
                v0 = values[blk, c, r, 0]
                v1 = values[blk, c, r, 1]
                codes = meta[blk, c, r]
                for lane in range(16):
                    a = codes[lane] & 3
                    b = codes[lane] >> 2
                    planes[0, lane] = v0[lane] if a == 0 else zero  # a < b: only the first value can sit at 0
                    planes[1, lane] = v0[lane] if a == 1 else (v1[lane] if b == 1 else zero)
                    planes[2, lane] = v0[lane] if a == 2 else (v1[lane] if b == 2 else zero)
                    planes[3, lane] = v1[lane] if b == 3 else zero
                segment = row[64 * c:64 * c + 4 * min(16, groups - 16 * c)]
                for j in range(segment.shape[0]):
                    segment[j] = planes[j & 3, j >> 2]
