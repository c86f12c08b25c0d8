"""Pruner registry: one small class per method, looked up by name."""
from __future__ import annotations

from ..errors import LLMPruneError
from .base import Pruned, Pruner, apply_keep_mask
from .dsnot import DSnoT
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

PRUNERS: dict[str, type] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}

# Refiners take a base pruner's result and improve its mask: ``refine(original, pruned, stats, pattern)``.
REFINERS: dict[str, type] = {"dsnot": DSnoT}


def _make(registry: dict[str, type], kind: str, name: str, options: dict):
    """Instantiate ``registry[name](**options)``, with clear errors for an unknown name or option."""
    try:
        cls = registry[name]
    except KeyError:
        raise LLMPruneError(f"unknown {kind} {name!r}; choose one of {', '.join(sorted(registry))}") from None
    try:
        return cls(**options)
    except TypeError:
        raise LLMPruneError(f"{kind} {name!r} takes no option(s) {', '.join(sorted(options))}") from None


def make_pruner(method: str, **options) -> Pruner:
    return _make(PRUNERS, "method", method, options)


def make_refiner(name: str, **options) -> DSnoT:
    return _make(REFINERS, "refinement", name, options)


__all__ = ["PRUNERS", "REFINERS", "Pruned", "Pruner", "apply_keep_mask", "make_pruner", "make_refiner"]
