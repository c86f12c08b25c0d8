"""`llmprune bench`: the structure of its tables and JSON on CPU (never its timings)."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from conftest import tiny_model
from helpers import prune_args, run_cli

from torch.utils._python_dispatch import TorchDispatchMode

from llmprune.errors import LLMPruneError
from llmprune.eval.speed import (FREE, StaticDecode, byte_ceiling, decode_table, free_copy, gemm_table, median_seconds,
                                 random_24, sparse_copy)
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


def test_bench_int4_copy_of_a_dense_model(capsys, tiny_checkpoint, calib_file, tmp_path) -> None:
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, "bench", tiny_checkpoint, "--quick", "--int4", "--device", "cpu", "--json", out,
                                "--quiet", "--no-ceiling")
    assert code == 0, err
    assert "2:4 magnitude copy of the dense model, random 4-bit codes" in stdout
    record = json.loads(out.read_text())
    assert {r["backend"] for r in record["gemm"]} == {"dense", "numba", "numba+int4"}
    kernel = "numba" if importlib.util.find_spec("numba") else "dense"
    assert record["sparse_backends_run"] == [kernel]
    packed = tmp_path / "pruned"
    assert run_cli(capsys, *prune_args(tiny_checkpoint, calib_file, packed, "--pattern", "2:4"))[0] == 0
    code, _, err = run_cli(capsys, "bench", packed, "--quick", "--int4", "--device", "cpu")
    assert code == 2 and "--int4 makes a 2:4 + INT4 copy of a dense model" in err


@torch.inference_mode()
def test_int4_sparse_copy_holds_codes_on_the_magnitude_positions() -> None:
    dense = tiny_model().eval()
    sparse = sparse_copy(dense, "dense", int4=True)
    for module in (m for m in sparse.modules() if isinstance(m, SparseLinear)):
        q = module.quantized()
        assert q is not None and q.bits == 4
        original = dense.get_submodule(module.name).weight
        kept = NM(2, 4).keep_mask(original.abs().float())
        assert torch.equal(q.dequantize() != 0, kept & (q.dequantize() != 0))  # only magnitude-kept positions
    assert sparse(torch.tensor([[5, 17, 3, 9]])).logits.isfinite().all()


class _HostSyncs(TorchDispatchMode):
    """Records the operators that make the host wait for a CUDA device (they read a value back or size an
    output by the data); a CUDA graph cannot capture any of them."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero", "aten::masked_select",
               "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "SparseLinear"])
@torch.inference_mode()
def test_static_decode_is_greedy_generate_and_its_step_never_waits_for_the_device(sparse: bool) -> None:
    """What the CUDA graph replays must be the model's own greedy decoding, and capturable: on CPU the step
    runs eagerly, and no operator in it may read a device value back on the host."""
    model = tiny_model().eval()
    if sparse:
        model = sparse_copy(model, "dense")
    prompt = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, pad_token_id=0)[:, 7:]
    decode = StaticDecode(model, prompt, 6)
    with _HostSyncs() as syncs:
        decode.step()
        decode.step()
    assert syncs.seen == [] and decode.steps == 2
    assert torch.equal(decode.run(), expected) and decode.steps == 5
    with pytest.raises(LLMPruneError, match="at least 4 new tokens"):  # checked before any CUDA call
        StaticDecode(model, prompt, 3).capture()


def test_tables_show_cuda_graph_columns_only_where_timed() -> None:
    row = {"out": 8, "in": 16, "m": 1, "backend": "triton", "ran": "triton", "dense_us": 30.0, "sparse_us": 40.0,
           "speedup": 0.75, "ceiling": 1.78}
    assert "graph" not in gemm_table([row])
    graphed = [{**row, "dense_graph_us": 10.0, "sparse_graph_us": 5.0, "graph_speedup": 2.0, "graph_error": None},
               {**row, "backend": "semi-structured", "dense_graph_us": 10.0, "sparse_graph_us": None,
                "graph_speedup": None, "graph_error": "capture failed"}]
    table = gemm_table(graphed)
    assert "| 10.0 | 5.0 | 2.00 |" in table and "| 10.0 | n/a | n/a |" in table
    assert table.endswith("CUDA graph not captured: semi-structured: capture failed")
    decode = [{"model": "dense", "batch": 1, "prefill_ms": 5.0, "decode_tok_s": 40.0},
              {"model": FREE, "batch": 1, "prefill_ms": 4.0, "decode_tok_s": 50.0}]
    assert "graph" not in decode_table(decode) and "(batch 1: 1.25x dense)" in decode_table(decode)
    decode[0].update(graph_tok_s=400.0, graph_error=None)
    decode[1].update(graph_tok_s=1000.0, graph_error=None)
    table = decode_table(decode)
    assert "| dense | 1 | 5.0 | 40.0 | 1.00 | 400.0 | 1.00 |" in table
    assert "taking no time, CUDA graphs (batch 1: 2.50x dense)" in table
