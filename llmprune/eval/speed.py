"""Speed of 2:4 sparse against dense: a GEMM microbenchmark on a model's real linear shapes, and
end-to-end prefill and decode, dense and sparse, in one run.

Timing: CUDA events on CUDA, ``perf_counter`` on CPU; warm-up first, then the median of many
repeats, each on a fresh random input (a rotating pool, never zeros). Decode streams every weight
from memory once per token, so by default each call also takes the next of a pool of weight copies
larger than any cache (``pool_bytes``); a single weight repeated would be timed from cache instead,
which is what prefill-sized M see anyway. The byte ceiling is what a
memory-bound GEMV can gain at most: dense bytes over kept values plus their position metadata
(``itemsize / (itemsize/2 + 1/8)`` with 2-bit positions: 16/9 ≈ 1.78 in fp16, 1.88 in fp32; 1.78 in
fp32 for the numba layout's byte per group), for the backend that actually ran.
"""
from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter import ModelAdapter
from ..errors import LLMPruneError
from ..packing import Int24, int24_from
from ..patterns import NM
from ..sparse_linear import SparseLinear

GEMM_MS = (1, 16, 64, 256, 1024, 4096)
QUICK_MS = (1, 16)
POOL_BYTES = 256 << 20  # weight copies per shape in the GEMM benchmark: beyond any CPU L3 or GPU L2


# Metadata bits per dense element of each backend's layout: 2-bit positions of the two kept values of 4
# (1 bit per element), or the numba kernel's one byte per group of 4 (2 bits); the dense backend has no saving.
METADATA_BITS = {"semi-structured": 1, "triton": 1, "numba": 2}
# 2:4 + INT4 (``+int4``): bytes per group of 4 inputs with a 128-column grid, in both kernels' layouts:
# two 4-bit codes, 4 bits of positions, and a float32 scale and offset per row and 128 columns.
INT4_GROUP_BYTES = 1.5 + 8 / 32
INT4 = "+int4"


def byte_ceiling(dtype: torch.dtype, backend: str = "triton") -> float:
    """Most a memory-bound 2:4 GEMV can gain over dense: dense bytes / (kept values + metadata);
    ``backend`` may carry ``+int4`` (the kept values as 4-bit codes)."""
    name, _, fmt = backend.partition("+")
    if name == "dense":
        return 1.0
    itemsize = torch.empty((), dtype=dtype).element_size()
    if fmt:
        return 4 * itemsize / INT4_GROUP_BYTES
    return itemsize / (itemsize / 2 + METADATA_BITS[name] / 8)


def median_seconds(fn: Callable[[int], object], device: torch.device, repeats: int, warmup: int,
                   budget_s: float = 2.0) -> float:
    """Median time of ``fn(i)`` over up to ``repeats`` calls (fewer once ``budget_s`` is spent)."""
    for i in range(warmup):
        fn(i)
    times: list[float] = []
    spent = 0.0
    for i in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            clock = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - clock)
        spent += times[-1]
        if spent > budget_s and len(times) >= 5:
            break
    return statistics.median(times)


def random_24(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device,
              generator: torch.Generator) -> torch.Tensor:
    """A random weight pruned 2:4 by magnitude (values do not matter for speed; the pattern does)."""
    weight = torch.randn(out_features, in_features, generator=generator)
    weight = weight * NM(2, 4).keep_mask(weight.abs())
    return weight.to(device=device, dtype=dtype)


def random_int24(weight: torch.Tensor, generator: torch.Generator, group_size: int = 128) -> Int24:
    """``weight``'s 2:4 positions with random 4-bit codes on a random symmetric grid of ``group_size`` columns."""
    out_features, in_features = weight.shape
    groups = -(-in_features // group_size)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(out_features, groups, generator=generator) * 0.01 + 1e-3).half()
    q = int24_from(weight.float().cpu() + 0.0, codes, scales, torch.full((out_features, groups), 8.0).half(), group_size)
    return Int24(*(t.to(weight.device) for t in q[:4]), q.group_size, q.bits)


def sparse_module(weight: torch.Tensor, backend: str, generator: torch.Generator) -> SparseLinear:
    """A ``SparseLinear`` of ``weight`` on ``backend`` (``numba+int4``: as random 4-bit codes on its positions)."""
    name, _, fmt = backend.partition("+")
    label = "x".join(map(str, weight.shape))
    if fmt:
        return SparseLinear(random_int24(weight, generator), backend=name, name=label, dtype=weight.dtype)
    return SparseLinear(weight.clone(), backend=name, name=label)  # a clone: the dense backend keeps its input


@torch.inference_mode()
def gemm_benchmark(shapes: list[tuple[int, int]], ms: tuple[int, ...], backends: list[str], dtype: torch.dtype,
                   device: torch.device, repeats: int = 100, warmup: int = 10, seed: int = 0,
                   pool_bytes: int = POOL_BYTES, progress: bool = True) -> list[dict]:
    """``y = x·Wᵀ`` for each ``[out, in]`` shape and each M (rows of x): dense ``F.linear`` against
    ``SparseLinear`` with each backend (``NAME+int4``: the 2:4 + INT4 kernels of that name). One row per
    (shape, M, backend) with medians and speedups.

    Each side cycles through copies of its weight holding at least ``pool_bytes`` of dense weights
    (0: one weight, timed hot in cache)."""
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    bar = tqdm(total=len(shapes) * len(ms), desc="GEMM", unit="case", disable=not progress)
    for out_features, in_features in shapes:
        weight = random_24(out_features, in_features, dtype, device, generator)
        copies = max(1, -(-pool_bytes // (weight.numel() * weight.element_size())))
        dense = [nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype) for _ in range(copies)]
        for linear in dense:  # modules, so both sides pay the same call overhead
            linear.weight.data.copy_(weight)
        modules = {backend: [sparse_module(weight, backend, generator) for _ in range(copies)] for backend in backends}
        for m in ms:
            pool = [torch.randn(m, in_features, generator=generator).to(device=device, dtype=dtype) + 0.1
                    for _ in range(4)]
            dense_s = median_seconds(lambda i: dense[i % copies](pool[i % 4]), device, repeats, warmup)
            for backend, sparse in modules.items():
                sparse_s = median_seconds(lambda i: sparse[i % copies](pool[i % 4]), device, repeats, warmup)
                ran = sparse[0].backend + (INT4 if INT4 in backend and sparse[0].backend != "dense" else "")
                rows.append({"out": out_features, "in": in_features, "m": m, "backend": backend,
                             "ran": ran, "weight_copies": copies, "dense_us": round(dense_s * 1e6, 2),
                             "sparse_us": round(sparse_s * 1e6, 2), "speedup": round(dense_s / sparse_s, 3),
                             "ceiling": round(byte_ceiling(dtype, ran), 3)})
            bar.update()
    bar.close()
    return rows


def sparse_copy(model: nn.Module, backend: str) -> nn.Module:
    """A copy of a dense model whose prunable linears are 2:4 (magnitude) ``SparseLinear`` modules,
    for speed comparisons only."""
    sparse = copy.deepcopy(model)
    adapter = ModelAdapter(sparse)
    for name, prunable in adapter.all_linears().items():
        weight = prunable.weight.detach()
        weight = weight * NM(2, 4).keep_mask(weight.abs().float())
        module = SparseLinear(weight, getattr(prunable.module, "bias", None), backend=backend, name=name,
                              transposed=prunable.transposed)
        parent, _, child = name.rpartition(".")
        setattr(sparse.get_submodule(parent) if parent else sparse, child, module)
    return sparse


FREE = "linears free"  # the decode row of ``free_copy``: the ceiling of any 2:4 kernel


class _Free(nn.Module):
    """A sparse linear that costs nothing: zeros of its output's shape."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def free_copy(sparse: nn.Module) -> nn.Module:
    """``sparse`` with every ``SparseLinear`` taking no time, all other tensors shared (not copied).

    Its decode speed is everything but the 2:4 linears (embedding, attention, norms, the LM head,
    sampling, the framework's own overhead): over dense, the most any 2:4 kernel can gain end to end."""
    memo: dict[int, object] = {id(t): t for t in itertools.chain(sparse.parameters(), sparse.buffers())}
    memo.update({id(m): _Free(m.out_features) for m in sparse.modules() if isinstance(m, SparseLinear)})
    return copy.deepcopy(sparse, memo)


def _elapsed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - clock


@torch.inference_mode()
def decode_benchmark(models: dict[str, nn.Module], batch_sizes: list[int], prompt_len: int, new_tokens: int,
                     device: torch.device, seed: int = 0, repeats: int = 3, progress: bool = True) -> list[dict]:
    """Prefill time and greedy decode tokens/s of each model on the same random prompts.

    The models take turns within each repeat (after one warm-up run each), so a noisy machine
    slows them alike; decode time is the generate() time minus the prefill time (medians)."""
    rows: list[dict] = []
    bar = tqdm(total=len(batch_sizes) * (repeats + 1), desc="decode", unit="round", disable=not progress)
    for batch in batch_sizes:
        vocab = next(iter(models.values())).config.vocab_size
        prompt = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
        mask = torch.ones_like(prompt)
        times: dict[str, dict[str, list[float]]] = {label: {"prefill": [], "total": []} for label in models}
        for round_ in range(repeats + 1):
            for label, model in models.items():
                prefill = _elapsed(lambda: model(prompt, attention_mask=mask, use_cache=True), device)
                total = _elapsed(lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0), device)
                if round_:  # round 0 warms up
                    times[label]["prefill"].append(prefill)
                    times[label]["total"].append(total)
            bar.update()
        for label in models:
            prefill, total = (statistics.median(times[label][k]) for k in ("prefill", "total"))
            rows.append({"model": label, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                         "prefill_ms": round(prefill * 1e3, 2),
                         "decode_tok_s": round(batch * new_tokens / max(total - prefill, 1e-9), 2)})
    bar.close()
    return rows


def gemm_table(rows: list[dict]) -> str:
    lines = ["| out × in | M | backend (ran) | dense µs | sparse µs | speedup | byte ceiling |", "|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['out']} × {r['in']} | {r['m']} | {r['backend']} ({r['ran']}) | {r['dense_us']} | {r['sparse_us']} | "
              f"{r['speedup']:.2f} | {r['ceiling']:.2f} |" for r in rows]
    return "\n".join(lines)


def decode_table(rows: list[dict]) -> str:
    """The decode rows as markdown, then, where a ``FREE`` row was timed, the ceiling it sets per batch."""
    lines = ["| model | batch | prefill ms | decode tok/s | vs dense |", "|---|---:|---:|---:|---:|"]
    dense = {r["batch"]: r["decode_tok_s"] for r in rows if r["model"] == "dense"}
    for r in rows:
        ratio = r["decode_tok_s"] / dense[r["batch"]] if r["batch"] in dense else float("nan")
        lines.append(f"| {r['model']} | {r['batch']} | {r['prefill_ms']} | {r['decode_tok_s']} | {ratio:.2f} |")
    ceilings = [f"batch {r['batch']}: {r['decode_tok_s'] / dense[r['batch']]:.2f}x" for r in rows
                if r["model"] == FREE and r["batch"] in dense]
    if ceilings:
        lines.append(f"\nceiling with the 2:4 linears taking no time ({'; '.join(ceilings)} dense): what remains is "
                     f"the embedding, attention, norms, LM head, sampling and the framework")
    return "\n".join(lines)


def plot_speedups(rows: list[dict], path) -> None:
    """Speedup against M, one line per (shape, backend), with the byte ceiling."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise LLMPruneError("the speedup plot needs matplotlib: pip install 'llmprune[eval]'") from exc

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for key in sorted({(r["out"], r["in"], r["backend"]) for r in rows}):
        points = sorted((r["m"], r["speedup"]) for r in rows if (r["out"], r["in"], r["backend"]) == key)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{key[0]}×{key[1]} {key[2]}")
    for ceiling in sorted({r["ceiling"] for r in rows} - {1.0}):
        axes.axhline(ceiling, color="grey", linestyle="--", label=f"byte ceiling {ceiling:.2f}")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("M (rows of x: batch × tokens)")
    axes.set_ylabel("speedup over dense F.linear")
    axes.set_title("2:4 sparse vs dense GEMM")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
