"""A numba 2:4 kernel for CPU decode: ``y = x·Wᵀ (+ b)`` reading only the kept values and their positions.

Batch-1 decode is memory-bound: every token streams every weight once, and the weights of a whole
model do not fit in cache. Dense float32 costs 16 bytes per group of 4 inputs; this layout costs 9
(two float32 values and one byte holding both positions), so the ceiling is 16/9 ≈ 1.78×.

Layout (built once at load time, float32), in panels of 4 output rows × 16 groups of 4 inputs:

- ``values`` ``[out/4, chunks, 4, 2, 16]``: for each block of 4 rows and each chunk of 16 groups, the
  first and then the second kept value of each row's 16 groups;
- ``meta`` uint8 ``[out/4, chunks, 4, 16]``: ``a | b << 2`` with ``a < b`` the positions (0-3) of the
  kept values; 255 marks the groups that pad ``in/4`` up to a multiple of 16 (their values are 0).

Why it is fast: a block's panel is one contiguous stream, which the hardware prefetcher follows (one
array per row would be a dozen streams per block, and measured half the bandwidth); the inputs are
split into their four residues mod 4, so the kernel never gathers: for each group it loads all four,
selects the two the positions name (blends) and accumulates two FMAs, 16 groups per vector. For a few
rows of ``x`` (decode with a small batch) the panel stays in L1/L2 while every row of ``x`` passes over
it; for more rows (prefill) the weight is expanded to dense once per call and ``F.linear`` does the
GEMM, since a dense GEMM is compute-bound there and 2:4 saves no arithmetic on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LLMPruneError
from ..packing import stored_positions

MAX_FUSED_ROWS = 8  # rows of x up to which the fused kernel runs; past it expanding wins (eval/RESULTS.md)
LANES = 16  # groups per chunk (one AVX-512 vector of float32)
PAD = 255  # meta code of a padding group


def unavailable(weight: torch.Tensor) -> str | None:
    """Why the CPU 2:4 kernel cannot run ``weight`` ``[out, in]`` (None when it can)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return "numba is not installed (pip install numba, or llmprune[kernels])"
    if weight.device.type != "cpu":
        return f"weight is on {weight.device.type}; the numba kernel runs on CPU"
    if weight.dtype != torch.float32:
        return f"dtype {weight.dtype} (the numba kernel takes float32)"
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
    values = torch.zeros(out_features, chunks * LANES, 2, dtype=torch.float32)
    values[:, :groups] = weight.gather(1, columns.flatten(1)).reshape(out_features, groups, 2) + 0.0  # −0.0 → +0.0
    meta = torch.full((out_features, chunks * LANES), PAD, dtype=torch.uint8)
    positions = columns % 4
    meta[:, :groups] = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)
    panels = values.reshape(out_features // 4, 4, chunks, LANES, 2).permute(0, 2, 1, 4, 3)
    return panels.contiguous(), meta.reshape(out_features // 4, 4, chunks, LANES).permute(0, 2, 1, 3).contiguous()


_NUMBA: dict = {}


def _kernels():
    """The compiled kernels (numba is optional: imported on first use, compiled then and cached on disk),
    with numba's thread count following ``torch.get_num_threads()``."""
    if not _NUMBA:
        import numba

        from . import _numba24

        _NUMBA.update(module=_numba24, set_threads=numba.set_num_threads, most=numba.config.NUMBA_NUM_THREADS)
    threads = min(torch.get_num_threads(), _NUMBA["most"])
    if _NUMBA.get("threads") != threads:
        _NUMBA["set_threads"](threads)
        _NUMBA["threads"] = threads
    return _NUMBA["module"]


def from_layout(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_layout``: the dense ``[out, in]`` weight (``in`` read off the padding)."""
    in_features = 4 * int((meta[0, :, 0] != PAD).sum())
    dense = torch.empty(values.shape[0] * 4, in_features, dtype=torch.float32)
    _kernels().expand(values.numpy(), meta.numpy(), dense.numpy())
    return dense


def linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[..., in]`` times the 2:4 weight in ``(values, meta)`` layout, transposed, plus ``bias``
    (inference only: no gradient flows through the fused kernel)."""
    blocks = values.shape[0]
    in_features = x.shape[-1]
    if values.device.type != "cpu" or x.device.type != "cpu":
        raise LLMPruneError(f"the numba 2:4 kernel runs on CPU (weight on {values.device.type}, x on "
                            f"{x.device.type}); load the checkpoint on the target device with backend='auto'")
    if x.dtype != torch.float32:
        raise LLMPruneError(f"the numba 2:4 kernel takes float32 inputs, got {x.dtype}")
    flat = x.detach().reshape(-1, in_features)
    if flat.shape[0] > MAX_FUSED_ROWS:
        return F.linear(x, from_layout(values, meta), bias)  # F.linear checks the sizes
    y = torch.empty(flat.shape[0], blocks * 4, dtype=torch.float32)
    try:
        _kernels().gemm(values.numpy(), meta.numpy(), flat.contiguous().numpy(), y.numpy())
    except ValueError as exc:  # the kernel's size check (it reads x without bounds checks)
        raise LLMPruneError(f"x has {in_features} input features: {exc}") from None
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], blocks * 4)
