"""scripts/gpu_check.sh (its dry run on CPU, its pass/fail logic) and scripts/synthetic_model.py, which it
and the out-of-core benchmarks build their models with. Neither needs ../shared or a GPU."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmprune.resources import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"


def _script(name: str):
    """A module of scripts/ imported by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


synthetic = _script("synthetic_model")
gpu_check = _script("gpu_check")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


# --- synthetic_model.py -------------------------------------------------------------------------------

def test_tiny_checkpoint_loads_with_transformers_and_tokenizes_its_calibration_text(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    assert synthetic.main(["tiny", str(out), "--seed", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["calib.txt", "config.json", "model.safetensors", "synthetic.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    weight = model.model.layers[1].mlp.up_proj.weight.float()
    assert abs(weight.std().item() - 0.02) < 0.002 and abs(weight.mean().item()) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(128, dtype=torch.bfloat16))
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer((out / "calib.txt").read_text(), add_special_tokens=False).input_ids
    assert len(ids) == synthetic.CALIB_WORDS and tokenizer.unk_token_id not in ids and max(ids) < 512
    record = json.loads((out / "synthetic.json").read_text())
    assert record["parameters"] == sum(p.numel() for p in model.parameters()) and record["seed"] == 3


def test_shards_index_and_seeding(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    whole, sharded, short = tmp_path / "whole", tmp_path / "sharded", tmp_path / "short"
    synthetic.build("tiny", whole, layers=4, log=lambda _: None)
    synthetic.build("tiny", sharded, layers=4, max_shard_mb=1, log=lambda _: None)
    synthetic.build("tiny", short, layers=2, log=lambda _: None)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert all((sharded / f).stat().st_size <= (1 << 20) + 4096 for f in files)
    expected = _tensors(whole)
    assert set(index["weight_map"]) == set(expected) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in expected.values())
    got = _tensors(sharded)
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())  # sharding changes no value
    # Each tensor is seeded by its name: a 2-layer build is the 4-layer one's first layers.
    assert all(torch.equal(tensor, expected[name]) for name, tensor in _tensors(short).items())
    _, info = AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    other_seed = tmp_path / "seed1"
    synthetic.build("tiny", other_seed, layers=2, seed=1, log=lambda _: None)
    def digest(path: Path) -> str:
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    assert digest(other_seed) != digest(short)
    synthetic.build("tiny", tmp_path / "again", layers=2, log=lambda _: None)
    assert digest(tmp_path / "again") == digest(short)


def test_presets_have_the_real_models_shapes() -> None:
    """Parameter counts of the models the presets copy (their model cards), from meta tensors only."""
    counts = {preset: sum(spec.numel for spec in synthetic.tensor_specs(synthetic.make_config(preset)))
              for preset in ("smollm2", "llama-1b", "llama2-7b")}
    assert counts == {"smollm2": 134_515_008, "llama-1b": 1_100_048_384, "llama2-7b": 6_738_415_616}
    specs = {spec.name for spec in synthetic.tensor_specs(synthetic.make_config("smollm2"))}
    assert "lm_head.weight" not in specs and "model.embed_tokens.weight" in specs  # tied: stored once


def test_tied_embeddings_and_overrides_load(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smol"
    synthetic.build("smollm2", out, layers=1, hidden=72, intermediate=96, dtype="float16", log=lambda _: None)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and model.dtype == torch.float16
    assert model.config.hidden_size == 72 and model.config.intermediate_size == 96 and model.config.vocab_size == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_cli_refuses_bad_requests_with_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    assert synthetic.main(["tiny", str(occupied)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (occupied / "keep.txt").exists()
    assert synthetic.main(["tiny", str(tmp_path / "odd"), "--hidden", "90"]) == 2
    assert "not a multiple of the preset's 4 attention heads" in capsys.readouterr().err
    assert synthetic.main(["tiny", str(tmp_path / "odd"), "--hidden", "100"]) == 2  # head_dim 25: RoPE needs it even
    assert "transformers rejects this configuration" in capsys.readouterr().err
    monkeypatch.setattr(synthetic.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1 << 20})())
    assert synthetic.main(["llama2-7b", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    assert "needs 12.6 GiB" in err and "0.0 GiB free" in err and not (tmp_path / "big").exists()
    assert synthetic.main(["tiny", str(occupied), "--overwrite"]) == 0
    assert not (occupied / "keep.txt").exists() and (occupied / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_llmprune_prunes_a_synthetic_checkpoint_offline(tmp_path: Path) -> None:
    from llmprune.cli import main

    model = tmp_path / "tiny"
    synthetic.build("tiny", model, log=lambda _: None)
    code = main(["prune", str(model), "--method", "sparsegpt", "--pattern", "2:4", "--calib", str(model / "calib.txt"),
                 "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--out", str(tmp_path / "pruned"), "--quiet"])
    assert code == 0 and (tmp_path / "pruned" / "llmprune.json").is_file()


# --- gpu_check.py ---------------------------------------------------------------------------------------

def test_compare_prunings_finds_flipped_groups_and_changed_rows() -> None:
    torch.manual_seed(0)
    dense = torch.randn(4, 16)
    keep = torch.tensor([1, 1, 0, 0], dtype=torch.bool).repeat(4, 4)
    reference = dense * keep
    other = reference.clone()
    other[1, 0], other[1, 2] = 0.0, dense[1, 2]  # row 1, first group: another pair kept
    other[3, 5] += 1e-3  # row 3: same mask, a changed value
    stats = gpu_check.compare_prunings({"model.layers.0.mlp.up_proj": reference},
                                       {"model.layers.0.mlp.up_proj": other})["model.layers.0.mlp.up_proj"]
    assert stats["layer"] == 0 and stats["groups"] == pytest.approx(1 / 16) and stats["rows"] == pytest.approx(1 / 4)
    assert not stats["kept_equal"] and stats["max_nonzeros"] == 2
    assert stats["same_mask_row_rel"] == pytest.approx(1e-3 / reference[3].norm().item(), rel=1e-3)
    other[0, :4] = dense[0, :4]  # a group keeping 4
    assert gpu_check.compare_prunings({"model.layers.0.x": reference}, {"model.layers.0.x": other})[
        "model.layers.0.x"]["max_nonzeros"] == 4


def test_a_failed_step_fails_the_run_and_what_needs_it(tmp_path: Path, monkeypatch, capsys) -> None:
    def broken(ctx) -> str:
        raise gpu_check.CheckFailed("masks are not 2:4")

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main sets it for a dry run; restored after the test
    monkeypatch.setattr(gpu_check, "STEPS", [("versions", lambda ctx: "ok"), ("synthetic models", broken),
                                             ("Wanda 2:4, CPU vs CUDA", lambda ctx: "never runs")])
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| versions | pass | ok |" in summary and "| synthetic models | fail | masks are not 2:4 |" in summary
    assert "| Wanda 2:4, CPU vs CUDA | fail | not run: synthetic models did not pass |" in summary
    assert "1 of 3 checks passed, 2 FAILED" in summary and summary in capsys.readouterr().out + "\n"


def test_dry_run_passes_end_to_end(tmp_path: Path) -> None:
    """The whole script on CPU at tiny sizes, as CI can run it: every step passes and the summary table,
    log and results land in --out."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([str(SCRIPTS / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " | pass | " in line]
    assert len(rows) == len(gpu_check.STEPS), proc.stdout[-4000:]
    assert "### dry run on CPU" in proc.stdout and f"{len(rows)} of {len(rows)} checks passed" in proc.stdout
    cuda_row = next(row for row in rows if row.startswith("| CUDA-only tests"))
    selected = re.search(r"\| (\d+) tests in test_\w+.*: \d+ passed, 0 failed, \d+ skipped", cuda_row)
    assert selected and int(selected.group(1)) > 0, cuda_row  # it found the tests that need CUDA
    written = {path.name for path in tmp_path.iterdir()}
    assert {"summary.md", "gpu_check.log", "gemm.json", "bench-packed-wanda-24.json", "bench-packed-magnitude-24-w4.json",
            "cuda_tests.xml"} <= written
    assert json.loads((tmp_path / "gemm.json").read_text())["gemm"]


# --- tune_triton.py ---------------------------------------------------------------------------------------

def test_tune_triton_checks_each_configuration_and_reports_the_defaults(tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "tune_triton.py"), "--device", "cpu", "--dtype", "float32",
                           "--shapes", "32x256", "--ms", "1,2", "--quick", "--pool-mb", "0", "--repeats", "2",
                           "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["kernel"] for row in rows} == {"triton24", "triton24q4"}
    assert len(rows) == 2 * 2 * 3  # two configurations and the expand path, two Ms, per kernel
    assert sum((r["block_n"], r["steps"]) == ("expand", "cuBLAS") for r in rows) == 2 * 2
    assert "#### triton24 (default: `_triton_jit.blocks` for each M)" in proc.stdout
    # the quick candidates (8 or 16 output rows, 1 chunk) hold neither M's default launch shape
    assert proc.stdout.count("| 32x256 | 1 |") == 2 and "| 32x256 | 2 |" in proc.stdout and "not tried" in proc.stdout
