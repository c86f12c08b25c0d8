"""What the streaming engine and the pruners see of a causal LM: its decoder layers and their linears.

One generic adapter instead of per-family tables: the decoder stack is the ``nn.ModuleList`` of
identical blocks holding the most parameters, and the prunable linears are every ``nn.Linear`` (or
GPT-2 ``Conv1D``, stored transposed) inside those blocks. Linears that read the same input (q/k/v,
gate/up) are grouped at run time by tensor identity in ``stream.py``, which works for fused and
unfused projections alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import LLMPruneError

# Leaf names of linears inside a decoder layer that are not weight matrices worth pruning:
# mixture-of-experts routers choose experts, and pruning them changes routing, not compute.
ROUTER_NAMES = frozenset({"gate", "router"})


def is_linear(module: nn.Module) -> bool:
    """A weight matrix llmprune can prune and store: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` view of a linear's weight, whatever the module stores (``Conv1D`` keeps ``[in, out]``)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


@dataclass
class Prunable:
    """One prunable matrix, always seen as ``[out, in]`` whatever the module stores."""

    name: str
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def weight(self) -> torch.Tensor:
        """``[out, in]`` view of the stored weight (no copy)."""
        return linear_weight(self.module).data

    def set_weight(self, weight: torch.Tensor) -> None:
        """Write a ``[out, in]`` weight back in the module's layout and dtype."""
        self.weight.copy_(weight)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


class ModelAdapter:
    """The view of a causal LM that the streaming engine and the pruners work on."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers_name, self.layers = self._find_layers(model)

    @staticmethod
    def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
        best: tuple[int, str, nn.ModuleList] | None = None
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if len({type(block) for block in module}) != 1:
                continue
            if not any(is_linear(m) for m in module[0].modules()):
                continue
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
        if best is None:
            raise LLMPruneError(
                f"unknown architecture {type(model).__name__}: found no stack of decoder layers "
                f"(an nn.ModuleList of identical blocks containing nn.Linear or Conv1D)"
            )
        return best[1], best[2]

    def __len__(self) -> int:
        return len(self.layers)

    def linears(self, index: int) -> dict[str, Prunable]:
        """Prunable matrices of decoder layer ``index``, keyed by their full module name."""
        prefix = f"{self.layers_name}.{index}."
        return {
            prefix + name: Prunable(prefix + name, module)
            for name, module in self.layers[index].named_modules()
            if is_linear(module) and name.rsplit(".", 1)[-1] not in ROUTER_NAMES
        }

    def all_linears(self) -> dict[str, Prunable]:
        return {name: p for i in range(len(self)) for name, p in self.linears(i).items()}


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (None when it does not say)."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise LLMPruneError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}; "
                            f"use --seqlen {limit} or less")
