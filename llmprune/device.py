"""Where computation runs: one rule for ``auto`` and one clear error for a missing GPU."""
from __future__ import annotations

import torch

from .errors import LLMPruneError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an explicit CUDA device without CUDA is refused."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LLMPruneError("--device cuda was given but CUDA is not available; use --device cpu or auto")
    return device


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (free GPU memory; the kernel's MemAvailable on CPU,
    or 1 TiB where it cannot tell)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


def to_device(obj, device: torch.device):
    """Move tensors nested in tuples, lists and dicts (a decoder layer's captured arguments); leave the rest."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
