"""Calibration data: local formats, seeded windows the way SparseGPT/Wanda draw them, clear errors."""
from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import needs_wikitext, word_text, word_tokenizer

from llmprune.calib import named_text, read_text_file, sample_windows, tokens
from llmprune.errors import LLMPruneError


def test_windows_follow_the_papers_sampling() -> None:
    ids = torch.arange(1000)
    got = sample_windows(ids, nsamples=6, seqlen=50, seed=3, source="x")
    rng = random.Random(3)
    starts = [rng.randint(0, 1000 - 50 - 1) for _ in range(6)]
    assert torch.equal(got, torch.stack([ids[s : s + 50] for s in starts]))
    assert torch.equal(got, sample_windows(ids, 6, 50, 3, "x"))
    assert not torch.equal(got, sample_windows(ids, 6, 50, 4, "x"))


def test_too_short_corpus_says_how_many_tokens() -> None:
    with pytest.raises(LLMPruneError, match="has 100 tokens; windows of seqlen=128"):
        sample_windows(torch.arange(100), 4, 128, 0, "tiny.txt")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_local_formats(tmp_path, suffix: str) -> None:
    docs = ["w1 w2 w3", "w4 w5", "w6"]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(docs))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    elif suffix == ".json":
        path.write_text(json.dumps(docs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path)
    assert read_text_file(path) == "\n\n".join(docs)


def test_local_file_tokens_shape(tmp_path) -> None:
    path = tmp_path / "c.txt"
    path.write_text(word_text(500))
    got = tokens(str(path), word_tokenizer(), nsamples=4, seqlen=32, seed=0)
    assert got.shape == (4, 32) and got.dtype == torch.long


def test_bad_specs(tmp_path) -> None:
    with pytest.raises(LLMPruneError, match="unknown calibration text 'nope'"):
        named_text("nope")
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(LLMPruneError, match="unsupported calibration file type '.csv'"):
        named_text(str(bad))
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"question": 1}))
    with pytest.raises(LLMPruneError, match="'text' field"):
        named_text(str(records))


@needs_wikitext
def test_wikitext2_uses_the_shared_validation_text() -> None:
    text, source = named_text("wikitext2")
    assert "wiki.valid.tokens" in source and "Homarus gammarus" in text[:200]
