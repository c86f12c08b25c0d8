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
from .pruners import make_pruner
from .stats import InputStats


def max_positions(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise LLMPruneError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}; use --seqlen {limit} or less")


def prune(model: nn.Module | str | os.PathLike, method: str = "wanda", pattern: str | Pattern | None = None,
          sparsity: float | None = None, calib: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048,
          seed: int = 0, device: str = "auto", batch_size: int = 8, dtype: str | None = None, tokenizer=None,
          calib_tokens: torch.Tensor | None = None, share_stats: bool = True, progress: bool = True,
          **pruner_options) -> nn.Module:
    """Prune a causal LM in place and return it, with ``model.llmprune_report`` describing the run.

    ``model`` is a loaded transformers model or anything ``models.load`` accepts. ``calib_tokens``
    (``[nsamples, seqlen]``) bypasses ``calib`` for callers that bring their own tokens.
    ``pruner_options`` go to the pruner's constructor (e.g. SparseGPT's ``blocksize``).
    """
    pruner = make_pruner(method, **pruner_options)
    pattern = pattern if isinstance(pattern, (Unstructured, NM)) else parse_pattern(pattern, sparsity)
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

    def process(index: int, linears: dict[str, Prunable], stats: dict[str, InputStats]) -> dict[str, dict]:
        info = {}
        for name, linear in linears.items():
            started = time.perf_counter()
            result = pruner.prune(linear.weight.float().clone(), stats.get(name), pattern)
            bad = pattern.violations(result.weight)
            if bad:
                raise RuntimeError(f"{method} produced a weight for {name} that breaks {pattern} in {bad} rows/groups")
            linear.set_weight(result.weight)
            info[name] = {"seconds": round(time.perf_counter() - started, 4), **result.info}
        return info

    started = time.perf_counter()
    reports = stream.layerwise(adapter, calib_tokens, process, needs=pruner.needs, device=device,
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
