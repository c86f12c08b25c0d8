"""Patterns: masks meet their pattern exactly, against a slow reference with the documented tie-break."""
from __future__ import annotations

import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.patterns import NM, Unstructured, parse_pattern


def reference_keep(scores: torch.Tensor, group: int, prune_count: int) -> torch.Tensor:
    """Per row, per group of ``group`` columns: drop the ``prune_count`` lowest (score, index) pairs."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], group):
            cols = sorted(range(g, g + group), key=lambda j: (float(scores[r, j]), j))
            for j in cols[:prune_count]:
                keep[r, j] = False
    return keep


def tied_scores(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Scores drawn from only 4 values, so most comparisons are ties."""
    return torch.randint(0, 4, (rows, cols), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("scores", [torch.rand(7, 24, generator=torch.Generator().manual_seed(1)), tied_scores(7, 24)])
def test_unstructured_matches_reference(sparsity: float, scores: torch.Tensor) -> None:
    pattern = Unstructured(sparsity)
    keep = pattern.keep_mask(scores)
    assert torch.equal(keep, reference_keep(scores, 24, round(24 * sparsity)))
    assert ((~keep).sum(1) == round(24 * sparsity)).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4), (2, 8)])
@pytest.mark.parametrize("tied", [False, True])
def test_nm_matches_reference_and_conforms(n: int, m: int, tied: bool) -> None:
    scores = tied_scores(5, 32, seed=n * m) if tied else torch.rand(5, 32, generator=torch.Generator().manual_seed(m))
    pattern = NM(n, m)
    keep = pattern.keep_mask(scores)
    assert torch.equal(keep, reference_keep(scores, m, m - n))
    assert (keep.reshape(5, -1, m).sum(-1) == n).all()
    assert pattern.violations(scores * keep) == 0
    assert pattern.target_sparsity == pytest.approx(1 - n / m)


def test_violations_detect_broken_weights() -> None:
    weight = torch.ones(2, 8)
    assert NM(2, 4).violations(weight) == 4
    weight[:, :2] = 0
    weight[:, 4:6] = 0
    assert NM(2, 4).violations(weight) == 0
    assert Unstructured(0.5).violations(weight) == 0
    assert Unstructured(0.75).violations(weight) == 2


def test_nm_validate_names_layer() -> None:
    with pytest.raises(LLMPruneError, match=r"model.layers.3.mlp.down_proj has 11 = 2\*4\+3"):
        NM(2, 4).validate("model.layers.3.mlp.down_proj", 8, 11)
    NM(2, 4).validate("ok", 8, 12)


@pytest.mark.parametrize("spec,sparsity,match", [
    ("banana", None, "unknown pattern 'banana'"),
    ("4:2", None, "0 < N < M"),
    ("0:4", None, "0 < N < M"),
    ("2:4", 0.7, "fixes the sparsity at 0.5"),
    (None, 1.0, r"sparsity must be in \[0, 1\)"),
    ("unstructured", -0.1, r"sparsity must be in \[0, 1\)"),
])
def test_parse_pattern_errors(spec, sparsity, match) -> None:
    with pytest.raises(LLMPruneError, match=match):
        parse_pattern(spec, sparsity)


def test_parse_pattern_defaults() -> None:
    assert parse_pattern(None, None) == Unstructured(0.5)
    assert parse_pattern("2:4", 0.5) == NM(2, 4)
    assert parse_pattern("unstructured", 0.6) == Unstructured(0.6)
    assert str(NM(4, 8)) == "4:8"
