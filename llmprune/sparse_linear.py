"""``SparseLinear``: the inference module for a 2:4 linear read from a packed checkpoint.

It keeps only what its backend computes with (``kernels``: dense, semi-structured, triton, numba),
never two copies of the weight; ``backend`` names what runs and ``fallback_reason`` says why that
is not the requested one (a layer whose shape or dtype a kernel does not take runs on the exact
dense path).

Hybrid sparse-dense split (``dense_ranges``, input-column ranges kept dense): the 2:4 part is the
weight's other columns ``S``, run by the backend, and the dense columns ``D`` run as a plain GEMM:
``y = W[:, S]·x[S] + W[:, D]·x[D] + b``, two stock GEMMs whose results add, the inputs gathered
once per part (a view when the part is one contiguous range).

A 2:4 weight whose kept values are 4-bit codes on a per-group grid (``packing.Int24``) runs on the
kernels for those (numba on CPU, Triton on CUDA) or dequantized once (``dense``); the module keeps the
compact form too (codes two per byte, the bitmask, the grid: 0.41 bytes per weight at group size 128), so saving it
again writes exactly what was read.

``weight`` returns the dense ``[out, in]`` weight and ``state_dict()`` holds a dense ``weight`` (and
``bias``) in the replaced module's layout, so ``save_pretrained`` writes a checkpoint that plain
transformers loads. Reading packed tensors is the checkpoint codecs' job, not this module's.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LLMPruneError
from .kernels import Backend, choose_backend
from .packing import (Int24, bitmask_positions, hybrid_columns, is_24, pack_24, pack_nibbles, positions_bitmask,
                      unpack_nibbles)
from .patterns import range_columns


class SparseLinear(nn.Module):
    """A 2:4 linear ``y = x Wᵀ + b`` with ``W`` ``[out, in]``; drop-in for ``nn.Linear`` or GPT-2 ``Conv1D``.

    ``transposed`` marks a ``Conv1D`` replacement: its ``state_dict`` weight is ``[in, out]`` like
    the module it replaced, and the dense backend computes exactly what ``Conv1D`` computes.
    """

    def __init__(self, weight: torch.Tensor | Int24, bias: torch.Tensor | None = None, backend: str = "dense",
                 name: str = "weight", transposed: bool = False,
                 dense_ranges: tuple[tuple[int, int], ...] = (), dtype: torch.dtype | None = None) -> None:
        """``weight`` is the dense ``[out, in]`` weight, 2:4 outside ``dense_ranges``, or an ``Int24``
        (then ``dtype`` is the dense path's compute dtype, float32 by default; no dense ranges)."""
        super().__init__()
        self.name = name
        if isinstance(weight, Int24):
            self._init_int24(weight, bias, backend, transposed, dtype or torch.float32)
            return
        self.out_features, self.in_features = weight.shape
        self.dense_ranges = tuple((int(a), int(b)) for a, b in dense_ranges)
        dense = hybrid_columns(self.in_features, self.dense_ranges, name)
        self.register_buffer("sparse_index", (~dense).nonzero().flatten().to(weight.device), persistent=False)
        self.register_buffer("dense_index", dense.nonzero().flatten().to(weight.device), persistent=False)
        # each index as (start, length) when it is one contiguous run, decided here: reading it on every call
        # would synchronise with the device and break torch.compile's graph
        self._runs = {key: _run(mask) for key, mask in (("sparse_index", ~dense), ("dense_index", dense))}
        self.transposed = transposed
        self.requested_backend = backend
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        for attr in ("int_codes", "int_bitmask", "int_scales", "int_zeros"):
            self.register_buffer(attr, None, persistent=False)
        weight = weight.detach()
        self.register_buffer("dense_weight", weight[:, self.dense_index].contiguous() if self.hybrid else None,
                             persistent=False)  # [out, |D|] of a hybrid layer
        sparse = weight[:, self.sparse_index] if self.hybrid else weight
        if not is_24(sparse):
            raise LLMPruneError(f"{name} is not 2:4 {'outside its dense columns ' if self.hybrid else ''}"
                                f"(a group of 4 inputs holds more than 2 non-zeros, or in_features is not "
                                f"divisible by 4); keep it as nn.Linear")
        # Conv1D's own [in, out] layout for the dense path, so results equal the replaced module's bit for bit.
        self.kernel_backend: Backend
        self.kernel_backend, (values, meta), self.fallback_reason = choose_backend(
            backend, sparse, name, transposed=transposed and not self.hybrid)
        self.kernel = nn.Parameter(values, requires_grad=False)
        self.register_buffer("meta", meta, persistent=False)  # a layout backend's positions

    def _init_int24(self, q: Int24, bias: torch.Tensor | None, backend: str, transposed: bool,
                    dtype: torch.dtype) -> None:
        self.out_features, self.in_features = q.shape
        self.dense_ranges = ()
        self.transposed = transposed
        self.requested_backend = backend
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        for attr in ("sparse_index", "dense_index", "dense_weight"):
            self.register_buffer(attr, None, persistent=False)
        self.register_buffer("int_codes", pack_nibbles(q.codes), persistent=False)
        self.register_buffer("int_bitmask", positions_bitmask(q.positions, self.in_features), persistent=False)
        self.register_buffer("int_scales", q.scales, persistent=False)
        self.register_buffer("int_zeros", q.zeros, persistent=False)
        self.group_size, self.bits = q.group_size, q.bits
        self.kernel_backend, (values, meta), self.fallback_reason = choose_backend(backend, q, self.name, transposed,
                                                                                   dtype)
        self.kernel = nn.Parameter(values, requires_grad=False)
        self.register_buffer("meta", meta, persistent=False)

    def quantized(self) -> Int24 | None:
        """The ``Int24`` this layer was built from (None for a floating-point 2:4 layer)."""
        if self.int_codes is None:
            return None
        return Int24(unpack_nibbles(self.int_codes), bitmask_positions(self.int_bitmask, self.in_features, self.name),
                     self.int_scales, self.int_zeros, self.group_size, self.bits)

    @property
    def backend(self) -> str:
        """The name of the backend that runs this layer."""
        return self.kernel_backend.name

    @property
    def hybrid(self) -> bool:
        return bool(self.dense_ranges)

    @property
    def sparse_weight(self) -> torch.Tensor:
        """The 2:4 part ``[out, |S|]`` (the whole weight unless the layer is hybrid)."""
        return self.kernel_backend.weight(self.kernel, self.meta)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (a view for the dense non-hybrid backend, a new tensor otherwise)."""
        if not self.hybrid:
            return self.sparse_weight
        return join_regions(self.sparse_weight, self.dense_weight, self.dense_ranges)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``compressed``, ``bitmask``) of the 2:4 part, as ``packing.pack_24`` writes them."""
        return pack_24(self.sparse_weight, self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # no cached closure: the kernels as operators torch.compile can trace
            call = functools.partial(self._traced, out_features=self.out_features)
        elif (call := self.__dict__.get("_bound")) is None:  # bound at the first call and after every move (_apply)
            call = self._bound = self.kernel_backend.bind(self.kernel, self.meta)
        if self.hybrid:
            return call(self._columns(x, "sparse_index"), self.bias) + F.linear(self._columns(x, "dense_index"),
                                                                               self.dense_weight)
        return call(x, self.bias)

    def _columns(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """``x[..., index]``: a view when the index is one contiguous run, else a gather."""
        run = self._runs[key]
        return x.narrow(-1, *run) if run else x.index_select(-1, getattr(self, key))

    def _traced(self, x: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
        return self.kernel_backend.traced(x, self.kernel, self.meta, bias, out_features)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_bound", None)  # it holds the tensors as they were
        # model.half() / .to(bfloat16) moves but never casts the compact INT4 form (the checkpoint's float16
        # grid: a cast would lose bits that saving writes back) nor a CPU kernel's layout (float32 values
        # or grid that the kernel alone reads; it takes half inputs instead)
        fixed = [self.int_codes, self.int_bitmask, self.int_scales, self.int_zeros]
        if self.kernel_backend.fixed_dtypes:
            fixed += [self.kernel, self.meta]
        dtypes = {id(t): t.dtype for t in fixed if t is not None}

        def keep_fixed_dtypes(t: torch.Tensor) -> torch.Tensor:
            applied = fn(t)
            return applied if dtypes.get(id(t), applied.dtype) == applied.dtype else t.to(applied.device)

        return super()._apply(keep_fixed_dtypes, recurse)

    # state_dict holds the dense weight in the replaced module's layout, not the kernel's storage.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight.T if self.transposed else self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

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


def _run(mask: torch.Tensor) -> tuple[int, int] | None:
    """(start, length) of the columns ``mask`` marks when they are one non-empty contiguous run, else None."""
    columns = mask.nonzero().flatten().tolist()
    return (columns[0], len(columns)) if columns and columns[-1] - columns[0] + 1 == len(columns) else None


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
