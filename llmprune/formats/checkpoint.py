"""Checkpoint directories written atomically: a temp dir beside the target, then one rename.

A crash or a full disk leaves either the previous output or nothing, never a half checkpoint
that looks complete. The directory is a plain transformers checkpoint plus ``llmprune.json``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from ..errors import LLMPruneError
from ..resources import read_json
from .packed import BITMASK_FORMAT, SPARSE_FORMAT, write_packed

REPORT_FILE = "llmprune.json"


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output unless ``overwrite``; called before any long work starts."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise LLMPruneError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LLMPruneError(f"output directory {path} exists and is not empty; pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir to fill; on success it replaces ``out`` in one rename, on failure it is removed."""
    path = check_output_dir(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LLMPruneError(f"could not write {path}: {exc.strerror or exc}; nothing was written there") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


STORAGE = ("auto", "bitmask")
PACKED_PATTERNS = ("2:4", "hybrid:2:4")


def check_storage(storage: str, pattern: str | None) -> None:
    """Refuse an unknown storage format, or bitmask storage for a pattern that is saved packed 2:4."""
    if storage not in STORAGE:
        raise LLMPruneError(f"unknown --format {storage!r}; use one of {', '.join(STORAGE)}")
    if storage == "bitmask" and pattern in PACKED_PATTERNS:
        raise LLMPruneError(f"a {pattern} model is saved packed 2:4 (as compact, and it runs on the 2:4 kernels); "
                            f"--format bitmask is for unstructured and other N:M patterns")


def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, overwrite: bool = False, storage: str = "auto") -> Path:
    """Write ``model`` (2:4 linears packed, the rest dense safetensors), its tokenizer and ``llmprune.json`` to ``out`` atomically.

    A run pruned with pattern 2:4 declares its pruned linears as packing targets, so a weight that
    is not 2:4 fails loudly instead of being stored dense; other 2:4 linears are packed when found.
    A hybrid:2:4 run declares each linear's dense columns (from the report) the same way.
    ``storage="bitmask"`` stores the pruned linears of any other pattern in the legacy unstructured
    ``sparse-bitmask`` layout (values + bitmask + row offsets) instead of dense.
    """
    tokenizer = tokenizer or getattr(model, "llmprune_tokenizer", None)
    report = getattr(model, "llmprune_report", None)
    targets, hybrid = None, None
    pattern = (report or {}).get("recipe", {}).get("pattern")
    check_storage(storage, pattern)
    if pattern in PACKED_PATTERNS:
        targets = {layer["name"] for layer in report.get("layers", [])}
        hybrid = {layer["name"]: layer.get("dense_columns") or () for layer in report.get("layers", [])}
    elif storage == "bitmask":
        if report is None:
            raise LLMPruneError("--format bitmask stores the linears a pruning run reports; this model has no "
                                "llmprune_report (prune it with llmprune first)")
        targets = {layer["name"] for layer in report.get("layers", [])}
    with atomic_output_dir(out, overwrite) as tmp:
        write_packed(model, tmp, targets=targets, hybrid=hybrid,
                     storage=BITMASK_FORMAT if storage == "bitmask" else SPARSE_FORMAT)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return Path(out)


def read_report(directory: str | os.PathLike) -> dict:
    """The ``llmprune.json`` of a checkpoint, with a clear error when it is missing or corrupt."""
    return read_json(Path(directory) / REPORT_FILE, f"{directory} has no {REPORT_FILE}: it was not written by llmprune prune")


def export_dense(directory: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Unpack a packed checkpoint into an ordinary dense one that plain ``from_pretrained`` loads."""
    from ..models import load_model

    check_output_dir(out, overwrite)
    model = load_model(directory, device="cpu", backend="dense")
    report = Path(directory) / REPORT_FILE
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if model.llmprune_tokenizer is not None:
            model.llmprune_tokenizer.save_pretrained(tmp)
        if report.exists():
            shutil.copy(report, tmp / REPORT_FILE)
    return Path(out)
