"""The typed record of a pruning run; ``llmprune.json`` is its JSON form on disk.

``PruneReport`` is what ``prune`` returns and what ``save``, ``llmprune info`` and ``llmprune compare``
read. The JSON keeps the layout 0.1.0 wrote (``recipe`` / ``summary`` / ``layers``), so checkpoints
written before this module existed still load; fields a 0.1.0 file lacks take their defaults.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LLMPruneError
from .patterns import Pattern, is_24_pattern, parse_recorded
from .resources import read_json

REPORT_FILE = "llmprune.json"


@dataclass
class RecipeRecord:
    """What was asked for, as recorded (strings and numbers: it must survive JSON)."""

    method: str
    pattern: str
    target_sparsity: float = 0.0
    options: dict = field(default_factory=dict)  # the pruner options the caller gave explicitly
    refine: dict | None = None  # {"name": "dsnot", **options}
    allocation: dict = field(default_factory=lambda: {"name": "uniform"})  # with OWL's ratios and sparsities
    hybrid: dict | None = None  # dense_fraction, block, select, budget
    calibration: dict = field(default_factory=dict)  # spec, nsamples, seqlen, seed
    source: str | None = None
    device: str = "cpu"
    versions: dict = field(default_factory=dict)
    passes: int = 2  # reports from before the one-pass order ran two passes per layer
    quantize: dict | None = None  # bits, group_size, symmetric, clip of a quantized run

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_recorded(self.pattern, self.hybrid)


@dataclass
class Summary:
    sparsity: float
    prunable_params: int = 0
    zeros: int = 0
    dense_fraction: float = 0.0  # share of the prunable weights in hybrid dense regions
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class LinearRecord:
    """One pruned linear: achieved sparsity, relative reconstruction error ‖(W₀−Ŵ)X‖/‖W₀X‖ on the
    calibration inputs, time, the hybrid dense columns, and the method's own facts (``facts``)."""

    name: str
    shape: tuple[int, int]  # [out, in]
    sparsity: float
    rel_error: float | None
    layer_seconds: float = 0.0
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)
    dense_columns: list[list[int]] | None = None

    def to_json(self) -> dict:
        record = {"name": self.name, "shape": list(self.shape), "sparsity": self.sparsity, "rel_error": self.rel_error,
                  "layer_seconds": self.layer_seconds, "seconds": self.seconds, **self.facts}
        if self.dense_columns is not None:
            record["dense_columns"] = self.dense_columns
        return record

    @classmethod
    def from_json(cls, record: dict) -> LinearRecord:
        known = {"name", "shape", "sparsity", "rel_error", "layer_seconds", "seconds", "dense_columns"}
        return cls(name=record["name"], shape=tuple(record["shape"]), sparsity=record["sparsity"],
                   rel_error=record.get("rel_error"), layer_seconds=record.get("layer_seconds", 0.0),
                   seconds=record.get("seconds", 0.0), facts={k: v for k, v in record.items() if k not in known},
                   dense_columns=record.get("dense_columns"))


@dataclass
class PruneReport:
    recipe: RecipeRecord
    summary: Summary
    layers: list[LinearRecord]

    @property
    def pattern(self) -> Pattern:
        return self.recipe.parsed_pattern

    @property
    def packs_24(self) -> bool:
        """Whether the run's linears are 2:4 (plain or hybrid), so a checkpoint stores them packed."""
        return is_24_pattern(self.pattern)

    @property
    def linear_names(self) -> set[str]:
        return {layer.name for layer in self.layers}

    def dense_ranges(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """Hybrid dense column ranges per linear (empty tuples for the others)."""
        return {layer.name: tuple(tuple(r) for r in layer.dense_columns or ()) for layer in self.layers}

    def to_json(self) -> dict:
        return {"recipe": dict(self.recipe.__dict__), "summary": dict(self.summary.__dict__),
                "layers": [layer.to_json() for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict, where: str = "llmprune.json") -> PruneReport:
        try:
            recipe = RecipeRecord(**{k: v for k, v in data["recipe"].items() if k in RecipeRecord.__dataclass_fields__})
            summary = Summary(**{k: v for k, v in data["summary"].items() if k in Summary.__dataclass_fields__})
            layers = [LinearRecord.from_json(record) for record in data.get("layers", [])]
        except (KeyError, TypeError) as exc:
            raise LLMPruneError(f"{where} is not an llmprune report ({type(exc).__name__}: {exc})") from exc
        return cls(recipe, summary, layers)

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / REPORT_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> PruneReport:
        """The ``llmprune.json`` of a checkpoint, with a clear error when it is missing or corrupt."""
        path = Path(directory) / REPORT_FILE
        data = read_json(path, f"{directory} has no {REPORT_FILE}: it was not written by llmprune prune")
        return cls.from_json(data, str(path))
