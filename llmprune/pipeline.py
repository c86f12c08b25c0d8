"""Pruning a model: calibration tokens → the streaming engine → a pruner per linear → a ``PruneReport``.

Lifecycle of ``run``, in order:
  1. the allocation strategy's pre-pass, if it has one (OWL, the global hybrid budget);
  2. the main pass (``stream.layerwise``): for each decoder layer, the statistics the recipe needs,
     then ``prune_layer``: for each linear, the strategy's pattern, the pruner, the refiner, a check
     that the result fits the pattern, the weight written back;
  3. the report, from the per-layer records of the engine.
``prune`` is the public entry point: it builds the ``Recipe``, loads the model and draws the tokens.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import distributed, stream
from .adapter import ModelAdapter, Prunable, check_seqlen
from .device import available_memory, resolve_device
from .errors import LLMPruneError
from .checkpoint import check_output_dir, check_storage, storage_plan_for
from .checkpoint.directory import atomic_output_dir
from .checkpoint.writer import CheckpointWriter
from .loading import CheckpointSource, load_pretrained
from .packing import Int24, int24_from
from .patterns import Hybrid, is_24_pattern
from .pruners import Pruned
from .recipe import Recipe
from .report import LinearRecord, PruneReport, Summary
from .state import state
from .stats import InputStats


def prune_layer(recipe: Recipe, index: int, linears: dict[str, Prunable], stats: dict[str, InputStats],
                quantized: dict[str, Int24] | None = None) -> dict[str, dict]:
    """Prune (and quantize) the given linears of decoder layer ``index`` in place; per-linear facts for the report.

    Linears that read the same input and get the same pattern go to the pruner together when it can
    solve them as one problem (``prune_many``: SparseGPT's column loop over q/k/v stacked). With a
    quantizer, SparseGPT prunes and quantizes in its sweep; another pruner's result (refined, if asked)
    is quantized by GPTQ under its mask. The weight written back is the dequantized one; a 2:4 run's
    codes go into ``quantized`` (for the 2:4 + INT4 checkpoint)."""
    originals = {name: linear.weight.float().clone() for name, linear in linears.items()}
    patterns = {name: recipe.allocation.pattern_for(index, name, originals[name], stats.get(name)) for name in linears}
    groups: dict[tuple, list[str]] = {}
    for name in linears:
        together = hasattr(recipe.pruner, "prune_many") and not getattr(patterns[name], "dense", ())
        key = (id(stats.get(name)), patterns[name]) if together else (name,)
        groups.setdefault(key, []).append(name)
    joint = {"quantizer": recipe.quantizer} if recipe.quantizer is not None and recipe.gptq is None else {}
    info = {}
    for names in groups.values():
        clock = time.perf_counter()
        shared, pattern = stats.get(names[0]), patterns[names[0]]
        if len(names) > 1:
            results = recipe.pruner.prune_many([originals[n].clone() for n in names], shared, pattern, **joint)
        else:
            results = [recipe.pruner.prune(originals[names[0]].clone(), shared, pattern, **joint)]
        for name, result in zip(names, results):
            if recipe.refiner is not None and recipe.refiner.applies_to(name):
                refined = recipe.refiner.refine(originals[name], result.weight, stats[name], pattern)
                result = Pruned(refined.weight, {**result.info, **refined.info})
            if recipe.gptq is not None:
                rounded = recipe.gptq.quantize(result.weight, stats[name], recipe.quantizer, keep=result.weight != 0)
                gptq_facts = {"quant_" + key: value for key, value in rounded.info.items() if key != "obs_loss"}
                result = Pruned(rounded.weight, {**result.info, "quant_loss": rounded.info["obs_loss"], **gptq_facts},
                                rounded.quantized)
            bad = pattern.violations(result.weight)
            if bad:
                raise RuntimeError(f"{recipe.method} produced a weight for {name} that breaks {pattern} in {bad} rows/groups")
            linears[name].set_weight(result.weight)
            if result.quantized is not None and quantized is not None and is_24_pattern(pattern):
                q = result.quantized
                quantized[name] = int24_from(result.weight, q.codes, q.scales, q.zeros,
                                             q.quantizer.width(result.weight.shape[1]), q.quantizer.bits, name)
            info[name] = {"seconds": round((time.perf_counter() - clock) / len(names), 4), **result.info}
            if isinstance(recipe.pattern, Hybrid):  # every linear of a split says where its dense columns are
                info[name]["dense_columns"] = [list(r) for r in pattern.dense]
    return info


def choose_passes(adapter: ModelAdapter, tokens: torch.Tensor, device: torch.device) -> int:
    """1 (each GEMM once) unless what it holds would take more than half the memory available on
    ``device``: every calibration token's state where the batches park, about a hidden vector plus the
    widest linear input (the MLP's intermediate activations) each, in the model's dtype. Else 2."""
    first = adapter.linears(0).values()
    widest = max((p.in_features for p in first), default=0)
    hidden = adapter.model.get_input_embeddings().embedding_dim
    itemsize = next(iter(first)).weight.element_size() if first else 4
    needed = tokens.numel() * (hidden + widest) * itemsize
    return 1 if needed <= available_memory(device) // 2 else 2


def check_model(adapter: ModelAdapter, recipe: Recipe) -> None:
    """Every prunable linear takes the recipe's pattern (N:M needs whole groups), before any calibration."""
    for name, linear in adapter.all_linears().items():
        recipe.pattern.validate(name, linear.out_features, linear.in_features)


def run(model: nn.Module, recipe: Recipe, tokens: torch.Tensor, *, device: str = "auto", batch_size: int = 8,
        share_stats: bool = True, progress: bool = True, calibration_spec: str | None = None,
        source: stream.LayerSource | None = None, on_done: Callable[[int, dict[str, dict]], None] | None = None,
        offload_activations: str | os.PathLike | None = None) -> PruneReport:
    """Prune ``model`` in place with ``recipe`` on calibration ``tokens`` ``[nsamples, seqlen]``.

    ``source`` loads each decoder layer's weights before it runs and releases them after; ``on_done``
    gets each pruned layer's index and per-linear facts before that (the writer of the out-of-core path).
    """
    adapter = ModelAdapter(model)
    check_model(adapter, recipe)
    started = time.perf_counter()
    stream_options = {"device": device, "batch_size": batch_size, "progress": progress, "source": source,
                      "offload_activations": offload_activations}
    share = distributed.shard(tokens)  # this rank's windows (all of them with one process)
    recipe.allocation.prepare(adapter, share, recipe.pruner, stream_options)
    facts: dict[int, dict[str, dict]] = {}

    def process(index: int, linears: dict[str, Prunable], stats: dict[str, InputStats]) -> dict[str, dict]:
        info = prune_layer(recipe, index, linears, stats, state(model).quantized)  # the layer, or a group of it
        facts.setdefault(index, {}).update(info)
        return info

    passes = recipe.passes or choose_passes(adapter, share, resolve_device(device))
    layers = stream.layerwise(adapter, share, process, needs=recipe.needs, share_stats=share_stats,
                              hessian_dtype=recipe.hessian_dtype, passes=passes,
                              on_done=None if on_done is None else lambda index: on_done(index, facts.pop(index, {})),
                              **stream_options)
    total = sum(lin.shape[0] * lin.shape[1] for layer in layers for lin in layer.linears)
    zeros = sum(lin.zeros for layer in layers for lin in layer.linears)
    records = [
        LinearRecord(name=lin.name, shape=lin.shape, sparsity=round(lin.sparsity, 6),
                     rel_error=None if lin.rel_error is None else round(lin.rel_error, 6),
                     layer_seconds=round(layer.seconds, 3), seconds=lin.info.get("seconds", 0.0),
                     facts={k: v for k, v in lin.info.items() if k not in ("seconds", "dense_columns")},
                     dense_columns=lin.info.get("dense_columns"))
        for layer in layers for lin in layer.linears
    ]
    dense_weights = sum(r.shape[0] * (b - a) for r in records for a, b in r.dense_columns or ())
    summary = Summary(prunable_params=total, zeros=zeros, sparsity=zeros / max(total, 1),
                      dense_fraction=dense_weights / max(total, 1), seconds=round(time.perf_counter() - started, 2),
                      phase_seconds={phase: round(sum(layer.phases[phase] for layer in layers), 2)
                                     for phase in layers[0].phases})
    record = recipe.record(state(model).source, str(resolve_device(device)), calibration_spec, tokens, passes)
    return PruneReport(record, summary, records)


def prune(model: nn.Module | str | os.PathLike, method: str = "wanda", pattern=None, sparsity: float | None = None,
          calib: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048, seed: int = 0, device: str = "auto",
          batch_size: int = 8, dtype: str | None = None, tokenizer=None, calib_tokens: torch.Tensor | None = None,
          share_stats: bool = True, progress: bool = True, recipe: Recipe | None = None, **settings) -> nn.Module:
    """Prune a causal LM in place and return it; ``llmprune.state(model).report`` describes the run.

    ``model`` is a loaded transformers model or anything ``loading.load_pretrained`` accepts.
    ``settings`` are the rest of ``Recipe.build``'s arguments (``refine``, ``allocation``,
    ``dense_fraction``, pruner options such as SparseGPT's ``blocksize``...); a prebuilt ``recipe``
    replaces them all. ``calib_tokens`` (``[nsamples, seqlen]``) bypasses ``calib`` for callers that
    bring their own tokens.
    """
    if recipe is None:
        recipe = Recipe.build(method, pattern, sparsity, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              **settings)
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_pretrained(model, dtype)
    known = state(model)
    tokenizer = tokenizer or known.tokenizer
    adapter = ModelAdapter(model)
    check_model(adapter, recipe)
    spec = None
    if calib_tokens is None:
        if tokenizer is None:
            raise LLMPruneError("calibration needs a tokenizer; pass tokenizer= or load the model with llmprune")
        check_seqlen(model, recipe.calibration.seqlen)
        calib_tokens = recipe.calibration.tokens(tokenizer)
    else:
        spec = "tokens given by the caller"
    known.report = run(model, recipe, calib_tokens, device=device, batch_size=batch_size, share_stats=share_stats,
                       progress=progress, calibration_spec=spec)
    return model


class _LayerLoader:
    """``stream.LayerSource`` over a checkpoint: decoder layer ``i`` is the tensors under ``LAYERS.i.``."""

    def __init__(self, source: CheckpointSource, layers_name: str) -> None:
        self.source, self.layers_name = source, layers_name

    def load_layer(self, index: int) -> None:
        self.source.load(f"{self.layers_name}.{index}.")

    def release_layer(self, index: int) -> None:
        self.source.release(f"{self.layers_name}.{index}.")


def prune_checkpoint(source: str | os.PathLike, out: str | os.PathLike, recipe: Recipe, *, device: str = "auto",
                     batch_size: int = 8, dtype: str | None = None, share_stats: bool = True, progress: bool = True,
                     overwrite: bool = False, storage: str = "auto",
                     offload_activations: str | os.PathLike | None = None) -> PruneReport:
    """Prune a safetensors checkpoint of any size into ``out``, one decoder layer in memory at a time.

    The model is a skeleton on the meta device; what runs outside the decoder layers is loaded once;
    each layer's tensors are read from the memory-mapped shards when its turn comes, pruned, written
    to the output checkpoint right away (the same codecs and bytes as ``prune`` + ``save``), and freed.
    The directory appears atomically when everything is written, with ``llmprune.json``.
    """
    check_storage(storage, recipe.pattern)
    check_output_dir(out, overwrite)
    checkpoint = CheckpointSource(source, dtype)
    model = checkpoint.model
    adapter = ModelAdapter(model)
    check_model(adapter, recipe)
    check_seqlen(model, recipe.calibration.seqlen)
    checkpoint.load_outside(adapter.layers_name)
    tokens = recipe.calibration.tokens(checkpoint.tokenizer)
    names = set(adapter.all_linears())
    quantize = None if recipe.quantizer is None else {"bits": recipe.quantizer.bits}
    codec, targets, _ = storage_plan_for(recipe.pattern, storage, names, quantize)
    hybrid: dict[str, tuple] = {}
    options = {"device": device, "batch_size": batch_size, "share_stats": share_stats, "progress": progress,
               "source": _LayerLoader(checkpoint, adapter.layers_name), "offload_activations": offload_activations}
    if not distributed.is_leader():  # rank 0 writes; the others calibrate their share
        report = run(model, recipe, tokens, **options)
        distributed.barrier()
        return report
    with atomic_output_dir(out, overwrite) as tmp:
        payloads = state(model).quantized
        writer = CheckpointWriter(model, tmp, codec, targets, hybrid, fetch=checkpoint.fetch, payloads=payloads,
                                  ranges_later=isinstance(recipe.pattern, Hybrid) or recipe.quantizer is not None)
        free = shutil.disk_usage(tmp).free
        if writer.size_bound() > free:
            raise LLMPruneError(f"{Path(out).parent} has {free / 2**30:.1f} GiB free, and the pruned checkpoint needs up "
                                f"to {writer.size_bound() / 2**30:.1f} GiB; free space or choose another --out")
        stack = f"{adapter.layers_name}."

        def write_layer(index: int, layer_facts: dict[str, dict]) -> None:
            for name, info in layer_facts.items():
                hybrid[name] = tuple(tuple(r) for r in info.get("dense_columns", ()))

            def ready(key: str) -> bool:
                if not key.startswith(stack):
                    return True
                return int(key[len(stack):].split(".", 1)[0]) <= index

            writer.write_ready(ready)
            for name in layer_facts:
                payloads.pop(name, None)  # written: the codes need not stay in memory

        try:
            report = run(model, recipe, tokens, on_done=write_layer, **options)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        checkpoint.tokenizer.save_pretrained(tmp)
        report.write(tmp)
    state(model).report = report
    distributed.barrier()
    return report
