"""Checkpoints with packed 2:4 linears: written through the codecs, read back, checked against an independent reader."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STORIES, needs_stories
from helpers import copy_checkpoint, logits, read_raw, rewrite, tiny_llama
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.checkpoint import is_packed_checkpoint, read_checkpoint, write_checkpoint
from llmprune.checkpoint.codecs.sparse24 import SPARSE24
from llmprune.checkpoint.safetensors import WEIGHTS_NAME
from llmprune.errors import LLMPruneError
from llmprune.sparse_linear import SparseLinear


def write_packed(model: torch.nn.Module, directory: Path, targets: set[str] | None = None) -> list[str]:
    return write_checkpoint(model, directory, SPARSE24, targets=targets)


def read_packed(directory: Path, backend: str = "dense", **options) -> torch.nn.Module:
    return llmprune.load(directory, backend=backend, **options)


def pruned(model: torch.nn.Module, vocab: int = 128) -> torch.nn.Module:
    tokens = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(1))
    return llmprune.prune(model, method="wanda", pattern="2:4", calib_tokens=tokens, device="cpu", progress=False)


@pytest.fixture(scope="module")
def pruned_llama() -> torch.nn.Module:
    return pruned(tiny_llama())


@pytest.fixture(scope="module")
def packed_dir(pruned_llama, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("packed")
    write_packed(pruned_llama, directory)
    return directory


# --------------------------------------------------------------------------- an independent reader


def decode_24(compressed: np.ndarray, bitmask: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """The legacy decoder: unpack bits little-endian, scatter the stored values into zeros."""
    out_features, in_features = (int(v) for v in shape.reshape(-1))
    mask = np.unpackbits(bitmask, axis=1, count=in_features, bitorder="little").astype(bool)
    dense = np.zeros((out_features, in_features), dtype=compressed.dtype)
    dense[mask] = compressed.reshape(-1)
    return dense


def raw_bits(tensor: torch.Tensor) -> np.ndarray:
    view = {4: torch.int32, 2: torch.int16}[tensor.element_size()]
    return tensor.detach().contiguous().view(view).numpy().view({4: "<u4", 2: "<u2"}[tensor.element_size()])


# --------------------------------------------------------------------------- round trips

def test_round_trip_logits_are_exactly_equal(pruned_llama, packed_dir):
    model = read_packed(packed_dir, backend="dense")
    sparse = {name for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse) == 14 and all(".layers." in name for name in sparse)
    assert not model.training and set(llmprune.state(model).backends.values()) == {"dense"}
    assert torch.equal(logits(model), logits(pruned_llama))


def test_independent_reader_decodes_the_same_weights(pruned_llama, packed_dir):
    header, arrays = read_raw(packed_dir / WEIGHTS_NAME)
    assert header["__metadata__"] == {"format": "pt"}
    state = pruned_llama.state_dict()
    packed = sorted(key[: -len(".compressed")] for key in arrays if key.endswith(".compressed"))
    assert len(packed) == 14
    for name in packed:
        weight = state[f"{name}.weight"]
        out_features, in_features = weight.shape
        assert arrays[f"{name}.compressed"].shape == (out_features, in_features // 2)
        assert arrays[f"{name}.bitmask"].shape == (out_features, (in_features + 7) // 8)
        assert arrays[f"{name}.shape"].shape == (2, 1) and arrays[f"{name}.shape"].reshape(-1).tolist() == [out_features, in_features]
        decoded = decode_24(arrays[f"{name}.compressed"], arrays[f"{name}.bitmask"], arrays[f"{name}.shape"])
        assert np.array_equal(decoded, raw_bits(weight)), name
        assert f"{name}.weight" not in arrays
    for key, tensor in state.items():
        if key.rpartition(".")[0] not in packed:
            assert np.array_equal(arrays[key], raw_bits(tensor)), key


def test_config_declares_legacy_sparse_24_bitmask(packed_dir):
    config = json.loads((packed_dir / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    sparsity = quant["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]
    assert 0 < sparsity["global_sparsity"] < 50  # percent of all parameters, embeddings included
    assert set(quant) == {"quant_method", "sparsity_config"}  # nothing compressed-tensors would read as quantization
    assert len(config["llmprune_packing"]["packed"]) == 14 and config["dtype"] == "float32"
    assert is_packed_checkpoint(packed_dir)


def test_fp16_packed_linears_take_nine_sixteenths(tmp_path):
    # Built in fp16 like from_pretrained(dtype=float16) builds it: ``.half()`` would also cast the
    # rotary inv_freq buffer, which transformers keeps (and recomputes) in float32.
    model = pruned(tiny_llama(seed=3, dtype=torch.float16))
    write_packed(model, tmp_path)
    header, _ = read_raw(tmp_path / WEIGHTS_NAME)
    packed = [key[: -len(".compressed")] for key in header if key.endswith(".compressed")]
    packed_bytes = dense_bytes = 0
    for name in packed:
        out_features, in_features = model.get_submodule(name).weight.shape
        compressed, bitmask = header[f"{name}.compressed"], header[f"{name}.bitmask"]
        assert compressed["dtype"] == "F16" and compressed["shape"] == [out_features, in_features // 2]
        packed_bytes += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in (compressed, bitmask))
        dense_bytes += out_features * in_features * 2
    assert packed_bytes / dense_bytes == pytest.approx(9 / 16, abs=1e-12)
    reloaded = read_packed(tmp_path)
    assert reloaded.dtype == torch.float16
    assert torch.equal(logits(reloaded), logits(model))
    cast = read_packed(tmp_path, dtype="float32")
    assert cast.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_tied_embeddings_are_stored_once(tmp_path):
    model = pruned(tiny_llama(seed=4, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    write_packed(model, tmp_path)
    header, _ = read_raw(tmp_path / WEIGHTS_NAME)
    assert "lm_head.weight" not in header and "model.embed_tokens.weight" in header
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["llmprune_packing"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    reloaded = read_packed(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(logits(reloaded), logits(model))


def test_rewriting_a_loaded_model_gives_the_same_bytes(packed_dir, tmp_path):
    write_packed(read_packed(packed_dir), tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == (packed_dir / WEIGHTS_NAME).read_bytes()


def test_loaded_model_saves_back_to_a_plain_dense_checkpoint(pruned_llama, packed_dir, tmp_path):
    model = read_packed(packed_dir)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and "llmprune_packing" not in config
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    assert torch.equal(logits(dense), logits(pruned_llama))


def test_gpt2_conv1d_round_trip(tmp_path):
    from transformers import GPT2Config

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    model = pruned(model)
    packed = write_packed(model, tmp_path)
    assert "transformer.h.0.attn.c_attn" in packed and "lm_head" not in packed
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["targets"] == ["Conv1D"]
    reloaded = read_packed(tmp_path)
    layer = reloaded.transformer.h[0].attn.c_attn
    assert isinstance(layer, SparseLinear) and layer.transposed
    assert torch.equal(logits(reloaded), logits(model))


def test_unpruned_model_is_written_dense(tmp_path):
    model = tiny_llama(seed=6)
    assert write_packed(model, tmp_path) == []
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert not is_packed_checkpoint(tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(dense), logits(model))
    with pytest.raises(LLMPruneError, match="not a packed checkpoint"):
        read_checkpoint(tmp_path)


def test_declared_target_that_is_not_24_is_refused(pruned_llama, tmp_path):
    with pytest.raises(LLMPruneError, match=r"lm_head\.weight is declared 2:4"):
        write_packed(pruned_llama, tmp_path, targets={"model.layers.0.mlp.up_proj", "lm_head"})
    with pytest.raises(LLMPruneError, match="model.norm is a LlamaRMSNorm"):
        write_packed(pruned_llama, tmp_path, targets={"model.norm"})


def test_cpu_load_records_backends_and_fallbacks(packed_dir):
    model = read_packed(packed_dir, backend="semi-structured")
    assert set(llmprune.state(model).backends.values()) == {"dense"}
    assert len(llmprune.state(model).fallbacks) == 14 and all("CUDA" in r for r in llmprune.state(model).fallbacks.values())
    auto = read_packed(packed_dir, backend="auto")  # on CPU: the numba kernel, when numba is installed
    if importlib.util.find_spec("numba"):
        assert set(llmprune.state(auto).backends.values()) == {"numba"} and not llmprune.state(auto).fallbacks
    else:
        assert all("numba is not installed" in r for r in llmprune.state(auto).fallbacks.values())
    assert torch.allclose(logits(auto), logits(model), rtol=1e-4, atol=1e-4)
    with pytest.raises(LLMPruneError, match="unknown backend"):
        read_packed(packed_dir, backend="fast")


# --------------------------------------------------------------------------- corrupt checkpoints


def test_truncated_file_names_the_tensor_cut_off(packed_dir, tmp_path):
    directory = copy_checkpoint(packed_dir, tmp_path / "ckpt")
    header, _ = read_raw(directory / WEIGHTS_NAME)
    last = max((key for key in header if key != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    data = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(data[:-10])
    with pytest.raises(LLMPruneError, match=rf"truncated: tensor {last.replace('.', '[.]')} "):
        read_packed(directory)
    (directory / WEIGHTS_NAME).write_bytes(data[:5])
    with pytest.raises(LLMPruneError, match="truncated"):
        read_packed(directory)


def test_missing_bitmask_is_named(packed_dir, tmp_path):
    directory = copy_checkpoint(packed_dir, tmp_path / "ckpt")
    rewrite(directory, lambda t: t.pop("model.layers.1.mlp.down_proj.bitmask"))
    with pytest.raises(LLMPruneError, match=r"model\.layers\.1\.mlp\.down_proj\.bitmask is missing"):
        read_packed(directory)


def test_missing_dense_tensor_is_named(packed_dir, tmp_path):
    directory = copy_checkpoint(packed_dir, tmp_path / "ckpt")
    rewrite(directory, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(LLMPruneError, match=r"model\.norm\.weight is missing"):
        read_packed(directory)


def test_bitmask_with_three_bits_in_a_group_is_refused(packed_dir, tmp_path):
    directory = copy_checkpoint(packed_dir, tmp_path / "ckpt")

    def corrupt(tensors):
        bitmask = tensors["model.layers.0.self_attn.q_proj.bitmask"]
        low = int(bitmask[3, 0]) & 0x0F
        missing = next(bit for bit in range(4) if not low >> bit & 1)
        bitmask[3, 0] |= 1 << missing  # 3 bits set in columns 0..3 of row 3

    rewrite(directory, corrupt)
    with pytest.raises(LLMPruneError, match=r"model\.layers\.0\.self_attn\.q_proj\.bitmask is corrupt.*row 3, columns 0\.\.3"):
        read_packed(directory)


def test_shape_that_disagrees_with_config_is_refused(packed_dir, tmp_path):
    directory = copy_checkpoint(packed_dir, tmp_path / "ckpt")
    rewrite(directory, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.shape", torch.tensor([[128], [68]])))
    with pytest.raises(LLMPruneError, match=r"model\.layers\.0\.mlp\.up_proj\.shape says .*\(128, 68\)"):
        read_packed(directory)


def test_compressed_of_the_wrong_shape_is_refused(packed_dir, tmp_path):
    directory = copy_checkpoint(packed_dir, tmp_path / "ckpt")
    rewrite(directory, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.compressed", torch.zeros(128, 16)))
    with pytest.raises(LLMPruneError, match=r"model\.layers\.0\.mlp\.up_proj\.compressed has shape \[128, 16\]"):
        read_packed(directory)


def test_unexpected_tensor_is_refused(packed_dir, tmp_path):
    directory = copy_checkpoint(packed_dir, tmp_path / "ckpt")
    rewrite(directory, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(LLMPruneError, match=r"model\.extra\.weight"):
        read_packed(directory)


# --------------------------------------------------------------------------- the real model

@needs_stories
def test_stories260k_round_trip_generates_the_same_tokens(tmp_path):
    from llmprune.loading import load_pretrained as load

    model, _ = load(STORIES)
    model = pruned(model, vocab=model.config.vocab_size)
    packed = write_packed(model, tmp_path)
    assert len(packed) == 5 * 7
    reloaded = read_packed(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(logits(reloaded, 512), logits(model, 512))
    prompt = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=24, do_sample=False)
        got = reloaded.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)
    down = reloaded.model.layers[0].mlp.down_proj  # in = 172: bitmask rows of 22 bytes, the last one half used
    assert isinstance(down, SparseLinear) and down.in_features == 172
    header, _ = read_raw(tmp_path / WEIGHTS_NAME)
    assert header["model.layers.0.mlp.down_proj.bitmask"]["shape"] == [64, 22]
