"""Magnitude pruning: drop the smallest |W| per output row (unstructured) or per group (N:M)."""
from __future__ import annotations

import torch

from ..patterns import Pattern
from ..stats import InputStats
from .base import Pruned, apply_keep_mask


class Magnitude:
    name = "magnitude"
    needs: frozenset[str] = frozenset()

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        return Pruned(apply_keep_mask(weight, pattern.keep_mask(weight.abs())))
