"""Perplexity: the paper protocol against a direct per-window computation."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_wikitext, tiny_model, word_text, word_tokenizer

from llmprune.errors import LLMPruneError
from llmprune.eval import perplexity


@pytest.mark.parametrize("stride,batch_size", [(1, 1), (3, 2)])
def test_matches_direct_window_loop(tmp_path, stride: int, batch_size: int) -> None:
    path = tmp_path / "test.txt"
    path.write_text(word_text(300, seed=1))
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    result = perplexity(model, str(path), tokenizer=tokenizer, seqlen=32, window_stride=stride,
                        batch_size=batch_size, progress=False)
    ids = tokenizer(path.read_text(), return_tensors="pt").input_ids[0]
    total = ids.numel() // 32
    losses = []
    with torch.no_grad():
        for w in range(0, total, stride):
            window = ids[w * 32 : (w + 1) * 32][None]
            logits = model(input_ids=window).logits
            losses.append(float(F.cross_entropy(logits[0, :-1], window[0, 1:])))
    assert result.total_windows == total and result.windows == list(range(0, total, stride))
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert f"at seqlen 32" in result.describe()


def test_errors(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("w1 w2")
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    with pytest.raises(LLMPruneError, match="fewer than one window of seqlen 32"):
        perplexity(model, str(path), tokenizer=tokenizer, seqlen=32, progress=False)
    with pytest.raises(LLMPruneError, match="exceeds the model's max_position_embeddings"):
        perplexity(model, str(path), tokenizer=tokenizer, seqlen=2048, progress=False)
    with pytest.raises(LLMPruneError, match="needs a tokenizer"):
        perplexity(model, str(path), seqlen=32, progress=False)


@needs_wikitext
def test_wikitext2_raw_test_join() -> None:
    from llmprune.calib import named_text

    text, source = named_text("wikitext2", "evaluation")
    rows = json.loads(open(source).read())
    assert len(rows) == 4358 and text == "\n\n".join(rows)
