"""Layer-wise sparsity allocation: uniform and OWL (outlier ratios, mean kept, span 2λ, N:M refused)."""
from __future__ import annotations

import random

import pytest
import torch

from llmprune.allocation import OWL, HybridBudget, Uniform, make_allocation, outlier_ratio, owl_sparsities
from llmprune.errors import LLMPruneError
from llmprune.patterns import NM, Hybrid, Unstructured


def direct_outlier_ratio(pairs, m: float) -> float:
    """Every score of every linear in one Python list, mean, count above m × mean."""
    scores = [abs(float(w[i, j])) * float(norm[j]) for w, norm in pairs
              for i in range(w.shape[0]) for j in range(w.shape[1])]
    mean = sum(scores) / len(scores)
    return sum(1 for s in scores if s > m * mean) / len(scores)


def layer(seed: int, heavy: float = 0.0):
    """Three linears of one decoder layer (two reading the same input), norms with ``heavy`` outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    norm_a = torch.rand(12, generator=gen) + 0.1
    norm_a[:2] += heavy
    norm_b = torch.rand(20, generator=gen) + 0.1
    return [(torch.randn(8, 12, generator=gen), norm_a), (torch.randn(5, 12, generator=gen), norm_a),
            (torch.randn(12, 20, generator=gen), norm_b)]


@pytest.mark.parametrize("m", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("heavy", [0.0, 20.0])
def test_outlier_ratio_matches_direct_computation(m: float, heavy: float) -> None:
    pairs = layer(0, heavy)
    assert outlier_ratio(pairs, m) == pytest.approx(direct_outlier_ratio(pairs, m), abs=1e-12)
    assert outlier_ratio(iter(pairs), m) == outlier_ratio(pairs, m)  # a generator works too


def test_outlier_ratio_is_per_layer_not_per_linear() -> None:
    """One linear with huge scores sets the layer mean: the others count no outliers against it."""
    big = (torch.full((4, 4), 100.0), torch.ones(4))
    small = (torch.ones(4, 4), torch.ones(4))
    # layer mean = (16·100 + 16·1)/32 = 50.5; with m = 1.5 the threshold is 75.75 → the 16 big scores
    assert outlier_ratio([big, small], 1.5) == pytest.approx(0.5)
    assert outlier_ratio([small], 1.5) == 0.0
    # the norm scale does not matter (channel_norm is √E[x²], the paper's ‖X_j‖ is √N times that)
    pairs = layer(3, heavy=10.0)
    scaled = [(w, n * 7.5) for w, n in pairs]
    assert outlier_ratio(scaled, 5.0) == outlier_ratio(pairs, 5.0)
    assert outlier_ratio(layer(3, heavy=10.0), 5.0) > outlier_ratio(layer(3), 5.0)


def test_owl_keeps_mean_orders_layers_and_spans_two_lambda() -> None:
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        ratios = [rng.random() * 0.1 for _ in range(n)]
        target, lam = rng.uniform(0.3, 0.8), rng.uniform(0.01, 0.15)
        sparsities = owl_sparsities(ratios, target, lam)
        assert len(sparsities) == n
        assert abs(sum(sparsities) / n - target) < 1e-9
        assert max(sparsities) - min(sparsities) == pytest.approx(2 * lam, abs=1e-12)
        for a in range(n):
            for b in range(n):
                if ratios[a] > ratios[b]:
                    assert sparsities[a] < sparsities[b]  # more outliers → lower sparsity
        assert sparsities[ratios.index(max(ratios))] == pytest.approx(min(sparsities), abs=1e-15)


def test_owl_matches_the_papers_formula() -> None:
    """density_l = norm(ratio)·2λ − mean + (1 − target), sparsity = 1 − density (plain mean)."""
    ratios, target, lam = [0.02, 0.05, 0.011, 0.04], 0.7, 0.08
    low, high = min(ratios), max(ratios)
    normed = [(r - low) / (high - low) * 2 * lam for r in ratios]
    density = [d - sum(normed) / len(normed) + (1 - target) for d in normed]
    assert owl_sparsities(ratios, target, lam) == pytest.approx([1 - d for d in density], abs=1e-12)


def test_owl_uniform_when_ratios_equal_or_lambda_zero() -> None:
    assert owl_sparsities([0.03] * 5, 0.6) == [0.6] * 5
    assert owl_sparsities([0.01, 0.2, 0.05], 0.6, lam=0.0) == [0.6] * 3
    assert owl_sparsities([0.07], 0.5) == [0.5]
    assert owl_sparsities([], 0.5) == []


def test_owl_weighted_mean_by_parameter_count() -> None:
    ratios, sizes, target = [0.01, 0.04, 0.02, 0.08], [100.0, 300.0, 100.0, 500.0], 0.55
    sparsities = owl_sparsities(ratios, target, 0.1, weights=sizes)
    assert abs(sum(s * w for s, w in zip(sparsities, sizes)) / sum(sizes) - target) < 1e-9
    assert max(sparsities) - min(sparsities) == pytest.approx(0.2, abs=1e-12)
    assert owl_sparsities(ratios, target, 0.1, weights=[2.0] * 4) == pytest.approx(owl_sparsities(ratios, target, 0.1))


def test_owl_clamps_and_keeps_the_mean() -> None:
    ratios = [0.0, 0.01, 0.02, 0.2]
    low = owl_sparsities(ratios, 0.05, 0.08)  # the outlier layer would get 0.05 − 0.16 + ... < 0
    assert min(low) == 0.0 and all(0 <= s <= 0.99 for s in low)
    assert abs(sum(low) / 4 - 0.05) < 1e-9
    assert low == sorted(low, reverse=True)
    high = owl_sparsities(ratios, 0.95, 0.08, max_sparsity=0.97)
    assert max(high) == 0.97 and abs(sum(high) / 4 - 0.95) < 1e-9
    with pytest.raises(LLMPruneError, match="target sparsity"):
        owl_sparsities(ratios, 0.995, 0.08)
    with pytest.raises(LLMPruneError, match="target sparsity"):
        owl_sparsities(ratios, -0.1)
    with pytest.raises(LLMPruneError, match="lambda"):
        owl_sparsities(ratios, 0.5, lam=-0.1)
    with pytest.raises(LLMPruneError, match="weights"):
        owl_sparsities(ratios, 0.5, weights=[1.0, 2.0])
    with pytest.raises(LLMPruneError, match="finite"):
        owl_sparsities([0.1, float("nan")], 0.5)


def test_make_allocation_picks_the_strategy_and_refuses_owl_with_nm() -> None:
    assert isinstance(make_allocation("owl", Unstructured(0.7)), OWL)
    assert isinstance(make_allocation("uniform", NM(2, 4)), Uniform)
    assert isinstance(make_allocation("uniform", Hybrid(2, 4, 0.25)), HybridBudget)
    assert make_allocation("uniform", NM(2, 4)).pattern_for(3, "x", torch.ones(4, 8), None) == NM(2, 4)
    with pytest.raises(LLMPruneError, match=r"OWL allocates unstructured sparsity per layer; N:M fixes it at 1-N/M"):
        make_allocation("owl", NM(2, 4))
    with pytest.raises(LLMPruneError, match="unknown allocation 'owll'; choose one of owl, uniform"):
        make_allocation("owll", Unstructured(0.5))
    with pytest.raises(LLMPruneError, match="lambda"):
        make_allocation("owl", Unstructured(0.5), owl_lambda=-1.0)
    with pytest.raises(LLMPruneError, match="target sparsity"):
        make_allocation("owl", Unstructured(0.995))


def test_outlier_ratio_errors() -> None:
    with pytest.raises(LLMPruneError, match="at least one"):
        outlier_ratio([])
    with pytest.raises(LLMPruneError, match=r"\[out, in\]"):
        outlier_ratio([(torch.ones(3, 4), torch.ones(3))])
    with pytest.raises(LLMPruneError, match="NaN"):
        outlier_ratio([(torch.full((2, 2), float("nan")), torch.ones(2))])
