"""``SparseLinear``: the inference module for a 2:4 linear loaded from a packed checkpoint.

It is built from the packed tensors (``compressed`` ``[out, in/2]``, ``bitmask``, ``(out, in)``),
validates them, and keeps only what its backend computes with, never two copies of the weight:

- ``dense``: the weight unpacked once, exactly, used with ``F.linear`` (any device, any dtype).
- ``semi-structured``: ``torch.sparse.to_sparse_semi_structured`` of the unpacked weight
  (cuSPARSELt or CUTLASS 2:4 kernels; CUDA, float16/bfloat16). A layer whose shape or dtype the
  kernel does not take falls back to ``dense``; ``backend`` says what it runs and
  ``fallback_reason`` why it is not the requested one.
- ``triton``: the decode kernel of ``kernels.triton24`` (kept values + 2-bit positions, read once;
  CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests); in_features must be a multiple of 32.
- ``numba``: the CPU decode kernel of ``kernels.cpu24`` (kept values + one position byte per group
  of 4, float32, needs numba); more than a few rows of ``x`` expand the weight and run a dense GEMM.
- ``auto``: ``semi-structured`` on CUDA and ``numba`` on CPU where they apply, else ``dense``.

Hybrid sparse-dense split (``dense_ranges``, input-column ranges kept dense): the 2:4 part is the
weight's other columns ``S``, run by the backend as above, and the dense columns ``D`` run as a plain
GEMM: ``y = W[:, S]·x[S] + W[:, D]·x[D] + b``, two stock GEMMs whose results add, the inputs
gathered once per part (a view when the part is one contiguous range).

``weight`` returns the dense ``[out, in]`` weight, and ``state_dict()`` holds a dense ``weight``
(and ``bias``) in the replaced module's layout, so ``save_pretrained`` writes a checkpoint that
plain transformers loads, and ``formats.packed.write_packed`` re-packs it exactly.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LLMPruneError
from .patterns import range_columns
from .formats.sparse24 import hybrid_columns, is_24, pack_24, unpack_24
from .kernels import BACKENDS
from .kernels.cpu24 import cpu_unavailable, from_cpu_layout, linear_24_cpu, to_cpu_layout
from .kernels.triton24 import from_layout, linear_24, to_layout, triton_unavailable



class LayoutKernel(NamedTuple):
    """A backend that keeps ``(values, meta)`` in a layout of its own."""
    unavailable: Callable  # weight → why it cannot run it, or None
    to_layout: Callable  # dense 2:4 weight, name → (values, meta)
    from_layout: Callable  # values, meta → dense weight
    linear: Callable  # x, values, meta, bias → x·Wᵀ + b


LAYOUT_KERNELS = {"triton": LayoutKernel(triton_unavailable, to_layout, from_layout, linear_24),
                  "numba": LayoutKernel(cpu_unavailable, to_cpu_layout, from_cpu_layout, linear_24_cpu)}
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
                 name: str = "weight", transposed: bool = False,
                 dense_ranges: tuple[tuple[int, int], ...] = ()) -> None:
        """``weight`` is the dense ``[out, in]`` weight, 2:4 outside ``dense_ranges``; prefer
        ``from_packed`` when reading files."""
        super().__init__()
        if backend not in BACKENDS:
            raise LLMPruneError(f"unknown SparseLinear backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.name = name
        self.out_features, self.in_features = weight.shape
        self.dense_ranges = tuple((int(a), int(b)) for a, b in dense_ranges)
        dense = hybrid_columns(self.in_features, self.dense_ranges, name)
        self.register_buffer("sparse_index", (~dense).nonzero().flatten().to(weight.device), persistent=False)
        self.register_buffer("dense_index", dense.nonzero().flatten().to(weight.device), persistent=False)
        self.register_buffer("dense_weight", None, persistent=False)  # [out, |D|] of a hybrid layer
        self.register_buffer("meta", None, persistent=False)  # the positions of a LAYOUT_KERNELS backend
        self.transposed = transposed
        self.requested_backend = backend
        self.backend = "dense"
        self.fallback_reason: str | None = None
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._set_kernel(weight.detach())

    @classmethod
    def from_packed(cls, compressed: torch.Tensor, bitmask: torch.Tensor, shape, bias: torch.Tensor | None = None,
                    backend: str = "dense", name: str = "weight", transposed: bool = False,
                    dense: torch.Tensor | None = None, dense_ranges: tuple[tuple[int, int], ...] = ()) -> SparseLinear:
        """Build from packed tensors (on the device they are on); the bitmask is validated.

        A hybrid layer brings its dense region ``dense`` ``[out, |D|]`` and ``dense_ranges``; the packed
        part then covers the other columns, in order (``shape`` is that part's ``(out, |S|)``).
        """
        sparse = unpack_24(compressed, bitmask, shape, name)
        if dense is None:
            return cls(sparse, bias, backend, name, transposed)
        return cls(join_regions(sparse, dense, dense_ranges), bias, backend, name, transposed, dense_ranges)

    @property
    def hybrid(self) -> bool:
        return bool(self.dense_ranges)

    def _set_kernel(self, weight: torch.Tensor) -> None:
        """Choose the backend for dense ``weight`` ``[out, in]`` and keep only its representation."""
        sparse_index, dense_index = self.sparse_index.to(weight.device), self.dense_index.to(weight.device)
        self.dense_weight = weight.index_select(1, dense_index).contiguous() if self.hybrid else None
        weight = weight.index_select(1, sparse_index) if self.hybrid else weight
        if not is_24(weight):
            raise LLMPruneError(f"{self.name} is not 2:4 {'outside its dense columns ' if self.hybrid else ''}"
                                f"(a group of 4 inputs holds more than 2 non-zeros, or in_features is not "
                                f"divisible by 4); keep it as nn.Linear")
        reason = None
        self.meta = None
        requested = self.requested_backend
        if requested == "auto" and weight.device.type == "cpu":
            requested = "numba"
        if requested in LAYOUT_KERNELS:
            layout_kernel = LAYOUT_KERNELS[requested]
            reason = layout_kernel.unavailable(weight)
            if reason is None:
                values, self.meta = layout_kernel.to_layout(weight, self.name)
                self.kernel = nn.Parameter(values, requires_grad=False)
                self.backend, self.fallback_reason = requested, None
                return
        elif requested != "dense":
            reason = semi_structured_unavailable(weight)
            if reason is None:
                try:
                    # what torch.sparse.to_sparse_semi_structured does, with CUTLASS when cuSPARSELt is missing
                    kernel = _semi_structured_kernel().from_dense(weight.contiguous())
                    probe = torch.zeros(16, weight.shape[1], dtype=weight.dtype, device=weight.device)
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
        dense = weight.T.contiguous() if self._conv_layout else weight.contiguous()
        self.kernel = nn.Parameter(dense, requires_grad=False)

    @property
    def _conv_layout(self) -> bool:
        return self.transposed and not self.hybrid

    @property
    def sparse_weight(self) -> torch.Tensor:
        """The 2:4 part ``[out, |S|]`` (the whole weight unless the layer is hybrid)."""
        if self.backend == "dense":
            return self.kernel.T if self._conv_layout else self.kernel
        if self.backend in LAYOUT_KERNELS:
            return LAYOUT_KERNELS[self.backend].from_layout(self.kernel, self.meta)
        return self.kernel.to_dense()

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (a view for the dense non-hybrid backend, a new tensor otherwise)."""
        if not self.hybrid:
            return self.sparse_weight
        return join_regions(self.sparse_weight, self.dense_weight, self.dense_ranges)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``compressed``, ``bitmask``) of the 2:4 part, as ``formats.sparse24.pack_24`` writes them."""
        return pack_24(self.sparse_weight, self.name)

    def _sparse_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s 2:4 part times the 2:4 weight, plus the bias, on the kernel's backend."""
        if self.backend in LAYOUT_KERNELS:
            return LAYOUT_KERNELS[self.backend].linear(x, self.kernel, self.meta, self.bias)
        if self.backend == "semi-structured":
            x = x.contiguous()
        return F.linear(x, self.kernel, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hybrid:
            sparse = self._sparse_product(_columns(x, self.sparse_index))
            return sparse + F.linear(_columns(x, self.dense_index), self.dense_weight)
        if self.backend == "dense" and self.transposed:
            flat = x.reshape(-1, x.shape[-1])
            out = flat @ self.kernel if self.bias is None else torch.addmm(self.bias, flat, self.kernel)
            return out.view(*x.shape[:-1], self.out_features)
        return self._sparse_product(x)

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
                if self.hybrid and prefix + "dense" in state_dict:
                    weight = join_regions(weight, state_dict[prefix + "dense"], self.dense_ranges)
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
        else:
            try:
                self._set_kernel(weight.detach().to(device=self.kernel.device, dtype=self.kernel.dtype))
            except LLMPruneError as exc:
                error_msgs.append(f"{prefix}weight: {exc}")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            elif strict:
                missing_keys.append(prefix + "bias")
        if strict:
            known = {prefix + "weight", prefix + "bias", prefix + "dense", *packed_keys}
            unexpected_keys.extend(key for key in state_dict
                                   if key.startswith(prefix) and "." not in key[len(prefix):] and key not in known)

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend}")
        if self.fallback_reason and self.requested_backend != "dense":
            text += f" (asked {self.requested_backend}: {self.fallback_reason})"
        if self.transposed:
            text += ", transposed=True"
        if self.hybrid:
            text += ", dense_columns=" + ",".join(f"{a}:{b}" for a, b in self.dense_ranges)
        return text


def _columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., index]``: a view when ``index`` is one contiguous run, else a gather."""
    if index.numel() and int(index[-1]) - int(index[0]) + 1 == index.numel():
        return x.narrow(-1, int(index[0]), index.numel())
    return x.index_select(-1, index)


def join_regions(sparse: torch.Tensor, dense: torch.Tensor, dense_ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The full ``[out, in]`` weight from a hybrid layer's 2:4 columns ``sparse`` and dense columns ``dense``
    (each in column order); ``dense_ranges`` says where the dense ones go."""
    rows = sparse.shape[0]
    in_features = sparse.shape[1] + dense.shape[1]
    is_dense = range_columns(in_features, dense_ranges)
    if int(is_dense.sum()) != dense.shape[1] or dense.shape[0] != rows:
        raise LLMPruneError(f"dense region {list(dense.shape)} does not match the dense columns "
                            f"{[list(r) for r in dense_ranges]} of a [{rows}, {in_features}] weight")
    weight = torch.empty(rows, in_features, dtype=sparse.dtype, device=sparse.device)
    weight[:, ~is_dense.to(sparse.device)] = sparse
    weight[:, is_dense.to(sparse.device)] = dense.to(sparse.dtype)
    return weight
