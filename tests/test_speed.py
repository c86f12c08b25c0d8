"""`llmprune bench`: the structure of its tables and JSON on CPU (never its timings)."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from conftest import tiny_model
from helpers import prune_args, run_cli

from llmprune.eval.speed import FREE, byte_ceiling, free_copy, median_seconds, random_24, sparse_copy
from llmprune.patterns import NM
from llmprune.sparse_linear import SparseLinear


def test_byte_ceiling_and_helpers() -> None:
    assert byte_ceiling(torch.float16) == pytest.approx(16 / 9)
    assert byte_ceiling(torch.float32) == pytest.approx(4 / 2.125)
    assert byte_ceiling(torch.float32, "numba") == pytest.approx(16 / 9) and byte_ceiling(torch.float16, "dense") == 1
    weight = random_24(8, 16, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert NM(2, 4).violations(weight) == 0 and (weight != 0).sum() == 64
    calls = []

    def call(i: int) -> None:
        calls.append(i)
        if i % 2:  # odd calls sleep: 3 of the 7 timed ones, so the median is a fast one
            time.sleep(0.05)

    median = median_seconds(call, torch.device("cpu"), repeats=7, warmup=2)
    assert calls == [0, 1, 0, 1, 2, 3, 4, 5, 6]
    assert median < 0.025  # the median, not the mean or the maximum (a loaded machine may delay a fast call)


@pytest.mark.parametrize("packed", [False, True])
def test_bench_quick_on_a_tiny_model(capsys, tiny_checkpoint, calib_file, tmp_path, packed) -> None:
    model = tiny_checkpoint
    if packed:
        model = tmp_path / "pruned"
        assert run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, model, "--pattern", "2:4"))[0] == 0
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, "bench", model, "--quick", "--device", "cpu", "--json", out, "--quiet")
    assert code == 0, err
    assert ("packed checkpoint" if packed else "2:4 magnitude copy") in stdout
    record = json.loads(out.read_text())
    kernel = "numba" if importlib.util.find_spec("numba") else "dense"  # auto on CPU
    assert record["packed"] is packed and record["sparse_backends_run"] == [kernel]
    shapes = {(32, 32), (16, 32), (64, 32), (32, 64)}  # q/o, k/v (GQA), gate/up, down of the tiny Llama
    assert {(r["out"], r["in"]) for r in record["gemm"]} == shapes
    assert {r["m"] for r in record["gemm"]} == {1, 16}
    assert {(r["backend"], r["ran"]) for r in record["gemm"]} == {("dense", "dense"), ("numba", kernel)}
    for row in record["gemm"]:
        assert row["dense_us"] > 0 and row["sparse_us"] > 0 and row["ceiling"] == pytest.approx(
            {"dense": 1.0, "numba": 16 / 9}[row["ran"]], abs=1e-3)
        assert row["speedup"] == pytest.approx(row["dense_us"] / row["sparse_us"], rel=0.02, abs=1e-3)  # 3 decimals
    assert [(r["model"], r["batch"]) for r in record["decode"]] == [("dense", 1), ("sparse", 1), (FREE, 1)]
    assert all(r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 for r in record["decode"])
    assert stdout.count("| 32 × 64 |") == 4 and "| sparse | 1 |" in stdout
    assert "ceiling with the 2:4 linears taking no time (batch 1: " in stdout
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@torch.inference_mode()
def test_free_copy_takes_out_exactly_the_sparse_linears() -> None:
    dense = tiny_model().eval()
    sparse = sparse_copy(dense, "dense")
    free = free_copy(sparse)
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 7 * len(sparse.model.layers)  # q k v o gate up down
    assert not any(isinstance(m, SparseLinear) for m in free.modules())
    embed, head = free.get_input_embeddings(), free.get_output_embeddings()
    assert embed.weight is sparse.get_input_embeddings().weight  # shared, not copied
    ids = torch.tensor([[5, 17, 3, 9]])
    # every residual branch ends in a free linear, so the hidden state is the embedding throughout
    expected = head(free.model.norm(embed(ids)))
    torch.testing.assert_close(free(ids).logits, expected, rtol=0, atol=0)
    assert not torch.equal(sparse(ids).logits, expected)


def test_bench_bad_lists(capsys, tiny_checkpoint) -> None:
    code, _, err = run_cli(capsys, "bench", tiny_checkpoint, "--ms", "1,x", "--device", "cpu")
    assert code == 2 and "--ms must be positive integers" in err
    code, _, err = run_cli(capsys, "bench", tiny_checkpoint, "--prompt-len", "0", "--device", "cpu")
    assert code == 2 and "--prompt-len must be a positive integer" in err
