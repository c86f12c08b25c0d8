"""The hybrid sparse-dense split: pattern geometry, block selection against direct references,
the global budget, SparseGPT with a dense region against the float64 OBS reference, and the pipeline."""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from helpers import correlated_inputs, random_weight, reference_obs, stats_for

from llmprune import hybrid
from llmprune.errors import LLMPruneError
from llmprune.adapter import ModelAdapter
from llmprune.patterns import NM, Hybrid, parse_pattern
from llmprune.pipeline import prune
from llmprune.pruners import make_pruner
from llmprune.state import state
from llmprune.stats import HESSIAN, SQ_NORM

TOKENS = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


def test_parse_and_validate() -> None:
    split = parse_pattern("hybrid:2:4", None, 0.25)
    assert split == Hybrid(2, 4, 0.25, 64) and str(split) == "hybrid:2:4"
    assert split.target_sparsity == pytest.approx(0.375)
    assert parse_pattern("hybrid", None, None) == Hybrid()
    with pytest.raises(LLMPruneError, match=r"dense-fraction must be in \[0, 1\)"):
        parse_pattern("hybrid:2:4", None, 1.0)
    with pytest.raises(LLMPruneError, match="drop --sparsity"):
        parse_pattern("hybrid:2:4", 0.5, 0.25)
    with pytest.raises(LLMPruneError, match="hybrid pattern only"):
        parse_pattern("2:4", None, 0.25)
    with pytest.raises(LLMPruneError, match="multiple of M=4"):
        Hybrid(2, 4, 0.25, 6)
    assert Hybrid(block=64).blocks(160) == [(0, 64), (64, 128), (128, 160)]
    assert Hybrid(dense_fraction=0.25, block=64).uniform_count(576) == 2  # 144 columns → 2 blocks of 64
    assert Hybrid(block=4).region([(8, 12), (0, 4), (4, 8)]) == NM(2, 4, ((0, 12),))


def test_region_pattern_keeps_dense_columns_and_checks_only_sparse_groups() -> None:
    region = NM(2, 4, ((4, 12),))
    scores = torch.rand(6, 16)
    keep = region.keep_mask(scores)
    assert keep[:, 4:12].all()
    assert (keep[:, :4].sum(1) == 2).all() and (keep[:, 12:].reshape(6, 1, 4).sum(-1) == 2).all()
    weight = torch.randn(6, 16) * keep
    assert region.violations(weight) == 0
    weight[0, 0:4] = 1.0  # a full group in the sparse region
    assert region.violations(weight) == 1
    assert NM(2, 4).violations(torch.ones(6, 16) * keep) == 6 * 2  # the dense groups break plain 2:4


def loss(delta: torch.Tensor, second: torch.Tensor) -> float:
    return float(((delta @ second) * delta).sum())


def test_error_ranking_matches_a_direct_greedy_search() -> None:
    inputs = correlated_inputs(columns=32, tokens=256)
    stats = stats_for(inputs, torch.float64, needs=frozenset({HESSIAN}))
    weight = random_weight(8, 32).double()
    pruned = make_pruner("magnitude").prune(weight.clone(), None, NM(2, 4)).weight
    split = Hybrid(2, 4, 0.5, block=8)
    ranking = hybrid.rank_blocks(weight, pruned, stats, split, "error")
    # Direct: try every remaining block, recompute the full loss, keep the best.
    h = stats.hessian
    energy = loss(weight, h)
    delta = weight - pruned
    for step in range(4):
        current = loss(delta, h)
        candidates = {}
        for a, e in split.blocks(32):
            if (a, e) in ranking.blocks[:step]:
                continue
            restored = delta.clone()
            restored[:, a:e] = 0
            candidates[(a, e)] = current - loss(restored, h)
        best = max(candidates, key=candidates.get)
        assert ranking.blocks[step] == best
        assert ranking.gains[step] == pytest.approx(candidates[best] / energy, rel=1e-9)
        delta[:, best[0]:best[1]] = 0
    assert ranking.weights == [8 * 8] * 4


def test_saliency_ranking_is_the_per_block_diagonal_loss() -> None:
    inputs = correlated_inputs(columns=32, tokens=256)
    stats = stats_for(inputs, needs=frozenset({SQ_NORM}))
    weight = random_weight(8, 32)
    pruned = make_pruner("wanda").prune(weight.clone(), stats, NM(2, 4)).weight
    ranking = hybrid.rank_blocks(weight, pruned, stats, Hybrid(block=8), "saliency")
    second = stats.sq_norm.double()
    direct = {(a, a + 8): float(((weight - pruned).double()[:, a:a + 8].square() * second[a:a + 8]).sum())
              for a in range(0, 32, 8)}
    assert [tuple(b) for b in ranking.blocks] == sorted(direct, key=lambda blk: -direct[blk])
    energy = float((weight.double().square() * second).sum())
    assert ranking.gains == pytest.approx([direct[tuple(b)] / energy for b in ranking.blocks])
    with pytest.raises(LLMPruneError, match="unknown hybrid selection 'best'"):
        hybrid.rank_blocks(weight, pruned, stats, Hybrid(block=8), "best")


def test_global_budget_spends_on_the_largest_gains_per_weight_in_order() -> None:
    rankings = {
        "a": hybrid.Ranking([(0, 4), (4, 8)], [0.8, 0.1], [10, 10]),
        "b": hybrid.Ranking([(0, 4), (4, 8)], [0.5, 0.6], [10, 10]),  # not decreasing: 2nd block follows the 1st
        "c": hybrid.Ranking([(0, 4)], [0.05], [40]),
    }
    assert hybrid.allocate_global(rankings, 30 / 80) == {"a": 1, "b": 2, "c": 0}
    assert hybrid.allocate_global(rankings, 0.0) == {"a": 0, "b": 0, "c": 0}
    assert sum(hybrid.allocate_global(rankings, 0.99).values()) == 5


@pytest.mark.parametrize("ranges", [((8, 16),), ((0, 8), (24, 32))])
def test_sparsegpt_with_a_dense_region_matches_the_obs_reference(ranges) -> None:
    columns = 32
    inputs = correlated_inputs(columns=columns, tokens=256)
    stats = stats_for(inputs, torch.float64)
    weight = random_weight(16, columns).double()
    region = NM(2, 4, ranges)
    ours = make_pruner("sparsegpt", blocksize=8, hessian_dtype="float64").prune(weight.clone(), stats, region).weight
    dense = region.dense_columns(columns)
    order = torch.cat([(~dense).nonzero().flatten(), dense.nonzero().flatten()])
    width = int((~dense).sum())
    expected_perm, _ = reference_obs(weight[:, order], stats.hessian[order][:, order], NM(2, 4, ((width, columns),)))
    expected = torch.empty_like(expected_perm)
    expected[:, order] = expected_perm
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    assert region.violations(ours) == 0
    assert (ours[:, dense] != 0).all()  # the dense region absorbs updates but is never pruned
    assert not torch.equal(ours[:, dense], weight[:, dense])


@pytest.mark.parametrize("method,select,budget", [
    ("wanda", "saliency", "uniform"), ("wanda", "error", "global"), ("sparsegpt", "error", "uniform"),
    ("sparsegpt", "saliency", "global"), ("magnitude", "error", "uniform"),
])
def test_pipeline_hybrid_geometry_and_sparsity(method, select, budget) -> None:
    model = tiny_model("llama")
    original = {n: p.weight.clone() for n, p in ModelAdapter(model).all_linears().items()}
    prune(model, method=method, pattern="hybrid:2:4", dense_fraction=0.25, hybrid_select=select,
          hybrid_budget=budget, hybrid_block=8, calib_tokens=TOKENS, device="cpu", progress=False)
    report = state(model).report
    assert report.recipe.pattern == "hybrid:2:4"
    assert report.recipe.hybrid == {"dense_fraction": 0.25, "block": 8, "select": select, "budget": budget}
    layers = {layer.name: layer for layer in report.layers}
    dense_weights = 0
    for name, linear in ModelAdapter(model).all_linears().items():
        ranges = [tuple(r) for r in layers[name].dense_columns]
        columns = linear.in_features
        for a, b in ranges:
            assert a % 8 == 0 and (b % 8 == 0 or b == columns) and a < b <= columns
        if budget == "uniform":
            assert sum(b - a for a, b in ranges) == columns // 4
        region = NM(2, 4, tuple(ranges))
        weight = linear.weight
        assert region.violations(weight) == 0
        dense = region.dense_columns(columns)
        assert ((weight[:, ~dense] == 0).sum() == weight[:, ~dense].numel() // 2)
        if method != "sparsegpt":  # no weight updates: the dense region is the original weight
            assert torch.equal(weight[:, dense], original[name][:, dense])
        dense_weights += linear.out_features * int(dense.sum())
    total = report.summary.prunable_params
    assert report.summary.dense_fraction == pytest.approx(dense_weights / total)
    assert report.summary.dense_fraction == pytest.approx(0.25, abs=0.05)
    assert report.summary.sparsity == pytest.approx((1 - dense_weights / total) / 2, abs=1e-6)


def test_hybrid_beats_plain_24_on_reconstruction_error() -> None:
    errors = {}
    for pattern, fraction in [("2:4", None), ("hybrid:2:4", 0.5)]:
        model = tiny_model("llama")
        prune(model, method="wanda", pattern=pattern, dense_fraction=fraction, hybrid_block=16, calib_tokens=TOKENS,
              device="cpu", progress=False)
        errors[pattern] = sum(layer.rel_error for layer in state(model).report.layers)
    assert errors["hybrid:2:4"] < errors["2:4"]


def test_pipeline_refuses_bad_hybrid_options() -> None:
    with pytest.raises(LLMPruneError, match="unknown hybrid budget 'even'"):
        prune(tiny_model("llama"), method="wanda", pattern="hybrid:2:4", hybrid_budget="even", calib_tokens=TOKENS)
    with pytest.raises(LLMPruneError, match="OWL allocates unstructured"):
        prune(tiny_model("llama"), method="wanda", pattern="hybrid:2:4", allocation="owl", calib_tokens=TOKENS)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_hybrid_checkpoint_round_trip(tmp_path, method) -> None:
    import llmprune
    from llmprune.checkpoint import read_layout
    from llmprune.sparse_linear import SparseLinear

    model = tiny_model("llama")
    prune(model, method=method, pattern="hybrid:2:4", dense_fraction=0.25, hybrid_block=8, calib_tokens=TOKENS,
          device="cpu", progress=False)
    llmprune.save(model, tmp_path / "out")
    config = __import__("json").loads((tmp_path / "out" / "config.json").read_text())
    layers = {layer.name: layer for layer in state(model).report.layers}
    assert config["llmprune_packing"]["hybrid"] == {n: layer.dense_columns for n, layer in layers.items()}
    assert set(layers) <= set(config["quantization_config"]["sparsity_config"]["ignore"])
    layout = read_layout(tmp_path / "out")
    name = "model.layers.0.mlp.down_proj"  # [32, 64]: 16 dense columns
    assert layout[f"{name}.dense"].shape == (32, 16) and layout[f"{name}.compressed"].shape == (32, 24)
    loaded = llmprune.load(tmp_path / "out", backend="dense")
    modules = dict(loaded.named_modules())
    for n, linear in ModelAdapter(model).all_linears().items():
        sparse = modules[n]
        assert isinstance(sparse, SparseLinear) and sparse.dense_ranges == tuple(map(tuple, layers[n].dense_columns))
        assert torch.equal(sparse.weight, linear.weight)  # the dense + 2:4 parts rebuild the pruned weight exactly
        x = torch.randn(3, linear.in_features)
        torch.testing.assert_close(sparse(x), torch.nn.functional.linear(x, linear.weight), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, model(TOKENS).logits, rtol=1e-4, atol=1e-4)
    llmprune.save(loaded, tmp_path / "again")  # a loaded hybrid model re-packs to the same bytes
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_hybrid_checkpoint_rejects_a_bad_layout(tmp_path) -> None:
    import json

    import llmprune

    model = tiny_model("llama")
    prune(model, method="wanda", pattern="hybrid:2:4", dense_fraction=0.25, hybrid_block=8, calib_tokens=TOKENS,
          device="cpu", progress=False)
    llmprune.save(model, tmp_path / "out")
    path = tmp_path / "out" / "config.json"
    config = json.loads(path.read_text())
    config["llmprune_packing"]["hybrid"]["model.layers.0.mlp.down_proj"] = [[0, 8]]
    path.write_text(json.dumps(config))
    with pytest.raises(LLMPruneError, match=r"model.layers.0.mlp.down_proj.compressed has shape \[32, 24\].*8 dense columns"):
        llmprune.load(tmp_path / "out")
    config["llmprune_packing"]["hybrid"]["model.layers.0.mlp.down_proj"] = [[2, 18]]
    path.write_text(json.dumps(config))
    with pytest.raises(LLMPruneError, match="dense range 2:18, not whole groups of 4"):
        llmprune.load(tmp_path / "out")
