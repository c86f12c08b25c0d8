"""Magnitude and Wanda against direct, slow references (ties included)."""
from __future__ import annotations

import math

import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.patterns import NM, Unstructured
from llmprune.pruners import PRUNERS, make_pruner
from llmprune.stats import SQ_NORM, InputStats


def reference_prune(weight: torch.Tensor, channel_norm: torch.Tensor | None, group: int, prune_count: int) -> torch.Tensor:
    """Score each weight (|W| or |W|·‖X_j‖) in plain Python and zero the lowest per row/group."""
    out = weight.clone()
    for r in range(weight.shape[0]):
        for g in range(0, weight.shape[1], group):
            def score(j: int) -> float:
                s = abs(float(weight[r, j]))
                return s * float(channel_norm[j]) if channel_norm is not None else s
            for j in sorted(range(g, g + group), key=lambda j: (score(j), j))[:prune_count]:
                out[r, j] = 0.0
    return out


def quantized_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A weight with few distinct magnitudes, like a dequantized 4-bit checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-3, 4, (rows, cols), generator=gen) * 0.25).float()


PATTERNS = [(Unstructured(0.5), None), (Unstructured(0.7), None), (NM(2, 4), 4), (NM(4, 8), 8)]


@pytest.mark.parametrize("pattern,group", PATTERNS, ids=str)
@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_matches_reference(pattern, group, ties) -> None:
    weight = quantized_weight(6, 32) if ties else torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    got = make_pruner("magnitude").prune(weight.clone(), None, pattern).weight
    count = round(32 * pattern.target_sparsity) if group is None else group - pattern.n
    assert torch.equal(got, reference_prune(weight, None, group or 32, count))


@pytest.mark.parametrize("pattern,group", PATTERNS, ids=str)
@pytest.mark.parametrize("ties", [False, True])
def test_wanda_matches_reference(pattern, group, ties) -> None:
    gen = torch.Generator().manual_seed(5)
    weight = quantized_weight(6, 32) if ties else torch.randn(6, 32, generator=gen)
    inputs = torch.randn(3, 10, 32, generator=gen) * torch.linspace(0.1, 3.0, 32)
    if ties:  # make channel norms tie too: pairs of identical input channels
        inputs[..., 1::2] = inputs[..., ::2]
    stats = InputStats(32, frozenset({SQ_NORM}))
    for batch in inputs:
        stats.update(batch)
    norms = torch.tensor([math.sqrt(sum(float(x) ** 2 for x in inputs[..., j].flatten())) for j in range(32)])
    got = make_pruner("wanda").prune(weight.clone(), stats, pattern).weight
    count = round(32 * pattern.target_sparsity) if group is None else group - pattern.n
    assert torch.equal(got, reference_prune(weight, norms, group or 32, count))


def test_pruned_zeros_are_positive() -> None:
    weight = -torch.rand(4, 8)
    got = make_pruner("magnitude").prune(weight, None, NM(2, 4)).weight
    assert not torch.signbit(got[got == 0]).any()


def test_unknown_method_and_option() -> None:
    with pytest.raises(LLMPruneError, match="unknown method 'sparse'.*magnitude"):
        make_pruner("sparse")
    with pytest.raises(LLMPruneError, match="takes no option"):
        make_pruner("wanda", blocksize=4)
    assert {"magnitude", "wanda"} <= set(PRUNERS)
