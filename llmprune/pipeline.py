"""The public ``prune`` entry point: load, draw calibration data, stream, prune, report."""
from __future__ import annotations

import os
import platform
import time

import torch
from torch import nn

from . import __version__, hybrid, models, stream
from . import calib as calibration
from .errors import LLMPruneError
from .models import ModelAdapter, Prunable
from .patterns import NM, Hybrid, Pattern, Unstructured, parse_pattern
from .allocation import check_allocation, outlier_ratio, owl_sparsities
from .pruners import Pruned, make_pruner, make_refiner
from .stats import SQ_NORM, InputStats


def max_positions(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def owl_outlier_ratios(adapter: ModelAdapter, tokens: torch.Tensor, m: float, **stream_options) -> list[float]:
    """OWL's statistics pre-pass: each layer's outlier ratio of Wanda scores on the dense model."""
    ratios: list[float] = []

    def collect(index: int, linears: dict[str, Prunable], stats: dict[str, InputStats]) -> None:
        ratios.append(outlier_ratio([(p.weight.float(), stats[n].channel_norm) for n, p in linears.items()], m))

    stream.layerwise(adapter, tokens, collect, needs=frozenset({SQ_NORM}), measure_error=False,
                     desc="OWL outlier ratios", **stream_options)
    return ratios


def hybrid_rankings(adapter: ModelAdapter, tokens: torch.Tensor, pruner, split: Hybrid, strategy: str,
                    **stream_options) -> dict[str, hybrid.Ranking]:
    """The global dense budget's pre-pass: every linear's block ranking on the dense model."""
    rankings: dict[str, hybrid.Ranking] = {}
    plain = NM(split.n, split.m)

    def collect(index: int, linears: dict[str, Prunable], stats: dict[str, InputStats]) -> None:
        for name, linear in linears.items():
            original = linear.weight.float()
            base = pruner.prune(original.clone(), stats.get(name), plain)
            rankings[name] = hybrid.rank_blocks(original, base.weight, stats[name], split, strategy)

    stream.layerwise(adapter, tokens, collect, needs=pruner.needs | hybrid.needs(strategy), measure_error=False,
                     desc="hybrid dense budget", hessian_dtype=getattr(pruner, "hessian_dtype", torch.float32),
                     **stream_options)
    return rankings


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise LLMPruneError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}; use --seqlen {limit} or less")


def prune(model: nn.Module | str | os.PathLike, method: str = "wanda", pattern: str | Pattern | None = None,
          sparsity: float | None = None, calib: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048,
          seed: int = 0, device: str = "auto", batch_size: int = 8, dtype: str | None = None, tokenizer=None,
          calib_tokens: torch.Tensor | None = None, share_stats: bool = True, progress: bool = True,
          refine: str | None = None, refine_options: dict | None = None, allocation: str = "uniform",
          owl_lambda: float = 0.08, owl_m: float = 5.0, dense_fraction: float | None = None,
          hybrid_select: str = "error", hybrid_budget: str = "uniform", hybrid_block: int = 64,
          **pruner_options) -> nn.Module:
    """Prune a causal LM in place and return it, with ``model.llmprune_report`` describing the run.

    ``model`` is a loaded transformers model or anything ``models.load`` accepts. ``calib_tokens``
    (``[nsamples, seqlen]``) bypasses ``calib`` for callers that bring their own tokens.
    ``pruner_options`` go to the pruner's constructor (e.g. SparseGPT's ``blocksize``).
    ``refine="dsnot"`` refines every base mask with DSnoT (``refine_options`` go to its constructor).
    ``allocation="owl"`` sets per-layer unstructured sparsities from a dense statistics pre-pass.
    ``pattern="hybrid:2:4"`` keeps ``dense_fraction`` of each linear's input columns dense (blocks of
    ``hybrid_block``) and prunes the rest 2:4; ``hybrid_select`` (``error``/``saliency``) picks the
    blocks, ``hybrid_budget="global"`` spreads one budget over all linears from a dense pre-pass.
    """
    pruner = make_pruner(method, **pruner_options)
    refiner = make_refiner(refine, **(refine_options or {})) if refine else None
    if not isinstance(pattern, (Unstructured, NM, Hybrid)):
        pattern = parse_pattern(pattern, sparsity, dense_fraction, hybrid_block)
    check_allocation(allocation, pattern)
    split = pattern if isinstance(pattern, Hybrid) else None
    needs = pruner.needs | (refiner.needs if refiner else frozenset())
    if split is not None:
        hybrid.check_budget(hybrid_budget)
        needs |= hybrid.needs(hybrid_select)
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
    stream_options = {"device": device, "batch_size": batch_size, "progress": progress}
    allocated: dict = {"name": allocation}
    layer_patterns = [pattern] * len(adapter)
    if allocation == "owl":
        ratios = owl_outlier_ratios(adapter, calib_tokens, owl_m, **stream_options)
        sparsities = owl_sparsities(ratios, pattern.sparsity, owl_lambda)
        layer_patterns = [Unstructured(s) for s in sparsities]
        allocated.update(lam=owl_lambda, m=owl_m, outlier_ratios=[round(r, 6) for r in ratios],
                         sparsities=[round(s, 6) for s in sparsities])

    dense_counts: dict[str, int] | None = None
    if split is not None and hybrid_budget == "global":
        rankings = hybrid_rankings(adapter, calib_tokens, pruner, split, hybrid_select, **stream_options)
        dense_counts = hybrid.allocate_global(rankings, split.dense_fraction)

    def region(name: str, original: torch.Tensor, stats: InputStats | None) -> NM:
        """This linear's pattern under the hybrid split: N:M with its chosen dense blocks."""
        plain = NM(split.n, split.m)
        count = dense_counts[name] if dense_counts is not None else split.uniform_count(original.shape[1])
        if count == 0:
            return plain
        base = pruner.prune(original.clone(), stats, plain)
        return split.region(hybrid.rank_blocks(original, base.weight, stats, split, hybrid_select).blocks[:count])

    def process(index: int, linears: dict[str, Prunable], stats: dict[str, InputStats]) -> dict[str, dict]:
        info = {}
        for name, linear in linears.items():
            clock = time.perf_counter()
            original = linear.weight.float().clone()
            layer_pattern = region(name, original, stats.get(name)) if split else layer_patterns[index]
            result = pruner.prune(original.clone(), stats.get(name), layer_pattern)
            if refiner is not None and refiner.applies_to(name):
                refined = refiner.refine(original, result.weight, stats[name], layer_pattern)
                result = Pruned(refined.weight, {**result.info, **refined.info})
            bad = layer_pattern.violations(result.weight)
            if bad:
                raise RuntimeError(f"{method} produced a weight for {name} that breaks {layer_pattern} in {bad} rows/groups")
            linear.set_weight(result.weight)
            info[name] = {"seconds": round(time.perf_counter() - clock, 4), **result.info}
            if split is not None:
                info[name]["dense_columns"] = [list(r) for r in layer_pattern.dense]
        return info

    reports = stream.layerwise(adapter, calib_tokens, process, needs=needs, share_stats=share_stats,
                               hessian_dtype=getattr(pruner, "hessian_dtype", torch.float32), **stream_options)
    weights = [p.weight for p in adapter.all_linears().values()]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    dense_weights = sum(lin.shape[0] * (b - a) for rep in reports for lin in rep.linears
                        for a, b in lin.info.get("dense_columns", []))
    model.llmprune_report = {
        "recipe": {
            "method": method,
            "pattern": str(pattern),
            "target_sparsity": pattern.target_sparsity,
            "options": pruner_options,
            "refine": {"name": refine, **(refine_options or {})} if refine else None,
            "allocation": allocated,
            "hybrid": None if split is None else {"dense_fraction": split.dense_fraction, "block": split.block,
                                                  "select": hybrid_select, "budget": hybrid_budget},
            "calibration": {"spec": calib, "nsamples": int(calib_tokens.shape[0]),
                            "seqlen": int(calib_tokens.shape[1]), "seed": seed},
            "source": getattr(model, "llmprune_source", None),
            "device": str(stream.resolve_device(device)),
            "versions": _versions(),
        },
        "summary": {"prunable_params": total, "zeros": zeros, "sparsity": zeros / max(total, 1),
                    "dense_fraction": dense_weights / max(total, 1),
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
