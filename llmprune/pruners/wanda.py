"""Wanda (Sun et al., 2023): score |W_ij|·‖X_j‖₂, compared within each output row or N:M group."""
from __future__ import annotations

import torch

from ..patterns import Pattern
from ..stats import SQ_NORM, InputStats
from .base import Pruned, apply_keep_mask


class Wanda:
    name = "wanda"
    needs = frozenset({SQ_NORM})

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        if stats is None:
            raise ValueError("Wanda needs input statistics")
        scores = weight.abs() * stats.channel_norm.to(weight.device)[None, :]
        return Pruned(apply_keep_mask(weight, pattern.keep_mask(scores)))
