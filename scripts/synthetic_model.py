#!/usr/bin/env python
"""Write a random-weight causal-LM checkpoint of a real model's shapes, offline, at any size.

    python scripts/synthetic_model.py PRESET OUT_DIR [--layers N] [--hidden H] [--intermediate I]
                                      [--dtype bfloat16] [--seed 0] [--max-shard-mb 4096] [--overwrite]

For what needs a model's shapes but not its knowledge: GPU checks and speed or memory benchmarks of
models no machine here has (Llama-2-7B, TinyLlama-1.1B), with no Hub access. OUT_DIR gets the
transformers layout: ``config.json``, safetensors weights (``model.safetensors``, or shards plus
``model.safetensors.index.json`` past ``--max-shard-mb``), a word-level tokenizer built in code
(``<unk> <s> </s> w0 w1 ...`` up to the vocabulary size) and ``calib.txt``, random words of that
vocabulary, so that ``llmprune prune OUT_DIR --calib OUT_DIR/calib.txt`` and ``llmprune.load`` work
offline.

Never holds the model in memory: the module tree is built on the meta device for its names and
shapes, then each tensor is drawn, written and freed (peak memory: one tensor, 256 MiB for Llama-2-7B's
embeddings in bf16). Weights are N(0, initializer_range²) (0.02), norms 1 and biases 0, each tensor
drawn from its own generator seeded by ``--seed`` and the tensor's name, so a tensor's values do not
depend on ``--layers`` or on the shard it lands in. Tied embeddings (SmolLM2) are stored once.
The directory is written beside OUT_DIR and renamed into place, so an interrupted run leaves nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

# transformers config arguments per preset (Llama architecture: GQA, RMSNorm, SiLU MLP).
PRESETS: dict[str, dict] = {
    # Seconds to build; shapes every 2:4 kernel takes (in_features multiples of 64).
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M: 134.5M parameters.
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T (Llama-2 tokenizer size): 1.1B parameters.
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Llama-2-7b-hf: 6.74B parameters.
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Llama-2-70b-hf: 69.0B parameters (138 GB in bf16; scripts/memory_formula.py's shapes).
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Llama-3.1-405B: 405.9B parameters.
    "llama3-405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=False),
}
DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"), "float32": (torch.float32, "F32")}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: unk, bos, eos
CALIB_WORDS = 1 << 16  # calib.txt: enough tokens for any window length up to 32768, drawn with replacement
DISK_MARGIN = 1.02  # free space wanted over the weights' bytes (config, tokenizer, calibration text, filesystem)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name in the state dict, its shape and how it is filled."""

    name: str
    shape: tuple[int, ...]
    fill: str  # "normal", "ones" (norm weights) or "zeros" (biases)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def make_config(preset: str, layers: int | None = None, hidden: int | None = None,
                intermediate: int | None = None, dtype: str = "bfloat16") -> LlamaConfig:
    """The transformers config of ``preset`` with the overrides applied (heads kept; head_dim = hidden/heads)."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = dict(PRESETS[preset], bos_token_id=1, eos_token_id=2, pad_token_id=None)
    for key, value in (("num_hidden_layers", layers), ("hidden_size", hidden), ("intermediate_size", intermediate)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{key} must be positive, got {value}")
            settings[key] = value
    if settings["hidden_size"] % settings["num_attention_heads"]:
        raise ValueError(f"hidden size {settings['hidden_size']} is not a multiple of the preset's "
                         f"{settings['num_attention_heads']} attention heads; pick a multiple")
    try:
        config = LlamaConfig(**settings)
    except Exception as exc:  # transformers validates configs (e.g. an odd head_dim for RoPE) with its own errors
        raise ValueError(f"transformers rejects this configuration: {str(exc).strip().splitlines()[-1]}") from exc
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]
    return config


def tensor_specs(config: LlamaConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in state-dict order, tied ones once (read off a meta-device model)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    specs, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied weight: the same Parameter under a second name
            continue
        seen.add(id(tensor))
        fill = "zeros" if name.endswith("bias") else "ones" if tensor.dim() == 1 else "normal"
        specs.append(TensorSpec(name, tuple(tensor.shape), fill))
    return specs


def plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def draw(spec: TensorSpec, dtype: torch.dtype, seed: int, std: float) -> torch.Tensor:
    """The tensor's values: its own generator, seeded by ``seed`` and its name."""
    if spec.fill == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.fill == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    # One 32-bit seed from both (the CPU generator keeps only the low 32 bits of what it is given).
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{spec.name}".encode()))
    return torch.empty(spec.shape, dtype=dtype).normal_(0.0, std, generator=generator)


def write_safetensors(path: Path, specs: list[TensorSpec], dtype: torch.dtype, dtype_code: str, seed: int,
                      std: float) -> None:
    """One safetensors file, streamed: the header from the shapes, then each tensor drawn, written, freed."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        header[spec.name] = {"dtype": dtype_code, "shape": list(spec.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for spec in specs:
            tensor = draw(spec, dtype, seed, std)
            handle.write(tensor.view(torch.uint8).numpy().data)
            del tensor


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level fast tokenizer: ``<unk> <s> </s>`` then ``w0, w1, ...`` up to ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def calibration_text(vocab_size: int, seed: int, nwords: int = CALIB_WORDS) -> str:
    """Random words of the tokenizer's vocabulary (one token each), 16 to a line."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - len(SPECIAL_TOKENS), (nwords,), generator=generator).tolist()
    words = [f"w{i}" for i in ids]
    return "\n".join(" ".join(words[i:i + 16]) for i in range(0, nwords, 16)) + "\n"


def build(preset: str, out_dir: str | Path, layers: int | None = None, hidden: int | None = None,
          intermediate: int | None = None, dtype: str = "bfloat16", seed: int = 0, max_shard_mb: int = 4096,
          overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Write the checkpoint to ``out_dir``; returns what was written (also saved as ``synthetic.json``)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if max_shard_mb < 1:
        raise ValueError(f"--max-shard-mb must be positive, got {max_shard_mb}")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    torch_dtype, dtype_code = DTYPES[dtype]
    config = make_config(preset, layers, hidden, intermediate, dtype)
    specs = tensor_specs(config)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    params = sum(spec.numel for spec in specs)
    total_bytes = params * itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if total_bytes * DISK_MARGIN > free:
        raise OSError(f"{preset} in {dtype} needs {total_bytes / 2**30:.1f} GiB and {out.parent} has "
                      f"{free / 2**30:.1f} GiB free; free space, pick a smaller --layers, or another OUT_DIR")
    shards = plan_shards(specs, itemsize, max_shard_mb << 20)
    log(f"{preset}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, MLP {config.intermediate_size}, "
        f"vocab {config.vocab_size}: {params / 1e6:.1f}M parameters, {total_bytes / 2**30:.2f} GiB in {dtype}, "
        f"{len(shards)} file(s)")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            write_safetensors(tmp / name, shard, torch_dtype, dtype_code, seed, config.initializer_range)
            log(f"  wrote {name} ({sum(s.numel for s in shard) * itemsize / 2**30:.2f} GiB, "
                f"{time.perf_counter() - started:.0f} s)")
        if len(shards) > 1:
            weight_map = {spec.name: name for name, shard in zip(names, shards) for spec in shard}
            index = {"metadata": {"total_size": total_bytes, "total_parameters": params}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        word_tokenizer(config.vocab_size).save_pretrained(tmp)
        (tmp / "calib.txt").write_text(calibration_text(config.vocab_size, seed))
        record = {"preset": preset, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
                  "intermediate": config.intermediate_size, "vocab": config.vocab_size, "dtype": dtype, "seed": seed,
                  "parameters": params, "bytes": total_bytes, "files": names,
                  "seconds": round(time.perf_counter() - started, 1)}
        (tmp / "synthetic.json").write_text(json.dumps(record, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; the checkpoint gets the usual permissions
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} in {record['seconds']:.1f} s")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=f"presets: {', '.join(PRESETS)}")
    parser.add_argument("preset", choices=sorted(PRESETS), help="shapes to copy")
    parser.add_argument("out_dir", help="checkpoint directory to write (must not exist, or be empty)")
    parser.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: the preset's)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: the preset's; heads kept)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP size (default: the preset's)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="stored dtype (default bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and calibration text (default 0)")
    parser.add_argument("--max-shard-mb", type=int, default=4096, help="largest safetensors file in MiB (default 4096)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        build(args.preset, args.out_dir, args.layers, args.hidden, args.intermediate, args.dtype, args.seed,
              args.max_shard_mb, args.overwrite)
    except (ValueError, OSError) as exc:
        print(f"synthetic_model: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
