#!/usr/bin/env python
"""Packed 2:4 checkpoint vs dense: size on disk, load time, peak RSS, and logits equality.

Prunes SmolLM2 with Wanda 2:4 (the protocol's calibration), casts to ``--dtype``, saves it packed with
``llmprune.save`` and its dense equivalent with plain ``save_pretrained``, then loads each in a fresh
subprocess (so peak RSS is that load's own) and checks the two give identical logits.

    python scripts/bench_load.py --dtype float16 --json eval/results/load.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmprune.resources import peak_rss_mb, shared_dir  # noqa: E402

PROMPT = "The history of the city begins with a small settlement on the river, which"


def load_one(kind: str, directory: str, dtype: str, logits_path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import llmprune

    started = time.perf_counter()
    if kind == "dense":
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()
    else:
        model = llmprune.load(directory, dtype=dtype, backend="dense")
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    with torch.no_grad():
        logits = model(input_ids=torch.load(logits_path)["ids"]).logits
    torch.save(logits, f"{logits_path}.{kind}")
    return {"load_s": round(seconds, 2), "peak_rss_mb": round(peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(shared_dir() / "models" / "smollm2-135m-instruct-q4_1"))
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--load", nargs=3, help=argparse.SUPPRESS)  # internal: KIND DIR LOGITS
    args = parser.parse_args()
    if args.load:
        print("RESULT " + json.dumps(load_one(args.load[0], args.load[1], args.dtype, args.load[2])), flush=True)
        return

    import torch

    import llmprune

    model = llmprune.load(args.model, dtype="float32")
    started = time.perf_counter()
    llmprune.prune(model, method="wanda", pattern="2:4", nsamples=64, seqlen=512, device="cpu", progress=False)
    prune_s = time.perf_counter() - started
    model = model.to(getattr(torch, args.dtype))
    ids = llmprune.state(model).tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    rows = {}
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tmp = Path(tmp)
        torch.save({"ids": ids}, tmp / "logits.pt")
        model.save_pretrained(tmp / "dense")
        llmprune.save(model, tmp / "packed")
        for kind in ("dense", "packed"):
            files = list((tmp / kind).glob("*.safetensors"))
            proc = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--load", kind, str(tmp / kind), str(tmp / "logits.pt")],
                                  stdout=subprocess.PIPE, text=True, check=True)
            result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
            rows[kind] = {"safetensors_mb": round(sum(f.stat().st_size for f in files) / 2**20, 2), **result}
        dense_logits, packed_logits = (torch.load(tmp / f"logits.pt.{kind}") for kind in ("dense", "packed"))
    equal = bool(torch.equal(dense_logits, packed_logits))
    # A model cast in memory also casts rotary buffers that loaders keep in float32, so the in-memory
    # reference is exact only in float32; in half precision the dense reload is the reference.
    in_memory = bool(torch.equal(logits, packed_logits)) if args.dtype == "float32" else None
    print(f"SmolLM2-135M, Wanda 2:4 (pruned in {prune_s:.0f} s), stored in {args.dtype}\n")
    print("| checkpoint | safetensors MiB | load s | peak RSS MiB (VmHWM) |")
    print("|---|---|---|---|")
    for kind, row in rows.items():
        loader = "plain from_pretrained" if kind == "dense" else "llmprune.load, backend dense"
        print(f"| {kind} ({loader}) | {row['safetensors_mb']} | {row['load_s']} | {row['peak_rss_mb']} |")
    print(f"\npacked logits == dense-checkpoint logits: {equal}" + ("" if in_memory is None else f"; == in-memory pruned model: {in_memory}"))
    ratio = rows["packed"]["safetensors_mb"] / rows["dense"]["safetensors_mb"]
    print(f"\npacked / dense size: {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dtype": args.dtype, "prune_s": round(prune_s, 1), "rows": rows, "size_ratio": ratio,
                                               "logits_equal_dense_reload": equal, "logits_equal_in_memory": in_memory}, indent=1))


if __name__ == "__main__":
    main()
