#!/usr/bin/env python
"""Benchmark protocol: prune with each config, then WikiText-2 perplexity; prints a markdown table.

Each config runs in its own subprocess, so its peak RSS is its own. Config syntax:
``dense``, ``METHOD@SPARSITY`` (unstructured), ``METHOD@N:M``, ``METHOD@hybrid:F`` (2:4 with a dense
fraction F), plus suffixes: ``+dsnot`` (DSnoT refinement), ``+owl`` (OWL allocation), ``+noshare``
(every linear gets its own statistics, to measure what Hessian sharing saves), ``+dsnotattn`` (DSnoT
on the attention linears only, as the paper's code does), ``+saliency`` (hybrid
blocks by saliency instead of the error-driven default), ``+global`` (one global hybrid budget),
``+2pass`` (the papers' two passes per layer instead of one), ``+w4`` (4-bit weights, group 128;
``METHOD@dense+w4`` prunes nothing: plain GPTQ), ``+asym`` (zero points), ``+gN`` (group size N), ``+clip`` (searched grid ranges), ``+actorder`` (SparseGPT's columns by decreasing diag(H)). ``--baseline CHECKOUT`` runs each config
also with another checkout's code (e.g. a git worktree of an earlier commit), right after ours.
Example (the protocol):

    python scripts/bench_prune.py dense magnitude@0.5 wanda@0.5 magnitude@2:4 wanda@2:4 --json eval/results/core.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmprune.resources import peak_rss_mb, shared_dir  # noqa: E402

DEFAULT_MODEL = shared_dir() / "models" / "smollm2-135m-instruct-q4_1"


# Suffixes that switch a pipeline option on: METHOD@TARGET+dsnot+owl+noshare.
SUFFIXES = {"noshare": {"share_stats": False}, "dsnot": {"refine": "dsnot"}, "owl": {"allocation": "owl"},
            "dsnotattn": {"refine": "dsnot", "refine_options": {"skip": ("mlp",)}},
            "saliency": {"hybrid_select": "saliency"}, "global": {"hybrid_budget": "global"}, "2pass": {"passes": 2},
            "w4": {"quantize": "w4"}, "asym": {"symmetric": False}, "clip": {"clip": True},
            "actorder": {"act_order": True}}


def parse_config(config: str) -> dict:
    base, *flags = config.split("+")
    options: dict = {}
    for flag in flags:
        if flag[:1] == "g" and flag[1:].isdigit():  # +g64: quantization group size
            options["group_size"] = int(flag[1:])
            continue
        if flag not in SUFFIXES:
            raise SystemExit(f"unknown config suffix +{flag}; known: {', '.join(SUFFIXES)}")
        options.update(SUFFIXES[flag])
    if base == "dense":
        return {"method": None, "options": options}
    method, _, target = base.partition("@")
    if target.startswith("hybrid:"):
        options["dense_fraction"] = float(target.removeprefix("hybrid:"))
        return {"method": method, "pattern": "hybrid:2:4", "sparsity": None, "options": options}
    if ":" in target or target == "dense":
        return {"method": method, "pattern": target, "sparsity": None, "options": options}
    return {"method": method, "pattern": None, "sparsity": float(target or 0.5), "options": options}


def run_one(args: argparse.Namespace) -> dict:
    import torch

    import llmprune
    from llmprune.eval import perplexity

    torch.set_num_threads(args.threads)
    spec = parse_config(args.config)
    started = time.perf_counter()
    model = llmprune.load(args.model, device="cpu", dtype="float32")
    result = {"config": args.config, "load_s": round(time.perf_counter() - started, 1), "rss_after_load_mb": round(peak_rss_mb())}
    if spec["method"]:
        started = time.perf_counter()
        llmprune.prune(model, method=spec["method"], pattern=spec["pattern"], sparsity=spec["sparsity"],
                       nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device="cpu",
                       batch_size=args.batch_size, progress=not args.quiet, **spec["options"])
        result["prune_s"] = round(time.perf_counter() - started, 1)
        report = llmprune.state(model).report
        result["sparsity"] = round(report.summary.sparsity, 4)
        errors = [layer.rel_error for layer in report.layers]
        result["mean_rel_error"] = round(sum(errors) / len(errors), 4)
        if spec["pattern"] == "hybrid:2:4":
            result["dense_fraction"] = round(report.summary.dense_fraction, 4)
        result["phase_s"] = report.summary.phase_seconds
    result["peak_rss_prune_mb"] = round(peak_rss_mb())
    if not args.skip_eval:
        ppl = perplexity(model, "wikitext2", seqlen=args.eval_seqlen, window_stride=args.window_stride, progress=not args.quiet)
        result.update(ppl=round(ppl.ppl, 3), eval_s=round(ppl.seconds, 1), windows=f"{len(ppl.windows)}/{ppl.total_windows}")
    return result


def table(rows: list[dict]) -> str:
    columns = ["config", "ppl", "sparsity", "dense_fraction", "mean_rel_error", "prune_s", "phase_s", "peak_rss_prune_mb",
               "eval_s", "windows"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "-")) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["dense", "magnitude@0.5", "wanda@0.5"])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--window-stride", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--baseline", default=None, metavar="CHECKOUT",
                        help="also run every config with the code of another checkout (e.g. a git worktree of an "
                             "earlier commit), right after ours, so both see the same machine load")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: run one config in this process
    args = parser.parse_args()
    if args.config:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    passthrough = [a for a in sys.argv[1:] if a not in args.configs]
    if args.baseline:
        index = passthrough.index("--baseline")
        passthrough = passthrough[:index] + passthrough[index + 2:]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LLMPRUNE_SHARED": str(shared_dir())}
    for config in args.configs:
        for label, checkout in [("", REPO)] + ([("baseline ", Path(args.baseline))] if args.baseline else []):
            if label and "+2pass" in config:
                continue  # the baseline has only the two-pass order
            script = checkout / "scripts" / "bench_prune.py"
            proc = subprocess.run([sys.executable, str(script), *passthrough, "--config", config],
                                  stdout=subprocess.PIPE, text=True, cwd=checkout, env=env)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not found:
                sys.exit(f"{label}config {config} failed (exit {proc.returncode})")
            rows.append({**json.loads(found[-1][7:]), "config": label + config})
            print(f"{label}{config}: {rows[-1]}", flush=True)
    print(f"\nmodel {args.model}; calibration wikitext2 {args.nsamples} x {args.seqlen} seed {args.seed}; "
          f"eval WikiText-2 test seqlen {args.eval_seqlen}, every {args.window_stride}th window; {args.threads} threads\n")
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "config"}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
