"""End to end on real trained weights (stories260K from ../shared): prune → save → reload → same logits."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import STORIES, needs_stories, needs_wikitext

import llmprune
from llmprune.eval import perplexity

pytestmark = [pytest.mark.slow, needs_stories, needs_wikitext]

PROMPT = "Once upon a time, there was a little girl named Lily."


def prune_stories(method: str, pattern: str | None = None, sparsity: float | None = None):
    return llmprune.prune(STORIES, method=method, pattern=pattern, sparsity=sparsity, nsamples=16, seqlen=256,
                          device="cpu", progress=False)


@pytest.mark.parametrize("pattern", ["2:4", None])
def test_saved_checkpoint_reloads_with_the_same_logits(tmp_path, pattern) -> None:
    """Unstructured saves dense (plain transformers reads it); 2:4 saves packed (llmprune.load)."""
    from transformers import AutoModelForCausalLM

    model = prune_stories("wanda", pattern=pattern)
    out = llmprune.save(model, tmp_path / "pruned")
    if pattern == "2:4":
        reloaded = llmprune.load(out, backend="dense")
        assert "sparse-24-bitmask" in (out / "config.json").read_text()
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = llmprune.state(model).tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    if pattern == "2:4" and importlib.util.find_spec("numba"):  # the CPU kernel decodes what dense decodes
        fast = llmprune.load(out, backend="numba")
        assert set(llmprune.state(fast).backends.values()) == {"numba"}
        runs = [m.generate(ids, max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True)
                for m in (reloaded, fast)]
        assert torch.equal(runs[0].sequences, runs[1].sequences)
        torch.testing.assert_close(torch.stack(runs[1].scores), torch.stack(runs[0].scores), rtol=1e-4, atol=1e-4)
    report = llmprune.state(model).report
    assert report.summary.sparsity == pytest.approx(0.5, abs=1e-3)
    assert all(0 < layer.rel_error < 1 for layer in report.layers)


def test_wanda_beats_magnitude_on_real_weights() -> None:
    results = {}
    for method in ("magnitude", "wanda"):
        model = prune_stories(method, sparsity=0.5)
        results[method] = perplexity(model, "wikitext2", seqlen=256, window_stride=40, progress=False).ppl
    assert results["wanda"] <= results["magnitude"], results


def test_nm_that_does_not_divide_a_real_layer() -> None:
    with pytest.raises(llmprune.LLMPruneError, match="model.layers.0.mlp.down_proj has 172 = 21\\*8\\+4"):
        prune_stories("wanda", pattern="4:8")
