"""Which pattern each linear gets: allocation strategies, each owning its statistics pre-pass.

- ``Uniform``: the recipe's pattern everywhere.
- ``OWL`` (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): per-layer unstructured sparsities
  from a pre-pass over the dense model (below).
- ``HybridBudget``: the sparse-dense split's dense blocks per linear (``llmprune.hybrid``), either the
  same fraction in every linear or one model-wide budget from a pre-pass over the dense model.

Lifecycle, driven by the pipeline: ``prepare`` (the pre-pass, if any, through the same streaming
engine) → ``pattern_for`` for each linear during the main pass → ``record`` for the report.

OWL gives decoder layers with more activation outliers a LOWER sparsity and the others a higher
one, keeping the model's overall sparsity at the target:

  1. Outlier ratio of layer l (its "layerwise outlier distribution", LOD): with the Wanda scores
     A_ij = |W_ij|·‖X_j‖ of ALL the layer's linears taken together, D_l = share of scores above
     M × their mean (``outlier_ratio``; M = 5 by default). ‖X_j‖ may be any fixed multiple of the
     input norm (``InputStats.channel_norm`` is √E[x²]): the ratio does not change.
  2. Ratios min-max normalised to [0, 2λ], then centred on their mean: d_l ∈ [−λ, +λ] up to the shift.
  3. s_l = target − d_l: the layer with most outliers is 2λ less sparse than the one with fewest.
     The mean of s is the target exactly; with ``weights`` (e.g. each layer's parameter count) the
     centring is by the weighted mean, so the share of zeros over the whole model is the target.
     The paper uses the plain mean, which is the same when all layers have the same size.

A layer pushed below 0 or above ``max_sparsity`` is clamped and the others are shifted together
(one common shift, found by bisection) so that the (weighted) mean stays the target; the span is
then below 2λ. OWL is for unstructured sparsity only: an N:M pattern fixes every layer at 1 − N/M.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .errors import LLMPruneError
from . import hybrid, stream
from .adapter import ModelAdapter, Prunable
from .patterns import NM, Hybrid, Pattern, Unstructured
from .stats import SQ_NORM, InputStats


def outlier_ratio(weights_and_norms: Iterable[tuple[torch.Tensor, torch.Tensor]], m: float = 5.0) -> float:
    """Share of the Wanda scores |W_ij|·‖X_j‖ of one decoder layer above ``m`` × their mean.

    ``weights_and_norms``: ``(weight [out, in], channel_norm [in])`` for each of the layer's linears;
    the mean is over all scores of all of them together (OWL's per-layer definition).
    """
    pairs = list(weights_and_norms)
    if not pairs:
        raise LLMPruneError("outlier_ratio needs at least one (weight, channel_norm) pair for the layer")
    if not m > 0:
        raise LLMPruneError(f"OWL outlier multiple M must be positive (e.g. 5); got {m!r}")
    for weight, norm in pairs:
        if weight.dim() != 2 or norm.shape != (weight.shape[1],):
            raise LLMPruneError(f"outlier_ratio needs a weight [out, in] and a norm [in]; got {tuple(weight.shape)} "
                                f"and {tuple(norm.shape)}")

    def scores(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return weight.double().abs() * norm.to(device=weight.device, dtype=torch.float64)[None, :]

    count = sum(weight.numel() for weight, _ in pairs)
    if count == 0:
        raise LLMPruneError("outlier_ratio got only empty weights")
    total = sum(float(scores(w, n).sum()) for w, n in pairs)
    if total != total or total in (float("inf"), float("-inf")):
        raise LLMPruneError("the Wanda scores of a layer hold NaN or Inf; cannot compute its outlier ratio")
    limit = m * total / count
    return sum(int((scores(w, n) > limit).sum()) for w, n in pairs) / count


def owl_sparsities(ratios: Sequence[float], target: float, lam: float = 0.08, *,
                   weights: Sequence[float] | None = None, max_sparsity: float = 0.99) -> list[float]:
    """Per-layer sparsities from per-layer outlier ratios: more outliers → less sparsity.

    Ratios are min-max mapped to [0, 2λ], centred on their (``weights``-weighted) mean, and
    subtracted from ``target``; layers outside [0, ``max_sparsity``] are clamped and the rest shifted
    so the weighted mean stays ``target``. Equal ratios (or λ = 0) give ``uniform``.
    """
    values = [float(r) for r in ratios]
    count = len(values)
    _check_target(target, max_sparsity)
    if not 0 <= lam < float("inf"):
        raise LLMPruneError(f"OWL lambda must be a non-negative number (e.g. 0.08); got {lam!r}")
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise LLMPruneError(f"OWL outlier ratios must be finite numbers; got {values}")
    if weights is None:
        shares = [1.0] * count
    else:
        shares = [float(w) for w in weights]
        if len(shares) != count or any(not 0 < w < float("inf") for w in shares):
            raise LLMPruneError(f"OWL weights must be {count} positive numbers (one per layer); got {list(weights)}")
    if count == 0:
        return []
    low, high = min(values), max(values)
    if high == low or lam == 0:
        return [float(target)] * count
    spread = [(v - low) / (high - low) * 2 * lam for v in values]
    weight_sum = sum(shares)
    centre = sum(w * d for w, d in zip(shares, spread)) / weight_sum
    base = [target - (d - centre) for d in spread]
    if all(0.0 <= s <= max_sparsity for s in base):
        return base
    return _clamp_keeping_mean(base, shares, target, max_sparsity)


def _clamp_keeping_mean(base: list[float], shares: list[float], target: float, ceiling: float) -> list[float]:
    """clip(base + c, 0, ceiling) with the one shift c that makes the weighted mean ``target``.

    The weighted mean of the clipped values grows continuously from 0 to ``ceiling`` with c, so a
    solution exists for every target in [0, ceiling]; bisection pins it to float precision."""
    weight_sum = sum(shares)

    def mean_at(shift: float) -> float:
        return sum(w * min(max(s + shift, 0.0), ceiling) for w, s in zip(shares, base)) / weight_sum

    lo, hi = -max(base) - 1.0, ceiling - min(base) + 1.0  # mean_at(lo) = 0, mean_at(hi) = ceiling
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    result = [min(max(s + hi, 0.0), ceiling) for s in base]
    if abs(mean_at(hi) - target) > 1e-12:
        raise LLMPruneError(f"OWL cannot reach mean sparsity {target:g} with layer sparsities in [0, {ceiling:g}]")
    return result


def _check_target(target: float, ceiling: float) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= ceiling or target >= 1:
        raise LLMPruneError(f"target sparsity must be in [0, {ceiling:g}] (and below 1); got {target!r}")




class Uniform:
    """The recipe's pattern for every linear; no pre-pass."""

    needs: frozenset[str] = frozenset()

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern

    def prepare(self, adapter: ModelAdapter, tokens: torch.Tensor, pruner, stream_options: dict) -> None:
        """Nothing to measure first."""

    def pattern_for(self, index: int, name: str, original: torch.Tensor, stats: InputStats | None) -> Pattern:
        return self.pattern

    def record(self) -> dict:
        return {"allocation": {"name": "uniform"}}


class OWL:
    """Per-layer unstructured sparsities from each layer's outlier ratio of Wanda scores on the dense model."""

    needs: frozenset[str] = frozenset()

    def __init__(self, pattern: Pattern, lam: float = 0.08, m: float = 5.0) -> None:
        if not isinstance(pattern, Unstructured):
            raise LLMPruneError(
                f"OWL allocates unstructured sparsity per layer; N:M fixes it at 1-N/M (pattern {pattern} is "
                f"{pattern.target_sparsity:g} in every layer). Use --allocation uniform with {pattern}, "
                f"or OWL with an unstructured --sparsity."
            )
        _check_target(pattern.sparsity, 0.99)
        if not 0 <= lam < float("inf"):
            raise LLMPruneError(f"OWL lambda must be a non-negative number (e.g. 0.08); got {lam!r}")
        if not m > 0:
            raise LLMPruneError(f"OWL outlier multiple M must be positive (e.g. 5); got {m!r}")
        self.pattern, self.lam, self.m = pattern, lam, m
        self.ratios: list[float] = []
        self.sparsities: list[float] = []

    def prepare(self, adapter: ModelAdapter, tokens: torch.Tensor, pruner, stream_options: dict) -> None:
        """The pre-pass: each layer's outlier ratio on the dense model, then the sparsities."""
        ratios: list[float] = []

        def collect(index: int, linears: dict[str, Prunable], stats: dict[str, InputStats]) -> None:
            ratios.append(outlier_ratio([(p.weight.float(), stats[n].channel_norm) for n, p in linears.items()], self.m))

        stream.layerwise(adapter, tokens, collect, needs=frozenset({SQ_NORM}), measure_error=False, rewrites=False,
                         desc="OWL outlier ratios", **stream_options)
        self.ratios = ratios
        self.sparsities = owl_sparsities(ratios, self.pattern.sparsity, self.lam)

    def pattern_for(self, index: int, name: str, original: torch.Tensor, stats: InputStats | None) -> Pattern:
        return Unstructured(self.sparsities[index])

    def record(self) -> dict:
        return {"allocation": {"name": "owl", "lam": self.lam, "m": self.m,
                               "outlier_ratios": [round(r, 6) for r in self.ratios],
                               "sparsities": [round(s, 6) for s in self.sparsities]}}


class HybridBudget:
    """The dense blocks of each linear under a hybrid split: ``select`` ranks a linear's blocks from the
    base pruner's plain N:M result (``hybrid.rank_blocks``); ``budget`` ``uniform`` keeps the same
    fraction in every linear, ``global`` spends one model-wide budget, ranked in a dense pre-pass."""

    def __init__(self, split: Hybrid, select: str = "error", budget: str = "uniform") -> None:
        self.needs = hybrid.needs(select)
        hybrid.check_budget(budget)
        self.split, self.select, self.budget = split, select, budget
        self.pruner = None
        self.dense_counts: dict[str, int] | None = None

    def prepare(self, adapter: ModelAdapter, tokens: torch.Tensor, pruner, stream_options: dict) -> None:
        """Keep the base pruner (the blocks are ranked on its result); for the global budget, rank every
        linear's blocks on the dense model first and share out the budget."""
        self.pruner = pruner
        if self.budget != "global":
            return
        rankings: dict[str, hybrid.Ranking] = {}

        def collect(index: int, linears: dict[str, Prunable], stats: dict[str, InputStats]) -> None:
            for name, linear in linears.items():
                original = linear.weight.float()
                rankings[name] = self._ranking(original, stats[name])

        stream.layerwise(adapter, tokens, collect, needs=pruner.needs | self.needs, measure_error=False, rewrites=False,
                         desc="hybrid dense budget", hessian_dtype=getattr(pruner, "hessian_dtype", torch.float32),
                         **stream_options)
        self.dense_counts = hybrid.allocate_global(rankings, self.split.dense_fraction)

    def _ranking(self, original: torch.Tensor, stats: InputStats | None) -> hybrid.Ranking:
        base = self.pruner.prune(original.clone(), stats, NM(self.split.n, self.split.m))
        return hybrid.rank_blocks(original, base.weight, stats, self.split, self.select)

    def pattern_for(self, index: int, name: str, original: torch.Tensor, stats: InputStats | None) -> NM:
        """N:M with this linear's chosen dense blocks."""
        count = self.dense_counts[name] if self.dense_counts is not None else self.split.uniform_count(original.shape[1])
        if count == 0:
            return NM(self.split.n, self.split.m)
        return self.split.region(self._ranking(original, stats).blocks[:count])

    def record(self) -> dict:
        return {"allocation": {"name": "uniform"},
                "hybrid": {"dense_fraction": self.split.dense_fraction, "block": self.split.block,
                           "select": self.select, "budget": self.budget}}


Allocation = Uniform | OWL | HybridBudget
ALLOCATIONS = ("uniform", "owl")


def make_allocation(name: str, pattern: Pattern, *, owl_lambda: float = 0.08, owl_m: float = 5.0,
                    hybrid_select: str = "error", hybrid_budget: str = "uniform") -> Allocation:
    """The strategy for ``--allocation NAME`` and the pattern (a hybrid pattern brings its own)."""
    if name not in ALLOCATIONS:
        raise LLMPruneError(f"unknown allocation {name!r}; choose one of {', '.join(sorted(ALLOCATIONS))}")
    if name == "owl":
        return OWL(pattern, owl_lambda, owl_m)
    if isinstance(pattern, Hybrid):
        return HybridBudget(pattern, hybrid_select, hybrid_budget)
    return Uniform(pattern)
