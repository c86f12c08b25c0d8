#!/usr/bin/env python
"""GEMM microbenchmark on given layer shapes (random weights pruned 2:4), without a model: the SmolLM2
shapes and the Llama-2-7B ones by default, every sparse backend the device has against dense F.linear.

`llmprune bench` does the same on a model's own shapes and adds end-to-end decode; this script is for
shapes no local model has (7B layers on a GPU machine, built there from random weights).

    python scripts/bench_gemm.py --ms 1,16,64 --threads 2 --json eval/results/gemm_cpu.json
    python scripts/bench_gemm.py --device cuda --dtype float16 --ms 1,16,64,256,1024,4096
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from llmprune.eval.speed import POOL_BYTES, gemm_benchmark, gemm_table
from llmprune.kernels import sparse_backends

SMOLLM2 = "576x576,192x576,1536x576,576x1536"
LLAMA_7B = "4096x4096,11008x4096,4096x11008"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=f"{SMOLLM2},{LLAMA_7B}", help="OUTxIN,... (default SmolLM2 and Llama-2-7B)")
    parser.add_argument("--ms", default="1,16,64", help="rows of x, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backends", default=None,
                        help="sparse backends (default: numba on CPU; semi-structured,triton on CUDA); NAME+int4 times "
                             "the 2:4 + INT4 kernel of that name (numba+int4, triton+int4)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch and numba)")
    parser.add_argument("--pool-mb", type=int, default=POOL_BYTES >> 20, help="weight copies per shape (0: hot cache)")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        shapes = [(int(out), int(inp)) for out, inp in (shape.split("x") for shape in args.shapes.split(","))]
        ms = tuple(int(m) for m in args.ms.split(","))
    except ValueError:
        parser.error(f"--shapes takes OUTxIN,... and --ms integers; got {args.shapes!r} and {args.ms!r}")
    backends = args.backends.split(",") if args.backends else list(sparse_backends(device))
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}, "
          f"weights rotate through {args.pool_mb} MiB per shape")
    rows = gemm_benchmark(shapes, ms, ["dense", *backends], dtype, device,
                          repeats=args.repeats, pool_bytes=args.pool_mb << 20)
    print(gemm_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "dtype": args.dtype, "threads": torch.get_num_threads(),
                       "pool_mb": args.pool_mb, "torch": torch.__version__, "gemm": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
