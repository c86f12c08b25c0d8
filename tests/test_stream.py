"""Streaming: captured per-layer inputs reproduce the model's own forward, for every family."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, VOCAB, tiny_model

from llmprune.state import state
from llmprune.errors import LLMPruneError
from llmprune.adapter import ModelAdapter
from llmprune.pipeline import prune
from llmprune.stats import HESSIAN, MOMENTS, SQ_NORM, InputStats
from llmprune.stream import layerwise


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
              needs=frozenset({SQ_NORM}), device="cpu", batch_size=2, progress=False)
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
                  device="cpu", batch_size=2, share_stats=share, progress=False)
        results[share] = captured[1]
    shared, separate = results[True], results[False]
    assert shared["model.layers.1.self_attn.q_proj"] is shared["model.layers.1.self_attn.k_proj"]
    assert separate["model.layers.1.self_attn.q_proj"] is not separate["model.layers.1.self_attn.k_proj"]
    for name in shared:
        torch.testing.assert_close(shared[name].hessian, separate[name].hessian)


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
