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


def range_columns(in_features: int, ranges, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[in]``: True on the columns of the ``(start, end)`` ranges."""
    columns = torch.zeros(in_features, dtype=torch.bool, device=device)
    for start, end in ranges:
        columns[start:end] = True
    return columns


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
    """At most ``n`` non-zeros in every ``m`` consecutive input weights (2:4 = NVIDIA's format).

    ``dense`` lists input-column ranges ``(start, end)`` left dense (one linear of a hybrid split,
    see ``Hybrid``); they are whole groups, so every group is either dense or N:M.
    """

    n: int
    m: int
    dense: tuple[tuple[int, int], ...] = ()

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

    def dense_columns(self, in_features: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool ``[in]``: True on the columns of the dense ranges."""
        return range_columns(in_features, self.dense, device)

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[out, in]`` → bool keep-mask: exactly ``n`` kept per group, all kept in dense ranges."""
        out_features, in_features = scores.shape
        groups = scores.reshape(out_features, in_features // self.m, self.m)
        keep = _prune_lowest(groups, self.m - self.n).reshape(out_features, in_features)
        return keep | self.dense_columns(in_features, scores.device)[None, :] if self.dense else keep

    def violations(self, weight: torch.Tensor) -> int:
        """Groups outside the dense ranges holding more than ``n`` non-zeros (0 means the weight conforms)."""
        out_features, in_features = weight.shape
        nonzero = (weight != 0).reshape(out_features, in_features // self.m, self.m).sum(-1)
        sparse_groups = ~self.dense_columns(in_features, weight.device).reshape(-1, self.m)[:, 0]
        return int((nonzero[:, sparse_groups] > self.n).sum())

    def __str__(self) -> str:
        if self.dense:
            return f"{self.n}:{self.m} with dense columns " + ",".join(f"{a}:{b}" for a, b in self.dense)
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Hybrid:
    """The sparse-dense split: each linear keeps ``dense_fraction`` of its input columns dense, in
    blocks of ``block`` columns, and prunes the rest N:M. Which blocks stay dense is chosen per linear
    (``llmprune.hybrid``); the result for one linear is an ``NM`` with ``dense`` ranges.

    Blocks of 64 columns keep both regions on the shapes the 2:4 kernels take (fp16/bf16 sparse
    operands need in_features % 64 == 0), so the split is rounded to whole blocks.
    """

    n: int = 2
    m: int = 4
    dense_fraction: float = 0.25
    block: int = 64

    def __post_init__(self) -> None:
        NM(self.n, self.m)  # same checks on N and M
        if not 0.0 <= self.dense_fraction < 1.0:
            raise LLMPruneError(f"--dense-fraction must be in [0, 1); got {self.dense_fraction}")
        if self.block < self.m or self.block % self.m:
            raise LLMPruneError(f"hybrid block width must be a positive multiple of M={self.m}; got {self.block}")

    @property
    def target_sparsity(self) -> float:
        return (1.0 - self.dense_fraction) * (1.0 - self.n / self.m)

    def validate(self, name: str, out_features: int, in_features: int) -> None:
        NM(self.n, self.m).validate(name, out_features, in_features)

    def blocks(self, in_features: int) -> list[tuple[int, int]]:
        """The candidate dense ranges: consecutive blocks, the last one possibly narrower."""
        return [(start, min(start + self.block, in_features)) for start in range(0, in_features, self.block)]

    def uniform_count(self, in_features: int) -> int:
        """Blocks kept dense under a uniform split: the whole-block count nearest ``dense_fraction``."""
        return min(len(self.blocks(in_features)), int(self.dense_fraction * in_features / self.block + 0.5))

    def region(self, ranges: list[tuple[int, int]]) -> NM:
        """The per-linear pattern: N:M with ``ranges`` dense (merged where they touch)."""
        merged: list[list[int]] = []
        for start, end in sorted(ranges):
            if merged and merged[-1][1] == start:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        return NM(self.n, self.m, tuple((a, b) for a, b in merged))

    def __str__(self) -> str:
        return f"hybrid:{self.n}:{self.m}"


Pattern = Unstructured | NM | Hybrid


def parse_pattern(pattern: str | None, sparsity: float | None, dense_fraction: float | None = None,
                  block: int = 64) -> Pattern:
    """Build a pattern from CLI-style arguments: ``2:4``, ``unstructured`` (+ sparsity), ``hybrid:2:4``
    (+ dense fraction)."""
    text = (pattern or "unstructured").strip()
    hybrid = re.fullmatch(r"hybrid(?::(\d+):(\d+))?", text)
    if dense_fraction is not None and not hybrid:
        raise LLMPruneError("--dense-fraction applies to the hybrid pattern only; use --pattern hybrid:2:4")
    if hybrid:
        n, m = (int(hybrid.group(1)), int(hybrid.group(2))) if hybrid.group(1) else (2, 4)
        split = Hybrid(n, m, 0.25 if dense_fraction is None else float(dense_fraction), block)
        if sparsity is not None:
            raise LLMPruneError(f"pattern {split} sets the sparsity through --dense-fraction "
                                f"((1 - F) x {1 - n / m:g}); drop --sparsity {sparsity:g}")
        return split
    if text == "unstructured":
        return Unstructured(0.5 if sparsity is None else float(sparsity))
    if text == "dense":  # nothing pruned: --quantize alone (plain GPTQ)
        if sparsity not in (None, 0.0):
            raise LLMPruneError(f"pattern dense prunes nothing; drop --sparsity {sparsity:g}")
        return Unstructured(0.0)
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise LLMPruneError(f"unknown pattern {pattern!r}; use 'unstructured', N:M such as '2:4' or '4:8', "
                            f"'hybrid:2:4' with --dense-fraction, or 'dense' (with --quantize)")
    nm = NM(int(match.group(1)), int(match.group(2)))
    if sparsity is not None and abs(sparsity - nm.target_sparsity) > 1e-9:
        raise LLMPruneError(
            f"pattern {nm} fixes the sparsity at {nm.target_sparsity:g}; drop --sparsity {sparsity:g} or change the pattern"
        )
    return nm


def parse_recorded(text: str, hybrid: dict | None = None) -> Pattern:
    """The pattern a report records as ``str(pattern)`` (``2:4``, ``unstructured:0.5``, ``hybrid:2:4``;
    a hybrid split's fraction and block come from the report's ``hybrid`` section)."""
    if text.startswith("unstructured:"):
        return Unstructured(float(text.removeprefix("unstructured:")))
    if text.startswith("hybrid:"):
        settings = hybrid or {}
        return parse_pattern(text, None, settings.get("dense_fraction"), settings.get("block", 64))
    return parse_pattern(text, None)


def is_24_pattern(pattern: Pattern) -> bool:
    """A 2:4 pattern, plain or as the sparse part of a hybrid split: what checkpoints store packed."""
    return isinstance(pattern, (NM, Hybrid)) and (pattern.n, pattern.m) == (2, 4)
