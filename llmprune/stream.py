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

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import LLMPruneError
from .models import ModelAdapter, Prunable
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


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LLMPruneError("--device cuda was given but CUDA is not available; use --device cpu or auto")
    return device


def _to(obj, device: torch.device):
    """Move tensors nested in tuples, lists and dicts; leave everything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _check_finite(hidden: torch.Tensor, where: str) -> None:
    if not torch.isfinite(hidden).all():
        raise LLMPruneError(
            f"NaN or Inf in the activations {where}; the model overflows in this dtype "
            f"(try --dtype float32) or its weights are corrupt"
        )


@torch.no_grad()
def capture(adapter: ModelAdapter, tokens: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[list[LayerInputs]]]:
    """Run the model's embeddings on ``tokens`` and record every layer's inputs.

    Returns the first layer's hidden states per batch (on CPU) and, per layer, per batch,
    the remaining positional and keyword arguments it was called with.
    """
    layers = adapter.layers
    hidden: list[torch.Tensor] = []
    inputs: list[list[LayerInputs]] = [[] for _ in layers]

    def recorder(index: int):
        def forward(*args, **kwargs):
            if args:
                states, rest = args[0], args[1:]
            else:
                states, rest = kwargs.pop("hidden_states"), ()
            inputs[index].append(LayerInputs(rest, kwargs))
            if index == 0:
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
    if len(inputs[-1]) != len(hidden):
        raise LLMPruneError(f"{type(adapter.model).__name__} did not call every decoder layer once per forward")
    for batch in hidden:
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
    out = layer(states.to(device), *_to(inputs.args, device), **_to(inputs.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layerwise(adapter: ModelAdapter, tokens: torch.Tensor, process: Process, *, needs: frozenset[str] = frozenset(),
              device: str | torch.device = "auto", batch_size: int = 8, measure_error: bool = True,
              share_stats: bool = True, hessian_dtype: torch.dtype = torch.float32, error_tokens: int = 8192,
              progress: bool = True, desc: str = "pruning") -> list[LayerReport]:
    """Stream ``tokens`` through the decoder one layer at a time, calling ``process`` on each.

    ``process(index, linears, stats)`` may rewrite the linears' weights and returns optional
    per-linear info for the report. Outputs of the processed layer feed the next one.
    ``share_stats=False`` gives every linear its own accumulator (for measuring what sharing saves).
    The reconstruction error is measured on the first batches covering ``error_tokens`` tokens: an
    extra GEMM per linear, so measuring it on every batch would add about a third to the run.
    """
    device = resolve_device(device)
    hidden, layer_inputs = capture(adapter, tokens, batch_size)
    offload = device.type != "cpu"
    reports: list[LayerReport] = []
    bar = tqdm(total=len(adapter), desc=desc, unit="layer", disable=not progress)
    for index, layer in enumerate(adapter.layers):
        started = time.perf_counter()
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
        phases = {"stats": time.perf_counter() - started}
        originals = {n: p.weight.clone() for n, p in linears.items()} if measure_error else {}
        info = process(index, linears, stats) or {}
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
                hidden[b] = out.to("cpu") if offload else out
        finally:
            for h in handles:
                h.remove()
        if offload:
            layer.to("cpu")
        del originals
        seconds = time.perf_counter() - started
        phases["outputs"] = seconds - phases["stats"] - phases["process"]
        reports.append(LayerReport(index, seconds, [
            LinearReport(
                name=name,
                shape=(p.out_features, p.in_features),
                sparsity=float((p.weight == 0).float().mean()),
                rel_error=(sums[name][0] / sums[name][1]) ** 0.5 if measure_error and sums[name][1] > 0 else None,
                info=info.get(name, {}),
            )
            for name, p in linears.items()
        ], phases))
        bar.set_postfix(layer_s=f"{reports[-1].seconds:.1f}")
        bar.update()
    bar.close()
    return reports
