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
