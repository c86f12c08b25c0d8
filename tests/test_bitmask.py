"""Unstructured checkpoints in the legacy compressed-tensors ``sparse-bitmask`` layout (--format bitmask)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import copy_checkpoint, logits, read_raw, rewrite, tiny_llama

import llmprune
from llmprune.errors import LLMPruneError
from llmprune.checkpoint.safetensors import WEIGHTS_NAME
from llmprune.packing import pack_bitmask, pack_bits, unpack_bitmask, unpack_bits
from llmprune.adapter import ModelAdapter

TOKENS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pruned_60() -> torch.nn.Module:
    return llmprune.pipeline.prune(tiny_llama(), method="wanda", sparsity=0.6, calib_tokens=TOKENS, device="cpu",
                                   progress=False)


@pytest.fixture(scope="module")
def bitmask_dir(pruned_60, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bitmask") / "out"
    llmprune.save(pruned_60, directory, storage="bitmask")
    return directory


@pytest.mark.parametrize("shape", [(5, 13), (1, 8), (3, 1), (7, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codec_round_trips_bit_exactly_and_matches_numpy(shape, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=gen).to(dtype)
    weight[torch.rand(*shape, generator=gen) < 0.6] = 0
    weight[0, 0] = -0.0
    compressed, bitmask, offsets = pack_bitmask(weight)
    reference = np.packbits((weight != 0).numpy(), axis=-1, bitorder="little")
    assert np.array_equal(bitmask.numpy(), reference)
    assert torch.equal(unpack_bits(pack_bits(weight != 0), shape[1]), weight != 0)
    restored = unpack_bitmask(compressed, bitmask, torch.tensor(shape), offsets)
    assert restored.dtype == dtype and torch.equal(restored.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                                   (weight + 0.0).view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_codec_rejects_inconsistent_tensors() -> None:
    weight = torch.randn(4, 16)
    weight[:, ::3] = 0
    compressed, bitmask, offsets = pack_bitmask(weight)
    with pytest.raises(LLMPruneError, match="marks 40 values but w.compressed holds 39"):
        unpack_bitmask(compressed[:-1], bitmask, (4, 16), offsets, "w")
    with pytest.raises(LLMPruneError, match="w.row_offsets disagrees"):
        unpack_bitmask(compressed, bitmask, (4, 16), offsets.flip(0), "w")
    bad = bitmask.clone()
    bad[0, 0] ^= 0b10
    with pytest.raises(LLMPruneError, match="marks 39 values"):
        unpack_bitmask(compressed, bad, (4, 16), offsets, "w")
    with pytest.raises(LLMPruneError, match="bits are set past column 13"):
        unpack_bitmask(compressed, bitmask | 0x80, (4, 13), offsets, "w")


def test_round_trip_is_exact_and_files_are_legacy(pruned_60, bitmask_dir) -> None:
    config = json.loads((bitmask_dir / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "sparse-bitmask" and sparsity["sparsity_structure"] == "unstructured"
    header, arrays = read_raw(bitmask_dir / WEIGHTS_NAME)
    linears = ModelAdapter(pruned_60).all_linears()
    for name, linear in linears.items():
        assert f"{name}.weight" not in header
        # The legacy decoder, written independently: unpack bits, scatter the values row-major.
        out_features, in_features = (int(v) for v in arrays[f"{name}.shape"])
        mask = np.unpackbits(arrays[f"{name}.bitmask"], axis=1, count=in_features, bitorder="little").astype(bool)
        dense = np.zeros((out_features, in_features), dtype="<u4")
        dense[mask] = arrays[f"{name}.compressed"]
        expected = linear.weight.detach().contiguous().view(torch.int32).numpy().view("<u4")
        assert np.array_equal(dense, expected), name
        assert np.array_equal(arrays[f"{name}.row_offsets"], np.concatenate([[0], np.cumsum(mask.sum(1))[:-1]]))
    loaded = llmprune.load(bitmask_dir)
    assert torch.equal(logits(loaded), logits(pruned_60))
    for name, linear in linears.items():
        assert torch.equal(loaded.get_submodule(name).weight, linear.weight)


def test_bitmask_files_are_smaller(pruned_60, bitmask_dir, tmp_path) -> None:
    llmprune.save(pruned_60, tmp_path / "dense")
    header, _ = read_raw(bitmask_dir / WEIGHTS_NAME)
    dense_header, _ = read_raw(tmp_path / "dense" / WEIGHTS_NAME)
    name = "model.layers.0.mlp.down_proj"  # [64, 128] fp32, 60% zeros
    size = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k.startswith(name + "."))
    dense = dense_header[f"{name}.weight"]["data_offsets"][1] - dense_header[f"{name}.weight"]["data_offsets"][0]
    kept = 128 - round(128 * 0.6)  # per row
    assert size == 64 * kept * 4 + 64 * 16 + 16 + 64 * 8  # values + bitmask + shape + row offsets
    assert size / dense == pytest.approx(0.446, abs=1e-3)


def test_corrupt_bitmask_checkpoint_is_refused(bitmask_dir, tmp_path) -> None:
    directory = copy_checkpoint(bitmask_dir, tmp_path / "ckpt")
    rewrite(directory, lambda t: t.pop("model.layers.1.self_attn.o_proj.row_offsets"))
    with pytest.raises(LLMPruneError, match="model.layers.1.self_attn.o_proj.row_offsets is missing"):
        llmprune.load(directory)
    directory = copy_checkpoint(bitmask_dir, tmp_path / "ckpt2")

    def flip(tensors):
        tensors["model.layers.0.mlp.up_proj.bitmask"][3, 2] ^= 0x01

    rewrite(directory, flip)
    with pytest.raises(LLMPruneError, match="model.layers.0.mlp.up_proj.bitmask marks"):
        llmprune.load(directory)


def test_bitmask_storage_is_refused_for_24_and_unpruned_models(tmp_path) -> None:
    model = llmprune.pipeline.prune(tiny_llama(), method="wanda", pattern="2:4", calib_tokens=TOKENS, device="cpu",
                                    progress=False)
    with pytest.raises(LLMPruneError, match="saved packed 2:4"):
        llmprune.save(model, tmp_path / "a", storage="bitmask")
    with pytest.raises(LLMPruneError, match="has no llmprune_report"):
        llmprune.save(tiny_llama(), tmp_path / "b", storage="bitmask")
    with pytest.raises(LLMPruneError, match="unknown --format 'zip'"):
        llmprune.save(model, tmp_path / "c", storage="zip")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
