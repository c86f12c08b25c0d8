#!/usr/bin/env python
"""Pruning time per weight across architectures: SmolLM2-shaped (Llama) against Gemma-3-270M-shaped models.

    python scripts/profile_family.py --method sparsegpt --pattern 2:4 --nsamples 16 --seqlen 512 \\
        --json eval/results/profile_family.json [--profile 20]

Each model is built from its transformers config with random weights (nothing downloaded) and pruned
in memory by ``llmprune.prune`` on random calibration tokens, one model after the other in this process
(same load). The table gives each run's phases (statistics, pruning, outputs) in seconds and in
microseconds per prunable weight, so a family whose pruning costs more per weight than another's shows
up. ``LLMPRUNE_CHECKOUT=DIR`` runs another checkout's llmprune (e.g. a worktree of 0.1.0). ``--profile N`` adds a cProfile of each run's pruning, its N most expensive functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("LLMPRUNE_CHECKOUT") or str(Path(__file__).resolve().parent.parent))
import llmprune  # noqa: E402
from llmprune.adapter import ModelAdapter  # noqa: E402

FAMILIES = {
    # HuggingFaceTB/SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 9 heads of 64 (3 KV heads).
    "smollm2": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    # google/gemma-3-270m: 18 layers, hidden 640, MLP 2048, 4 heads of 256 (1 KV head), 262k vocabulary
    # (cut to 32k here: the vocabulary does not enter the pruning of decoder layers).
    "gemma3": ("gemma3_text", dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=256, vocab_size=32768, sliding_window=512,
                                   tie_word_embeddings=True)),
}


def build(family: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, settings = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def run(family: str, args: argparse.Namespace) -> dict:
    model = build(family)
    weights = sum(p.weight.numel() for p in ModelAdapter(model).all_linears().values())
    tokens = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                           generator=torch.Generator().manual_seed(0))
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    options = {} if args.passes is None else {"passes": args.passes}
    llmprune.prune(model, args.method, args.pattern, calib_tokens=tokens, nsamples=args.nsamples, seqlen=args.seqlen,
                   device="cpu", progress=False, **options)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    if hasattr(llmprune, "state"):
        phase_seconds = llmprune.state(model).report.summary.phase_seconds
    else:  # 0.1.0 (--baseline runs this script on its code) kept the report as a dict on the model
        phase_seconds = model.llmprune_report["summary"]["phase_seconds"]
    phases = {name: round(value, 2) for name, value in phase_seconds.items()}
    row = {"family": family, "prunable_weights": weights, "layers": model.config.num_hidden_layers,
           "seconds": round(seconds, 1), "phase_s": phases,
           "us_per_weight": {name: round(1e6 * value / weights, 3) for name, value in phases.items()}}
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile)
        row["profile"] = text.getvalue()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--passes", type=int, choices=[1, 2], default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for family in args.families.split(","):
        if family not in FAMILIES:
            raise SystemExit(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
        rows.append(run(family, args))
        if args.profile:
            print(f"--- {family}: pruning profile (own time)\n{rows[-1]['profile']}")
    names = sorted({name for row in rows for name in row["phase_s"]})
    print(f"{args.method} {args.pattern}, {args.nsamples} × {args.seqlen} random tokens, {args.threads} threads")
    print("| family | layers | prunable weights | seconds | " + " | ".join(f"{n} s (µs/weight)" for n in names) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(names))
    for row in rows:
        cells = " | ".join(f"{row['phase_s'].get(n, 0):.1f} ({row['us_per_weight'].get(n, 0):.3f})" for n in names)
        print(f"| {row['family']} | {row['layers']} | {row['prunable_weights'] / 1e6:.1f}M | {row['seconds']} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
