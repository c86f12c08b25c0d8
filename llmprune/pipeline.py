"""The public ``prune`` entry point: load, draw calibration data, stream, prune, report."""
from __future__ import annotations

import os
import platform
import time

import torch
from torch import nn

from . import __version__, models, stream
from . import calib as calibration
from .errors import LLMPruneError
from .models import ModelAdapter, Prunable
from .patterns import NM, Pattern, Unstructured, parse_pattern
from .allocation import check_allocation, outlier_ratio, owl_sparsities
from .pruners import Pruned, make_pruner, make_refiner
from .stats import SQ_NORM, InputStats


def max_positions(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def owl_outlier_ratios(adapter: ModelAdapter, tokens: torch.Tensor, m: float, device: str, batch_size: int,
                       progress: bool) -> list[float]:
    """OWL's statistics pre-pass: each layer's outlier ratio of Wanda scores on the dense model."""
    ratios: list[float] = []

    def collect(index: int, linears: dict[str, Prunable], stats: dict[str, InputStats]) -> None:
        ratios.append(outlier_ratio([(p.weight.float(), stats[n].channel_norm) for n, p in linears.items()], m))

    stream.layerwise(adapter, tokens, collect, needs=frozenset({SQ_NORM}), device=device, batch_size=batch_size,
                     measure_error=False, progress=progress, desc="OWL outlier ratios")
    return ratios


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise LLMPruneError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}; use --seqlen {limit} or less")


def prune(model: nn.Module | str | os.PathLike, method: str = "wanda", pattern: str | Pattern | None = None,
          sparsity: float | None = None, calib: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048,
          seed: int = 0, device: str = "auto", batch_size: int = 8, dtype: str | None = None, tokenizer=None,
          calib_tokens: torch.Tensor | None = None, share_stats: bool = True, progress: bool = True,
          refine: str | None = None, refine_options: dict | None = None, allocation: str = "uniform",
          owl_lambda: float = 0.08, owl_m: float = 5.0, **pruner_options) -> nn.Module:
    """Prune a causal LM in place and return it, with ``model.llmprune_report`` describing the run.

    ``model`` is a loaded transformers model or anything ``models.load`` accepts. ``calib_tokens``
    (``[nsamples, seqlen]``) bypasses ``calib`` for callers that bring their own tokens.
    ``pruner_options`` go to the pruner's constructor (e.g. SparseGPT's ``blocksize``).
    ``refine="dsnot"`` refines every base mask with DSnoT (``refine_options`` go to its constructor).
    ``allocation="owl"`` sets per-layer unstructured sparsities from a dense statistics pre-pass.
    """
    pruner = make_pruner(method, **pruner_options)
    refiner = make_refiner(refine, **(refine_options or {})) if refine else None
    pattern = pattern if isinstance(pattern, (Unstructured, NM)) else parse_pattern(pattern, sparsity)
    check_allocation(allocation, pattern)
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = models.load(model, dtype)
    tokenizer = tokenizer or getattr(model, "llmprune_tokenizer", None)
    adapter = ModelAdapter(model)
    for name, linear in adapter.all_linears().items():
        pattern.validate(name, linear.out_features, linear.in_features)
    if calib_tokens is None:
        if tokenizer is None:
            raise LLMPruneError("calibration needs a tokenizer; pass tokenizer= or load the model with llmprune")
        check_seqlen(model, seqlen)
        calib_tokens = calibration.tokens(calib, tokenizer, nsamples, seqlen, seed)
    else:
        calib = "tokens given by the caller"

    started = time.perf_counter()
    allocated: dict = {"name": allocation}
    layer_patterns = [pattern] * len(adapter)
    if allocation == "owl":
        ratios = owl_outlier_ratios(adapter, calib_tokens, owl_m, device, batch_size, progress)
        sparsities = owl_sparsities(ratios, pattern.sparsity, owl_lambda)
        layer_patterns = [Unstructured(s) for s in sparsities]
        allocated.update(lam=owl_lambda, m=owl_m, outlier_ratios=[round(r, 6) for r in ratios],
                         sparsities=[round(s, 6) for s in sparsities])

    def process(index: int, linears: dict[str, Prunable], stats: dict[str, InputStats]) -> dict[str, dict]:
        info = {}
        layer_pattern = layer_patterns[index]
        for name, linear in linears.items():
            clock = time.perf_counter()
            original = linear.weight.float().clone()
            result = pruner.prune(original.clone(), stats.get(name), layer_pattern)
            if refiner is not None and refiner.applies_to(name):
                refined = refiner.refine(original, result.weight, stats[name], layer_pattern)
                result = Pruned(refined.weight, {**result.info, **refined.info})
            bad = layer_pattern.violations(result.weight)
            if bad:
                raise RuntimeError(f"{method} produced a weight for {name} that breaks {layer_pattern} in {bad} rows/groups")
            linear.set_weight(result.weight)
            info[name] = {"seconds": round(time.perf_counter() - clock, 4), **result.info}
        return info

    reports = stream.layerwise(adapter, calib_tokens, process, needs=pruner.needs | (refiner.needs if refiner else frozenset()), device=device,
                               batch_size=batch_size, share_stats=share_stats, progress=progress,
                               hessian_dtype=getattr(pruner, "hessian_dtype", torch.float32))
    weights = [p.weight for p in adapter.all_linears().values()]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    model.llmprune_report = {
        "recipe": {
            "method": method,
            "pattern": str(pattern),
            "target_sparsity": pattern.target_sparsity,
            "options": pruner_options,
            "refine": {"name": refine, **(refine_options or {})} if refine else None,
            "allocation": allocated,
            "calibration": {"spec": calib, "nsamples": int(calib_tokens.shape[0]),
                            "seqlen": int(calib_tokens.shape[1]), "seed": seed},
            "source": getattr(model, "llmprune_source", None),
            "device": str(stream.resolve_device(device)),
            "versions": _versions(),
        },
        "summary": {"prunable_params": total, "zeros": zeros, "sparsity": zeros / max(total, 1),
                    "seconds": round(time.perf_counter() - started, 2),
                    "phase_seconds": {phase: round(sum(r.phases[phase] for r in reports), 2) for phase in reports[0].phases}},
        "layers": [
            {"name": lin.name, "shape": list(lin.shape), "sparsity": round(lin.sparsity, 6),
             "rel_error": None if lin.rel_error is None else round(lin.rel_error, 6),
             "layer_seconds": round(rep.seconds, 3), **lin.info}
            for rep in reports for lin in rep.linears
        ],
    }
    return model


def _versions() -> dict[str, str]:
    import transformers

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
