"""Data-parallel calibration with torch.distributed (2 gloo processes on CPU) against one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_model, word_text, word_tokenizer
from safetensors.torch import load_file

from llmprune.stats import HESSIAN, MOMENTS, SQ_NORM, InputStats
from llmprune.report import PruneReport

NEEDS = frozenset({SQ_NORM, HESSIAN, MOMENTS})


def _inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 20, 16, generator=gen) * torch.linspace(0.1, 3.0, 16) + torch.linspace(-1, 1, 16)


def _combine_worker(rank: int, world: int, port: int, result: str) -> None:
    import torch.distributed as dist

    from llmprune import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stats = InputStats(16, NEEDS, hessian_dtype=torch.float64)
    for batch in torch.tensor_split(_inputs(), world)[rank].split(2):  # uneven shares: 4 and 2 sequences
        stats.update(batch)
    stats.combine(distributed.sum_)
    if rank == 0:
        torch.save({"count": stats.count, "sq_norm": stats.sq_norm, "hessian": stats.hessian, "mean": stats.mean,
                    "variance": stats.variance}, result)
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_combined_statistics_equal_those_of_all_inputs(tmp_path) -> None:
    result = tmp_path / "combined.pt"
    mp.spawn(_combine_worker, args=(2, _free_port(), str(result)), nprocs=2, join=True)
    combined = torch.load(result)
    whole = InputStats(16, NEEDS, hessian_dtype=torch.float64)
    for batch in _inputs().split(2):
        whole.update(batch)
    assert combined["count"] == whole.count == 120
    for name in ("sq_norm", "hessian", "mean", "variance"):
        torch.testing.assert_close(combined[name], getattr(whole, name), rtol=1e-6, atol=1e-9, msg=name)


def _prune(args: list[str], nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "llmprune", "prune", *args, "--device", "cpu", "--quiet"]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(_free_port()), "-m", "llmprune", "prune", *args, "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method,path", [("wanda", "out-of-core"), ("sparsegpt", "in-memory")])
def test_two_processes_prune_like_one(tmp_path, method, path) -> None:
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    (tmp_path / "calib.txt").write_text(word_text(3000))
    args = [str(source), "--method", method, "--pattern", "2:4", "--calib", "calib.txt", "--nsamples", "8",
            "--seqlen", "16"] + (["--in-memory"] if path == "in-memory" else [])
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        done = _prune([*args, "--out", str(out)], nproc, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[nproc] = out
    assert "data-parallel over 2 processes" in done.stdout
    assert sorted(p.name for p in outputs[1].iterdir()) == sorted(p.name for p in outputs[2].iterdir())
    one, two = load_file(outputs[1] / "model.safetensors"), load_file(outputs[2] / "model.safetensors")
    assert list(one) == list(two)  # the same tensors in the same order
    for key in one:
        if method == "sparsegpt" and key.endswith(".compressed"):  # OBS updates: float32 summation order differs
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(one[key], two[key]), key  # masks (bitmasks) and unchanged weights: identical
    errors = [{layer.name: layer.rel_error for layer in PruneReport.read(outputs[n]).layers} for n in (1, 2)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-3)  # summed over the ranks (SparseGPT: from the Hessian)


def test_a_rank_that_dies_ends_the_run_with_no_output(tmp_path) -> None:
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    (tmp_path / "calib.txt").write_text(word_text(3000))
    # rank 1 fails inside its first decoder layer; rank 0 waits for it in a collective until torchrun stops it
    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys\n"
        "from llmprune.cli import main\n"
        "if os.environ['RANK'] == '1':\n"
        "    import llmprune.stream as s\n"
        "    def boom(*a, **k): raise RuntimeError('rank 1 died')\n"
        "    s._run_layer = boom\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               str(script), "prune", str(source), "--method", "wanda", "--pattern", "2:4", "--calib", "calib.txt",
               "--nsamples", "8", "--seqlen", "16", "--device", "cpu", "--quiet", "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
