"""What llmprune knows about a model it loaded or pruned, kept in one typed object on the model.

``llmprune.prune`` returns a transformers model, and ``save``, ``perplexity`` or ``evaluate_tasks``
later need its tokenizer and pruning report; a loaded checkpoint carries which backend each packed
linear runs. All of that lives in one ``ModelState`` under one attribute, read through ``state()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .packing import Int24
    from .report import PruneReport

ATTRIBUTE = "llmprune_state"


@dataclass
class ModelState:
    tokenizer: object | None = None
    source: str | None = None  # what the model was loaded from, as the user gave it
    report: PruneReport | None = None  # set by a pruning run, or read from a checkpoint's llmprune.json
    backends: dict[str, str] = field(default_factory=dict)  # packed module → backend it runs on
    fallbacks: dict[str, str] = field(default_factory=dict)  # packed module → why not the requested backend
    quantized: dict[str, Int24] = field(default_factory=dict)  # a quantized 2:4 run's codes, per linear, for saving


def state(model: nn.Module) -> ModelState:
    """The model's ``ModelState``, created empty on first use."""
    current = model.__dict__.get(ATTRIBUTE)
    if current is None:
        current = ModelState()
        model.__dict__[ATTRIBUTE] = current
    return current
