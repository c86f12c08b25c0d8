"""Layer-by-layer calibration streaming, independent of the pruning method.

Capture: every decoder layer's ``forward`` is swapped for a pass-through recorder and the model
runs once per batch, so only the embeddings compute. That records each layer's own positional
and keyword inputs (masks, ``position_embeddings``, ``cache_position``...), which differ per layer
in families such as Gemma 2/3 (sliding vs. global attention), without knowing any signature.

Then, for each layer: move it to the device; pass 1 collects input statistics with forward hooks
on its linears (one accumulator per distinct input tensor, so q/k/v and gate/up share); the caller's
``process`` rewrites the weights; pass 2 runs the pruned layer, measures each linear's relative
reconstruction error ‖(W₀−Ŵ)X‖/‖W₀X‖ on the inputs it sees (first ``error_tokens`` tokens), and its
outputs feed the next layer.
"""
from __future__ import annotations

import math
import os
import tempfile
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
from . import distributed
from .adapter import ModelAdapter, Prunable
from .device import resolve_device, to_device
from .stats import InputStats


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


def _stats_hooks(linears: dict[str, Prunable], stats: dict[str, InputStats], needs: frozenset[str],
                 share: bool, seen: dict, hessian_dtype: torch.dtype) -> list:
    """Forward hooks that fold each distinct input tensor into one accumulator.

    ``seen`` maps (data_ptr, shape, stride) → (tensor, stats) for the current batch; holding the
    tensor keeps its memory from being reused, so equal keys really mean the same input.
    """

    def hook(name: str, prunable: Prunable):
        def fn(module: nn.Module, args: tuple, output) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            if name not in stats:
                if share and key in seen:
                    stats[name] = seen[key][1]
                    return
                stats[name] = InputStats(prunable.in_features, needs, device=x.device, hessian_dtype=hessian_dtype)
            elif share and key in seen:
                return
            stats[name].update(x)
            seen[key] = (x, stats[name])

        return fn

    return [p.module.register_forward_hook(hook(n, p)) for n, p in linears.items()]


def _error_hooks(linears: dict[str, Prunable], originals: dict[str, torch.Tensor], sums: dict[str, list[float]]) -> list:
    """Forward hooks accumulating ‖(W₀−Ŵ)x‖² and ‖W₀x + b‖² per linear."""

    def hook(name: str, delta: torch.Tensor):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            diff = F.linear(args[0], delta).float()
            sums[name][0] += float(diff.pow(2).sum())
            sums[name][1] += float((output.float() + diff).pow(2).sum())

        return fn

    handles = []
    for name, prunable in linears.items():
        delta = originals[name] - prunable.weight
        handles.append(prunable.module.register_forward_hook(hook(name, delta)))
    return handles


def _run_layer(layer: nn.Module, states: torch.Tensor, inputs: LayerInputs, device: torch.device) -> torch.Tensor:
    out = layer(states.to(device), *to_device(inputs.args, device), **to_device(inputs.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layerwise(adapter: ModelAdapter, tokens: torch.Tensor, process: Process, *, needs: frozenset[str] = frozenset(),
              device: str | torch.device = "auto", batch_size: int = 8, measure_error: bool = True,
              share_stats: bool = True, hessian_dtype: torch.dtype = torch.float32, error_tokens: int = 8192,
              progress: bool = True, desc: str = "pruning", source: LayerSource | None = None,
              on_done: Callable[[int], None] | None = None,
              offload_activations: str | os.PathLike | None = None, rewrites: bool = True) -> list[LayerReport]:
    """Stream ``tokens`` through the decoder one layer at a time, calling ``process`` on each.

    ``process(index, linears, stats)`` may rewrite the linears' weights and returns optional
    per-linear info for the report. Outputs of the processed layer feed the next one.
    ``share_stats=False`` gives every linear its own accumulator (for measuring what sharing saves).
    The reconstruction error is measured on the first batches covering ``error_tokens`` tokens: an
    extra GEMM per linear, so measuring it on every batch would add about a third to the run.
    With a ``source``, each layer's weights are loaded before it runs and released after ``on_done``
    (the writer) has seen the processed layer, so memory holds one layer at a time.
    ``offload_activations``: a folder for the hidden states between layers (see ``Activations``).

    Under ``torch.distributed`` (see ``distributed``), ``tokens`` is this rank's share: the statistics
    are summed over the ranks before ``process``, which runs on rank 0 only; when it ``rewrites`` the
    weights, rank 0's are broadcast before every rank runs its share through the layer.
    """
    device = resolve_device(device)
    activations, layer_inputs = capture(adapter, tokens, batch_size, Activations(offload_activations))
    try:
        return _layer_loop(adapter, activations, layer_inputs, process, needs, device, measure_error, share_stats,
                           hessian_dtype, error_tokens, progress and distributed.is_leader(), desc, source, on_done,
                           rewrites)
    finally:
        activations.close()


def _layer_loop(adapter: ModelAdapter, activations: Activations, layer_inputs: list[list[LayerInputs]],
                process: Process, needs: frozenset[str], device: torch.device, measure_error: bool,
                share_stats: bool, hessian_dtype: torch.dtype, error_tokens: int, progress: bool, desc: str,
                source: LayerSource | None, on_done: Callable[[int], None] | None, rewrites: bool) -> list[LayerReport]:
    hidden = activations.batches
    offload = device.type != "cpu"
    reports: list[LayerReport] = []
    bar = tqdm(total=len(adapter), desc=desc, unit="layer", disable=not progress)
    for index, layer in enumerate(adapter.layers):
        started = time.perf_counter()
        if source is not None:
            source.load_layer(index)
        layer.to(device)
        linears = adapter.linears(index)
        stats: dict[str, InputStats] = {}
        if needs:
            seen: dict = {}
            handles = _stats_hooks(linears, stats, needs, share_stats, seen, hessian_dtype)
            try:
                for states, inputs in zip(hidden, layer_inputs[index]):
                    seen.clear()
                    _run_layer(layer, states, inputs, device)
            finally:
                seen.clear()
                for h in handles:
                    h.remove()
        if distributed.active():
            for shared in {id(st): st for st in stats.values()}.values():
                shared.combine(distributed.sum_)
        phases = {"stats": time.perf_counter() - started}
        originals = {n: p.weight.clone() for n, p in linears.items()} if measure_error else {}
        info = (process(index, linears, stats) or {}) if distributed.is_leader() else {}
        if rewrites and distributed.active():
            for linear in linears.values():
                distributed.broadcast_(linear.module.weight.data)
        stats.clear()
        phases["process"] = time.perf_counter() - started - phases["stats"]
        sums = {name: [0.0, 0.0] for name in linears}
        handles = _error_hooks(linears, originals, sums) if measure_error else []
        measured = 0
        try:
            for b, (states, inputs) in enumerate(zip(hidden, layer_inputs[index])):
                if handles and measured >= error_tokens:
                    for h in handles:
                        h.remove()
                    handles = []
                measured += states.shape[0] * states.shape[1]
                out = _run_layer(layer, states, inputs, device)
                _check_finite(out, f"leaving decoder layer {index} ({adapter.layers_name}.{index})")
                activations.replace(b, out.to("cpu") if offload else out)
        finally:
            for h in handles:
                h.remove()
        if offload:
            layer.to("cpu")
        del originals
        if measure_error and distributed.active():
            totals = distributed.sum_(torch.tensor([sums[name] for name in linears], dtype=torch.float64))
            sums = dict(zip(linears, totals.tolist()))
        seconds = time.perf_counter() - started
        phases["outputs"] = seconds - phases["stats"] - phases["process"]
        linear_reports = [
            LinearReport(
                name=name,
                shape=(p.out_features, p.in_features),
                sparsity=float((p.weight == 0).float().mean()),
                zeros=int((p.weight == 0).sum()),
                rel_error=(sums[name][0] / sums[name][1]) ** 0.5 if measure_error and sums[name][1] > 0 else None,
                info=info.get(name, {}),
            )
            for name, p in linears.items()
        ]
        if on_done is not None:
            on_done(index)
        if source is not None:
            source.release_layer(index)
        reports.append(LayerReport(index, seconds, linear_reports, phases))
        bar.set_postfix(layer_s=f"{reports[-1].seconds:.1f}")
        bar.update()
    bar.close()
    return reports
