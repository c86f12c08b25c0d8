#!/usr/bin/env python
"""The two SparseGPT speed changes of issue #13, each timed alone on random data of real shapes.

    python scripts/bench_obs.py --json eval/results/bench_obs.json

1. Hessian accumulation: ``InputStats.update`` folding ``--tokens`` inputs (in batches of 512) into 2·E[xxᵀ],
   the upper triangle in column blocks (today) against one full ``addmm`` per batch (before), mirror included.
2. The OBS column loop: SparseGPT 2:4 on linears that share an input (q/k/v, gate/up), each linear on its
   own (``prune``, before) against their rows stacked in one loop (``prune_many``, today); the script
   checks that both give the same weights bit for bit.
3. The column loop inside a block in torch (one tensor op at a time; what runs on GPU or without numba)
   against the compiled one (``pruners._obs_numba``, CPU with numba), rows stacked, the factor computed
   beforehand; again checked bit for bit.

Shapes: SmolLM2-135M (hidden 576, MLP 1536) and Llama-2-7B (4096, 11008). Weights are random normal, the
Hessian that of random correlated inputs. Each variant runs ``--repeats`` times, the two alternating, and
the table has medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmprune.patterns import NM  # noqa: E402
from llmprune.pruners import sparsegpt  # noqa: E402
from llmprune.pruners.sparsegpt import SparseGPT  # noqa: E402
from llmprune.stats import HESSIAN, InputStats  # noqa: E402

HESSIAN_WIDTHS = (576, 1536, 4096, 11008)
GROUPS = {  # name: (in_features, [out_features of the linears sharing that input])
    "SmolLM2 q/k/v": (576, [576, 192, 192]),
    "SmolLM2 o": (576, [576]),
    "SmolLM2 gate/up": (576, [1536, 1536]),
    "SmolLM2 down": (1536, [576]),
    "Llama-2-7B q/k/v": (4096, [4096, 4096, 4096]),
    "Llama-2-7B down": (11008, [4096]),
}


def correlated_inputs(tokens: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Inputs whose channels are correlated (a random mixing of independent ones), like a layer's."""
    base = torch.randn(tokens, width, generator=generator)
    mixing = torch.eye(width) + 0.1 * torch.randn(width, width, generator=generator) / width**0.5
    return base @ mixing


def hessian_of(inputs: torch.Tensor) -> InputStats:
    stats = InputStats(inputs.shape[1], frozenset({HESSIAN}))
    stats.update(inputs)
    return stats


def time_hessian(width: int, tokens: int, blocked: bool, inputs: torch.Tensor) -> float:
    stats = InputStats(width, frozenset({HESSIAN}))
    if not blocked:
        stats._blocks = [(0, width)]  # the full product, as before the triangular accumulation
    started = time.perf_counter()
    for batch in inputs.split(512):
        stats.update(batch)
    _ = stats.hessian  # the mirror is part of the cost
    return time.perf_counter() - started


def time_obs(weights: list[torch.Tensor], stats: InputStats, stacked: bool) -> tuple[float, list[torch.Tensor]]:
    pruner, pattern = SparseGPT(), NM(2, 4)
    started = time.perf_counter()
    if stacked:
        results = pruner.prune_many([w.clone() for w in weights], stats, pattern)
    else:
        results = [pruner.prune(w.clone(), stats, pattern) for w in weights]
    return time.perf_counter() - started, [r.weight for r in results]


def time_loop(weights: list[torch.Tensor], stats: InputStats, compiled: bool) -> tuple[float, list[torch.Tensor]]:
    pruner, pattern = SparseGPT(), NM(2, 4)
    pruner._factor(stats, torch.device("cpu"), None)  # timed apart from the loop
    chooser = sparsegpt._numba_runs
    sparsegpt._numba_runs = lambda work: compiled  # which loop the sweep takes (benchmark only)
    try:
        started = time.perf_counter()
        results = pruner.prune_many([w.clone() for w in weights], stats, pattern)
        return time.perf_counter() - started, [r.weight for r in results]
    finally:
        sparsegpt._numba_runs = chooser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--groups", default=",".join(GROUPS), help="comma-separated names of GROUPS")
    parser.add_argument("--parts", default="hessian,stacking,compiled", help="comma-separated: which tables")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    parts = set(args.parts.split(","))
    if "hessian" in parts:
        hessian_table(args, generator, rows)
    for part, title, label, timer in (
            ("stacking", "one by one s | stacked s", "one_by_one_s", time_obs),
            ("compiled", "torch loop s | compiled s", "torch_loop_s", time_loop)):
        if part == "compiled" and part in parts:  # numba's compile (or disk cache load) is not the loop's time
            time_loop([torch.randn(8, 64)], hessian_of(correlated_inputs(128, 64, generator)), True)
        if part in parts:
            obs_table(args, generator, rows, title, label, timer)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


def hessian_table(args: argparse.Namespace, generator: torch.Generator, rows: list[dict]) -> None:
    print(f"Hessian accumulation, {args.tokens} tokens in batches of 512, {args.threads} threads")
    print("| in | full s | triangular s | × |\n|---:|---:|---:|---:|")
    for width in HESSIAN_WIDTHS:
        inputs = correlated_inputs(args.tokens, width, generator)
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for blocked in (False, True):
                times[blocked].append(time_hessian(width, args.tokens, blocked, inputs))
        full, tri = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"part": "hessian", "in": width, "full_s": round(full, 4), "triangular_s": round(tri, 4)})
        print(f"| {width} | {full:.3f} | {tri:.3f} | {full / tri:.2f} |", flush=True)


def obs_table(args: argparse.Namespace, generator: torch.Generator, rows: list[dict], title: str, label: str,
              timer) -> None:
    """One table of the column loop: ``timer(weights, stats, False)`` (before) against ``…True`` (today)."""
    print(f"\nSparseGPT 2:4 column loop (blocksize 128), {args.threads} threads")
    print(f"| linears | in | rows | {title} | × | identical |\n|---|---:|---:|---:|---:|---:|---|")
    for name in args.groups.split(","):
        width, outs = GROUPS[name]
        stats = hessian_of(correlated_inputs(2 * width, width, generator))
        weights = [torch.randn(out, width, generator=generator) * 0.02 for out in outs]
        times = {True: [], False: []}
        results = {}
        for _ in range(args.repeats):
            for today in (False, True):
                seconds, results[today] = timer(weights, stats, today)
                times[today].append(seconds)
        same = all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
        before, today = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"part": "obs", "linears": name, "in": width, "rows": sum(outs), label: round(before, 3),
                     "today_s": round(today, 3), "identical": same})
        print(f"| {name} | {width} | {sum(outs)} | {before:.3f} | {today:.3f} | {before / today:.2f} | {same} |",
              flush=True)


if __name__ == "__main__":
    main()
