"""Uniform integer weight quantization on a min-max grid per group of input columns (GPTQ's grid).

A row's weights in group g (dense input columns ``[g·G, (g+1)·G)``) are stored as integer codes
c ∈ [0, 2^bits − 1] with one scale s and zero point z per (row, group), and read back as
ŵ = (c − z)·s. The grid always contains 0 (its range is [min(w, 0), max(w, 0)]) and z is an
integer, so a pruned weight, stored as c = z, reads back as exactly +0.0 whatever its group.

  * asymmetric: s = (xmax − xmin) / (2^bits − 1),  z = round(−xmin / s)
  * symmetric:  amax = max(|xmin|, xmax),  s = 2·amax / (2^bits − 1),  z = 2^(bits−1).
    The codes cover [−2^(bits−1)·s, (2^(bits−1) − 1)·s]; +amax sits at the edge of the last
    rounding bin, so clamping it costs at most s/2, the same as rounding anywhere else.

With ``clip`` the range is searched instead of taken whole (GPTQ's reference code offers the same
option): the grid of [shrink·xmin, shrink·xmax] for shrink in ``CLIP_SHRINKS`` that minimises
Σ|ŵ − w|^2.4 over the fitted weights, per row and group. A finer grid for most weights at the cost
of clamping a few extremes; in a GPTQ or SparseGPT sweep the columns not yet processed absorb the
clamping error like any other rounding error.

Scales and zero points are stored in float16 (as the checkpoint keeps them), and the dequantized
value is computed from those float16 numbers in float32, so what a pruner holds in memory is
bit for bit what a reader of the checkpoint computes: (c − z) is a small integer and s has an
11-bit mantissa, so their product is exact in float32. The scale is rounded up to float16, never
down, and z is computed from the rounded scale: then every weight the grid was fitted to lies
within s/2 of a code (rounding down would clamp the ends by up to 2^bits float16 ulps, which is
a whole step for 8 bits or for the subnormal scales of tiny weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LLMPruneError

_FP16 = torch.finfo(torch.float16)
_SMALLEST_SCALE = 2.0**-24  # the smallest positive float16 (subnormal): a scale may never round to 0
CLIP_SHRINKS = tuple(1.0 - 0.025 * i for i in range(1, 21))  # 0.975 ... 0.5: the ranges ``clip`` tries
CLIP_NORM = 2.4  # the error's exponent in the search (GPTQ's choice: between the mean square and the max)


@dataclass(frozen=True)
class Quantizer:
    """``bits``-bit codes, one scale (and zero point) per row and group of ``group_size`` input
    columns (-1: one group per row), ``symmetric`` or asymmetric grid, the range searched (``clip``)
    or min-max."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    clip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LLMPruneError(f"--quantize takes 2 to 8 bits (w2 ... w8, e.g. w4); got {self.bits!r} bits")
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or (size > 0 and size % 4 == 0)):
            raise LLMPruneError(f"--group-size must be a positive multiple of 4 or -1 (one group per row); "
                                f"got {size!r}")
        if not isinstance(self.symmetric, bool):
            raise LLMPruneError(f"the quantization grid is --sym or --asym (symmetric True/False); "
                                f"got {self.symmetric!r}")
        if not isinstance(self.clip, bool):
            raise LLMPruneError(f"clip (--clip: search the grid's range) is True or False; got {self.clip!r}")

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    def width(self, in_features: int) -> int:
        """Columns per group for a weight with ``in_features`` inputs (the last group may be narrower)."""
        return in_features if self.group_size == -1 else self.group_size

    def groups(self, in_features: int) -> int:
        return -(-in_features // self.width(in_features))

    def group_of(self, columns: torch.Tensor, in_features: int) -> torch.Tensor:
        """The group of each dense input-column index in ``columns``."""
        return columns // self.width(in_features)

    def params(self, weights: torch.Tensor, kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (float16 ``[out]``) of each row of one group ``weights`` ``[out, k]``.

        Only the entries where ``kept`` is True are fitted (pruned weights become 0, which every
        grid holds); a row with nothing to fit (all zero or all pruned) gets scale 1."""
        values = weights if kept is None else torch.where(kept, weights, weights.new_zeros(()))
        xmin = values.amin(-1).clamp(max=0)
        xmax = values.amax(-1).clamp(min=0)
        scale, zero = self._grid(xmin, xmax)
        if not self.clip:
            return scale, zero
        best = self._clip_error(values, kept, scale, zero)
        for shrink in CLIP_SHRINKS:
            candidate = self._grid(xmin * shrink, xmax * shrink)
            error = self._clip_error(values, kept, *candidate)
            better = error < best
            best = torch.where(better, error, best)
            scale, zero = (torch.where(better, new, old) for new, old in zip(candidate, (scale, zero)))
        return scale, zero

    def _clip_error(self, values: torch.Tensor, kept: torch.Tensor | None, scale: torch.Tensor,
                    zero: torch.Tensor) -> torch.Tensor:
        """Σ|ŵ − w|^CLIP_NORM per row over the fitted weights of ``values`` ``[out, k]``."""
        rounded = self.dequantize(self.quantize(values, scale[:, None], zero[:, None]), scale[:, None], zero[:, None])
        error = (rounded - values.float()).abs_().pow_(CLIP_NORM)
        return (error if kept is None else error * kept).sum(-1)

    def _grid(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (float16) of the grid spanning [xmin, xmax] (xmin ≤ 0 ≤ xmax) per row."""
        if self.symmetric:
            amax = torch.maximum(-xmin, xmax)
            xmin, xmax = -amax, amax
        scale = (xmax - xmin) / self.max_code
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).clamp(_SMALLEST_SCALE, _FP16.max)
        stored = scale.to(torch.float16)  # rounded up, never down: the grid must still span [xmin, xmax]
        up = torch.nextafter(stored, torch.full_like(stored, _FP16.max))
        scale = torch.where(stored.to(scale.dtype) < scale, up, stored)
        if self.symmetric:
            zero = torch.full_like(scale, 2 ** (self.bits - 1))
        else:
            zero = torch.round(-xmin / scale.to(xmin.dtype)).clamp(0, self.max_code).to(torch.float16)
        return scale, zero

    def quantize(self, weights: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Nearest codes (uint8, the shape of ``weights``) on the grid, clamped to [0, 2^bits − 1];
        ``scale``/``zero`` broadcast (``[out, 1]`` against a group ``[out, k]``, ``[out]`` against a column)."""
        codes = torch.round(weights / scale.to(weights.dtype)) + zero.to(weights.dtype)
        return codes.clamp(0, self.max_code).to(torch.uint8)

    @staticmethod
    def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """(c − z)·s in float32 from the float16 ``scale`` and ``zero``: what a checkpoint reader computes."""
        return (codes.float() - zero.float()) * scale.float()


@dataclass
class Quantized:
    """A quantized ``[out, in]`` weight: ``codes`` uint8 ``[out, in]``, ``scales`` and ``zeros`` float16
    ``[out, groups]`` (groups of dense input columns; symmetric zeros are all 2^(bits−1)). Pruned
    weights hold their row's zero point and dequantize to +0.0."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    quantizer: Quantizer

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` (the one the pruner returned)."""
        columns = self.codes.shape[1]
        group = self.quantizer.group_of(torch.arange(columns, device=self.codes.device), columns)
        return Quantizer.dequantize(self.codes, self.scales[:, group], self.zeros[:, group])
