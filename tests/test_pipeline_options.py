"""DSnoT refinement and OWL allocation through the real pipeline on a tiny model."""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from llmprune.state import state
from llmprune.errors import LLMPruneError
from llmprune.adapter import ModelAdapter
from llmprune.patterns import NM, Unstructured
from llmprune.pipeline import prune

TOKENS = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


def run(**kwargs):
    model = tiny_model("llama")
    prune(model, calib_tokens=TOKENS, device="cpu", progress=False, **kwargs)
    return model


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", None), ("magnitude", "4:8")])
def test_dsnot_keeps_the_pattern_and_reports(method, pattern) -> None:
    base = run(method=method, pattern=pattern, sparsity=None if pattern else 0.6)
    refined = run(method=method, pattern=pattern, sparsity=None if pattern else 0.6, refine="dsnot",
                  refine_options={"threshold": 0.0})
    target = NM(*map(int, pattern.split(":"))) if pattern else Unstructured(0.6)
    for (name, a), b in zip(ModelAdapter(base).all_linears().items(), ModelAdapter(refined).all_linears().values()):
        assert target.violations(b.weight) == 0, name
        assert torch.equal((a.weight == 0).sum(1), (b.weight == 0).sum(1)), name
    report = state(refined).report
    assert all(layer.facts["dsnot_err_after"] <= layer.facts["dsnot_err_before"] + 1e-6 for layer in report.layers)
    assert report.recipe.refine == {"name": "dsnot", "threshold": 0.0}


def test_owl_allocates_per_layer_and_keeps_the_mean() -> None:
    model = run(method="wanda", sparsity=0.7, allocation="owl", owl_lambda=0.05)
    allocation = state(model).report.recipe.allocation
    sparsities, ratios = allocation["sparsities"], allocation["outlier_ratios"]
    assert len(sparsities) == 3 and sum(sparsities) / 3 == pytest.approx(0.7, abs=1e-6)
    order = sorted(range(3), key=lambda i: ratios[i])
    assert [sparsities[i] for i in order] == sorted(sparsities, reverse=True)  # more outliers, less sparsity
    adapter = ModelAdapter(model)
    for index, sparsity in enumerate(sparsities):
        for linear in adapter.linears(index).values():
            assert Unstructured(sparsity).violations(linear.weight) == 0


def test_owl_refuses_nm_and_unknown_names() -> None:
    with pytest.raises(LLMPruneError, match="OWL allocates unstructured sparsity"):
        run(method="wanda", pattern="2:4", allocation="owl")
    with pytest.raises(LLMPruneError, match="unknown allocation 'best'"):
        run(method="wanda", allocation="best")
    with pytest.raises(LLMPruneError, match="unknown refinement 'grow'"):
        run(method="wanda", refine="grow")
