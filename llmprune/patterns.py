"""Sparsity patterns: turn scores into keep-masks and check masks against the pattern.

Groups run along the input dimension (the last axis of a ``[out, in]`` weight), the same
axis the hardware 2:4 format uses. Ties are broken deterministically: among equal scores
the weight with the lower input index is pruned first (stable sort), because dequantized
low-bit checkpoints tie a lot and results must not depend on the backend's sort.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import LLMPruneError


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask that drops the ``count`` lowest scores along the last axis."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        order = torch.sort(scores, dim=-1, stable=True).indices
        keep.scatter_(-1, order[..., :count], False)
    return keep


@dataclass(frozen=True)
class Unstructured:
    """Prune a fraction ``sparsity`` of every output row (Wanda's comparison group)."""

    sparsity: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise LLMPruneError(f"sparsity must be in [0, 1); got {self.sparsity}")

    @property
    def target_sparsity(self) -> float:
        return self.sparsity

    def validate(self, name: str, out_features: int, in_features: int) -> None:
        """Any shape works for unstructured sparsity."""

    def pruned_per_row(self, in_features: int) -> int:
        return int(round(in_features * self.sparsity))

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[out, in]`` → bool keep-mask, same shape."""
        return _prune_lowest(scores, self.pruned_per_row(scores.shape[-1]))

    def violations(self, weight: torch.Tensor) -> int:
        """Rows holding fewer zeros than the target (0 means the weight conforms)."""
        zeros = (weight == 0).sum(-1)
        return int((zeros < self.pruned_per_row(weight.shape[-1])).sum())

    def __str__(self) -> str:
        return f"unstructured:{self.sparsity:g}"


@dataclass(frozen=True)
class NM:
    """At most ``n`` non-zeros in every ``m`` consecutive input weights (2:4 = NVIDIA's format)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise LLMPruneError(f"N:M pattern needs 0 < N < M; got {self.n}:{self.m}")

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def validate(self, name: str, out_features: int, in_features: int) -> None:
        if in_features % self.m:
            raise LLMPruneError(
                f"pattern {self} needs in_features divisible by {self.m}; {name} has "
                f"{in_features} = {in_features // self.m}*{self.m}+{in_features % self.m}. "
                f"Use an unstructured --sparsity for this model, or an M that divides it."
            )

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[out, in]`` → bool keep-mask with exactly ``n`` kept per group."""
        out_features, in_features = scores.shape
        groups = scores.reshape(out_features, in_features // self.m, self.m)
        return _prune_lowest(groups, self.m - self.n).reshape(out_features, in_features)

    def violations(self, weight: torch.Tensor) -> int:
        """Groups holding more than ``n`` non-zeros (0 means the weight conforms)."""
        out_features, in_features = weight.shape
        nonzero = (weight != 0).reshape(out_features, in_features // self.m, self.m).sum(-1)
        return int((nonzero > self.n).sum())

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


Pattern = Unstructured | NM


def parse_pattern(pattern: str | None, sparsity: float | None) -> Pattern:
    """Build a pattern from CLI-style arguments: ``2:4``, ``unstructured`` (+ sparsity)."""
    if pattern is None or pattern == "unstructured":
        return Unstructured(0.5 if sparsity is None else float(sparsity))
    match = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
    if not match:
        raise LLMPruneError(f"unknown pattern {pattern!r}; use 'unstructured' or N:M such as '2:4' or '4:8'")
    nm = NM(int(match.group(1)), int(match.group(2)))
    if sparsity is not None and abs(sparsity - nm.target_sparsity) > 1e-9:
        raise LLMPruneError(
            f"pattern {nm} fixes the sparsity at {nm.target_sparsity:g}; drop --sparsity {sparsity:g} or change the pattern"
        )
    return nm
