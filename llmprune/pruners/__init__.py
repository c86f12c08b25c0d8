"""Pruner registry: one small class per method, looked up by name."""
from __future__ import annotations

from ..errors import LLMPruneError
from .base import Pruned, Pruner, apply_keep_mask
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

PRUNERS: dict[str, type] = {"magnitude": Magnitude, "wanda": Wanda}
PRUNERS["sparsegpt"] = SparseGPT


def make_pruner(method: str, **options) -> Pruner:
    """Instantiate a pruner by name, with a clear error for an unknown one."""
    try:
        cls = PRUNERS[method]
    except KeyError:
        raise LLMPruneError(f"unknown method {method!r}; choose one of {', '.join(sorted(PRUNERS))}") from None
    try:
        return cls(**options)
    except TypeError:
        raise LLMPruneError(f"method {method!r} takes no option(s) {', '.join(sorted(options))}") from None


__all__ = ["PRUNERS", "Pruned", "Pruner", "apply_keep_mask", "make_pruner"]
