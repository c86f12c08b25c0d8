"""Checkpoint directories: safetensors I/O, one codec per storage format, atomic output.

A checkpoint is a transformers directory plus ``llmprune.json`` (the ``PruneReport``). How each linear
is stored follows from the report: a 2:4 or hybrid:2:4 run is packed (``sparse-24-bitmask``), any other
run is dense, or with ``storage="bitmask"`` in the legacy ``sparse-bitmask`` layout.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from ..errors import LLMPruneError
from ..patterns import Pattern, is_24_pattern
from ..report import REPORT_FILE, PruneReport
from ..state import state
from .codecs import CODECS, Codec
from .codecs.bitmask import BITMASK
from .codecs.int24 import INT24
from .codecs.sparse24 import SPARSE24
from .directory import atomic_output_dir, check_output_dir
from .reader import CONFIG_NAME, is_packed_checkpoint, read_checkpoint, sparse_format
from .safetensors import INDEX_NAME, WEIGHTS_NAME, read_layout
from .writer import write_checkpoint

STORAGE = ("auto", "bitmask")


def check_storage(storage: str, pattern: Pattern | None) -> None:
    """Refuse an unknown storage name, or bitmask storage for a pattern that is saved packed 2:4."""
    if storage not in STORAGE:
        raise LLMPruneError(f"unknown --format {storage!r}; use one of {', '.join(STORAGE)}")
    if storage == "bitmask" and pattern is not None and is_24_pattern(pattern):
        raise LLMPruneError(f"a {pattern} model is saved packed 2:4 (as compact, and it runs on the 2:4 kernels); "
                            f"--format bitmask is for unstructured and other N:M patterns")


def storage_plan(report: PruneReport | None, storage: str = "auto") -> tuple[Codec, set[str] | None, dict | None]:
    """(codec, declared targets, hybrid ranges) for saving a model with this report (see ``storage_plan_for``).
    Without a report (a model llmprune did not prune), every 2:4 linear found is packed."""
    if report is None:
        check_storage(storage, None)
        if storage == "bitmask":
            raise LLMPruneError("--format bitmask stores the linears a pruning run reports; this model has no "
                                "llmprune_report (prune it with llmprune first)")
        return SPARSE24, None, None
    codec, targets, _ = storage_plan_for(report.pattern, storage, report.linear_names, report.recipe.quantize)
    return codec, targets, report.dense_ranges() if report.packs_24 else None


def storage_plan_for(pattern: Pattern, storage: str, pruned: set[str], quantize: dict | None = None
                     ) -> tuple[Codec, set[str], None]:
    """(codec, declared targets, None) for the linears ``pruned`` with ``pattern``: a 2:4 or hybrid:2:4 run
    declares them packing targets, so a weight that is not 2:4 fails loudly instead of being stored
    dense; a 2:4 run quantized to at most 4 bits is stored as 2:4 + INT4 codes; ``bitmask`` stores an
    unstructured run in the legacy layout; any other run is stored dense. Other quantized runs (plain
    GPTQ included) are stored as their dequantized weights, exact in float32."""
    check_storage(storage, pattern)
    if quantize is not None and is_24_pattern(pattern) and quantize["bits"] <= 4:
        return INT24, set(pruned), None
    if is_24_pattern(pattern):
        return SPARSE24, set(pruned), None
    if storage == "bitmask":
        return BITMASK, set(pruned), None
    return SPARSE24, set(), None


def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         storage: str = "auto") -> Path:
    """Write ``model`` (its pruning run's linears through their codec, the rest dense safetensors), its
    tokenizer and ``llmprune.json`` to ``out`` atomically."""
    known = state(model)
    tokenizer = tokenizer or known.tokenizer
    report = known.report
    codec, targets, hybrid = storage_plan(report, storage)
    with atomic_output_dir(out, overwrite) as tmp:
        write_checkpoint(model, tmp, codec, targets=targets, hybrid=hybrid, payloads=known.quantized)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.write(tmp)
    return Path(out)


def read_report(directory: str | os.PathLike) -> PruneReport:
    """The ``llmprune.json`` of a checkpoint, with a clear error when it is missing or corrupt."""
    return PruneReport.read(directory)


# Files of a checkpoint that describe its weights; everything else (tokenizer, chat template, the report)
# is carried over as it is when the weights are rewritten.
_WEIGHT_FILES = {CONFIG_NAME, "generation_config.json", WEIGHTS_NAME, INDEX_NAME}


def export_dense(directory: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Unpack a checkpoint with sparse-stored linears into an ordinary dense one that plain
    ``from_pretrained`` loads; the tokenizer files and ``llmprune.json`` are copied as they are."""
    directory = Path(directory)
    check_output_dir(out, overwrite)
    model, _, _ = read_checkpoint(directory, device="cpu", backend="dense")
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for path in directory.iterdir():
            if path.is_file() and path.name not in _WEIGHT_FILES and path.suffix != ".safetensors":
                shutil.copy(path, tmp / path.name)
    return Path(out)


__all__ = ["CODECS", "REPORT_FILE", "STORAGE", "atomic_output_dir", "check_output_dir", "check_storage",
           "export_dense", "is_packed_checkpoint", "read_checkpoint", "read_layout", "read_report", "save",
           "sparse_format", "storage_plan", "storage_plan_for", "write_checkpoint"]
