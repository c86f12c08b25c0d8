"""The numba kernels behind ``kernels.numba24``, and the pieces ``kernels._numba24q4`` shares (imported
only when those backends run: numba is optional).

Arrays are in the panel layout of ``numba24``: ``values`` ``[blocks, chunks, 4, 2, 16]`` and ``meta``
``[blocks, chunks, 4, 16]``; ``x`` is ``[M, in]``.
``fastmath`` is limited to reassociation and contraction, so sums may be reordered and fused into FMAs
(what lets LLVM vectorise the reductions) while NaN and inf keep their meaning.

Every kernel is serial and releases the GIL; ``numba24.parallel`` runs it on the calling thread
(``caller`` True) and on helper threads at once, and ``run_claims`` shares the work out: each thread
claims the next run of blocks with an atomic increment of ``state`` (int64: the fields ``numba24.NEXT``,
``DONE``, ``CLAIMS``, ``STEP``, then one flag per claim) until none is left, so a thread the OS
deschedules holds up at most the one run it took, never a fixed share of the rows (numba's ``prange``
splits the rows evenly between threads and waits for the slowest).

The constants imported from ``numba24`` are frozen into the compiled code, and numba's disk cache
only notices edits to this file: whoever changes them must touch this file too.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .numba24 import CLAIMS, DONE, FLAGS, HELPED, NEXT, OWN, PAD, STEP

_FLAGS = dict(fastmath={"reassoc", "contract"}, cache=True, boundscheck=False, nogil=True)


@intrinsic
def _add(typingctx, array, index, value):
    """Atomically ``array[index] += value`` (int64), returning the old value (``value`` 0: an atomic read)."""
    sig = types.int64(array, index, types.int64)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]], wraparound=False)
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")

    return sig, codegen


@njit(inline="always", **_FLAGS)
def run_claims(compute, copy, operands, state, out, spare, caller, redo):
    """Claim runs of blocks until none is left and ``compute(operands, start, stop, target)`` each: into
    ``out`` on the calling thread, into ``spare`` on a helper. Then the caller sees to the runs helpers
    took: it copies those they finished (``copy(spare, out, start, stop)``) and, with ``redo``, computes
    those still in flight itself rather than wait for a thread that may be descheduled (a late helper
    then writes only ``spare``). Without ``redo`` (``spare`` is ``out``) it returns False while some
    are in flight, and ``parallel`` waits. A helper returns True when it finished the last run."""
    step = state[STEP]
    while True:
        index = _add(state, NEXT, 1)
        if index >= state[CLAIMS]:
            break
        compute(operands, index * step, (index + 1) * step, out if caller else spare)
        _add(state, FLAGS + index, OWN if caller else HELPED)
        if _add(state, DONE, 1) + 1 == state[CLAIMS] and not caller:
            return True
    if not caller:
        return False
    for index in range(state[CLAIMS]):
        flag = _add(state, FLAGS + index, 0)
        if flag == HELPED:
            copy(spare, out, index * step, (index + 1) * step)
        elif flag != OWN:
            if not redo:
                return False
            compute(operands, index * step, (index + 1) * step, out)
    return True


@njit(inline="always", **_FLAGS)
def copy_columns(spare, out, start, stop):
    """The outputs of blocks ``[start, stop)``, columns ``4·start`` to ``4·stop`` of ``y`` ``[M, out]``."""
    for m in range(out.shape[0]):
        for column in range(4 * start, min(4 * stop, out.shape[1])):
            out[m, column] = spare[m, column]


@njit(inline="always", **_FLAGS)
def in_place(spare, out, start, stop):
    """Nothing to copy: the helpers wrote ``out`` itself."""


@intrinsic
def has_bits(typingctx, byte, mask):
    """``byte & mask != 0`` on 8 bits: numba widens integer arithmetic to 64 bits, which would make
    LLVM test 8 lanes at a time instead of 16 (or 64) bytes."""
    sig = types.boolean(types.uint8, types.uint8)

    def codegen(context, builder, signature, args):
        return builder.icmp_unsigned("!=", builder.and_(args[0], args[1]), ir.Constant(ir.IntType(8), 0))

    return sig, codegen


@intrinsic
def widen(typingctx, value):
    """A stored weight as float32: float32 as it is, bfloat16 (its bits, uint16) widened exactly, in
    registers (numba has no bfloat16 type; a bfloat16 is the high half of a float32's bits)."""
    if value == types.float32:
        return types.float32(value), lambda context, builder, signature, args: args[0]
    if value != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(bits, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(value), codegen


@intrinsic
def narrow(typingctx, value, array):
    """float32 ``value`` as an element of ``array``: as it is for float32, for bfloat16 bits (uint16) rounded
    to nearest even, NaN as 0x7FC0, as torch rounds."""
    if array.dtype == types.float32:
        return types.float32(value, array), lambda context, builder, signature, args: args[0]
    if array.dtype != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.lshr(builder.add(bits, builder.add(odd, ir.Constant(i32, 0x7FFF))), ir.Constant(i32, 16))
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(nan, ir.Constant(i32, 0x7FC0), rounded), ir.IntType(16))

    return types.uint16(value, array), codegen


@njit(inline="always", **_FLAGS)
def residues(x, groups, padded):
    """``x`` ``[M, 4·groups]`` as its residues mod 4, ``xs[m, p, g] = x[m, 4g + p]``, zero up to ``padded``
    groups: the four planes a kernel selects from with blends, never gathers."""
    if x.shape[1] != 4 * groups:
        raise ValueError("the 2:4 weight takes a different number of input features")
    xs = np.zeros((x.shape[0], 4, padded), dtype=np.float32)
    for m in range(x.shape[0]):
        for g in range(groups):
            for p in range(4):
                xs[m, p, g] = x[m, 4 * g + p]
    return xs


@njit(inline="always", **_FLAGS)
def interleave(planes, row, start, count):
    """Position planes ``[4, 16]`` (``planes[p, g]``: the weight at position p of group g) into the dense
    columns ``row[start:start + count]``: writing planes and then interleaving vectorises; writing the
    row directly made LLVM use scatters, which were slower."""
    for j in range(count):
        row[start + j] = narrow(planes[j & 3, j >> 2], row)


A1, A2, B3, B2 = np.uint8(1), np.uint8(2), np.uint8(4), np.uint8(8)  # the bits of a | b << 2 that pick tests
ZERO = np.float32(0.0)


@njit(inline="always", **_FLAGS)
def pick(code, a1, a2, b2, b3, inputs):
    """The two of a group's ``inputs`` (its four residues) its positions name, ``(x_a, x_b)``, as selects
    (no branches, no gathers), from the bits of ``a | b << 2`` (``a < b``): ``a1``: a == 1, ``a2``:
    a == 2, ``b2``: b >= 2, ``b3`` with ``b2``: b == 3 (the masks say where those bits sit in ``code``)."""
    x0, x1, x2, x3 = inputs
    xa = x2 if has_bits(code, a2) else (x1 if has_bits(code, a1) else x0)
    xb = (x3 if has_bits(code, b3) else x2) if has_bits(code, b2) else x1
    return xa, xb


@njit(inline="always", **_FLAGS)
def place(code, a1, a2, b2, b3, wa, wb):
    """A group's two weights at the positions ``code`` names (bits as in ``pick``): ``(w0, w1, w2, w3)``."""
    w0 = ZERO if has_bits(code, a1 | a2) else wa
    w1 = wa if has_bits(code, a1) else (ZERO if has_bits(code, b2) else wb)
    w2 = wa if has_bits(code, a2) else ((ZERO if has_bits(code, b3) else wb) if has_bits(code, b2) else ZERO)
    w3 = (wb if has_bits(code, b3) else ZERO) if has_bits(code, b2) else ZERO
    return w0, w1, w2, w3


@njit(**_FLAGS)
def split(x, values, meta):
    """``x`` ``[M, in]`` as ``residues``, ``in`` checked against the groups ``meta`` holds (those before
    the padding of its last chunk)."""
    chunks = meta.shape[1]
    groups = (chunks - 1) * 16
    while groups < chunks * 16 and meta[0, chunks - 1, 0, groups - (chunks - 1) * 16] != PAD:
        groups += 1
    return residues(x, groups, chunks * 16)


@njit(inline="always", **_FLAGS)
def _lane(part, r, values, meta, blk, c, lane, inputs):
    """Group ``16·c + lane`` of row ``4·blk + r`` into ``part[r, lane]``: its two kept values times the two
    of its ``inputs`` (four residues) its positions name."""
    xa, xb = pick(meta[blk, c, r, lane], A1, A2, B2, B3, inputs)
    part[r, lane] += widen(values[blk, c, r, 0, lane]) * xa + widen(values[blk, c, r, 1, lane]) * xb


@njit(inline="always", **_FLAGS)
def _dot(operands, start, stop, y):
    """Blocks ``[start, stop)`` of y: y[m, 4·blk + r] = Σ over groups of the two kept values times the
    inputs their positions name.

    One block of 4 output rows at a time: its panel is one contiguous stream (what the hardware
    prefetcher follows best), read from memory for the first row of x and from cache for the others;
    the 4 rows share each group's inputs, and the 4 × 16 partial sums stay in L1 until the block is done."""
    values, meta, xs = operands
    part = np.empty((4, 16), dtype=np.float32)
    for blk in range(start, min(stop, values.shape[0])):
        for m in range(xs.shape[0]):
            part[:] = 0
            for c in range(values.shape[1]):
                for lane in range(16):
                    g = 16 * c + lane
                    inputs = (xs[m, 0, g], xs[m, 1, g], xs[m, 2, g], xs[m, 3, g])
                    _lane(part, 0, values, meta, blk, c, lane, inputs)
                    _lane(part, 1, values, meta, blk, c, lane, inputs)
                    _lane(part, 2, values, meta, blk, c, lane, inputs)
                    _lane(part, 3, values, meta, blk, c, lane, inputs)
            for r in range(4):
                y[m, 4 * blk + r] = part[r].sum()


@njit(**_FLAGS)
def gemm(state, values, meta, xs, y, spare, caller):
    """``y`` ``[M, out]`` = ``x·Wᵀ`` from the residues ``xs`` (``spare``: where helpers write)."""
    return run_claims(_dot, copy_columns, (values, meta, xs), state, y, spare, caller, True)


@njit(inline="always", **_FLAGS)
def _dense(operands, start, stop, out):
    """Rows ``4·start`` to ``4·stop`` of the dense weight (the panels without their padding), each chunk
    built as four position planes and then interleaved into the row."""
    values, meta = operands
    groups = out.shape[1] // 4
    planes = np.empty((4, 16), dtype=np.float32)
    for blk in range(start, min(stop, values.shape[0])):
        for r in range(4):
            row = out[4 * blk + r]
            for c in range(values.shape[1]):
                for lane in range(16):
                    planes[0, lane], planes[1, lane], planes[2, lane], planes[3, lane] = place(
                        meta[blk, c, r, lane], A1, A2, B2, B3, widen(values[blk, c, r, 0, lane]),
                        widen(values[blk, c, r, 1, lane]))
                interleave(planes, row, 64 * c, 4 * min(16, groups - 16 * c))


@njit(**_FLAGS)
def expand(state, values, meta, out, caller):
    """The dense weight into ``out`` ``[out_features, in_features]``."""
    return run_claims(_dense, in_place, (values, meta), state, out, out, caller, False)
