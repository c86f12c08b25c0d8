#!/usr/bin/env python
"""What Hessian sharing saves (issue: SparseGPT), isolated from the rest of a pruning run.

One decoder layer of a Llama-family model reads four distinct inputs: the attention input (q, k, v),
the o_proj input, the MLP input (gate, up) and the down_proj input. Without sharing, each of its seven
linears accumulates its own H = 2·E[xxᵀ] and factorises its own (H + λI)⁻¹; with sharing, four of each.
This times both on inputs of the model's real widths (random values: the cost does not depend on them),
the two variants taking turns so machine noise hits both alike.

    python scripts/bench_sharing.py                           # SmolLM2-135M widths: 576 and 1536
    python scripts/bench_sharing.py --hidden 4096 --intermediate 11008 --tokens 8192   # LLaMA-7B widths
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llmprune.pruners.sparsegpt import SparseGPT  # noqa: E402
from llmprune.stats import HESSIAN, InputStats  # noqa: E402

# (input, linears reading it) for one Llama decoder layer
READERS = {"attention input": ["q_proj", "k_proj", "v_proj"], "o_proj input": ["o_proj"],
           "mlp input": ["gate_proj", "up_proj"], "down_proj input": ["down_proj"]}


def one_layer(inputs: dict[str, torch.Tensor], share: bool, batch: int) -> tuple[float, float]:
    """(seconds accumulating Hessians, seconds factorising them) for one layer."""
    start = time.perf_counter()
    stats = []
    for name, x in inputs.items():
        for _ in range(1 if share else len(READERS[name])):
            accumulator = InputStats(x.shape[1], frozenset({HESSIAN}))
            for chunk in x.split(batch):
                accumulator.update(chunk)
            stats.append(accumulator)
    hessian_s = time.perf_counter() - start
    start = time.perf_counter()
    pruner = SparseGPT()
    for accumulator in stats:
        pruner._factor(accumulator, torch.device("cpu"), None)
    return hessian_s, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=64 * 512, help="calibration tokens (protocol: 64 x 512)")
    parser.add_argument("--batch", type=int, default=8 * 512, help="tokens per streamed batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    widths = {"attention input": args.hidden, "o_proj input": args.hidden, "mlp input": args.hidden,
              "down_proj input": args.intermediate}
    inputs = {name: torch.randn(args.tokens, width, generator=generator) for name, width in widths.items()}
    times = {True: [], False: []}
    one_layer(inputs, True, args.batch)  # warm-up
    for _ in range(args.rounds):
        for share in (True, False):
            times[share].append(one_layer(inputs, share, args.batch))
    print(f"widths {args.hidden}/{args.intermediate}, {args.tokens} tokens, {args.threads} threads, "
          f"medians of {args.rounds} interleaved rounds, one decoder layer")
    print("| phase | shared s | per linear s | speed-up |\n|---|---:|---:|---:|")
    for index, phase in enumerate(["Hessian accumulation", "Cholesky factorisation"]):
        shared = statistics.median(t[index] for t in times[True])
        alone = statistics.median(t[index] for t in times[False])
        print(f"| {phase} | {shared:.3f} | {alone:.3f} | {alone / shared:.2f}x |")
    shared = statistics.median(sum(t) for t in times[True])
    alone = statistics.median(sum(t) for t in times[False])
    print(f"| both | {shared:.3f} | {alone:.3f} | {alone / shared:.2f}x |")


if __name__ == "__main__":
    main()
