"""Model loading: local directories, .gguf resolution, and clear errors for bad paths."""
from __future__ import annotations

import pytest
from conftest import SMOLLM2

from llmprune.state import state
from llmprune.errors import LLMPruneError
from llmprune.loading import _resolve_gguf, load_pretrained as load


def test_load_local_directory(tiny_checkpoint) -> None:
    model, tokenizer = load(tiny_checkpoint)
    assert state(model).tokenizer is tokenizer and not model.training
    assert tokenizer("w1 w2").input_ids[-2:] == [4, 5]


def test_missing_path() -> None:
    with pytest.raises(LLMPruneError, match="model path ./no/such/model does not exist"):
        load("./no/such/model")


def test_corrupt_checkpoint(tiny_checkpoint) -> None:
    (tiny_checkpoint / "config.json").write_text("{ not json")
    with pytest.raises(LLMPruneError, match="cannot load model from .*local checkpoint"):
        load(tiny_checkpoint)


def test_directory_without_model(tmp_path) -> None:
    with pytest.raises(LLMPruneError, match="no config.json and no .gguf"):
        load(tmp_path)


def test_gguf_resolution(tmp_path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    assert _resolve_gguf(tmp_path) == (tmp_path, "a.gguf")
    assert _resolve_gguf(tmp_path / "a.gguf") == (tmp_path, "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(LLMPruneError, match="several .gguf files"):
        _resolve_gguf(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"SmolLM2 GGUF not found at {SMOLLM2}")
def test_gguf_benchmark_model_finds_its_layers() -> None:
    from llmprune.adapter import ModelAdapter

    model, _ = load(SMOLLM2)
    adapter = ModelAdapter(model)
    assert len(adapter) == 30 and len(adapter.all_linears()) == 30 * 7
