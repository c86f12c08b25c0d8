"""Layer-by-layer calibration streaming, independent of the pruning method.

Capture: every decoder layer's ``forward`` is swapped for a pass-through recorder and the model
runs once per batch, so only the embeddings compute. That records each layer's own positional
and keyword inputs (masks, ``position_embeddings``, ``cache_position``...), which differ per layer
in families such as Gemma 2/3 (sliding vs. global attention), without knowing any signature.

Then, for each layer, in one of two orders (``passes``):

* ``passes=1`` (sequential, the default): every GEMM of the layer runs once. Each batch's forward
  runs in a thread of its own, the threads taking turns in batch order (so results are reproducible
  and the cores are not oversubscribed). A forward pre-hook on each linear folds the linear's input
  into its statistics and parks the thread there until the linear is pruned; once every batch is
  parked at the same linear, ``process`` prunes it (and the linears that read the same input, which
  the first layer reveals: q/k/v, gate/up) and the threads go on. So each group's statistics come
  from inputs that the groups before it already produce pruned ("true sequential"), and the same pass
  yields the layer's output. It holds every batch's state at the point where it is parked.
* ``passes=2`` (the papers' order): a statistics pass with the dense weights, ``process`` on all
  linears, then an output pass with the pruned ones. The statistics pass stops at the last linear
  (its output is never used).

Statistics are one accumulator per distinct input tensor (q/k/v and gate/up share). Each linear's
relative reconstruction error ‖(W₀−Ŵ)X‖/‖W₀X + b‖ is measured on the inputs it sees in the pruned
forward: with an extra GEMM on the first ``error_tokens`` tokens, or, in the one-pass order for a
bias-free linear, from the Gram matrix of those very inputs: the Hessian where it was collected
(SparseGPT, GPTQ; exact over all tokens), or one accumulated on the same first tokens where that is
cheaper than the GEMMs it replaces (``gram_pays``: Wanda's q/k/v and gate/up on SmolLM2). The
layer's outputs feed the next layer.
"""
from __future__ import annotations

import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import LLMPruneError
from .resources import share_one_heap, return_freed_memory
from . import distributed
from .adapter import ModelAdapter, Prunable
from .device import resolve_device, to_device
from .stats import HESSIAN, InputStats, hessian_blocks


@dataclass
class LayerInputs:
    """What one decoder layer is called with, for one batch, besides the hidden states."""

    args: tuple
    kwargs: dict


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    zeros: int
    rel_error: float | None
    info: dict = field(default_factory=dict)


@dataclass
class LayerReport:
    index: int
    seconds: float
    linears: list[LinearReport]
    phases: dict[str, float] = field(default_factory=dict)  # seconds: stats pass, process, output pass


Process = Callable[[int, dict[str, Prunable], dict[str, InputStats]], dict[str, dict] | None]


class _StopForward(Exception):
    """Raised by the last recorder: everything needed has been captured."""


class LayerSource(Protocol):
    """Where a decoder layer's weights come from when they are not all in memory (``loading.CheckpointSource``)."""

    def load_layer(self, index: int) -> None: ...

    def release_layer(self, index: int) -> None: ...


class Activations:
    """The hidden states between decoder layers, one tensor per batch, in the model dtype: in memory, or in
    a memory-mapped file under ``offload`` (the calibration set of a large model need not fit in RAM;
    the page cache keeps what it can)."""

    def __init__(self, offload: str | os.PathLike | None = None) -> None:
        self.offload = None if offload is None else Path(offload)
        self.batches: list[torch.Tensor] = []
        self._file: Path | None = None
        self._storage: torch.Tensor | None = None

    def allocate(self, nsamples: int, first: torch.Tensor) -> None:
        """Room for ``nsamples`` sequences shaped like the rows of ``first`` (called before the first ``append``)."""
        if self.offload is None:
            return
        self.offload.mkdir(parents=True, exist_ok=True)
        shape = (nsamples, *first.shape[1:])
        numel = math.prod(shape)
        handle = tempfile.NamedTemporaryFile(prefix="llmprune-activations-", suffix=".bin", dir=self.offload, delete=False)
        with handle:
            handle.truncate(numel * first.element_size())
        self._file = Path(handle.name)
        self._storage = torch.from_file(str(self._file), shared=True, size=numel, dtype=first.dtype).view(shape)

    def append(self, states: torch.Tensor) -> None:
        if self._storage is None:
            self.batches.append(states)
            return
        start = sum(batch.shape[0] for batch in self.batches)
        view = self._storage[start:start + states.shape[0]]
        view.copy_(states)
        self.batches.append(view)

    def replace(self, index: int, states: torch.Tensor) -> None:
        """The layer's outputs for batch ``index`` become the next layer's inputs."""
        if self._storage is None:
            self.batches[index] = states
        else:
            self.batches[index].copy_(states)

    def close(self) -> None:
        self.batches.clear()
        self._storage = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)


def _check_finite(hidden: torch.Tensor, where: str) -> None:
    if not torch.isfinite(hidden).all():
        raise LLMPruneError(
            f"NaN or Inf in the activations {where}; the model overflows in this dtype "
            f"(try --dtype float32) or its weights are corrupt"
        )


@torch.no_grad()
def capture(adapter: ModelAdapter, tokens: torch.Tensor, batch_size: int,
            hidden: Activations | None = None) -> tuple[Activations, list[list[LayerInputs]]]:
    """Run the model's embeddings on ``tokens`` and record every layer's inputs.

    Returns the first layer's hidden states per batch (on CPU, in ``hidden``) and, per layer, per
    batch, the remaining positional and keyword arguments it was called with. The decoder layers never
    compute here, so their weights need not be loaded.
    """
    layers = adapter.layers
    hidden = Activations() if hidden is None else hidden
    inputs: list[list[LayerInputs]] = [[] for _ in layers]

    def recorder(index: int):
        def forward(*args, **kwargs):
            if args:
                states, rest = args[0], args[1:]
            else:
                states, rest = kwargs.pop("hidden_states"), ()
            inputs[index].append(LayerInputs(rest, kwargs))
            if index == 0:
                if not hidden.batches:
                    hidden.allocate(tokens.shape[0], states)
                hidden.append(states.detach().to("cpu"))
            if index == len(layers) - 1:
                raise _StopForward
            return states

        return forward

    # Another library (accelerate) may have set an instance-level forward: restore it afterwards.
    previous = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            try:
                adapter.model(input_ids=tokens[start : start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer, forward in zip(layers, previous):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if len(inputs[-1]) != len(hidden.batches):
        raise LLMPruneError(f"{type(adapter.model).__name__} did not call every decoder layer once per forward")
    for batch in hidden.batches:
        _check_finite(batch, "entering the first decoder layer")
    return hidden, inputs


@dataclass(frozen=True)
class Settings:
    """How the engine runs a layer (the same for every layer of one pass over the model)."""

    device: torch.device
    needs: frozenset[str] = frozenset()
    passes: int = 1
    share_stats: bool = True
    hessian_dtype: torch.dtype = torch.float32
    measure_error: bool = True
    error_tokens: int = 8192
    rewrites: bool = True


@dataclass
class _Structure:
    """What the first layer reveals and the others (blocks of one class) repeat: the linears in the order
    they run, grouped by the input they share, as names relative to the layer."""

    groups: list[list[str]] = field(default_factory=list)

    @property
    def last(self) -> str | None:
        return self.groups[-1][-1] if self.groups else None

    def group_of(self, name: str) -> list[str]:
        return next((group for group in self.groups if name in group), [name])


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix):]


def gram_pays(in_features: int, outs: list[int], tokens: int) -> bool:
    """Whether the errors of linears reading one input (``outs``: their output features) cost less from that
    input's Gram matrix on ``tokens`` tokens (its accumulation, as ``InputStats`` does it, plus two
    [out, in]·[in, in] products per linear) than from the error hooks' [tokens, in]·[in, out] GEMMs."""
    gram = sum((end - start) * (in_features - start) for start, end in hessian_blocks(in_features))
    return tokens * gram + 2 * in_features * in_features * sum(outs) < tokens * in_features * sum(outs)


def _run_layer(layer: nn.Module, states: torch.Tensor, inputs: LayerInputs, device: torch.device) -> torch.Tensor:
    out = layer(states.to(device), *to_device(inputs.args, device), **to_device(inputs.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


class _Workers:
    """The one-pass order's batch threads, kept from layer to layer: a fresh thread's GEMMs run ~10% slower
    than a warm one's (its OpenMP team and BLAS buffers are new), and each layer would start one per batch."""

    def __init__(self) -> None:
        self.jobs: list[queue.SimpleQueue] = []
        self.finished: queue.SimpleQueue = queue.SimpleQueue()

    def run(self, count: int, job: Callable[[int], None]) -> None:
        """Start ``job(b)`` in thread ``b`` for each of ``count`` batches (``job`` must not raise)."""
        while len(self.jobs) < count:
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(len(self.jobs), jobs), daemon=True,
                             name=f"llmprune-batch-{len(self.jobs)}").start()
            self.jobs.append(jobs)
        for b in range(count):
            self.jobs[b].put(job)

    def wait(self, count: int) -> None:
        """Until ``count`` jobs have returned."""
        for _ in range(count):
            self.finished.get()

    def _serve(self, b: int, jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            job(b)
            self.finished.put(b)

    def close(self) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        self.jobs.clear()


class _LayerRun:
    """One decoder layer: statistics, pruning (through ``process``), outputs and reconstruction errors."""

    def __init__(self, settings: Settings, index: int, prefix: str, layer: nn.Module, linears: dict[str, Prunable],
                 process: Process, structure: _Structure, workers: _Workers) -> None:
        self.settings, self.index, self.prefix, self.layer = settings, index, prefix, layer
        self.workers = workers
        self.linears, self.process, self.structure = linears, process, structure
        self.learning = not structure.groups  # the first layer: groups are found as the inputs arrive
        self.modules = {id(p.module): name for name, p in linears.items()}
        self.stats: dict[str, InputStats] = {}
        self.owner: dict[str, str] = {}  # name → the linear whose input created its accumulator (an id() could be
        # reused once the accumulator is freed)
        self.order: list[str] = []  # names in the order their inputs first arrived
        self.info: dict[str, dict] = {}
        self.originals = ({n: p.weight.clone() for n, p in linears.items()} if settings.measure_error else {})
        self.sums = {name: [0.0, 0.0] for name in linears}
        self.from_hessian: set[str] = set()  # linears whose sums came from a Gram matrix, not from hooks
        self.grams: dict[str, InputStats] = {}  # name → the Gram of its input on the measured batches (one pass)
        self.phases = {"stats": 0.0, "process": 0.0, "outputs": 0.0}
        self.local = threading.local()  # the batch the running thread computes

    # -- statistics --------------------------------------------------------------------------------

    def collect(self, name: str, x: torch.Tensor, seen: dict) -> None:
        """Fold ``x`` into ``name``'s statistics unless this batch already folded the same tensor for a
        linear that shares them; ``seen`` maps (data_ptr, shape, stride) → (tensor, stats, owner) for the batch,
        holding the tensor so its memory cannot be reused while the key is alive. It holds the latest input
        only: linears that share one run back to back (q/k/v, gate/up), and a batch parked at its down_proj
        must not keep the inputs of every linear before it alive (8 batches × 4 inputs at 64 × 512)."""
        settings = self.settings
        if name not in self.order:
            self.order.append(name)
        if not settings.needs:
            return
        key = (x.data_ptr(), tuple(x.shape), x.stride())
        if name not in self.stats:
            if settings.share_stats and key in seen:
                _, self.stats[name], self.owner[name] = seen[key]
                return
            stats = InputStats(self.linears[name].in_features, settings.needs, device=x.device,
                               hessian_dtype=settings.hessian_dtype)
            group = [name] if self.learning or not settings.share_stats else \
                [self.prefix + n for n in self.structure.group_of(_relative(name, self.prefix))]
            for member in group:
                self.stats[member] = stats
                self.owner[member] = name
            self._plan_gram(group, x.device)
        elif settings.share_stats and key in seen and seen[key][1] is self.stats[name]:
            return
        self.stats[name].update(x)
        if name in self.grams and self.batch_starts[self.local.batch] < settings.error_tokens:
            self.grams[name].update(x)
        seen.clear()
        seen[key] = (x, self.stats[name], self.owner[name])

    def _plan_gram(self, group: list[str], device: torch.device) -> None:
        """In the one-pass order, give the bias-free linears of ``group`` (which read one input) a Gram
        matrix of that input on the batches the error hooks would measure, where ``gram_pays``; the first
        layer, whose groups are still being learned, keeps the hooks."""
        settings = self.settings
        if (not (settings.measure_error and settings.passes == 1 and settings.rewrites) or self.learning
                or HESSIAN in settings.needs):
            return
        members = [m for m in group if getattr(self.linears[m].module, "bias", None) is None]
        tokens = min((s for s in self.batch_starts if s >= settings.error_tokens), default=self.batch_starts[-1])
        if members and gram_pays(self.linears[members[0]].in_features, [self.linears[m].out_features for m in members],
                                 tokens):
            gram = InputStats(self.linears[members[0]].in_features, frozenset({HESSIAN}), device=device)
            self.grams.update(dict.fromkeys(members, gram))

    def learn(self) -> None:
        """After the first layer: its linears in running order, grouped by shared statistics."""
        if not self.learning:
            return
        groups: dict[object, list[str]] = {}
        for name in self.order:
            groups.setdefault(self.owner.get(name, name), []).append(_relative(name, self.prefix))
        self.structure.groups = list(groups.values())

    # -- pruning -----------------------------------------------------------------------------------

    def prune(self, names: list[str]) -> None:
        """``process`` the linears ``names`` (statistics merged across ranks, rank 0 decides, weights
        broadcast), then start measuring their errors."""
        started = time.perf_counter()
        linears = {name: self.linears[name] for name in names}
        stats = {name: self.stats[name] for name in names if name in self.stats}
        if distributed.active():
            for shared in {id(st): st for st in stats.values()}.values():
                shared.combine(distributed.sum_)
        if distributed.is_leader():
            self.info.update(self.process(self.index, linears, stats) or {})
        if self.settings.rewrites and distributed.active():
            for linear in linears.values():
                distributed.broadcast_(linear.module.weight.data)
        if self.settings.measure_error and self.settings.passes == 1 and self.settings.rewrites:
            self._errors_from_hessian(names, stats)
        for name in names:
            self.stats.pop(name, None)
        self.phases["process"] += time.perf_counter() - started

    def _errors_from_hessian(self, names: list[str], stats: dict[str, InputStats]) -> None:
        """Each bias-free linear's error sums from a Gram matrix of its inputs: Σ‖Δx‖² over the tokens is
        tr(Δ·ΣxxᵀΔᵀ) = count·tr(ΔHΔᵀ)/2 (H = 2·E[xxᵀ]), and ‖W₀x‖² likewise. In the one-pass order H comes
        from exactly the inputs the pruned linear then reads.
        - The statistics' Hessian (SparseGPT, GPTQ) covers every calibration token, so the error is measured
          over all of them. It costs two [out, in]·[in, in] products against the hook's [tokens, in]·[in, out]
          on about ``error_tokens`` tokens (all of them in a shorter calibration set), so it is used where
          in ≤ min(error_tokens, tokens) / 2 (at the default 8,192: every linear of SmolLM2, all but down_proj
          of Llama-2-7B). The token count is the merged Hessian's, so every rank makes the same choice; the
          sums are the whole run's on every rank (H is merged before ``process``), so each rank adds its
          share of them to the final all-reduce.
        - Otherwise a Gram planned by ``_plan_gram`` covers this rank's measured batches, the hooks' tokens."""
        for name in names:
            linear, st = self.linears[name], stats.get(name)
            if getattr(linear.module, "bias", None) is not None:
                continue
            if (st is not None and st.hessian is not None
                    and 2 * linear.in_features <= min(self.settings.error_tokens, st.count)):
                hessian, scale = st.hessian, st.count / 2 / distributed.world()
            elif name in self.grams:
                gram = self.grams.pop(name)
                hessian, scale = gram.hessian, gram.count / 2
            else:
                continue
            original = self.originals[name].to(hessian)
            delta = original - linear.weight.to(hessian)
            self.sums[name] = [float(((delta @ hessian) * delta).sum()) * scale,
                               float(((original @ hessian) * original).sum()) * scale]
            self.from_hessian.add(name)

    def error_hook(self, name: str) -> Callable:
        """A forward hook adding ‖(W₀−Ŵ)x‖² and ‖W₀x + b‖² to ``name``'s sums while ``measuring()``."""
        delta = self.originals[name] - self.linears[name].weight

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.batch_starts[self.local.batch] < self.settings.error_tokens:
                diff = F.linear(args[0], delta).float()
                self.sums[name][0] += float(diff.pow(2).sum())
                self.sums[name][1] += float((output.float() + diff).pow(2).sum())

        return hook

    # -- the two orders ----------------------------------------------------------------------------

    def run(self, batches: list[torch.Tensor], inputs: list[LayerInputs], replace: Callable[[int, torch.Tensor], None]) -> None:
        starts = [0]
        for states in batches:
            starts.append(starts[-1] + states.shape[0] * states.shape[1])
        self.batch_starts = starts
        if not self.settings.rewrites:
            self._observe(batches, inputs, replace)
        elif self.settings.passes == 1:
            self._one_pass(batches, inputs, replace)
        else:
            self._two_passes(batches, inputs, replace)
        self.learn()
        if self.settings.measure_error and distributed.active():
            totals = distributed.sum_(torch.tensor([self.sums[name] for name in self.linears], dtype=torch.float64))
            self.sums = dict(zip(self.linears, totals.tolist()))

    def _forward(self, b: int, states: torch.Tensor, inputs: LayerInputs, replace: Callable[[int, torch.Tensor], None]
                 ) -> None:
        self.local.batch = b
        out = _run_layer(self.layer, states, inputs, self.settings.device)
        _check_finite(out, f"leaving decoder layer {self.index} ({self.prefix.rstrip('.')})")
        replace(b, out.to("cpu") if self.settings.device.type != "cpu" else out)

    def _with_statistics(self, batches, inputs, forward: Callable[[int, torch.Tensor, LayerInputs], object],
                         stop_at: str | None = None) -> None:
        """``forward`` every batch with pre-hooks folding each linear's input into its statistics; the
        forward stops at ``stop_at`` (a linear whose output nothing here needs)."""
        seen: dict = {}

        def pre_hook(module: nn.Module, args: tuple) -> None:
            name = self.modules[id(module)]
            self.collect(name, args[0], seen)
            if name == stop_at:
                raise _StopForward

        handles = [p.module.register_forward_pre_hook(pre_hook) for p in self.linears.values()]
        try:
            for b, (states, layer_inputs) in enumerate(zip(batches, inputs)):
                seen.clear()
                try:
                    forward(b, states, layer_inputs)
                except _StopForward:
                    pass
        finally:
            seen.clear()
            for h in handles:
                h.remove()

    def _observe(self, batches, inputs, replace) -> None:
        """A pre-pass (``process`` reads, never rewrites): one forward gives the statistics and the outputs."""
        started = time.perf_counter()
        self._with_statistics(batches, inputs, lambda b, states, layer_inputs: self._forward(b, states, layer_inputs,
                                                                                                replace))
        self.phases["stats"] = time.perf_counter() - started
        self.prune(list(self.linears))

    def _two_passes(self, batches, inputs, replace) -> None:
        started = time.perf_counter()
        if self.settings.needs:  # the statistics pass needs nothing the last linear computes
            last = None if self.learning else self.prefix + self.structure.last
            self._with_statistics(batches, inputs, lambda b, states, layer_inputs: _run_layer(
                self.layer, states, layer_inputs, self.settings.device), stop_at=last)
        self.phases["stats"] = time.perf_counter() - started
        self.prune(list(self.linears))
        started = time.perf_counter()
        handles = [p.module.register_forward_hook(self.error_hook(n)) for n, p in self.linears.items()] \
            if self.settings.measure_error else []
        try:
            for b, (states, layer_inputs) in enumerate(zip(batches, inputs)):
                self._forward(b, states, layer_inputs, replace)
        finally:
            for h in handles:
                h.remove()
        self.phases["outputs"] = time.perf_counter() - started

    def _one_pass(self, batches, inputs, replace) -> None:
        """Each batch's forward in its own thread; the threads run one at a time, in batch order, each until
        it parks at a linear not yet pruned or finishes; when all are parked at the same linear, its group
        is pruned and they go on."""
        started = time.perf_counter()
        count = len(batches)
        go = [threading.Event() for _ in range(count)]
        parked = [threading.Event() for _ in range(count)]
        at: list[str | None] = [None] * count
        done = [False] * count
        errors: list[BaseException | None] = [None] * count
        seen: list[dict] = [{} for _ in range(count)]
        released: set[str] = set()
        handles: list = []

        def pre_hook(module: nn.Module, args: tuple) -> None:
            name = self.modules[id(module)]
            if name in released:
                return
            b = self.local.batch
            self.collect(name, args[0], seen[b])
            at[b] = name
            parked[b].set()
            go[b].wait()
            go[b].clear()

        def worker(b: int) -> None:
            self.local.batch = b
            go[b].wait()
            go[b].clear()
            try:
                with torch.no_grad():
                    self._forward(b, batches[b], inputs[b], replace)
            except BaseException as exc:  # handed to the controller, which raises it
                errors[b] = exc
            finally:
                seen[b].clear()
                done[b] = True
                parked[b].set()

        handles = [p.module.register_forward_pre_hook(pre_hook) for p in self.linears.values()]
        self.workers.run(count, worker)
        try:
            while True:
                for b in range(count):  # each batch in turn, until it parks or finishes
                    if not done[b]:
                        go[b].set()
                        parked[b].wait()
                        parked[b].clear()
                failed = next((exc for exc in errors if exc is not None), None)
                if failed is not None:
                    raise failed
                if all(done):
                    break
                waiting = {at[b] for b in range(count) if not done[b]}
                if len(waiting) != 1 or any(done):
                    raise LLMPruneError(
                        f"decoder layer {self.index} runs its linears in a different order for different batches "
                        f"({sorted(filter(None, waiting))}); prune it with --passes 2")
                name = waiting.pop()
                group = [name] if self.learning else \
                    [self.prefix + n for n in self.structure.group_of(_relative(name, self.prefix))]
                self.prune(group)
                for member in group:
                    module = self.linears[member].module
                    if self.settings.measure_error and member not in self.from_hessian:
                        handles.append(module.register_forward_hook(self.error_hook(member)))
                released.update(group)
        finally:
            for b in range(count):  # let every thread run out (after an error each fails at its next step)
                if not done[b]:
                    released.update(self.linears)
                    go[b].set()
            self.workers.wait(count)
            for h in handles:
                h.remove()
        self.phases["outputs"] = time.perf_counter() - started - self.phases["process"]

    def report(self, seconds: float) -> LayerReport:
        sums, measure = self.sums, self.settings.measure_error
        return LayerReport(self.index, seconds, [
            LinearReport(
                name=name,
                shape=(p.out_features, p.in_features),
                sparsity=float((p.weight == 0).float().mean()),
                zeros=int((p.weight == 0).sum()),
                rel_error=(sums[name][0] / sums[name][1]) ** 0.5 if measure and sums[name][1] > 0 else None,
                info=self.info.get(name, {}),
            )
            for name, p in self.linears.items()
        ], self.phases)


@torch.no_grad()
def layerwise(adapter: ModelAdapter, tokens: torch.Tensor, process: Process, *, needs: frozenset[str] = frozenset(),
              device: str | torch.device = "auto", batch_size: int = 8, measure_error: bool = True,
              share_stats: bool = True, hessian_dtype: torch.dtype = torch.float32, error_tokens: int = 8192,
              progress: bool = True, desc: str = "pruning", source: LayerSource | None = None,
              on_done: Callable[[int], None] | None = None, offload_activations: str | os.PathLike | None = None,
              rewrites: bool = True, passes: int = 1) -> list[LayerReport]:
    """Stream ``tokens`` through the decoder one layer at a time, calling ``process`` on its linears.

    ``process(index, linears, stats)`` may rewrite the linears' weights (``rewrites``) and returns
    optional per-linear info for the report; it is called once per layer with ``passes=2``, once per
    group of linears sharing an input with ``passes=1`` (module docstring). Outputs of the processed
    layer feed the next one. ``share_stats=False`` gives every linear its own accumulator (for
    measuring what sharing saves). The reconstruction error is measured on the first batches covering
    ``error_tokens`` tokens: an extra GEMM per linear, so measuring it on every batch would add about
    a third to the run. With a ``source``, each layer's weights are loaded before it runs and released
    after ``on_done`` (the writer) has seen the processed layer, so memory holds one layer at a time.
    ``offload_activations``: a folder for the hidden states between layers (see ``Activations``).

    Under ``torch.distributed`` (see ``distributed``), ``tokens`` is this rank's share: the statistics
    are summed over the ranks before ``process``, which runs on rank 0 only; when it ``rewrites`` the
    weights, rank 0's are broadcast before every rank runs its share through the layer.
    """
    if passes not in (1, 2):
        raise LLMPruneError(f"passes must be 1 (each GEMM once, sequential) or 2 (statistics, then outputs); got {passes}")
    settings = Settings(resolve_device(device), frozenset(needs), passes, share_stats, hessian_dtype, measure_error,
                        error_tokens, rewrites)
    share_one_heap()
    activations, layer_inputs = capture(adapter, tokens, batch_size, Activations(offload_activations))
    structure = _Structure()
    workers = _Workers()
    reports: list[LayerReport] = []
    bar = tqdm(total=len(adapter), desc=desc, unit="layer", disable=not (progress and distributed.is_leader()))
    try:
        for index, layer in enumerate(adapter.layers):
            started = time.perf_counter()
            if source is not None:
                source.load_layer(index)
            layer.to(settings.device)
            run = _LayerRun(settings, index, f"{adapter.layers_name}.{index}.", layer, adapter.linears(index), process,
                            structure, workers)
            run.run(activations.batches, layer_inputs[index], activations.replace)
            if settings.device.type != "cpu":
                layer.to("cpu")
            reports.append(run.report(time.perf_counter() - started))
            del run
            if on_done is not None:
                on_done(index)
            if source is not None:
                source.release_layer(index)
            return_freed_memory()
            bar.set_postfix(layer_s=f"{reports[-1].seconds:.1f}")
            bar.update()
    finally:
        workers.close()
        bar.close()
        activations.close()
    return reports
