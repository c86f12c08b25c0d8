"""The OBS column loop of ``sparsegpt.GPTQ._sweep`` inside one block, compiled with numba for CPU (imported
only where numba is installed and the sweep runs on CPU; ``sparsegpt._torch_columns`` is the same loop in
torch, for every other case, and the reference the tests hold this one to, bit for bit).

Why: each column of the torch loop is a dozen tiny tensor ops whose dispatch costs far more than their
arithmetic (576 columns per linear group, four groups a layer: most of SparseGPT's "process" phase on CPU,
eval/RESULTS.md). Given the block's factor rows, every row of W is swept on its own, so here each row runs
through the block's columns while it sits in L1, and rows are shared out among threads in runs
(``kernels.numba24.parallel``, the claim loop of the decode kernels).

Bit for bit the torch loop's results: no fastmath (no fused multiply-add, no reordering), the same
operations in the same dtype on every element, ties and NaN ranked as torch's stable sort ranks them.
The constants and helpers imported from ``kernels`` are frozen into numba's disk cache, which notices edits
to this file only: whoever changes them must touch this file too.
"""
import numpy as np
from numba import njit

from ..kernels._numba24 import in_place, run_claims

_FLAGS = dict(cache=True, boundscheck=False, nogil=True)  # no fastmath: the torch loop's rounding exactly
ROWS_PER_CLAIM_BLOCK = 8  # rows of W per unit of work that threads claim


@njit(inline="always", **_FLAGS)
def _before(a, i, b, k):
    """Score ``a`` (at index ``i``) sorts before ``b`` (at ``k``) in torch's stable ascending sort (NaN last)."""
    if a != a:
        return b != b and i < k
    if b != b:
        return True
    return a < b or (a == b and i < k)


@njit(inline="always", **_FLAGS)
def _rows(operands, first, last, block):
    """Rows ``[first, last)`` (in claim blocks) of ``block`` through columns ``j0 … j1 − 1`` (see ``sweep``)."""
    (hinv, d, keep, errors, codes, scales, zeros, zero, offset, j0, j1, n, m, decided, max_code, quantize) = operands
    rows, width = block.shape
    scores = np.empty(max(m, 1), dtype=block.dtype)
    for r in range(first * ROWS_PER_CLAIM_BLOCK, min(last * ROWS_PER_CLAIM_BLOCK, rows)):
        for j in range(j0, j1):
            column = offset + j
            if m > 0 and j % m == 0 and column < decided:  # an N:M group starts: its mask from the OBS scores
                finite = True
                for i in range(m):
                    value, diagonal = block[r, j + i], d[j + i]
                    scores[i] = (value * value) / (diagonal * diagonal)
                    finite &= scores[i] == scores[i]
                for i in range(m):  # rank = how many scores sort before this one; the m − n lowest are pruned
                    rank = 0
                    if finite:  # the common case, without branches: ties go to the lower index
                        for k in range(i):
                            rank += scores[k] <= scores[i]
                        for k in range(i + 1, m):
                            rank += scores[k] < scores[i]
                    else:
                        for k in range(m):
                            if k != i and _before(scores[k], k, scores[i], i):
                                rank += 1
                    keep[r, column + i] = rank >= m - n
            w = block[r, j]
            if quantize:
                scale, point = scales[r, j - j0], zeros[r, j - j0]
                if keep[r, column]:
                    code = np.uint8(min(max(np.rint(w / scale) + point, 0), max_code))
                else:
                    code = np.uint8(point)
                codes[r, column] = code
                q = (np.float32(code) - np.float32(point)) * np.float32(scale)  # float32, as a reader dequantizes
            else:
                q = w if keep[r, column] else zero[0]
            err = (w - q) / d[j]
            rest, factor = block[r, j + 1:], hinv[j, j + 1:]
            for k in range(width - j - 1):  # from 0 over slices: the form LLVM vectorises
                rest[k] = rest[k] - err * factor[k]
            block[r, j] = q
            errors[r, j] = err


@njit(**_FLAGS)
def sweep(state, block, hinv, d, keep, errors, codes, scales, zeros, zero, offset, j0, j1, n, m, decided, max_code,
          quantize, caller):
    """Columns ``j0 … j1 − 1`` of one block, in place: ``block`` ``[rows, width]`` (the block's current weights,
    those processed become their final values), ``hinv`` ``[width, width]`` and ``d`` ``[width]`` (the block's
    factor rows and diagonal), ``errors`` ``[rows, width]`` (each processed column's scaled error).
    ``keep`` and ``codes`` are ``[rows, columns]``, the block at column ``offset``; with ``m`` > 0 the masks of
    N:M groups starting before column ``decided`` are chosen here, other masks are read. With ``quantize``,
    kept weights are rounded to the grid ``scales``/``zeros`` ``[rows, j1 − j0]`` (already fitted) and their
    codes written. ``zero`` holds a 0 of the block's dtype."""
    return run_claims(_rows, in_place, (hinv, d, keep, errors, codes, scales, zeros, zero, offset, j0, j1, n, m,
                                        decided, max_code, quantize),
                      state, block, block, caller, False)
