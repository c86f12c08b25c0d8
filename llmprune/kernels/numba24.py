"""A numba 2:4 kernel for CPU decode: ``y = x·Wᵀ (+ b)`` reading only the kept values and their positions.

Batch-1 decode is memory-bound: every token streams every weight once, and the weights of a whole
model do not fit in cache. Dense float32 costs 16 bytes per group of 4 inputs; this layout costs 9
(two float32 values and one byte holding both positions), so the ceiling is 16/9 ≈ 1.78×; a bfloat16
model keeps bfloat16 values, 5 bytes against 8 (1.6×), which the kernels widen to float32 in registers.

Layout (built once at load time, the weight's float32 or bfloat16), in panels of 4 output rows × 16
groups of 4 inputs:

- ``values`` ``[out/4, chunks, 4, 2, 16]``: for each block of 4 rows and each chunk of 16 groups, the
  first and then the second kept value of each row's 16 groups;
- ``meta`` uint8 ``[out/4, chunks, 4, 16]``: ``a | b << 2`` with ``a < b`` the positions (0-3) of the
  kept values; 255 marks the groups that pad ``in/4`` up to a multiple of 16 (their values are 0).

Why it is fast: a block's panel is one contiguous stream, which the hardware prefetcher follows (one
array per row would be a dozen streams per block, and measured half the bandwidth); the inputs are
split into their four residues mod 4, so the kernel never gathers: for each group it loads all four,
selects the two the positions name (blends) and accumulates two FMAs, 16 groups per vector. For a few
rows of ``x`` (decode with a small batch) the panel stays in L1/L2 while every row of ``x`` passes over
it; for more rows (prefill: past ``fused_rows``, 16 to 64 by the weight's size) the weight is expanded
to dense a tile at a time and torch's GEMM multiplies each tile, since a dense GEMM is compute-bound there and
2:4 saves no arithmetic on CPU.

Threads: the compiled kernels are serial; ``parallel`` (below, shared with ``numba24q4``) runs them on
this thread alone or with helper threads, whichever measured faster for that kernel and size, up to
``torch.get_num_threads()``.
"""
from __future__ import annotations

import atexit
import os
import queue
import threading
import time

import numpy as np
import torch

from ..errors import LLMPruneError
from ..packing import stored_positions

MAX_FUSED_ROWS = 16  # rows of x every layer runs fused (eval/results/q4_kernels.md)
# A large layer runs more, up to a cap, one more row per so many bytes of its float32 weight, by the dtype of
# the GEMM that expanding would run: bfloat16 GEMMs are ~4× faster here, so expanding pays sooner
# (eval/RESULTS.md, "Prefill" and "Prefill in tiles").
FUSED_ROWS = {torch.float32: (64, 256 << 10), torch.bfloat16: (64, 1 << 20)}  # dtype → (cap, bytes per row)
TILE_BYTES = 16 << 20  # of the dense weight expanded at a time for prefill (``expanded_linear``)
LANES = 16  # groups per chunk (one AVX-512 vector of float32)
PAD = 255  # meta code of a padding group
LAYOUT_DTYPES = (torch.float32, torch.bfloat16)  # of the kept values (bfloat16 widened to float32 in registers)


def unavailable(weight: torch.Tensor) -> str | None:
    """Why the CPU 2:4 kernel cannot run ``weight`` ``[out, in]`` (None when it can)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return "numba is not installed (pip install numba, or llmprune[kernels])"
    if weight.device.type != "cpu":
        return f"weight is on {weight.device.type}; the numba kernel runs on CPU"
    if weight.dtype not in LAYOUT_DTYPES:
        return f"dtype {weight.dtype} (the numba kernel keeps float32 or bfloat16 weights)"
    if weight.shape[0] % 4:
        return f"out_features {weight.shape[0]} is not a multiple of 4"
    return None


def to_layout(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 ``[out, in]`` → (``values`` ``[out/4, chunks, 4, 2, 16]``, ``meta`` ``[out/4, chunks, 4, 16]``)."""
    out_features, in_features = weight.shape
    if out_features % 4:
        raise LLMPruneError(f"{name}: the numba 2:4 layout needs out_features divisible by 4; it has {out_features}")
    stored = stored_positions(weight, name)  # exactly two per group of 4, ascending
    groups = in_features // 4
    chunks = -(-groups // LANES)
    columns = stored.nonzero()[:, 1].reshape(out_features, groups, 2)
    values = torch.zeros(out_features, chunks * LANES, 2, dtype=weight.dtype)
    values[:, :groups] = weight.gather(1, columns.flatten(1)).reshape(out_features, groups, 2) + 0.0  # −0.0 → +0.0
    meta = torch.full((out_features, chunks * LANES), PAD, dtype=torch.uint8)
    positions = columns % 4
    meta[:, :groups] = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)
    panels = values.reshape(out_features // 4, 4, chunks, LANES, 2).permute(0, 2, 1, 4, 3)
    return panels.contiguous(), meta.reshape(out_features // 4, 4, chunks, LANES).permute(0, 2, 1, 3).contiguous()


CLAIMS_PER_THREAD = 16  # runs of blocks per thread and call: a descheduled thread holds up one of them
MIN_HELPED_WORK = 64 << 10  # bytes below which a call never wakes helpers (it is done before they start)
EXPLORE = 16  # every EXPLORE-th call of a kind runs the way that measured slower, to notice when that changes
SMOOTHING = 0.25  # weight of the newest call in the running mean time of each way
SPIN_SECONDS = 50e-6  # how long a caller polls for a helper's last claim before it sleeps until woken
NEXT, DONE, CLAIMS, STEP, FLAGS = range(5)  # the fields of a parallel call's int64 state; FLAGS: the first claim's flag
HELPED, OWN = 1, 2  # a claim's flag once a helper (into the spare output) or the caller (into the output) did it
_CPUS = os.cpu_count() or 1


class _Job(threading.Event):
    """Set by the helper that finishes a call's last claim (or fails)."""

    error: BaseException | None = None


class _Helpers:
    """Threads that run a kernel's claim loop beside the calling thread (see ``parallel``): each takes
    ``(kernel, state, args, job)`` off one queue. Started on first use; a forked child starts its own.
    They are stopped at exit: a daemon thread still inside a kernel when the interpreter finalizes is
    killed as it takes the GIL back, which aborts the process."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def ensure(self, count: int) -> None:
        with self.lock:
            while len(self.threads) < count:
                thread = threading.Thread(target=self._serve, name="llmprune-numba", daemon=True)
                thread.start()
                self.threads.append(thread)

    def stop(self) -> None:
        with self.lock:
            for _ in self.threads:
                self.jobs.put(None)
            for thread in self.threads:
                thread.join(timeout=5)
            self.threads = []

    def _serve(self) -> None:
        while (item := self.jobs.get()) is not None:
            kernel, state, args, job = item
            if state[NEXT] >= state[CLAIMS]:
                continue  # every claim was taken before this thread woke
            try:
                if kernel(state, *args, False):
                    job.set()
            except BaseException as exc:  # noqa: BLE001 (the caller re-raises it)
                job.error = exc
                job.set()


_HELPERS = _Helpers()
os.register_at_fork(after_in_child=_HELPERS.__init__)
atexit.register(_HELPERS.stop)


def _state(blocks: int, threads: int) -> np.ndarray:
    step = -(-blocks // (CLAIMS_PER_THREAD * threads)) if threads > 1 else blocks
    claims = -(-blocks // step)
    state = np.zeros(FLAGS + claims, dtype=np.int64)
    state[CLAIMS], state[STEP] = claims, step
    return state


def _helped(kernel, blocks: int, threads: int, args: tuple) -> None:
    """``kernel``'s claim loop on this thread and ``threads - 1`` helpers; returns when every claim is done
    (``_numba24.run_claims``: a kernel that recomputes the claims still in flight returns at once)."""
    state = _state(blocks, threads)
    _HELPERS.ensure(threads - 1)
    job = _Job()
    for _ in range(threads - 1):
        _HELPERS.jobs.put((kernel, state, args, job))
    if kernel(state, *args, True):
        return
    deadline = time.perf_counter() + SPIN_SECONDS  # a claim in flight is usually done within microseconds
    while state[DONE] < state[CLAIMS] and time.perf_counter() < deadline:
        os.sched_yield()  # to a helper waiting for this core
    if state[DONE] < state[CLAIMS]:
        job.wait()
    if job.error is not None:
        raise job.error


_TIMES: dict = {}  # (kernel, size class, threads) → [calls, mean seconds alone, mean seconds helped]


def _use_helpers(record: list) -> bool:
    """Alone first, then helped, then whichever has the lower mean time, but the other every EXPLORE-th call."""
    calls, alone, helped = record
    return alone is not None and (helped is None or (helped < alone) != (calls % EXPLORE == 0))


def parallel(kernel, blocks: int, work: int, *args) -> None:
    """Run ``kernel(state, *args)`` over ``blocks`` blocks of rows, alone or with helper threads (up to
    ``torch.get_num_threads()`` in all), whichever has been faster for calls of this kernel and size
    (``work``: the bytes the call reads or writes).

    Why not numba's ``prange``: it splits the rows evenly and waits for every thread, and its OpenMP
    layer (the default where torch has loaded libgomp) spins while it waits and resets torch's thread
    count; with another process on the cores a call waited for a descheduled thread for milliseconds
    (eval/results/q4_kernels.md). Here the threads claim small runs of blocks, and the caller of a GEMV
    computes any run a helper still holds instead of waiting for it (the expansion's caller sleeps until
    it is done; it never spins for long). Even so, with the cores busy a helper often starts too late to
    pay for waking it, while a free core lets it take up to half of a large call: which way wins is
    measured on the calls themselves, since results do not depend on it (threads split rows, never a
    row's sum)."""
    threads = min(torch.get_num_threads(), _CPUS, blocks)
    if threads <= 1 or work < MIN_HELPED_WORK:
        kernel(_state(blocks, 1), *args, True)
        return
    record = _TIMES.setdefault((kernel, work.bit_length(), threads), [0, None, None])
    record[0] += 1
    use_helpers = _use_helpers(record)
    start = time.perf_counter()
    if use_helpers:
        _helped(kernel, blocks, threads, args)
    else:
        kernel(_state(blocks, 1), *args, True)
    mean = record[2 if use_helpers else 1]
    seconds = time.perf_counter() - start
    record[2 if use_helpers else 1] = seconds if mean is None else mean + SMOOTHING * (seconds - mean)


def fused_rows(out_features: int, in_features: int, dtype: torch.dtype = torch.float32) -> int:
    """How many rows of x (of ``dtype``) a layer runs fused before expanding its weight pays: at least
    ``MAX_FUSED_ROWS``, more for a large weight, whose expansion costs more than the GEMM saves on the
    first rows (measured: ``scripts/bench_prefill_rows.py``)."""
    cap, bytes_per_row = FUSED_ROWS[gemm_dtype(dtype)]
    return max(MAX_FUSED_ROWS, min(cap, out_features * in_features * 4 // bytes_per_row))


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a call of ``dtype`` rows runs its expanded GEMM in: bfloat16 for bfloat16, as its dense model
    does (the CPU's bf16 dot products); float32 otherwise (CPU float16 GEMMs are slower than float32 ones)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def array(tensor: torch.Tensor) -> np.ndarray:
    """A layout tensor as the kernels take it: a numpy view, bfloat16 as its bits (uint16: numba has no
    bfloat16; the kernels widen and narrow the bits, ``_numba24.widen``/``narrow``)."""
    return (tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor).detach().numpy()


def expand(kernels, values: torch.Tensor, meta: torch.Tensor, in_features: int, dtype: torch.dtype,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``[out, in]`` weight of a panel layout (or of its blocks ``values``/``meta`` hold) in ``dtype``
    (float32 or bfloat16: rounded to nearest even, as ``Tensor.to`` rounds), written by ``kernels.expand``
    into ``out`` when given."""
    dense = torch.empty(values.shape[0] * 4, in_features, dtype=dtype) if out is None else out
    parallel(kernels.expand, values.shape[0], dense.nbytes, array(values), array(meta), array(dense))
    return dense


def expanded_linear(kernels, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``x·Wᵀ + b`` for prefill-sized ``x``: the weight expanded ``TILE_BYTES`` at a time, in ``gemm_dtype``,
    each tile multiplied while it is in cache. One whole dense copy would be written out to memory and read
    back, and past glibc's mmap threshold (32 MiB at most) every call maps it afresh and faults in every page:
    12 ms of a 15 ms float32 expansion of 5632 × 2048 (eval/RESULTS.md, "Prefill in tiles")."""
    if x.shape[-1] != in_features:
        raise LLMPruneError(f"x has {x.shape[-1]} input features; the 2:4 weight takes {in_features}")
    dtype = gemm_dtype(x.dtype)
    rows = x.detach().reshape(-1, in_features).to(dtype)
    blocks = values.shape[0]
    step = max(1, TILE_BYTES // (4 * in_features * rows.element_size()))  # blocks of 4 rows per tile
    tile = torch.empty(4 * min(step, blocks), in_features, dtype=dtype)
    transposed = torch.empty(4 * blocks, rows.shape[0], dtype=dtype)  # yᵀ: each tile's rows are contiguous
    for start in range(0, blocks, step):
        stop = min(start + step, blocks)
        weight = expand(kernels, values[start:stop], meta[start:stop], in_features, dtype, tile[:4 * (stop - start)])
        if bias is None:
            torch.mm(weight, rows.T, out=transposed[4 * start:4 * stop])
        else:
            torch.addmm(bias[4 * start:4 * stop, None].to(dtype), weight, rows.T, out=transposed[4 * start:4 * stop])
    return transposed.T.contiguous().view(*x.shape[:-1], 4 * blocks).to(x.dtype)


def fused(kernels, x: torch.Tensor, rows: torch.Tensor, values: np.ndarray, meta: np.ndarray,
          bias: torch.Tensor | None) -> torch.Tensor:
    """``rows`` (``x`` flattened, float32) times the weight in ``(values, meta)`` (``array`` views), transposed,
    plus ``bias``, in ``x``'s dtype, with ``kernels.split`` and ``kernels.gemm`` of a panel layout
    (``values`` ``[out/4, ...]``)."""
    blocks = values.shape[0]
    try:  # the size check of split (the kernels read x without bounds checks)
        xs = kernels.split(rows.contiguous().numpy(), values, meta)
    except ValueError as exc:
        raise LLMPruneError(f"x has {x.shape[-1]} input features: {exc}") from None
    y_np = np.empty((rows.shape[0], blocks * 4), dtype=np.float32)
    parallel(kernels.gemm, blocks, (values.nbytes + meta.nbytes) * rows.shape[0], values, meta, xs, y_np,
             np.empty_like(y_np))
    y = torch.from_numpy(y_np)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], blocks * 4).to(x.dtype)


INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def run(kernels, kernel: str, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, in_features: int,
        bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` of a panel layout (both numba kernels): up to ``fused_rows`` rows of ``x`` in the fused
    kernel, which computes in float32 from the exact weights whatever ``x``'s dtype; more (prefill) through
    the weight expanded for this call, a tile at a time, and torch's GEMM in ``gemm_dtype``
    (``expanded_linear``). ``kernel`` names it in errors."""
    if values.device.type != "cpu" or x.device.type != "cpu":
        raise LLMPruneError(f"the {kernel} runs on CPU (weight on {values.device.type}, x on {x.device.type}); "
                            "load the checkpoint on the target device with backend='auto'")
    if x.dtype not in INPUT_DTYPES:
        raise LLMPruneError(f"the {kernel} takes float32, bfloat16 or float16 inputs, got {x.dtype}")
    rows = x.detach().reshape(-1, x.shape[-1])
    if rows.shape[0] > fused_rows(values.shape[0] * 4, in_features, x.dtype):
        return expanded_linear(kernels, x, values, meta, in_features, bias)
    return fused(kernels, x, rows.float(), array(values), array(meta), bias)


class Bound:
    """A layer's ``run`` with what does not depend on ``x`` done once (the compiled kernels, numpy views of
    the layout, the fused-row limit of each dtype): ``SparseLinear`` binds it, and a decode step makes
    hundreds of these calls, each a few tens of µs, where the generic path's checks and conversions cost as
    much again (eval/RESULTS.md). Anything the fast path does not take (another device, autograd, more rows
    than ``fused_rows``, a layout whose storage was replaced) goes to ``run``, which checks it and says what
    is wrong."""

    def __init__(self, kernels, kernel: str, values: torch.Tensor, meta: torch.Tensor, in_features: int) -> None:
        self.kernels, self.kernel, self.in_features = kernels, kernel, in_features
        self.max_elements = {dtype: fused_rows(values.shape[0] * 4, in_features, dtype) * in_features
                             for dtype in INPUT_DTYPES}  # of x, run fused
        self.values, self.meta = values, meta
        self.pointers = (values.data_ptr(), meta.data_ptr())
        self.arrays = (array(values), array(meta)) if values.device.type == "cpu" else None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (self.arrays is None or x.device.type != "cpu" or x.requires_grad
                or x.numel() > self.max_elements.get(x.dtype, -1)
                or (self.values.data_ptr(), self.meta.data_ptr()) != self.pointers):
            return run(self.kernels, self.kernel, x, self.values, self.meta, self.in_features, bias)
        return fused(self.kernels, x, x.reshape(-1, x.shape[-1]).float(), *self.arrays, bias)


KERNEL = "numba 2:4 kernel"


def bind(values: torch.Tensor, meta: torch.Tensor) -> Bound:
    """``linear`` for this layout, prepared once (see ``Bound``)."""
    return Bound(_compiled(), KERNEL, values, meta, in_features(values, meta))


def _compiled():
    """The compiled kernels (numba is optional: imported on first use, compiled then and cached on disk)."""
    from . import _numba24

    return _numba24


def in_features(values: torch.Tensor, meta: torch.Tensor) -> int:
    """The weight's ``in``, read off the padding of the layout's first row."""
    return 4 * int((meta[0, :, 0] != PAD).sum())


def from_layout(values: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The inverse of ``to_layout``: the dense ``[out, in]`` weight (in the layout's dtype unless ``dtype``)."""
    return expand(_compiled(), values, meta, in_features(values, meta), dtype or values.dtype)


def linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[..., in]`` times the 2:4 weight in ``(values, meta)`` layout, transposed, plus ``bias``
    (inference only: no gradient flows through the fused kernel; dtypes: ``run``)."""
    return run(_compiled(), KERNEL, x, values, meta, in_features(values, meta), bias)
