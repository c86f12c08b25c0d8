"""Per-layer sparsity targets: uniform, or OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity").

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

from collections.abc import Callable, Iterable, Sequence

import torch

from .errors import LLMPruneError
from .patterns import Pattern, Unstructured


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


def uniform(n_layers: int, target: float) -> list[float]:
    """Every layer at ``target``."""
    _check_target(target, 1.0)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 0:
        raise LLMPruneError(f"uniform allocation needs a non-negative number of layers; got {n_layers!r}")
    return [float(target)] * n_layers


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


ALLOCATIONS: dict[str, Callable[..., list[float]]] = {"uniform": uniform, "owl": owl_sparsities}
NEEDS_OUTLIER_RATIOS = frozenset({"owl"})  # allocations that need a statistics pre-pass (``outlier_ratio`` per layer)


def check_allocation(name: str, pattern: Pattern) -> None:
    """Fail early, before any calibration, on an unknown allocation or one the pattern cannot take."""
    if name not in ALLOCATIONS:
        raise LLMPruneError(f"unknown allocation {name!r}; choose one of {', '.join(sorted(ALLOCATIONS))}")
    if name == "owl" and not isinstance(pattern, Unstructured):
        raise LLMPruneError(
            f"OWL allocates unstructured sparsity per layer; N:M fixes it at 1-N/M (pattern {pattern} is "
            f"{pattern.target_sparsity:g} in every layer). Use --allocation uniform with {pattern}, "
            f"or OWL with an unstructured --sparsity."
        )
