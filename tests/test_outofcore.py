"""Out-of-core pruning of safetensors checkpoints: the same bytes as loading whole and saving, one decoder
layer in memory at a time, and a broken checkpoint or a small disk refused before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, word_text, word_tokenizer
from safetensors.torch import load_file, save_file

from llmprune.adapter import ModelAdapter
from llmprune.checkpoint import save
from llmprune.checkpoint.safetensors import WEIGHTS_NAME
from llmprune.errors import LLMPruneError
from llmprune.loading import CheckpointSource, is_safetensors_checkpoint, load_pretrained
from llmprune.pipeline import prune, prune_checkpoint
from llmprune.recipe import Recipe

# family, tied embeddings, recipe settings, storage: every family once, every method and pattern family once
CASES = [
    ("llama", False, dict(method="sparsegpt", pattern="2:4"), "auto"),
    ("llama", True, dict(method="wanda", sparsity=0.6), "bitmask"),
    ("qwen3", False, dict(method="sparsegpt", pattern="hybrid:2:4", dense_fraction=0.25, hybrid_block=8), "auto"),
    ("gemma3_text", True, dict(method="wanda", pattern="hybrid:2:4", dense_fraction=0.25, hybrid_block=8,
                               hybrid_budget="global", hybrid_select="saliency"), "auto"),
    ("opt", True, dict(method="magnitude", pattern="2:4"), "auto"),
    ("gpt2", True, dict(method="wanda", sparsity=0.7, allocation="owl"), "auto"),
    ("mistral", False, dict(method="wanda", sparsity=0.5, refine="dsnot"), "auto"),
]


def checkpoint(tmp_path: Path, model_type: str, tied: bool) -> Path:
    directory = tmp_path / "source"
    tiny_model(model_type, tie_word_embeddings=tied).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


def source_and_calib(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny untied Llama checkpoint and a calibration text for it."""
    calib = tmp_path / "calib.txt"
    calib.write_text(word_text(3000))
    return checkpoint(tmp_path, "llama", False), calib


def report_without_timings(directory: Path) -> dict:
    report = json.loads((directory / "llmprune.json").read_text())
    report["summary"].pop("seconds")
    report["summary"].pop("phase_seconds")
    for layer in report["layers"]:
        layer.pop("seconds")
        layer.pop("layer_seconds")
    return report


@pytest.mark.parametrize("model_type,tied,settings,storage", CASES, ids=[f"{c[0]}-{c[2]['method']}" for c in CASES])
def test_out_of_core_writes_the_bytes_of_the_in_memory_path(tmp_path, model_type, tied, settings, storage) -> None:
    source = checkpoint(tmp_path, model_type, tied)
    calib = tmp_path / "calib.txt"
    calib.write_text(word_text(3000))
    recipe = Recipe.build(calib=str(calib), nsamples=4, seqlen=16, **settings)
    assert is_safetensors_checkpoint(source)
    prune_checkpoint(source, tmp_path / "ooc", recipe, device="cpu", progress=False, storage=storage)
    model, tokenizer = load_pretrained(source)
    prune(model, recipe=Recipe.build(calib=str(calib), nsamples=4, seqlen=16, **settings), device="cpu", progress=False)
    save(model, tmp_path / "mem", tokenizer=tokenizer, storage=storage)
    for name in (WEIGHTS_NAME, "config.json"):
        assert (tmp_path / "ooc" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes(), name
    ooc, mem = report_without_timings(tmp_path / "ooc"), report_without_timings(tmp_path / "mem")
    assert ooc == mem


def test_one_decoder_layer_is_materialised_at_a_time(tmp_path, monkeypatch) -> None:
    source, calib = source_and_calib(tmp_path)
    seen: list[int] = []
    load = CheckpointSource.load

    def counting_load(self, prefix: str = "", exclude: str | None = None) -> int:
        size = load(self, prefix, exclude)
        adapter = ModelAdapter(self.model)
        seen.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in adapter.layers))
        return size

    monkeypatch.setattr(CheckpointSource, "load", counting_load)
    recipe = Recipe.build("sparsegpt", "2:4", calib=str(calib), nsamples=4, seqlen=16, allocation="uniform")
    report = prune_checkpoint(source, tmp_path / "out", recipe, device="cpu", progress=False)
    assert len(report.layers) == 3 * 7
    layer_loads = [count for count in seen if count]
    assert len(layer_loads) == 3 and max(layer_loads) == 1  # each layer once, never two at a time


def test_owl_prepass_also_streams_one_layer_at_a_time(tmp_path, monkeypatch) -> None:
    source, calib = source_and_calib(tmp_path)
    peaks: list[int] = []
    release = CheckpointSource.release

    def counting_release(self, prefix: str) -> None:
        peaks.append(sum(not p.is_meta for p in self.model.parameters()))
        release(self, prefix)

    monkeypatch.setattr(CheckpointSource, "release", counting_release)
    recipe = Recipe.build("wanda", sparsity=0.6, allocation="owl", calib=str(calib), nsamples=4, seqlen=16)
    prune_checkpoint(source, tmp_path / "out", recipe, device="cpu", progress=False)
    per_layer = 9  # a Llama layer: 7 linears, 2 norms
    outside = 2  # embeddings and final norm; the untied lm_head is read only when written
    assert len(peaks) == 2 * 3 and set(peaks) == {outside + per_layer}


def test_a_missing_or_misshapen_tensor_fails_before_any_work(tmp_path) -> None:
    source = checkpoint(tmp_path, "llama", False)
    tensors = load_file(source / WEIGHTS_NAME)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, source / WEIGHTS_NAME, metadata={"format": "pt"})
    recipe = Recipe.build("wanda", "2:4", nsamples=4, seqlen=16)
    with pytest.raises(LLMPruneError, match=r"model\.layers\.2\.mlp\.up_proj\.weight is missing"):
        prune_checkpoint(source, tmp_path / "out", recipe, device="cpu", progress=False)
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(64, 31)
    save_file(tensors, source / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(LLMPruneError, match=r"up_proj\.weight has shape \[64, 31\].*config\.json makes it \[64, 32\]"):
        prune_checkpoint(source, tmp_path / "out", recipe, device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_disk_too_small_for_the_output_fails_before_any_work(tmp_path, monkeypatch) -> None:
    import shutil

    source, calib = source_and_calib(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
    pruned = []
    monkeypatch.setattr("llmprune.pipeline.run", lambda *a, **k: pruned.append(1))
    recipe = Recipe.build("wanda", "2:4", calib=str(calib), nsamples=4, seqlen=16)
    with pytest.raises(LLMPruneError, match="GiB free, and the pruned checkpoint needs up to"):
        prune_checkpoint(source, tmp_path / "out", recipe, device="cpu", progress=False)
    assert not pruned and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_activations_offloaded_to_a_file_give_the_same_result(tmp_path) -> None:
    source, calib = source_and_calib(tmp_path)
    recipe = Recipe.build("sparsegpt", "2:4", calib=str(calib), nsamples=4, seqlen=16)
    prune_checkpoint(source, tmp_path / "ram", recipe, device="cpu", progress=False)
    offload = tmp_path / "activations"
    prune_checkpoint(source, tmp_path / "file", recipe, device="cpu", progress=False, offload_activations=offload)
    assert (tmp_path / "ram" / WEIGHTS_NAME).read_bytes() == (tmp_path / "file" / WEIGHTS_NAME).read_bytes()
    assert offload.is_dir() and not list(offload.iterdir())  # the file is removed at the end


def test_sigterm_leaves_no_temporary_output(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    source, calib = source_and_calib(tmp_path)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "llmprune", "prune", str(source), "--method", "sparsegpt",
                                "--pattern", "2:4", "--calib", str(calib), "--nsamples", "1024", "--seqlen", "32",
                                "--device", "cpu", "--quiet", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before its temporary output appeared"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err, err[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
