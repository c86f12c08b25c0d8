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


def _libc():
    """glibc, or None elsewhere (musl, macOS, Windows: their allocators are left alone)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # both must exist
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def return_freed_memory() -> None:
    """Give memory freed by Python and torch back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    glibc keeps freed blocks of a few MiB in its heaps (one per thread that allocated), so a process
    that frees a decoder layer's tensors and allocates the next one's keeps growing in RSS although its
    live memory stays flat; trimming after each layer keeps the resident set at what is really in use."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def share_one_heap() -> None:
    """Make every thread allocate from glibc's main heap (``mallopt(M_ARENA_MAX, 1)``).

    The one-pass order runs each calibration batch in a thread of its own; with one heap per thread,
    each kept its own freed activation-sized temporaries (SmolLM2-shaped, 8 layers, 64 × 512: peak
    2.34-2.48 GB against 1.85-1.94 GB with one heap). The threads take turns, so they never contend for
    it. A fixed mmap threshold saves more memory (1.25 GB) but cost ~25% of a SmolLM2-sized run in page
    faults on this kind of machine, though not measurably at the 1B shape (eval/RESULTS.md, "One-pass
    memory"). Process-wide, so set once, when pruning
    starts; nothing elsewhere than glibc."""
    global _SHARED_HEAP
    libc = _libc()
    if libc is not None and not _SHARED_HEAP:
        _SHARED_HEAP = bool(libc.mallopt(_M_ARENA_MAX, 1))


_LIBC = None
_SHARED_HEAP = False
_M_ARENA_MAX = -8  # glibc's malloc.h


def read_json(path: Path, missing: str) -> dict:
    """A JSON file the project wrote, with clear errors: ``missing`` when absent, 'corrupt' when unparsable."""
    from .errors import LLMPruneError

    if not path.exists():
        raise LLMPruneError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LLMPruneError(f"{path} is corrupt: {exc}") from exc
