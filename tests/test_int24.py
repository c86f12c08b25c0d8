"""2:4 + INT4 end to end: prune and quantize, the packed checkpoint (exact round trip, strict reader), the
loaded SparseLinear on every backend, and plain GPTQ."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES, VOCAB, needs_stories, needs_wikitext, tiny_model
from helpers import copy_checkpoint, rewrite

import llmprune
from llmprune.checkpoint.safetensors import read_layout
from llmprune.errors import LLMPruneError
from llmprune.kernels import numba24
from llmprune.packing import GROUP, Int24, int24_from, pack_24
from llmprune.patterns import NM
from llmprune.sparse_linear import SparseLinear

TOKENS = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))


def quantized_model(method: str = "sparsegpt", **settings) -> torch.nn.Module:
    model = tiny_model("llama")
    options = {"pattern": "2:4", "quantize": "w4", "group_size": 16, **settings}
    return llmprune.prune(model, method=method, calib_tokens=TOKENS, device="cpu", progress=False, **options)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("method,settings", [("sparsegpt", {}), ("wanda", {"symmetric": False}),
                                             ("magnitude", {"group_size": -1}), ("sparsegpt", {"passes": 2})])
def test_quantized_24_checkpoint_round_trips_exactly(tmp_path, method, settings) -> None:
    model = quantized_model(method, **settings)
    report = llmprune.state(model).report
    assert report.recipe.quantize["bits"] == 4 and all("quant_loss" in layer.facts for layer in report.layers)
    for layer in report.layers:  # the weights in the model are exactly the codes on their grid
        weight = model.get_submodule(layer.name).weight
        assert NM(2, 4).violations(weight) == 0
        assert torch.equal(llmprune.state(model).quantized[layer.name].dequantize(), weight)
    llmprune.save(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-24-int4"
    layout = read_layout(tmp_path / "out")
    name = "model.layers.0.mlp.down_proj"  # [32, 64]
    assert layout[f"{name}.codes"].shape == (32, 16) and layout[f"{name}.scales"].shape == (32, 64 // 16 if
                                                                                            settings.get("group_size", 16) == 16 else 1)
    for backend in ("dense", "auto"):
        loaded = llmprune.load(tmp_path / "out", backend=backend)
        for layer in report.layers:
            module = loaded.get_submodule(layer.name)
            assert isinstance(module, SparseLinear) and module.quantized() is not None
            assert torch.equal(module.weight.float(), model.get_submodule(layer.name).weight), layer.name
        torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    llmprune.save(loaded, tmp_path / "again")  # a loaded model saves back to the same bytes
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_int24_matches_the_packed_values() -> None:
    weight = torch.zeros(2, 8)
    weight[0, [1, 2, 5, 6]] = torch.tensor([1.0, -2.0, 3.0, 0.5])
    weight[1, [0, 7]] = torch.tensor([4.0, -1.0])  # groups with fewer than 2 non-zeros store zeros too
    codes = torch.full((2, 8), 8, dtype=torch.uint8)
    codes[weight != 0] = torch.tensor([10, 4, 14, 9, 16 - 8, 6], dtype=torch.uint8)
    q = int24_from(weight, codes, torch.ones(2, 1).half(), torch.full((2, 1), 8.0).half(), 8)
    compressed, _ = pack_24(weight)
    stored_columns = q.columns()
    assert torch.equal(weight.gather(1, stored_columns), compressed)
    assert q.positions.shape == (2, 4) and int(q.positions.max()) < GROUP
    assert torch.equal(q.dequantize()[weight != 0], (codes[weight != 0].float() - 8))


@pytest.mark.parametrize("tensor,change,message", [
    ("bitmask", lambda t: t.__setitem__(0, 0xFF), r"bitmask is corrupt: .* mark 4 positions"),
    ("scales", lambda t: t.__setitem__((0, 0), float("nan")), "scales holds a value that is not positive and finite"),
    ("zeros", lambda t: t.__setitem__((0, 0), 2.5), r"zeros holds a value that is not an integer in \[0, 15\]"),
    ("grid", lambda t: t.__setitem__(0, 6), "grid says group size 6"),
    ("scales", None, r"scales has shape \[32, 3\]"),
])
def test_corrupt_int24_tensors_are_named(tmp_path, tensor, change, message) -> None:
    llmprune.save(quantized_model(), tmp_path / "good")
    directory = copy_checkpoint(tmp_path / "good", tmp_path / "bad")
    key = f"model.layers.0.mlp.down_proj.{tensor}"

    def corrupt(tensors: dict) -> None:
        if change is None:
            tensors[key] = tensors[key][:, :3].contiguous()
        else:
            change(tensors[key])

    rewrite(directory, corrupt)
    with pytest.raises(LLMPruneError, match=rf"model\.layers\.0\.mlp\.down_proj\.{message}"):
        llmprune.load(directory)


def test_plain_gptq_and_bad_settings(tmp_path) -> None:
    model = tiny_model("llama")
    dense = {n: p.clone() for n, p in model.named_parameters()}
    llmprune.prune(model, method="sparsegpt", pattern="dense", quantize="w4", group_size=16, calib_tokens=TOKENS,
                   device="cpu", progress=False)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(weight, dense["model.layers.0.mlp.up_proj.weight"])
    assert float((weight == 0).float().mean()) < 0.2  # nothing pruned; some values round to 0
    llmprune.save(model, tmp_path / "gptq")  # not 2:4: stored dense, the dequantized values
    assert "quantization_config" not in json.loads((tmp_path / "gptq" / "config.json").read_text())
    with pytest.raises(LLMPruneError, match="unknown --quantize 'int4'"):
        llmprune.Recipe.build("wanda", "2:4", quantize="int4")
    with pytest.raises(LLMPruneError, match="group-size must be a positive multiple of 4"):
        llmprune.Recipe.build("wanda", "2:4", quantize="w4", group_size=6)
    with pytest.raises(LLMPruneError, match="hybrid:2:4 with --quantize has no packed format"):
        llmprune.Recipe.build("wanda", "hybrid:2:4", quantize="w4")
    with pytest.raises(LLMPruneError, match="--refine dsnot after SparseGPT's joint"):
        llmprune.Recipe.build("sparsegpt", "2:4", quantize="w4", refine="dsnot")
    with pytest.raises(LLMPruneError, match="pattern dense prunes nothing"):
        llmprune.Recipe.build("wanda", "dense", 0.5, quantize="w4")


def test_int24_kernel_choice_and_fallback() -> None:
    q = Int24(torch.randint(0, 16, (6, 8), dtype=torch.uint8), torch.tensor([[0, 1, 2, 3] * 4] * 6, dtype=torch.uint8)[:, :8],
              torch.ones(6, 1).half(), torch.full((6, 1), 8.0).half(), 16)
    module = SparseLinear(q, backend="auto", name="odd")  # 6 rows: the numba layout wants a multiple of 4
    assert module.backend == "dense" and module.fallback_reason
    assert SparseLinear(q, backend="semi-structured", name="x").fallback_reason == "no semi-structured kernel for 4-bit codes"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_runs_the_int4_kernel(tmp_path, dtype) -> None:
    """A bfloat16 checkpoint loads as a bfloat16 model by default; its 2:4 + INT4 layers must still run
    (they raised on their first input before). Decode rows give the float32 kernel's result in that dtype;
    prefill rows in bfloat16 give exactly the dense bfloat16 model's (its weights rounded, its GEMM), in
    float16 the float32 result (CPU float16 GEMMs are slow)."""
    pytest.importorskip("numba", reason="numba is not installed; the CPU 2:4 + INT4 kernel needs it")
    llmprune.save(quantized_model(), tmp_path / "out")
    half = llmprune.load(tmp_path / "out", backend="numba", dtype=dtype)
    single = llmprune.load(tmp_path / "out", backend="numba")
    dense = llmprune.load(tmp_path / "out", backend="dense", dtype=dtype)
    name = "model.layers.0.mlp.down_proj"
    assert half.get_submodule(name).backend == "numba"
    for rows in (1, 5, 40):  # fused, fused, expanded (past MAX_FUSED_ROWS)
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(dtype)
        with torch.inference_mode():
            y = half.get_submodule(name)(x)
            if rows > numba24.MAX_FUSED_ROWS and dtype == torch.bfloat16:
                expected = dense.get_submodule(name)(x)
            else:
                expected = single.get_submodule(name)(x.float()).to(dtype)
        assert y.dtype == dtype and torch.equal(y, expected), rows
    out = logits(half)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), logits(single), rtol=0.05, atol=0.05)


@pytest.mark.slow
@needs_stories
@needs_wikitext
def test_stories260k_int4_decodes_the_tokens_of_the_dequantized_model(tmp_path) -> None:
    pytest.importorskip("numba", reason="numba is not installed; the CPU 2:4 + INT4 kernel needs it")
    model = llmprune.prune(str(STORIES), method="sparsegpt", pattern="2:4", quantize="w4", group_size=32,
                           nsamples=16, seqlen=128, device="cpu", progress=False)
    llmprune.save(model, tmp_path / "out")
    dense = llmprune.load(tmp_path / "out", backend="dense")
    fast = llmprune.load(tmp_path / "out", backend="numba")
    assert set(llmprune.state(fast).backends.values()) == {"numba"}
    ids = llmprune.state(fast).tokenizer("Once upon a time, there was a little", return_tensors="pt").input_ids
    runs = [m.generate(ids, max_new_tokens=24, do_sample=False) for m in (dense, fast)]
    assert torch.equal(runs[0], runs[1])
