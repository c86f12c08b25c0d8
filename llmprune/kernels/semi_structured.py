"""PyTorch's 2:4 semi-structured sparse tensors (cuSPARSELt, else CUTLASS) on CUDA, float16/bfloat16."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LLMPruneError

DTYPES = (torch.float16, torch.bfloat16)


def _tensor_class():
    """The tensor subclass ``to_sparse_semi_structured`` would use, or CUTLASS when cuSPARSELt is missing."""
    from torch.sparse import SparseSemiStructuredTensor

    cusparselt = getattr(torch.backends, "cusparselt", None)
    if SparseSemiStructuredTensor._FORCE_CUTLASS or cusparselt is None or not cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def unavailable(weight: torch.Tensor) -> str | None:
    """Why the 2:4 semi-structured kernels cannot run ``weight`` ``[out, in]`` (None when they can)."""
    if weight.device.type != "cuda":
        return f"weight is on {weight.device.type}, the 2:4 kernels need CUDA"
    if weight.dtype not in DTYPES:
        return f"dtype {weight.dtype} (the 2:4 kernels here take float16 or bfloat16)"
    try:
        kernel = _tensor_class()
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


def to_layout(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, None]:
    """The compressed tensor (what ``torch.sparse.to_sparse_semi_structured`` does, with CUTLASS when
    cuSPARSELt is missing), after one probe product: some shapes pass the checks and fail in the kernel."""
    try:
        kernel = _tensor_class().from_dense(weight.contiguous())
        probe = torch.zeros(16, weight.shape[1], dtype=weight.dtype, device=weight.device)
        F.linear(probe, kernel)
    except (RuntimeError, NotImplementedError, AssertionError) as exc:
        raise LLMPruneError(f"to_sparse_semi_structured failed: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return kernel, None


def from_layout(values: torch.Tensor, meta: None) -> torch.Tensor:
    return values.to_dense()


def linear(x: torch.Tensor, values: torch.Tensor, meta: None, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.contiguous(), values, bias)
