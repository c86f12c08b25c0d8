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


def map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, after which
    activation-sized temporaries come from the heaps of the threads that made them and stay resident
    once freed. The one-pass order runs each calibration batch in its own thread, so every thread kept
    its own copies (measured in eval/RESULTS.md, "One-pass memory"). A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``) stops that; process-wide, so
    it is set once, when pruning starts."""
    global _MAPPED
    libc = _libc()
    if libc is not None and not _MAPPED:
        _MAPPED = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20))


_LIBC = None
_MAPPED = False
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def read_json(path: Path, missing: str) -> dict:
    """A JSON file the project wrote, with clear errors: ``missing`` when absent, 'corrupt' when unparsable."""
    from .errors import LLMPruneError

    if not path.exists():
        raise LLMPruneError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LLMPruneError(f"{path} is corrupt: {exc}") from exc
