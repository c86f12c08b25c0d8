#!/usr/bin/env python
"""Prefill-sized calls of the CPU 2:4 kernels: the fused kernel against expanding the weight and a dense
GEMM, for each shape and number of rows M, and which of the two ``numba24.fused_rows`` picks.

    python scripts/bench_prefill_rows.py [--shapes 2048x2048,5632x2048] [--ms 16,32,64,128,256] [--dtype D] [--json OUT]
    python scripts/bench_prefill_rows.py --checkpoint DIR [--prompt-lens 32,128] [--dtype D] [--json OUT]

With ``--checkpoint`` (a packed checkpoint, loaded in ``--dtype``) it times instead one forward of a random
prompt of each length through the whole model: on the dense backend, and on the numba backend under the
rules now, under the old fixed 16 rows (``numba24.MAX_FUSED_ROWS``), with each weight expanded whole
(no tiles; up to 128 rows fused in float32) and, in bfloat16, with the float32 expanded GEMMs of before;
all taking turns, ``--repeats`` rounds.

Both sides run on the same layer (random 2:4 weights, INT4 codes for ``numba+int4``), hot in cache as
prefill sees them (one weight, many rows); medians of ``--repeats`` calls. The fused kernel's time grows
with M from the first row; expanding (``numba24.expanded_linear``: a tile of the weight at a time) costs
the weight's copy once and then a GEMM (in bfloat16 for a bfloat16 model: ~4× faster here), so the crossover moves
to more rows as the weight grows, and to fewer in bfloat16.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmprune.eval.speed import random_24, sparse_module  # noqa: E402
from llmprune.kernels import numba24, numba24q4  # noqa: E402

SHAPES = "576x576,1536x576,2048x2048,5632x2048,2048x5632,4096x4096,11008x4096"


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def prompt_forwards(checkpoint: str, prompt_lens: list[int], repeats: int, dtype: str) -> list[dict]:
    """Median ms of one forward of each prompt length: the checkpoint on the dense backend, and on the
    numba backend under the rules now, under the fixed 16 rows and (bfloat16) with float32 expanded GEMMs."""
    import llmprune

    models = {"dense": llmprune.load(checkpoint, device="cpu", dtype=dtype, backend="dense"),
              "numba": llmprune.load(checkpoint, device="cpu", dtype=dtype, backend="numba")}
    vocab = models["dense"].config.vocab_size
    whole = {"TILE_BYTES": 1 << 62, "FUSED_ROWS": {**numba24.FUSED_ROWS, torch.float32: (128, 256 << 10)}}
    rules = {"dense backend": ("dense", {}), "numba, now": ("numba", {}),
             "numba, 16 rows": ("numba", {"fused_rows": lambda *shape: numba24.MAX_FUSED_ROWS}),
             "numba, whole expansion": ("numba", whole)}
    if dtype == "bfloat16":
        rules["numba, float32 GEMMs"] = ("numba", {"gemm_dtype": lambda dtype: torch.float32})
    rows = []
    print(f"| prompt tokens | {dtype} model | forward ms |")
    print("|---:|---|---:|")
    for length in prompt_lens:
        ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length))
        times: dict[str, list[float]] = {rule: [] for rule in rules}
        for round_ in range(repeats + 1):  # round 0 warms up
            for rule, (model, overrides) in rules.items():
                saved = {name: getattr(numba24, name) for name in overrides}
                for name, value in overrides.items():
                    setattr(numba24, name, value)
                models[model].to("cpu")  # rebinds every layer, which reads the limits when bound
                start = time.perf_counter()
                models[model](ids)
                if round_:
                    times[rule].append((time.perf_counter() - start) * 1e3)
                for name, value in saved.items():
                    setattr(numba24, name, value)
        for rule, values in times.items():
            rows.append({"prompt_len": length, "rule": rule, "dtype": dtype,
                         "forward_ms": round(statistics.median(values), 1), "all_ms": [round(v, 1) for v in values]})
            print(f"| {length} | {rule} | {rows[-1]['forward_ms']} |", flush=True)
    return rows


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=SHAPES, help="OUTxIN,... (default: SmolLM2, 1B and 7B shapes)")
    parser.add_argument("--ms", default="16,32,64,128,256", help="rows of x, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="of the weights and x (a bfloat16 model: the kernels widen in registers, "
                             "the expanded GEMM runs in bfloat16)")
    parser.add_argument("--checkpoint", default=None, help="time whole prompts through this packed checkpoint")
    parser.add_argument("--prompt-lens", default="32,128", help="with --checkpoint: prompt lengths")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.checkpoint:
        try:
            lengths = [int(v) for v in args.prompt_lens.split(",")]
        except ValueError:
            parser.error(f"--prompt-lens takes integers; got {args.prompt_lens!r}")
        rows = prompt_forwards(args.checkpoint, lengths, args.repeats, args.dtype)
        if args.json:
            Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "threads": torch.get_num_threads(),
                                                   "rows": rows}, indent=1))
        return
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
        ms = [int(m) for m in args.ms.split(",")]
    except ValueError:
        parser.error(f"--shapes takes OUTxIN,... and --ms integers; got {args.shapes!r} and {args.ms!r}")
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{torch.get_num_threads()} threads, {args.dtype}")
    print("| kernel | out × in | fused_rows | M | fused ms | expanded ms | faster | picked |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for name, kernel in (("numba+int4", numba24q4), ("numba", numba24)):
        for out_features, in_features in shapes:
            layer = sparse_module(random_24(out_features, in_features, dtype, torch.device("cpu"), generator),
                                  name, generator)[0]
            values, meta = layer.kernel.data, layer.meta
            arrays = (numba24.array(values), numba24.array(meta))
            limit = numba24.fused_rows(out_features, in_features, dtype)
            for m in ms:
                x = torch.randn(m, in_features, generator=generator).to(dtype)
                fused = median_ms(lambda: numba24.fused(kernel._compiled(), x, x.float(), *arrays, None), args.repeats)
                expanded = median_ms(lambda: numba24.expanded_linear(kernel._compiled(), x, values, meta, in_features,
                                                                     None), args.repeats)
                row = {"kernel": name, "out": out_features, "in": in_features, "dtype": args.dtype,
                       "fused_rows": limit, "m": m,
                       "fused_ms": round(fused, 3), "expanded_ms": round(expanded, 3)}
                rows.append(row)
                print(f"| {name} | {out_features} × {in_features} | {limit} | {m} | {fused:.2f} | {expanded:.2f} | "
                      f"{'fused' if fused < expanded else 'expanded'} | {'fused' if m <= limit else 'expanded'} |",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
