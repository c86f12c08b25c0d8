#!/usr/bin/env python
"""Peak memory and time against depth: out-of-core pruning against loading the whole model first.

    python scripts/synthetic_model.py llama-1b /work/synth/llama-1b-32 --layers 32
    python scripts/bench_memory.py /work/synth/llama-1b-32 --depths 4,8,16,32 --json eval/results/memory_depth.json

For each depth d, a view of the checkpoint with ``num_hidden_layers = d`` (its config.json rewritten, the
shards linked: the extra layers' tensors are simply not read) is pruned by ``llmprune prune`` in a fresh
process, out of core and with ``--in-memory``, the two modes taking turns. Peak RSS is the process's
own high-water mark (VmHWM, read by the CLI at the end); seconds per layer are the mean of the report's
``layer_seconds``. A table, the JSON and a PNG (RSS against depth) are written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def depth_view(source: Path, depth: int, root: Path) -> Path:
    """``source`` with only its first ``depth`` decoder layers, without copying any tensor."""
    view = root / f"{source.name}-{depth}"
    view.mkdir()
    for path in source.iterdir():
        if path.name != "config.json":
            (view / path.name).symlink_to(path.resolve())
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = depth
    for key in ("layer_types",):  # per-layer lists must match the depth
        if isinstance(config.get(key), list):
            config[key] = config[key][:depth]
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view


def prune(model: Path, out: Path, args: argparse.Namespace, in_memory: bool) -> dict:
    command = [sys.executable, "-m", "llmprune", "prune", str(model), "--method", args.method, "--pattern",
               args.pattern, "--calib", str(args.calib or model / "calib.txt"), "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--device", "cpu", "--quiet", "--out", str(out)]
    if in_memory:
        command.append("--in-memory")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rss = float(re.search(r"peak RSS of this process ([\d.]+) GiB", done.stdout).group(1))
    report = json.loads((out / "llmprune.json").read_text())
    per_layer = {int(re.search(r"\.(\d+)\.", layer["name"]).group(1)): layer["layer_seconds"] for layer in report["layers"]}
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"mode": "in-memory" if in_memory else "out-of-core", "rss_gib": rss, "wall_s": round(wall, 1),
            "prune_s": report["summary"]["seconds"], "s_per_layer": round(sum(per_layer.values()) / len(per_layer), 2),
            "output_gib": round(size / 2**30, 3)}


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for mode in ("out-of-core", "in-memory"):
        points = sorted((r["depth"], r["rss_gib"]) for r in rows if r["mode"] == mode)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
    axes.set_xlabel("decoder layers")
    axes.set_ylabel("peak RSS (GiB)")
    axes.set_title("Peak memory against depth (hidden 2048, MLP 5632, bf16)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a synthetic checkpoint (scripts/synthetic_model.py)")
    parser.add_argument("--depths", default="4,8,16,32")
    parser.add_argument("--modes", default="out-of-core,in-memory")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--calib", type=Path, default=None, help="default: MODEL/calib.txt")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    modes = args.modes.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmprune-depth-", dir=args.model.parent) as tmp:
        root = Path(tmp)
        for depth in depths:
            view = depth_view(args.model, depth, root)
            for mode in modes:
                row = {"depth": depth, **prune(view, root / f"out-{depth}-{mode}", args, mode == "in-memory")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("| layers | mode | peak RSS GiB | s per layer | prune s | output GiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['depth']} | {r['mode']} | {r['rss_gib']:.2f} | {r['s_per_layer']} | {r['prune_s']} | {r['output_gib']} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "method": args.method, "pattern": args.pattern,
                                         "nsamples": args.nsamples, "seqlen": args.seqlen, "threads": args.threads,
                                         "rows": rows}, indent=1))
        plot(rows, args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
