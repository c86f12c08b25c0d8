#!/usr/bin/env python
"""Block sizes of the two Triton kernels, timed on the GPU: every (BLOCK_N, STEPS) (output rows per
program, 128-column chunks per loop step) of the 2:4 kernel (``kernels.triton24``) and of the 2:4 + INT4
kernel (``kernels.triton24q4``) on the Llama-2-7B shapes at small M, against dense ``F.linear`` in the
same dtype; the rows of x per program follow M (``_triton_jit.blocks``).

On CUDA each configuration is timed as CUDA-graph replays (the kernel alone, without launch overhead).

    python scripts/tune_triton.py --json eval/results/tune_triton.json          (GPU machine)
    TRITON_INTERPRET=1 python scripts/tune_triton.py --device cpu --dtype float32 --shapes 32x256 --ms 1 --quick --pool-mb 0

Weights stream from memory as in decode: each call takes the next of a pool of copies holding at least
``--pool-mb`` in its own format (H200: 60 MB of L2). Every configuration's output is checked against the
dense product first (a configuration that computes something else must not win). The table gives, per
shape and M, the dense time, the default configuration's time and the best configuration's; the last
table, the configuration with the best geometric-mean time over all cases. The prefill path (the weight
expanded by ``expand24``/``expand24q4``, then cuBLAS) is timed at every M as the configuration
"expand, cuBLAS": where it wins, ``_triton_jit.PREFILL_M`` should move down.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, as on the GPU machine

from llmprune.eval.speed import byte_ceiling, graph_seconds, median_seconds, random_24, random_int24  # noqa: E402
from llmprune.kernels import triton24, triton24q4  # noqa: E402

LLAMA_7B = "4096x4096,11008x4096,4096x11008"
# name: (its module, its key in _triton_jit.LAUNCH, the two block-size keywords of its `linear`, their
# candidate values). The sweeps so far favoured the fewest output rows at M = 1 and more chunks per step with
# more rows of x: the candidates span both ends.
KERNELS = {
    "triton24": (triton24, "2:4", ("block_n", "steps"), ((1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 32))),
    "triton24q4": (triton24q4, "2:4+int4", ("block_n", "steps"), ((1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 32))),
}
# The configuration row of the prefill path (weight expanded, then cuBLAS) timed at every M, so that the M
# from which it wins (``_triton_jit.PREFILL_M``) is read from the same table.
EXPAND = ("expand", "cuBLAS")
FORMATS = {"triton24": "triton", "triton24q4": "triton+int4"}  # their names in eval.speed.byte_ceiling
QUICK = {"triton24": ((8, 16), (1,)), "triton24q4": ((8, 16), (1,))}


def defaults(kernel: str, m: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_n, steps): what the kernel's ``linear`` picks for ``m`` rows of x when not told (the rows of x
    per program follow M; the sweep leaves them to that rule)."""
    from llmprune.kernels._triton_jit import blocks

    shape = blocks(m, dtype, KERNELS[kernel][1])
    return shape.block_n, shape.steps


def layouts(kernel: str, weight: torch.Tensor, copies: int,
            generator: torch.Generator) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """``copies`` (values, meta) layouts of ``weight`` for ``kernel``, and the dense weight they stand for."""
    module = KERNELS[kernel][0]
    if kernel == "triton24q4":
        q = random_int24(weight, generator)
        layout = module.to_layout(q)
        dense = q.dequantize().to(weight.dtype)
    else:
        layout = module.to_layout(weight)
        dense = weight
    return [tuple(t.clone() for t in layout) for _ in range(copies)], dense


def tune(kernel: str, shapes: list[tuple[int, int]], ms: list[int], dtype: torch.dtype, device: torch.device,
         pool_bytes: int, repeats: int, candidates: tuple[tuple[int, ...], tuple[int, ...]]) -> list[dict]:
    """One row per (shape, M, configuration): median µs, and dense F.linear's."""
    module, _, keys, _ = KERNELS[kernel]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for out_features, in_features in shapes:
        weight = random_24(out_features, in_features, dtype, device, generator)
        dense_bytes = weight.numel() * weight.element_size()
        copies = max(1, -(-pool_bytes // dense_bytes))
        own = max(1, math.ceil(pool_bytes * byte_ceiling(dtype, FORMATS[kernel]) / dense_bytes))  # pool_bytes of its format
        pool, dense = layouts(kernel, weight, own, generator)
        dense_pool = [dense.clone() for _ in range(copies)]

        def timed(call: Callable[[int], object], calls: int) -> float:
            return graph_seconds(call, max(calls, 8)) if device.type == "cuda" else median_seconds(call, device, repeats, 5)

        for m in ms:
            xs = [torch.randn(m, in_features, generator=generator).to(device=device, dtype=dtype) for _ in range(4)]
            dense_s = timed(lambda i: F.linear(xs[i % 4], dense_pool[i % copies]), copies)
            expected = F.linear(xs[0].float(), dense.float())
            configurations = [({keys[0]: a, keys[1]: b}, (a, b)) for a, b in itertools.product(*candidates)]
            configurations.append(({"expand_from": 1}, EXPAND))  # the prefill path at this M
            for options, label in configurations:
                try:
                    got = module.linear(xs[0], *pool[0], **options).float()
                except OutOfResources as error:  # a tile this GPU cannot hold is not a candidate here
                    print(f"{kernel} {options} at {out_features}x{in_features}, M={m}: skipped ({error})")
                    continue
                error = ((got - expected).norm() / expected.norm()).item()
                if not error < 2e-2:
                    raise SystemExit(f"{kernel} {options} at {out_features}x{in_features}, M={m}: output differs "
                                     f"from the dense product by {error:.2e}")
                seconds = timed(lambda i: module.linear(xs[i % 4], *pool[i % own], **options), own)
                rows.append({"kernel": kernel, "out": out_features, "in": in_features, "m": m,
                             keys[0]: label[0], keys[1]: label[1],
                             "dtype": str(dtype).removeprefix("torch."),
                             "us": round(seconds * 1e6, 2), "dense_us": round(dense_s * 1e6, 2),
                             "speedup": dense_s / seconds})
    return rows


def report(rows: list[dict], kernel: str) -> str:
    """Per case: dense, default and best; then the configurations ranked by geometric-mean speedup."""
    module, _, keys, _ = KERNELS[kernel]
    lines = [f"#### {kernel} (default: `_triton_jit.blocks` for each M)", "",
             f"| shape | M | dense µs | default µs (×dense) | best µs (×dense) | best {keys[0]}, {keys[1]} |",
             "|---|---:|---:|---:|---:|---|"]
    cases = dict.fromkeys((r["out"], r["in"], r["m"]) for r in rows if r["kernel"] == kernel)
    for out_features, in_features, m in cases:
        mine = [r for r in rows if r["kernel"] == kernel and (r["out"], r["in"], r["m"]) == (out_features, in_features, m)]
        best = min(mine, key=lambda r: r["us"])
        default = defaults(kernel, m, getattr(torch, mine[0]["dtype"]))
        base = next((r for r in mine if (r[keys[0]], r[keys[1]]) == default), None)
        base_cell = f"{base['us']:.1f} ({base['speedup']:.2f}×)" if base else "not tried"
        lines.append(f"| {out_features}x{in_features} | {m} | {best['dense_us']:.1f} | {base_cell} | "
                     f"{best['us']:.1f} ({best['speedup']:.2f}×) | {best[keys[0]]}, {best[keys[1]]} |")
    configs: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if r["kernel"] == kernel:
            configs.setdefault((r[keys[0]], r[keys[1]]), []).append(math.log(r["speedup"]))
    # a configuration that could not run everywhere (too large for the GPU at some M) is not ranked
    ranked = sorted(((c, v) for c, v in configs.items() if len(v) == len(cases)),
                    key=lambda item: -sum(item[1]) / len(item[1]))
    lines += ["", f"| {keys[0]}, {keys[1]} | geomean ×dense over {len(cases)} cases |", "|---|---:|"]
    lines += [f"| {a}, {b} | {math.exp(sum(v) / len(v)):.3f} |"
              for (a, b), v in ranked[:6]]
    return "\n".join(lines)


def sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of powers of two (Triton block sides), for argparse."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 or v & (v - 1) for v in values):
        raise argparse.ArgumentTypeError(f"block sizes must be powers of two, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated: " + ", ".join(KERNELS))
    parser.add_argument("--shapes", default=LLAMA_7B, help="OUTxIN,... (default the Llama-2-7B shapes)")
    parser.add_argument("--ms", default="1,4,8", help="rows of x, comma-separated")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--pool-mb", type=int, default=256, help="MiB each format cycles through (default 256)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="two configurations per kernel (a smoke test)")
    grid = KERNELS["triton24"][3]
    parser.add_argument("--block-n", type=sizes, default=None, help="output rows per program to try, "
                        f"comma-separated (default {','.join(map(str, grid[0]))})")
    parser.add_argument("--steps", type=sizes, default=None, help="chunks per loop step to try, "
                        f"comma-separated (default {','.join(map(str, grid[1]))})")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    rows: list[dict] = []
    for kernel in args.kernels.split(","):
        candidates = QUICK[kernel] if args.quick else KERNELS[kernel][3]
        candidates = tuple(default if given is None else given
                           for default, given in zip(candidates, (args.block_n, args.steps)))
        rows += tune(kernel, shapes, ms, dtype, device, args.pool_mb << 20, args.repeats, candidates)
        print(report(rows, kernel) + "\n", flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": gpu, "dtype": args.dtype, "torch": torch.__version__,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
