"""Behaviour kept across refactors: outputs compared against files written by earlier code.

Two kinds of reference, both made by ``LLMPRUNE_WRITE_GOLDEN=1 pytest tests/test_compat.py`` with the
code of the commit that introduced them (0.1.0, before the codec/recipe redesign):

- ``fixtures/golden_stories260k.json``: SHA-256 of ``model.safetensors``, of ``config.json`` without the
  ``transformers_version`` that ``save_pretrained`` stamps (a new transformers release changes nothing
  else there), and of ``llmprune.json`` without timings and paths, for prunes of the real stories260K model with each
  method, pattern family and storage format. The same prune today must give the same bytes.
- ``fixtures/v0.1/*``: tiny checkpoints (random weights) written by that code, in each storage
  format (packed 2:4 with a tied ``Conv1D`` GPT-2, hybrid, sparse-bitmask). They must load, and the
  dense weights they load to must hash as they did then.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import STORIES, needs_stories, needs_wikitext, tiny_model

import llmprune
from llmprune.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden_stories260k.json"
OLD_CHECKPOINTS = FIXTURES / "v0.1"
WRITE = os.environ.get("LLMPRUNE_WRITE_GOLDEN") == "1"

# name → CLI arguments after ``prune MODEL``; 24 × 64 calibration tokens keep each run ~1 s.
PRUNES: dict[str, list[str]] = {
    "magnitude-2:4": ["--method", "magnitude", "--pattern", "2:4"],
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "sparsegpt-0.5": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "wanda-0.6-bitmask": ["--method", "wanda", "--sparsity", "0.6", "--format", "bitmask"],
    "wanda-0.5-dsnot": ["--method", "wanda", "--sparsity", "0.5", "--refine", "dsnot"],
    "sparsegpt-0.6-owl": ["--method", "sparsegpt", "--sparsity", "0.6", "--allocation", "owl"],
    "sparsegpt-hybrid": ["--method", "sparsegpt", "--pattern", "hybrid:2:4", "--dense-fraction", "0.25",
                         "--hybrid-block", "16"],
    "wanda-hybrid-global": ["--method", "wanda", "--pattern", "hybrid:2:4", "--dense-fraction", "0.25",
                            "--hybrid-block", "16", "--hybrid-budget", "global", "--hybrid-select", "saliency"],
}
# Report fields that legitimately change from run to run or machine to machine, and those 0.1.0 did not write.
VOLATILE = {"seconds", "layer_seconds", "phase_seconds", "source", "versions", "passes", "quantize"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stable(value):
    """The report without its volatile fields, for hashing."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def checkpoint_digest(directory: Path) -> dict[str, str]:
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    digest = {name: _sha((directory / name).read_bytes()) for name in files}
    config = json.loads((directory / "config.json").read_text())
    config.pop("transformers_version", None)
    digest["config.json"] = _sha(json.dumps(config, sort_keys=True).encode())
    report = json.loads((directory / "llmprune.json").read_text())
    digest["llmprune.json"] = _sha(json.dumps(_stable(report), sort_keys=True).encode())
    return digest


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the dense state dict (keys sorted, raw bytes), whatever modules hold it."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
@needs_stories
@needs_wikitext
@pytest.mark.parametrize("name", list(PRUNES))
def test_prune_gives_the_bytes_of_0_1(name: str, tmp_path: Path) -> None:
    """0.1.0's order (two passes per layer) is still there and gives its bytes."""
    # The references were made with 2 threads; float summation order in the GEMMs depends on the count.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    out = tmp_path / name
    try:
        code = main(["prune", str(STORIES), "--calib", "wikitext2", "--nsamples", "24", "--seqlen", "64",
                     "--device", "cpu", "--quiet", "--out", str(out), "--passes", "2", *PRUNES[name]])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    digest = checkpoint_digest(out)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if WRITE:
        golden[name] = digest
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden digest written")
    assert digest == golden[name]


def _old_checkpoints() -> dict[str, tuple[str, str, dict]]:
    """name → (model type, pattern, save options) of the fixtures written by 0.1.0."""
    return {"gpt2-packed-24": ("gpt2", "2:4", {}),
            "llama-hybrid": ("llama", "hybrid:2:4", {}),
            "llama-bitmask": ("llama", "unstructured", {"storage": "bitmask"})}


def _write_old_checkpoint(name: str, directory: Path) -> None:
    model_type, pattern, options = _old_checkpoints()[name]
    model = tiny_model(model_type, seed=3)
    tokens = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    extra = {"dense_fraction": 0.25, "hybrid_block": 8} if pattern.startswith("hybrid") else {}
    llmprune.prune(model, method="wanda", pattern=pattern, calib_tokens=tokens, device="cpu", progress=False, **extra)
    if directory.exists():
        shutil.rmtree(directory)
    llmprune.save(model, directory, **options)
    loaded = llmprune.load(directory, device="cpu", backend="dense")
    (directory / "weights.sha256").write_text(weights_digest(loaded) + "\n")


@pytest.mark.parametrize("name", list(_old_checkpoints()))
def test_checkpoints_of_0_1_load(name: str) -> None:
    directory = OLD_CHECKPOINTS / name
    if WRITE:
        _write_old_checkpoint(name, directory)
        pytest.skip("fixture written")
    for backend in ("dense", "auto"):
        model = llmprune.load(directory, device="cpu", backend=backend)
        assert weights_digest(model) == (directory / "weights.sha256").read_text().strip()
