#!/usr/bin/env python
"""CPU decode GEMVs: dense float32 ``F.linear`` against the numba 2:4 float32 kernel (``numba24``) and
the numba 2:4 + INT4 kernel (``numba24q4``), on SmolLM2 and Llama-2-7B shapes, with random weights.

Each side rotates through copies of its own layout totalling ``--pool-mb`` (beyond the L3), so every
call streams its weight from memory as decode does; the sides take turns in ``--rounds`` rounds, each a
median of ``--repeats`` calls, so noise from other work on the machine hits them alike; the table
has the median of the rounds. ``--contention N`` runs a second process doing dense GEMMs on N threads
during all of it (a user's other job).

    python scripts/bench_q4.py --json eval/results/q4_kernels.json
    python scripts/bench_q4.py --contention 2 --json eval/results/q4_kernels_contended.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numba
import torch
import torch.nn.functional as F

from llmprune.eval.speed import median_seconds, random_24
from llmprune.kernels import numba24, numba24q4
from llmprune.packing import Int24, stored_positions
from llmprune.pruners.quantizer import Quantizer

SMOLLM2 = "576x576,192x576,1536x576,576x1536"
LLAMA_7B = "4096x4096,11008x4096,4096x11008"
COMPETITOR = ("import sys, torch\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(1024, 1024)\n"
              "while True:\n    a @ a\n")  # a user's other job: dense GEMMs on N threads


def quantize_24(weight: torch.Tensor, group_size: int) -> Int24:
    """The stored values of a 2:4 weight on llmprune's symmetric 4-bit grid, as an ``Int24``."""
    out_features, in_features = weight.shape
    columns = stored_positions(weight).nonzero()[:, 1].reshape(out_features, in_features // 2)
    quantizer = Quantizer(bits=4, group_size=group_size)
    width = quantizer.width(in_features)
    grid = [quantizer.params(weight[:, start:start + width]) for start in range(0, in_features, width)]
    scales, zeros = (torch.stack(part, 1) for part in zip(*grid))
    group = columns // width
    codes = quantizer.quantize(weight.gather(1, columns), scales.gather(1, group), zeros.gather(1, group))
    return Int24(codes, (columns % 4).to(torch.uint8), scales, zeros, width)


def pool(tensors: tuple[torch.Tensor, ...], pool_bytes: int) -> list[tuple[torch.Tensor, ...]]:
    """Copies of ``tensors`` totalling at least ``pool_bytes`` (one copy when it is 0)."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    return [tuple(t.clone() for t in tensors) for _ in range(max(1, -(-pool_bytes // size)))]


def bench_shape(out_features: int, in_features: int, ms: list[int], group_size: int, pool_bytes: int,
                rounds: int, repeats: int, generator: torch.Generator) -> list[dict]:
    weight = random_24(out_features, in_features, torch.float32, torch.device("cpu"), generator)
    layouts = {"dense": (weight,), "numba24": numba24.to_layout(weight),
               "numba24q4": numba24q4.to_layout(quantize_24(weight, group_size))}
    functions = {"dense": F.linear, "numba24": numba24.linear, "numba24q4": numba24q4.linear}
    dense_bytes = weight.numel() * weight.element_size()
    ceilings = {side: dense_bytes / sum(t.numel() * t.element_size() for t in tensors)
                for side, tensors in layouts.items()}
    pools = {side: pool(tensors, pool_bytes) for side, tensors in layouts.items()}
    rows = []
    for m in ms:
        inputs = [torch.randn(m, in_features, generator=generator) for _ in range(4)]
        seconds: dict[str, list[float]] = {side: [] for side in pools}
        for turn in range(rounds):
            for side, copies in pools.items():
                def one_call(i: int, call=functions[side], copies=copies, inputs=inputs) -> torch.Tensor:
                    return call(inputs[i % 4], *copies[i % len(copies)])

                seconds[side].append(median_seconds(one_call, torch.device("cpu"), repeats, warmup=3 if turn else 10))
        dense_s = statistics.median(seconds["dense"])
        for side in ("numba24", "numba24q4"):
            side_s = statistics.median(seconds[side])
            rows.append({"out": out_features, "in": in_features, "m": m, "backend": side,
                         "dense_us": round(dense_s * 1e6, 1), "us": round(side_s * 1e6, 1),
                         "speedup": round(dense_s / side_s, 2), "ceiling": round(ceilings[side], 2),
                         "copies": len(pools[side])})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| out × in | M | dense µs | 2:4 fp32 µs | × | 2:4+INT4 µs | × | byte ceilings (fp32 2:4, INT4) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    pairs = {}
    for row in rows:
        pairs.setdefault((row["out"], row["in"], row["m"]), {})[row["backend"]] = row
    for (out_features, in_features, m), sides in pairs.items():
        fp32, q4 = sides["numba24"], sides["numba24q4"]
        lines.append(f"| {out_features} × {in_features} | {m} | {fp32['dense_us']} | {fp32['us']} | "
                     f"{fp32['speedup']:.2f} | {q4['us']} | **{q4['speedup']:.2f}** | "
                     f"{fp32['ceiling']:.2f}, {q4['ceiling']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=f"{SMOLLM2},{LLAMA_7B}", help="OUTxIN,... (default SmolLM2 and Llama-2-7B)")
    parser.add_argument("--ms", default="1,4,8", help="rows of x, comma-separated")
    parser.add_argument("--group-size", type=int, default=128, help="INT4 grid: input columns per scale")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch and both kernels)")
    parser.add_argument("--pool-mb", type=int, default=256, help="weight copies per side and shape (0: hot cache)")
    parser.add_argument("--rounds", type=int, default=5, help="turns the sides take")
    parser.add_argument("--repeats", type=int, default=20, help="calls per side and round")
    parser.add_argument("--contention", type=int, default=0, metavar="N",
                        help="run a competing process doing dense GEMMs on N threads (0: none)")
    parser.add_argument("--fused-rows", type=int, default=None, metavar="N",
                        help="run both kernels fused up to N rows of x, expanded above (default: numba24.fused_rows, by size)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        shapes = [(int(out), int(inp)) for out, inp in (shape.split("x") for shape in args.shapes.split(","))]
        ms = [int(m) for m in args.ms.split(",")]
    except ValueError:
        parser.error(f"--shapes takes OUTxIN,... and --ms integers; got {args.shapes!r} and {args.ms!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fused_rows is not None:
        numba24.fused_rows = lambda *shape: args.fused_rows
    competitor = None
    if args.contention:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(args.contention)])
        time.sleep(1)
    load = os.getloadavg()
    header = (f"{platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, torch {torch.__version__}, numba "
              f"{numba.__version__}, {torch.get_num_threads()} threads, INT4 group size {args.group_size}, "
              f"weights rotate through {args.pool_mb} MiB per side, fused up to {args.fused_rows if args.fused_rows is not None else 'numba24.fused_rows (by size)'} rows, "
              f"{f'a competing process on {args.contention} threads' if args.contention else 'no competing process'}")
    print(header, flush=True)
    rows = []
    try:
        generator = torch.Generator().manual_seed(0)
        for out_features, in_features in shapes:
            with torch.inference_mode():
                rows += bench_shape(out_features, in_features, ms, args.group_size, args.pool_mb << 20,
                                    args.rounds, args.repeats, generator)
            print(f"{out_features} × {in_features} done", file=sys.stderr, flush=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    load_after = os.getloadavg()
    print(f"load average (1 min) before {load[0]:.2f}, after {load_after[0]:.2f}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "threads": torch.get_num_threads(), "contention_threads": args.contention,
                       "max_fused_rows": args.fused_rows,
                       "group_size": args.group_size, "pool_mb": args.pool_mb, "rounds": args.rounds,
                       "repeats": args.repeats, "load_before": load, "load_after": load_after, "rows": rows},
                      handle, indent=1)


if __name__ == "__main__":
    main()
