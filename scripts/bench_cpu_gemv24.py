#!/usr/bin/env python
"""CPU experiment (issue: decoding speed): a numba 2:4 GEMV against torch's dense F.linear at batch 1.

Layout: for each group g of 4 inputs and row i, the two kept values v0[g, i], v1[g, i] (rows
contiguous, so the inner loop over rows can vectorise) and one byte of positions (a | b << 2). The
positions select x[4g + a] branch-free (x0 + Δ1·[a=1] + Δ2·[a=2] + Δ3·[a=3]). Exact up to float
summation order. Needs ``pip install numba`` (not a dependency of llmprune: the result is negative,
see eval/RESULTS.md). Dense and sparse timings are interleaved so machine noise hits both alike.

    python scripts/bench_cpu_gemv24.py
"""
import time

import numba
import numpy as np
import torch
from numba import njit, prange

torch.set_num_threads(2)
numba.set_num_threads(2)


@njit(fastmath=True, parallel=True, cache=True, boundscheck=False)
def gemv24(v0, v1, meta, x, y, chunk):
    """y = W·x for the 2:4 weight (v0, v1: [groups, rows] kept values; meta: [groups, rows] positions)."""
    groups, rows = v0.shape
    for block in prange((rows + chunk - 1) // chunk):
        lo = block * chunk
        hi = min(rows, lo + chunk)
        acc = np.zeros(hi - lo, dtype=np.float32)
        for g in range(groups):
            x0 = x[4 * g]
            d1, d2, d3 = x[4 * g + 1] - x0, x[4 * g + 2] - x0, x[4 * g + 3] - x0
            for i in range(hi - lo):
                a = meta[g, lo + i] & 3
                b = meta[g, lo + i] >> 2
                xa = x0 + d1 * np.float32(a == 1) + d2 * np.float32(a == 2) + d3 * np.float32(a == 3)
                xb = x0 + d1 * np.float32(b == 1) + d2 * np.float32(b == 2) + d3 * np.float32(b == 3)
                acc[i] += v0[g, lo + i] * xa + v1[g, lo + i] * xb
        y[lo:hi] = acc


def random_24(out_features: int, in_features: int):
    """A random 2:4 weight (dense, for torch) and its kernel layout (v0, v1, positions), rows last."""
    groups = torch.randn(out_features, in_features // 4, 4)
    positions = groups.abs().topk(2, dim=-1).indices.sort(-1).values
    kept = groups.gather(-1, positions)
    dense = torch.zeros_like(groups).scatter_(-1, positions, kept).reshape(out_features, in_features)
    v0, v1 = (kept[..., s].T.contiguous().numpy() for s in (0, 1))
    meta = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8).T.contiguous().numpy()
    return dense, v0, v1, meta


def median_us(fn, repeats: int = 100) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


print(f"torch {torch.__version__}, numba {numba.__version__}, 2 threads, float32, batch 1")
print("| out x in | dense F.linear us | numba 2:4 us | speedup | max abs err |\n|---|---:|---:|---:|---:|")
for out, inn in [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]:
    dense, v0, v1, meta = random_24(out, inn)
    x = torch.randn(inn)
    xn, y = x.numpy(), np.zeros(out, dtype=np.float32)
    gemv24(v0, v1, meta, xn, y, 512)
    err = np.abs(y - (dense @ x).numpy()).max()
    dense_us, sparse_us = [], []
    for _ in range(5):  # interleaved rounds
        dense_us.append(median_us(lambda: torch.nn.functional.linear(x[None], dense), 40))
        sparse_us.append(min(median_us(lambda: gemv24(v0, v1, meta, xn, y, chunk), 40) for chunk in (256, 1024)))
    d, s = np.median(dense_us), np.median(sparse_us)
    print(f"| {out} x {inn} | {d:.1f} | {s:.1f} | {d / s:.2f} | {err:.1e} |", flush=True)
