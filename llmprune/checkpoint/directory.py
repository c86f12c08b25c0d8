"""Checkpoint directories written atomically: a temp dir beside the target, then one rename.

A crash or a full disk leaves either the previous output or nothing, never a half checkpoint that
looks complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import LLMPruneError


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
