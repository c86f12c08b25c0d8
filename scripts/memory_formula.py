#!/usr/bin/env python
"""Peak memory of an out-of-core ``llmprune prune`` run, on paper: what each part holds, in GiB.

    python scripts/memory_formula.py llama2-7b --nsamples 32 --seqlen 128      # the measured 7B run
    python scripts/memory_formula.py llama2-70b llama3-405b --method sparsegpt  # the papers' 128 × 2048

MODEL is a preset of ``scripts/synthetic_model.py`` or a checkpoint directory (its config.json). The parts,
for a model in dtype b (bytes), n·s calibration tokens, hidden h, MLP width I, a decoder layer of P
parameters and its widest group of linears sharing an input (gate + up: 2·h·I parameters):

- ``process``: Python, torch, transformers and the tokenizer (measured: the RSS before any tensor).
- ``embeddings``: the input embeddings, resident for the whole run (the LM head is copied tensor by
  tensor into the output at the end, never whole).
- ``activations``: one hidden vector per calibration token, b·n·s·h; each batch's output replaces its
  input (plus one batch in flight).
- ``parked`` (``--passes 1`` only): every batch waits at the linear being pruned with its state, at
  ``down_proj`` a hidden vector plus the MLP's intermediate activations per token, b·n·s·(h + I). The
  default (no ``--passes``) runs two passes instead when this exceeds half the free memory.
- ``layer``: the decoder layer's weights, twice (the weights it runs with and the originals kept to
  measure each linear's output error), 2·b·P.
- ``working``: a group's float32 copies while it is pruned (originals, the pruner's copy, its result and
  SparseGPT's stacked rows), 16·2·h·I bytes.
- ``statistics``: Wanda's column norms (negligible); SparseGPT's float32 Hessians, 4·(3·h² + I²) with two
  passes (all of a layer's groups are collected before the first is pruned; with one pass, only one
  group's at a time, 4·I² at most), plus the factor of the one being pruned, 4·in².

Not counted: the safetensors pages the kernel maps while a layer is read (page cache, shared, not RSS
once released) and the output writer's buffers (one tensor at a time).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_model import PRESETS  # noqa: E402

GIB = 2**30
PROCESS_GIB = 0.55  # RSS after imports and the tokenizer, before the first tensor (a fresh `llmprune prune`)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def shapes(model: str) -> dict:
    """The config of a preset or of a checkpoint directory."""
    if model in PRESETS:
        return dict(PRESETS[model])
    path = Path(model) / "config.json"
    if not path.is_file():
        raise SystemExit(f"{model}: neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")
    return json.loads(path.read_text())


def parts(config: dict, nsamples: int, seqlen: int, method: str, passes: int, dtype_bytes: int) -> dict[str, float]:
    """GiB per part of the peak (see the module docstring)."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    layer_params = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter
    tokens = nsamples * seqlen
    stats = 0.0
    if method == "sparsegpt":
        collected = 3 * h * h + inter * inter if passes == 2 else inter * inter
        stats = 4 * (collected + max(h, inter) ** 2)
    return {
        "process": PROCESS_GIB,
        "embeddings": dtype_bytes * vocab * h / GIB,
        "activations": dtype_bytes * tokens * h / GIB,
        "parked": dtype_bytes * tokens * (h + inter) / GIB if passes == 1 else 0.0,
        "layer": 2 * dtype_bytes * layer_params / GIB,
        "working": 16 * 2 * h * inter / GIB,
        "statistics": stats / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="presets of scripts/synthetic_model.py or checkpoint directories")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--method", choices=["wanda", "sparsegpt"], default=None, help="default: both")
    parser.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16")
    args = parser.parse_args()
    methods = [args.method] if args.method else ["wanda", "sparsegpt"]
    names = list(parts(shapes(args.models[0]), 1, 1, "wanda", 1, 2))
    print(f"calibration {args.nsamples} × {args.seqlen}, {args.dtype}; GiB")
    print("| model | method | passes | " + " | ".join(names) + " | **peak** |")
    print("|---|---|---:|" + "---:|" * (len(names) + 1))
    for model in args.models:
        config = shapes(model)
        for method in methods:
            for passes in (1, 2):
                row = parts(config, args.nsamples, args.seqlen, method, passes, DTYPE_BYTES[args.dtype])
                cells = " | ".join(f"{row[n]:.2f}" for n in names)
                print(f"| {Path(model).name} | {method} | {passes} | {cells} | **{sum(row.values()):.1f}** |")


if __name__ == "__main__":
    main()
