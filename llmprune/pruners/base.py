"""The contract every pruner follows: declare the statistics it needs, rewrite one weight."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import LLMPruneError
from ..patterns import Pattern
from ..stats import InputStats
from .quantizer import Quantized


@dataclass
class Pruned:
    """A pruned ``[out, in]`` weight (float32, zeros are +0.0) and facts for the layer report; when it was
    also quantized, ``weight`` is the dequantized weight and ``quantized`` its codes, scales and zero points."""

    weight: torch.Tensor
    info: dict = field(default_factory=dict)
    quantized: Quantized | None = None


class Pruner(Protocol):
    name: str
    needs: frozenset[str]

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        """Prune ``weight`` ``[out, in]`` (float32, a copy the pruner may modify) to ``pattern``."""


def apply_keep_mask(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries with +0.0 (−0.0 breaks some 2:4 kernels)."""
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


_FLOAT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}


def float_dtype(value: torch.dtype | str, what: str) -> torch.dtype:
    """A pruner's working-precision option: float32 (default work) or float64 (reference runs)."""
    dtype = _FLOAT_DTYPES.get(value.removeprefix("torch."), value) if isinstance(value, str) else value
    if dtype not in (torch.float32, torch.float64):
        raise LLMPruneError(f"{what} must be float32 or float64; got {value!r}")
    return dtype
