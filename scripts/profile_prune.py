#!/usr/bin/env python
"""Where pruning time goes: cProfile of one ``llmprune.prune`` run on the first N decoder layers.

    python scripts/profile_prune.py --method sparsegpt --pattern 2:4 --layers 6
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import llmprune  # noqa: E402
from llmprune.resources import shared_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(shared_dir() / "models" / "smollm2-135m-instruct-q4_1"))
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--layers", type=int, default=6, help="profile only the first N decoder layers")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--no-share", action="store_true", help="every linear gets its own statistics")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = llmprune.load(args.model, dtype="float32")
    layers = model.model.layers
    model.model.layers = layers[: args.layers]
    model.config.num_hidden_layers = args.layers
    profile = cProfile.Profile()
    profile.enable()
    llmprune.prune(model, method=args.method, pattern=args.pattern, nsamples=args.nsamples, seqlen=args.seqlen,
                   device="cpu", progress=False, share_stats=not args.no_share)
    profile.disable()
    summary = llmprune.state(model).report.summary
    print(f"{args.method} {args.pattern}, first {args.layers} layers, share_stats={not args.no_share}: "
          f"{summary.seconds} s, phases {summary.phase_seconds}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
