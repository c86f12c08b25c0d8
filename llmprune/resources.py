"""Where the offline models and data live: ``$LLMPRUNE_SHARED``, else ``../shared`` beside the repo."""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared folder (may not exist; callers check the files they need)."""
    return Path(os.environ.get("LLMPRUNE_SHARED", REPO_ROOT.parent / "shared")).expanduser()


def shared_file(*parts: str) -> Path | None:
    """A file under the shared folder, or None when it is absent."""
    path = shared_dir().joinpath(*parts)
    return path if path.exists() else None


def peak_rss_mb() -> float:
    """This process's own peak RSS in MiB (VmHWM; ``ru_maxrss`` is inherited across fork+exec on Linux)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def return_freed_memory() -> None:
    """Give memory freed by Python and torch back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    glibc keeps freed blocks of a few MiB in its heaps (one per thread that allocated), so a process
    that frees a decoder layer's tensors and allocates the next one's keeps growing in RSS although its
    live memory stays flat; trimming after each layer keeps the resident set at what is really in use."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def read_json(path: Path, missing: str) -> dict:
    """A JSON file the project wrote, with clear errors: ``missing`` when absent, 'corrupt' when unparsable."""
    from .errors import LLMPruneError

    if not path.exists():
        raise LLMPruneError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LLMPruneError(f"{path} is corrupt: {exc}") from exc
