"""Streaming: captured per-layer inputs reproduce the model's own forward, for every family."""
from __future__ import annotations

import functools

import pytest
import torch
from conftest import TINY_CONFIGS, VOCAB, tiny_model

from llmprune.state import state
from llmprune.errors import LLMPruneError
from llmprune.adapter import ModelAdapter
from llmprune.pipeline import prune
from llmprune.patterns import NM
from llmprune.stats import HESSIAN, MOMENTS, SQ_NORM, InputStats
from llmprune import stream
from llmprune.stream import gram_pays, layerwise


def layer_outputs(adapter: ModelAdapter, run, count: int) -> list[torch.Tensor]:
    """The last ``count`` sequences output by each decoder layer while ``run()`` executes.

    (Streaming's capture pass calls the layers as pass-through recorders first; the real
    outputs are the last ones.)"""
    outputs: list[list[torch.Tensor]] = [[] for _ in adapter.layers]
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outputs[i].append((o[0] if isinstance(o, tuple) else o).detach()))
               for i, layer in enumerate(adapter.layers)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(o)[-count:] for o in outputs]


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stream_reproduces_model_hidden_states(model_type: str, attn: str) -> None:
    try:
        model = tiny_model(model_type, attn=attn)
    except ValueError as exc:
        pytest.skip(f"{model_type} has no {attn} attention in this transformers: {str(exc)[:60]}")
    adapter = ModelAdapter(model)
    tokens = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer_outputs(adapter, lambda: model(input_ids=tokens, use_cache=False), 5)
    got = layer_outputs(adapter, lambda: layerwise(adapter, tokens, lambda *a: None, device="cpu", batch_size=2, progress=False), 5)
    assert len(got) == len(expected) == TINY_CONFIGS[model_type].get("num_hidden_layers", 3)
    for index, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=f"layer {index}")


def test_sparsity_zero_changes_nothing() -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, method="wanda", sparsity=0.0, calib_tokens=torch.randint(0, VOCAB, (4, 16)), device="cpu", progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(layer.rel_error == 0.0 for layer in state(model).report.layers)


@pytest.mark.parametrize("model_type,groups", [
    ("llama", [{"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}]),
    ("opt", [{"q_proj", "k_proj", "v_proj"}, {"out_proj"}, {"fc1"}, {"fc2"}]),
    ("gpt2", [{"c_attn"}, {"attn.c_proj"}, {"c_fc"}, {"mlp.c_proj"}]),
])
def test_linears_reading_one_input_share_statistics(model_type: str, groups: list[set[str]]) -> None:
    adapter = ModelAdapter(tiny_model(model_type))
    seen: list[dict[str, InputStats]] = []
    layerwise(adapter, torch.randint(0, VOCAB, (4, 8)), lambda i, lin, stats: seen.append(dict(stats)),
              needs=frozenset({SQ_NORM}), device="cpu", batch_size=2, progress=False, passes=2)
    stats = seen[0]
    by_object: dict[int, set[str]] = {}
    for name, s in stats.items():
        short = ".".join(name.split(".")[-2:]) if model_type == "gpt2" and name.endswith("c_proj") else name.rsplit(".", 1)[-1]
        by_object.setdefault(id(s), set()).add(short)
    assert sorted(map(sorted, by_object.values())) == sorted(map(sorted, groups))


def test_unshared_statistics_are_equal_but_separate() -> None:
    adapter = ModelAdapter(tiny_model("llama"))
    tokens = torch.randint(0, VOCAB, (4, 8))
    results = {}
    for share in (True, False):
        captured = []
        layerwise(adapter, tokens, lambda i, lin, stats: captured.append(dict(stats)), needs=frozenset({HESSIAN}),
                  device="cpu", batch_size=2, share_stats=share, progress=False, passes=2)
        results[share] = captured[1]
    shared, separate = results[True], results[False]
    assert shared["model.layers.1.self_attn.q_proj"] is shared["model.layers.1.self_attn.k_proj"]
    assert separate["model.layers.1.self_attn.q_proj"] is not separate["model.layers.1.self_attn.k_proj"]
    for name in shared:
        torch.testing.assert_close(shared[name].hessian, separate[name].hessian)


def magnitude_24(linears) -> None:
    for linear in linears.values():
        weight = linear.weight.float()
        linear.set_weight(weight * NM(2, 4).keep_mask(weight.abs()))


def test_one_pass_prunes_group_by_group_in_running_order() -> None:
    adapter = ModelAdapter(tiny_model("llama"))
    calls: list[tuple[int, list[str], set[int]]] = []

    def process(index, linears, stats):
        calls.append((index, [n.rsplit(".", 1)[-1] for n in linears], {id(stats[n]) for n in linears}))
        magnitude_24(linears)

    layerwise(adapter, torch.randint(0, VOCAB, (4, 8)), process, needs=frozenset({SQ_NORM}), device="cpu", batch_size=2,
              progress=False)
    first = [names for index, names, _ in calls if index == 0]
    later = [(names, len(ids)) for index, names, ids in calls if index == 2]
    # the first layer reveals the order one linear at a time; the others prune each shared input's group at once
    assert first == [["q_proj"], ["k_proj"], ["v_proj"], ["o_proj"], ["gate_proj"], ["up_proj"], ["down_proj"]]
    assert later == [(["q_proj", "k_proj", "v_proj"], 1), (["o_proj"], 1), (["gate_proj", "up_proj"], 1),
                     (["down_proj"], 1)]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_one_pass_statistics_are_those_of_the_pruned_model(model_type: str) -> None:
    """Each group's statistics come from the forward in which the groups before it already run pruned:
    exactly the inputs those linears see in the final pruned model (a linear's input never depends on it)."""
    model = tiny_model(model_type)
    adapter = ModelAdapter(model)
    tokens = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}

    def process(index, linears, stats):
        seen.update({name: stats[name].hessian.clone() for name in linears})
        magnitude_24(linears)

    layerwise(adapter, tokens, process, needs=frozenset({HESSIAN}), device="cpu", batch_size=2, progress=False,
              hessian_dtype=torch.float64)
    reference = {name: InputStats(p.in_features, frozenset({HESSIAN}), hessian_dtype=torch.float64)
                 for name, p in adapter.all_linears().items()}
    hooks = [p.module.register_forward_pre_hook(lambda m, a, n=name: reference[n].update(a[0]))
             for name, p in adapter.all_linears().items()]
    try:
        with torch.no_grad():
            for batch in tokens.split(2):
                model(input_ids=batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(seen) == set(reference)
    for name, hessian in seen.items():
        torch.testing.assert_close(hessian, reference[name].hessian, rtol=1e-5, atol=1e-8, msg=name)


def test_input_stats_match_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, 6, generator=gen) * 4 + 2 for _ in range(5)]
    stats = InputStats(6, frozenset({SQ_NORM, HESSIAN, MOMENTS}), hessian_dtype=torch.float64)
    for batch in batches:
        stats.update(batch)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    assert stats.count == x.shape[0]
    torch.testing.assert_close(stats.sq_norm.double(), (x * x).mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.hessian, 2 * x.T @ x / x.shape[0])
    torch.testing.assert_close(stats.mean, x.mean(0))
    torch.testing.assert_close(stats.variance, x.var(0, unbiased=False))


def test_wide_hessian_accumulates_its_upper_triangle_and_reads_symmetric() -> None:
    from llmprune.stats import hessian_blocks

    assert hessian_blocks(576) == [(0, 576)] and len(hessian_blocks(1536)) == 4 and len(hessian_blocks(11008)) == 8
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 800, generator=gen, dtype=torch.float64) + 0.5 for _ in range(3)]
    stats = InputStats(800, frozenset({HESSIAN}), hessian_dtype=torch.float64)
    stats.update(batches[0])
    first = stats.hessian.clone()  # read between updates: mirrored, then accumulated on
    x0 = batches[0].reshape(-1, 800)
    torch.testing.assert_close(first, 2 * x0.T @ x0 / x0.shape[0])
    for batch in batches[1:]:
        stats.update(batch)
    x = torch.cat([b.reshape(-1, 800) for b in batches])
    torch.testing.assert_close(stats.hessian, 2 * x.T @ x / x.shape[0])
    assert torch.equal(stats.hessian, stats.hessian.T)


def test_nan_in_activations_names_the_layer() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(LLMPruneError, match=r"decoder layer 1 \(model.layers.1\)"):
        prune(model, method="magnitude", calib_tokens=torch.randint(0, VOCAB, (2, 8)), device="cpu", progress=False)


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(LLMPruneError, match="unknown architecture Sequential.*no stack of decoder layers"):
        ModelAdapter(torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.Linear(4, 4)))


def test_gpt2_conv1d_is_seen_as_out_in() -> None:
    adapter = ModelAdapter(tiny_model("gpt2"))
    c_attn = adapter.linears(0)["transformer.h.0.attn.c_attn"]
    assert c_attn.transposed and (c_attn.out_features, c_attn.in_features) == (96, 32)
    new = torch.arange(96 * 32, dtype=torch.float32).reshape(96, 32)
    c_attn.set_weight(new)
    assert torch.equal(c_attn.module.weight, new.T)


def test_routers_are_not_pruned() -> None:
    model = tiny_model("qwen2")
    adapter = ModelAdapter(model)
    layer = adapter.layers[0]
    layer.mlp.gate = torch.nn.Linear(32, 4)  # a MoE router, as in Qwen2-MoE
    assert "model.layers.0.mlp.gate" not in adapter.linears(0)
    assert "model.layers.0.mlp.gate_proj" in adapter.linears(0)


def _errors_from_grams(monkeypatch) -> list[set[str]]:
    """Filled, layer by layer, with the names of the linears whose errors came from a Gram matrix."""
    grams: list[set[str]] = []
    report = stream._LayerRun.report
    monkeypatch.setattr(stream._LayerRun, "report", lambda run, seconds: grams.append(set(run.from_hessian))
                        or report(run, seconds))
    return grams


@pytest.mark.parametrize("method,passes,samples,layer", [("sparsegpt", 1, 6, 0), ("wanda", 1, 6, 0), ("sparsegpt", 2, 6, 0),
                                                          ("wanda", 1, 12, 1)])
def test_reported_errors_equal_a_direct_measurement(method: str, passes: int, samples: int, layer: int,
                                                    monkeypatch) -> None:
    """‖(W₀−Ŵ)x‖/‖W₀x‖ over the inputs each linear of a layer reads in the pruned model, against the report:
    one-pass SparseGPT computes it from the Hessian where that is cheaper (here all but down_proj, whose 64
    inputs are more than half the 96 calibration tokens), one-pass Wanda from a Gram of the input where that
    pays (at 192 tokens: q/k/v and gate/up of the layers after the first), the others from hooks on the forward."""
    grams = _errors_from_grams(monkeypatch)
    model, original = tiny_model("llama"), tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (samples, 16), generator=torch.Generator().manual_seed(1))
    prune(model, method=method, pattern="2:4", calib_tokens=tokens, device="cpu", progress=False, passes=passes,
          batch_size=4)
    reported = {layer.name: layer.rel_error for layer in state(model).report.layers}
    prefix = ModelAdapter(model).layers_name + f".{layer}."
    expected = {("sparsegpt", 1): {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"},
                ("wanda", 1): {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} if layer else set()}
    assert {name.rsplit(".", 1)[1] for name in grams[layer]} == expected.get((method, passes), set())
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [module.register_forward_pre_hook(lambda m, a, n=name: inputs.setdefault(n, []).append(a[0]))
               for name, module in model.named_modules() if name.startswith(prefix) and isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    assert len(inputs) == 7
    for name, xs in inputs.items():
        x = torch.cat(xs).reshape(-1, xs[0].shape[-1]).double()
        before = original.get_submodule(name).weight.detach().double()
        after = model.get_submodule(name).weight.detach().double()
        direct = float((x @ (before - after).T).norm() / (x @ before.T).norm())
        assert reported[name] == pytest.approx(direct, rel=2e-4), name


def test_gram_pays_where_it_saves_gemm_work() -> None:
    """At the default 8,192 measured tokens: SmolLM2's q/k/v (576 → 576 + 2·192) and gate/up (576 → 2·1536),
    not its o_proj (a Gram as costly as the one GEMM it replaces) nor down_proj; none of Llama-2-7B's."""
    assert gram_pays(576, [576, 192, 192], 8192) and gram_pays(576, [1536, 1536], 8192)
    assert not gram_pays(576, [576], 8192) and not gram_pays(1536, [576], 8192)
    assert not any(gram_pays(4096, outs, 8192) for outs in ([4096] * 3, [4096], [11008] * 2)) and not gram_pays(
        11008, [4096], 8192)
    assert not gram_pays(576, [576, 192, 192], 256)  # few tokens: the hooks' GEMMs are cheap


def test_gram_errors_cover_the_tokens_the_hooks_measure(monkeypatch) -> None:
    """With ``error_tokens`` below the calibration set, the Gram holds exactly the batches the hooks would
    measure: the same reported errors either way."""
    tokens = torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(stream, "layerwise", functools.partial(layerwise, error_tokens=100))  # batches 0 and 1 of 4
    errors, grams = [], []
    for pays in (gram_pays, lambda *args: False):
        monkeypatch.setattr(stream, "gram_pays", pays)
        grams.append(_errors_from_grams(monkeypatch))
        model = tiny_model("llama")
        prune(model, method="wanda", pattern="2:4", calib_tokens=tokens, device="cpu", progress=False, batch_size=4)
        errors.append({layer.name: layer.rel_error for layer in state(model).report.layers})
    assert errors[0] == pytest.approx(errors[1], rel=1e-5)
    assert grams[0][1] == {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"} and not any(grams[1])
