"""Speed of 2:4 sparse against dense: a GEMM microbenchmark on a model's real linear shapes, and
end-to-end prefill and decode, dense and sparse, in one run.

Timing: CUDA events on CUDA, ``perf_counter`` on CPU; warm-up first, then the median of many
repeats, each on a fresh random input (a rotating pool, never zeros). On CUDA every case is also
timed as CUDA-graph replays (``graph_seconds``, ``StaticDecode``): an eager call's time includes the
host launching it (measured on an H200: 25-60 µs per GEMM call, more than the GEMV itself takes),
which the graph removes, as a server that captures its decode step does. Decode streams every weight
from memory once per token, so by default each call also takes the next of a pool of weight copies
larger than any cache (``pool_bytes``); a single weight repeated would be timed from cache instead,
which is what prefill-sized M see anyway. The byte ceiling is what a
memory-bound GEMV can gain at most: dense bytes over kept values plus their position metadata
(``itemsize / (itemsize/2 + 1/8)`` with 2-bit positions: 16/9 ≈ 1.78 in fp16, 1.88 in fp32; 1.78 in
fp32 for the numba layout's byte per group), for the backend that actually ran.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import math
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


def _capture(body: Callable[[], object], warmup: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``body`` recorded as a CUDA graph (recording runs nothing), after ``warmup`` ran off the default stream,
    as capture requires: Triton compiles and the allocator settles there."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warmup()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def graph_seconds(fn: Callable[[int], object], calls: int, repeats: int = 20, warmup: int = 3) -> float:
    """GPU seconds per call of ``fn(0)`` … ``fn(calls - 1)`` captured as one CUDA graph and replayed (median
    over ``repeats`` replays): the kernels' time without the host's launch overhead."""
    graph = _capture(lambda: [fn(i) for i in range(calls)], lambda: [fn(i) for i in range(warmup)])
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return statistics.median(times)


def _graph_us(fn: Callable[[int], object], calls: int) -> tuple[float | None, str | None]:
    """``graph_seconds`` in µs, or None and why when the work cannot be captured."""
    try:
        return round(graph_seconds(fn, calls) * 1e6, 2), None
    except RuntimeError as exc:
        torch.cuda.synchronize()
        return None, str(exc).splitlines()[0][:200]


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


def sparse_module(weight: torch.Tensor, backend: str, generator: torch.Generator, copies: int = 1) -> list[SparseLinear]:
    """``copies`` ``SparseLinear`` modules of ``weight`` on ``backend`` (``numba+int4``: as random 4-bit codes on
    its positions, the same codes in every copy)."""
    name, _, fmt = backend.partition("+")
    label = "x".join(map(str, weight.shape))
    if fmt:
        q = random_int24(weight, generator)
        return [SparseLinear(Int24(*(t.clone() for t in q[:4]), q.group_size, q.bits), backend=name, name=label,
                             dtype=weight.dtype) for _ in range(copies)]
    return [SparseLinear(weight.clone(), backend=name, name=label) for _ in range(copies)]  # the dense backend keeps its input


@torch.inference_mode()
def gemm_benchmark(shapes: list[tuple[int, int]], ms: tuple[int, ...], backends: list[str], dtype: torch.dtype,
                   device: torch.device, repeats: int = 100, warmup: int = 10, seed: int = 0,
                   pool_bytes: int = POOL_BYTES, progress: bool = True) -> list[dict]:
    """``y = x·Wᵀ`` for each ``[out, in]`` shape and each M (rows of x): dense ``F.linear`` against
    ``SparseLinear`` with each backend (``NAME+int4``: the 2:4 + INT4 kernels of that name). One row per
    (shape, M, backend) with medians and speedups; on CUDA also ``*_graph_us`` and ``graph_speedup``,
    the same calls timed as CUDA-graph replays (None, with ``graph_error``, where a side cannot be captured).

    Each side cycles through copies of its weight holding at least ``pool_bytes`` in its own format (a 2:4 +
    INT4 weight is 4.6x smaller than dense, so it takes more copies to leave the cache; 0: one weight, timed
    hot in cache)."""
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    bar = tqdm(total=len(shapes) * len(ms), desc="GEMM", unit="case", disable=not progress)
    for out_features, in_features in shapes:
        weight = random_24(out_features, in_features, dtype, device, generator)
        dense_bytes = weight.numel() * weight.element_size()
        copies = max(1, -(-pool_bytes // dense_bytes))
        dense = [nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype) for _ in range(copies)]
        for linear in dense:  # modules, so both sides pay the same call overhead
            linear.weight.data.copy_(weight)
        modules = {backend: sparse_module(weight, backend, generator,
                                          max(1, math.ceil(pool_bytes * byte_ceiling(dtype, backend) / dense_bytes)))
                   for backend in backends}
        for m in ms:
            pool = [torch.randn(m, in_features, generator=generator).to(device=device, dtype=dtype) + 0.1
                    for _ in range(4)]
            dense_s = median_seconds(lambda i: dense[i % copies](pool[i % 4]), device, repeats, warmup)
            calls = max(copies, 8)
            if device.type == "cuda":
                dense_graph, dense_error = _graph_us(lambda i: dense[i % copies](pool[i % 4]), calls)
            for backend, sparse in modules.items():
                sparse_s = median_seconds(lambda i: sparse[i % len(sparse)](pool[i % 4]), device, repeats, warmup)
                ran = sparse[0].backend + (INT4 if INT4 in backend and sparse[0].backend != "dense" else "")
                row = {"out": out_features, "in": in_features, "m": m, "backend": backend,
                       "ran": ran, "weight_copies": copies, "sparse_copies": len(sparse), "dense_us": round(dense_s * 1e6, 2),
                       "sparse_us": round(sparse_s * 1e6, 2), "speedup": round(dense_s / sparse_s, 3),
                       "ceiling": round(byte_ceiling(dtype, ran), 3)}
                if device.type == "cuda":
                    sparse_graph, error = _graph_us(lambda i: sparse[i % len(sparse)](pool[i % 4]), max(len(sparse), 8))
                    row.update(dense_graph_us=dense_graph, sparse_graph_us=sparse_graph, graph_error=error or dense_error,
                               graph_speedup=round(dense_graph / sparse_graph, 3) if dense_graph and sparse_graph else None)
                rows.append(row)
            bar.update()
    bar.close()
    return rows


def sparse_copy(model: nn.Module, backend: str, int4: bool = False, seed: int = 0) -> nn.Module:
    """A copy of a dense model whose prunable linears are 2:4 (magnitude) ``SparseLinear`` modules, with
    ``int4`` their kept values as random 4-bit codes (``random_int24``): for speed comparisons only."""
    sparse = copy.deepcopy(model)
    adapter = ModelAdapter(sparse)
    generator = torch.Generator().manual_seed(seed)
    for name, prunable in adapter.all_linears().items():
        weight = prunable.weight.detach()
        weight = weight * NM(2, 4).keep_mask(weight.abs().float())
        if int4 and prunable.transposed:
            raise LLMPruneError(f"{name}: the 2:4 + INT4 copy takes nn.Linear layers, not GPT-2 Conv1D ones")
        module = SparseLinear(random_int24(weight, generator) if int4 else weight, getattr(prunable.module, "bias", None),
                              backend=backend, name=name, transposed=prunable.transposed, dtype=weight.dtype)
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


GRAPH_MIN_TOKENS = 4  # a captured decode: the prefill's token, 2 warm-up steps, then at least one replay


class StaticDecode:
    """Greedy decoding on a static KV cache in which one step is a fixed sequence of kernels with no host
    synchronisation: the next token, its position and the attention mask stay on the device, and each step
    writes its token into ``tokens``. So on CUDA the step can be captured once as a CUDA graph and replayed
    per token (``capture``), which is how a server removes the per-kernel launch overhead that dominates
    eager decoding on a GPU.

    The step passes the cache position, the position ids and a 4-D additive mask itself: transformers
    versions differ in what they derive from the cache (some read its fill level back on the host, some
    drop the mask for one-token queries, which a static cache's empty slots cannot afford)."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> None:
        from transformers import StaticCache

        batch, prompt_len = prompt.shape
        self.model, self.new_tokens, self.prompt_len = model, new_tokens, prompt_len
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
        # transformers renamed past_key_values to cache (the old name warns on every call)
        self.cache = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
        positions = torch.arange(prompt_len, device=prompt.device)
        logits = model(prompt, cache_position=positions, use_cache=True, **self.cache).logits
        self.tokens = torch.zeros(batch, new_tokens, dtype=torch.long, device=prompt.device)
        self.tokens[:, 0] = logits[:, -1].argmax(-1)
        self.position = positions[-1:] + 1  # of the token fed next
        self.slots = torch.arange(prompt_len + new_tokens, device=prompt.device)
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.blocked = torch.finfo(self.dtype).min
        self.steps = 0  # taken so far, eagerly or as replays
        self.graph: torch.cuda.CUDAGraph | None = None

    def step(self) -> None:
        """Feed the last token, append the next (eagerly; ``run`` replays this once captured)."""
        batch = self.tokens.shape[0]
        index = (self.position - self.prompt_len)[None, :].expand(batch, 1)
        mask = torch.where(self.slots <= self.position, 0.0, self.blocked).to(self.dtype)
        logits = self.model(self.tokens.gather(1, index), **self.cache, cache_position=self.position,
                            position_ids=self.position[None, :].expand(batch, 1),
                            attention_mask=mask.expand(batch, 1, 1, -1), use_cache=True).logits
        self.tokens.scatter_(1, index + 1, logits[:, -1:].argmax(-1))
        self.position.add_(1)
        self.steps += 1

    def capture(self, warmup: int = 2) -> None:
        """Take ``warmup`` real steps eagerly, then record one step as a CUDA graph; recording runs nothing,
        so that step is not counted and no token is lost. At least one step must be left to replay."""
        if self.steps + warmup + 1 > self.new_tokens - 1:
            raise LLMPruneError(f"a captured decode needs at least {self.steps + warmup + 2} new tokens "
                                f"({warmup} warm-up steps, then replays); got {self.new_tokens}")
        self.graph = _capture(self.step, lambda: [self.step() for _ in range(warmup)])
        self.steps -= 1

    def run(self) -> torch.Tensor:
        """The steps left; ``[batch, new_tokens]``: the greedy tokens after the prompt."""
        while self.steps < self.new_tokens - 1:
            if self.graph is None:
                self.step()
            else:
                self.graph.replay()
                self.steps += 1
        return self.tokens


def _graph_tok_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float | None, str | None]:
    """Tokens/s of the captured decode step replayed, prefill and capture excluded; or None and why not."""
    try:
        decode = StaticDecode(model, prompt, new_tokens)
        decode.capture()
        steps = decode.new_tokens - 1 - decode.steps
        seconds = _elapsed(decode.run, prompt.device)
    except (RuntimeError, ValueError, TypeError) as exc:
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return round(prompt.shape[0] * steps / seconds, 2), None


@torch.inference_mode()
def decode_benchmark(models: dict[str, nn.Module], batch_sizes: list[int], prompt_len: int, new_tokens: int,
                     device: torch.device, seed: int = 0, repeats: int = 3, progress: bool = True) -> list[dict]:
    """Prefill time and greedy decode tokens/s of each model on the same random prompts.

    The models take turns within each repeat (after one warm-up run each), so a noisy machine
    slows them alike; decode time is the generate() time minus the prefill time (medians). On CUDA each
    row also has ``graph_tok_s`` (from ``GRAPH_MIN_TOKENS`` new tokens): the same greedy decode with its step
    replayed as a CUDA graph (``StaticDecode``; the median of ``repeats`` runs), None with ``graph_error``
    where capture fails."""
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
        graphed: dict[str, list[tuple[float | None, str | None]]] = {label: [] for label in models}
        if device.type == "cuda" and new_tokens >= GRAPH_MIN_TOKENS:
            for _ in range(repeats):
                for label, model in models.items():
                    graphed[label].append(_graph_tok_s(model, prompt, new_tokens))
        for label in models:
            prefill, total = (statistics.median(times[label][k]) for k in ("prefill", "total"))
            row = {"model": label, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "prefill_ms": round(prefill * 1e3, 2),
                   "decode_tok_s": round(batch * new_tokens / max(total - prefill, 1e-9), 2)}
            if graphed[label]:
                speeds = [tok_s for tok_s, _ in graphed[label] if tok_s is not None]
                row.update(graph_tok_s=statistics.median(speeds) if speeds else None,
                           graph_error=next((error for _, error in graphed[label] if error), None))
            rows.append(row)
    bar.close()
    return rows


def gemm_table(rows: list[dict]) -> str:
    """The GEMM rows as markdown, with the CUDA-graph columns where they were timed."""
    graphs = any("sparse_graph_us" in r for r in rows)
    lines = ["| out × in | M | backend (ran) | dense µs | sparse µs | speedup | byte ceiling |"
             + (" dense µs graph | sparse µs graph | graph speedup |" if graphs else ""),
             "|---|---:|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if graphs else "")]
    for r in rows:
        line = (f"| {r['out']} × {r['in']} | {r['m']} | {r['backend']} ({r['ran']}) | {r['dense_us']} | {r['sparse_us']} | "
                f"{r['speedup']:.2f} | {r['ceiling']:.2f} |")
        if graphs:
            line += (f" {r.get('dense_graph_us') or 'n/a'} | {r.get('sparse_graph_us') or 'n/a'} | "
                     f"{_ratio(r.get('dense_graph_us'), r.get('sparse_graph_us'))} |")
        lines.append(line)
    errors = sorted({f"{r['backend']}: {r['graph_error']}" for r in rows if r.get("graph_error")})
    if errors:
        lines.append("\nCUDA graph not captured: " + "; ".join(errors))
    return "\n".join(lines)


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value and base else "n/a"


def decode_table(rows: list[dict]) -> str:
    """The decode rows as markdown (with the CUDA-graph columns where they were timed), then, where a
    ``FREE`` row was timed, the ceiling it sets per batch."""
    graphs = any("graph_tok_s" in r for r in rows)
    lines = ["| model | batch | prefill ms | decode tok/s | vs dense |" + (" graph tok/s | vs dense |" if graphs else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if graphs else "")]
    dense = {r["batch"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        base = dense.get(r["batch"], {})
        line = (f"| {r['model']} | {r['batch']} | {r['prefill_ms']} | {r['decode_tok_s']} | "
                f"{_ratio(r['decode_tok_s'], base.get('decode_tok_s'))} |")
        if graphs:
            line += f" {r.get('graph_tok_s') or 'n/a'} | {_ratio(r.get('graph_tok_s'), base.get('graph_tok_s'))} |"
        lines.append(line)
    for key, what in (("decode_tok_s", ""), ("graph_tok_s", ", CUDA graphs")):
        ceilings = [f"batch {r['batch']}: {_ratio(r.get(key), dense[r['batch']].get(key))}x" for r in rows
                    if r["model"] == FREE and r["batch"] in dense and r.get(key)]
        if ceilings:
            lines.append(f"\nceiling with the 2:4 linears taking no time{what} ({'; '.join(ceilings)} dense): what "
                         f"remains is the embedding, attention, norms, LM head, sampling and the framework")
    errors = sorted({f"{r['model']}: {r['graph_error']}" for r in rows if r.get("graph_error")})
    if errors:
        lines.append("\nCUDA graph not captured: " + "; ".join(errors))
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
