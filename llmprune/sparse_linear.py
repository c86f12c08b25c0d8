"""``SparseLinear``: the inference module for a 2:4 linear loaded from a packed checkpoint.

It is built from the packed tensors (``compressed`` ``[out, in/2]``, ``bitmask``, ``(out, in)``),
validates them, and keeps only what its backend computes with, never two copies of the weight:

- ``dense``: the weight unpacked once, exactly, used with ``F.linear`` (any device, any dtype).
- ``semi-structured``: ``torch.sparse.to_sparse_semi_structured`` of the unpacked weight
  (cuSPARSELt or CUTLASS 2:4 kernels; CUDA, float16/bfloat16). A layer whose shape or dtype the
  kernel does not take falls back to ``dense``; ``backend`` says what it runs and
  ``fallback_reason`` why it is not the requested one.
- ``auto``: ``semi-structured`` where it applies, else ``dense``.

``weight`` returns the dense ``[out, in]`` weight, and ``state_dict()`` holds a dense ``weight``
(and ``bias``) in the replaced module's layout, so ``save_pretrained`` writes a checkpoint that
plain transformers loads, and ``formats.packed.write_packed`` re-packs it exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LLMPruneError
from .formats.sparse24 import is_24, pack_24, unpack_24

BACKENDS = ("dense", "semi-structured", "auto")
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _semi_structured_kernel():
    """The tensor subclass ``to_sparse_semi_structured`` would use, or CUTLASS when cuSPARSELt is missing."""
    from torch.sparse import SparseSemiStructuredTensor

    cusparselt = getattr(torch.backends, "cusparselt", None)
    if SparseSemiStructuredTensor._FORCE_CUTLASS or cusparselt is None or not cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def semi_structured_unavailable(weight: torch.Tensor) -> str | None:
    """Why the 2:4 semi-structured kernels cannot run ``weight`` ``[out, in]`` (None when they can)."""
    if weight.device.type != "cuda":
        return f"weight is on {weight.device.type}, the 2:4 kernels need CUDA"
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        return f"dtype {weight.dtype} (the 2:4 kernels here take float16 or bfloat16)"
    try:
        kernel = _semi_structured_kernel()
    except (ImportError, AttributeError):
        return f"torch {torch.__version__} has no torch.sparse semi-structured tensors"
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"GPU compute capability {major}.{minor} (2:4 sparse tensor cores need 8.0 or newer)"
    limits = getattr(kernel, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(weight.dtype)
    if limits is not None:
        rows, cols = weight.shape
        if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
            return (f"shape {tuple(weight.shape)} is not a multiple of the {kernel.BACKEND} minimum "
                    f"({limits.sparse_min_rows}, {limits.sparse_min_cols}) for {weight.dtype}")
    return None


class SparseLinear(nn.Module):
    """A 2:4 linear ``y = x Wᵀ + b`` with ``W`` ``[out, in]``; drop-in for ``nn.Linear`` or GPT-2 ``Conv1D``.

    ``transposed`` marks a ``Conv1D`` replacement: its ``state_dict`` weight is ``[in, out]`` like
    the module it replaced, and the dense backend computes exactly what ``Conv1D`` computes.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "dense",
                 name: str = "weight", transposed: bool = False) -> None:
        """``weight`` is the dense 2:4 ``[out, in]`` weight; prefer ``from_packed`` when reading files."""
        super().__init__()
        if backend not in BACKENDS:
            raise LLMPruneError(f"unknown SparseLinear backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if not is_24(weight):
            raise LLMPruneError(f"{name} is not 2:4 (a group of 4 inputs holds more than 2 non-zeros, "
                                f"or in_features is not divisible by 4); keep it as nn.Linear")
        self.name = name
        self.out_features, self.in_features = weight.shape
        self.transposed = transposed
        self.requested_backend = backend
        self.backend = "dense"
        self.fallback_reason: str | None = None
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._set_kernel(weight.detach())

    @classmethod
    def from_packed(cls, compressed: torch.Tensor, bitmask: torch.Tensor, shape, bias: torch.Tensor | None = None,
                    backend: str = "dense", name: str = "weight", transposed: bool = False) -> SparseLinear:
        """Build from packed tensors (on the device they are on); the bitmask is validated."""
        return cls(unpack_24(compressed, bitmask, shape, name), bias, backend, name, transposed)

    def _set_kernel(self, weight: torch.Tensor) -> None:
        """Choose the backend for dense ``weight`` ``[out, in]`` and keep only its representation."""
        reason = None
        if self.requested_backend != "dense":
            reason = semi_structured_unavailable(weight)
            if reason is None:
                try:
                    # what torch.sparse.to_sparse_semi_structured does, with CUTLASS when cuSPARSELt is missing
                    kernel = _semi_structured_kernel().from_dense(weight.contiguous())
                    probe = torch.zeros(16, self.in_features, dtype=weight.dtype, device=weight.device)
                    F.linear(probe, kernel, None if self.bias is None else self.bias.to(weight.dtype))
                except (RuntimeError, NotImplementedError, AssertionError) as exc:
                    reason = f"to_sparse_semi_structured failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                else:
                    self.kernel = nn.Parameter(kernel, requires_grad=False)
                    self.backend, self.fallback_reason = "semi-structured", None
                    return
        # Dense: the requested backend, or the per-layer fallback (the reason is kept to report).
        self.backend, self.fallback_reason = "dense", reason
        # Conv1D computes x @ W with W [in, out]: keep that layout so the results are bit-identical.
        dense = weight.T.contiguous() if self.transposed else weight.contiguous()
        self.kernel = nn.Parameter(dense, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (a view for the dense backend, a new tensor otherwise)."""
        if self.backend == "dense":
            return self.kernel.T if self.transposed else self.kernel
        return self.kernel.to_dense()

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``compressed``, ``bitmask``) of the current weight, as ``formats.sparse24.pack_24`` writes them."""
        return pack_24(self.weight, self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "dense" and self.transposed:
            flat = x.reshape(-1, x.shape[-1])
            out = flat @ self.kernel if self.bias is None else torch.addmm(self.bias, flat, self.kernel)
            return out.view(*x.shape[:-1], self.out_features)
        if self.backend == "semi-structured":
            x = x.contiguous()
        return F.linear(x, self.kernel, self.bias)

    # state_dict holds the dense weight in the replaced module's layout, not the kernel's storage.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight.T if self.transposed else self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        packed_keys = [prefix + suffix for suffix in ("compressed", "bitmask", "shape")]
        weight = state_dict.get(prefix + "weight")
        try:
            if weight is None and all(key in state_dict for key in packed_keys):
                weight = unpack_24(*(state_dict[key] for key in packed_keys), prefix.rstrip("."))
            elif weight is not None and self.transposed:
                weight = weight.T
        except LLMPruneError as exc:
            error_msgs.append(str(exc))
            return
        if weight is None:
            if strict:
                missing_keys.append(prefix + "weight")
        elif tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight has shape {tuple(weight.shape)}; this SparseLinear is "
                              f"({self.out_features}, {self.in_features}) as [out, in]")
        elif not is_24(weight):
            error_msgs.append(f"{prefix}weight is not 2:4; a SparseLinear cannot hold it")
        else:
            self._set_kernel(weight.detach().to(device=self.kernel.device, dtype=self.kernel.dtype))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            elif strict:
                missing_keys.append(prefix + "bias")
        if strict:
            known = {prefix + "weight", prefix + "bias", *packed_keys}
            unexpected_keys.extend(key for key in state_dict
                                   if key.startswith(prefix) and "." not in key[len(prefix):] and key not in known)

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend}")
        if self.fallback_reason and self.requested_backend != "dense":
            text += f" (asked {self.requested_backend}: {self.fallback_reason})"
        if self.transposed:
            text += ", transposed=True"
        return text
