#!/usr/bin/env python
"""One-pass pruning time and peak RSS under glibc allocator settings, on a random model of a preset's shapes.

    python scripts/bench_allocator.py MODE [--preset smollm2|llama-1b|...] [--layers 8] [--passes 1] [--method wanda]

MODE: ``default`` (glibc as it is), ``one-heap`` (what ``llmprune`` sets: ``M_ARENA_MAX`` 1),
``mmap`` (a fixed 1 MiB mmap threshold, what a1810a3 set), ``one-heap+N`` (one heap and a fixed N MiB
threshold). Run each mode in a fresh process (the settings are process-wide and the peak is the
process's); prints one line: mode, seconds, the run's phases, RSS before and peak RSS in MB. Set
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` to try transparent huge pages for mapped blocks.
"""
from __future__ import annotations

import argparse
import ctypes
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmprune
import llmprune.stream as stream
from synthetic_model import PRESETS
from llmprune.resources import peak_rss_mb

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's malloc.h


def allocator(mode: str):
    """The function ``stream.layerwise`` calls when pruning starts, for ``mode``."""
    libc = ctypes.CDLL("libc.so.6")
    heap, _, threshold = mode.partition("+")
    settings = {"default": [], "one-heap": [(M_ARENA_MAX, 1)], "mmap": [(M_MMAP_THRESHOLD, 1 << 20)]}[heap]
    if threshold:
        settings.append((M_MMAP_THRESHOLD, int(threshold) << 20))
    return lambda: [libc.mallopt(option, value) for option, value in settings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode")
    parser.add_argument("--preset", default="smollm2", choices=sorted(PRESETS), help="shapes (scripts/synthetic_model.py)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    stream.share_one_heap = allocator(args.mode)
    torch.set_num_threads(2)
    config = LlamaConfig(**{**PRESETS[args.preset], "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen))
    before = peak_rss_mb()
    started = time.perf_counter()
    llmprune.prune(model, method=args.method, pattern="2:4", calib_tokens=tokens, progress=False, device="cpu",
                   passes=args.passes)
    phases = llmprune.state(model).report.summary.phase_seconds
    print(f"{args.preset} {args.mode} passes={args.passes} {time.perf_counter() - started:.1f} s "
          f"{ {k: round(v, 1) for k, v in phases.items()} } rss_before_mb {before:.0f} peak_mb {peak_rss_mb():.0f}",
          flush=True)


if __name__ == "__main__":
    main()
