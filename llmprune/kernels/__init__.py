"""How a packed 2:4 weight is kept in memory and multiplied: one ``Backend`` object per kernel family.

Every kernel module has the same four functions: ``unavailable(weight)`` (why it cannot run this
``[out, in]`` 2:4 weight here, or None), ``to_layout(weight, name)`` → ``(values, meta)``, its own
representation, built once at load time, ``linear(x, values, meta, bias)`` → ``x·Wᵀ + b`` and
``from_layout(values, meta)`` → the dense weight. ``SparseLinear`` holds ``values``/``meta`` and a
``Backend``; ``choose_backend`` resolves ``auto`` and falls back to the exact dense path with a reason.
The kernel modules import their optional dependencies (numba, triton) only when used.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ..errors import LLMPruneError

# The user-facing names (the CLI lists them).
BACKENDS = ("dense", "semi-structured", "triton", "numba", "auto")


class Backend:
    """A kernel family, under the name users select it by."""

    name: str

    def unavailable(self, weight: torch.Tensor) -> str | None:
        raise NotImplementedError

    def prepare(self, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, values: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class KernelModule(Backend):
    """The four functions of one kernel module (imported on first use: numba and triton are optional)."""

    def __init__(self, name: str, module: str) -> None:
        self.name = name
        self._module_name = module

    @property
    def _module(self):
        return importlib.import_module(f"{__name__}.{self._module_name}")

    def unavailable(self, weight):
        return self._module.unavailable(weight)

    def prepare(self, weight, name):
        return self._module.to_layout(weight, name)

    def linear(self, x, values, meta, bias):
        return self._module.linear(x, values, meta, bias)

    def weight(self, values, meta):
        return self._module.from_layout(values, meta)


class Dense(Backend):
    """The exact path on any device and dtype: the weight unpacked once, ``F.linear``. With
    ``transposed`` it keeps GPT-2 ``Conv1D``'s ``[in, out]`` layout and computes ``x @ W`` as that
    module does, so results are bit-identical to the module it replaced."""

    name = "dense"

    def __init__(self, transposed: bool = False) -> None:
        self.transposed = transposed

    def unavailable(self, weight):
        return None

    def prepare(self, weight, name):
        return (weight.T.contiguous() if self.transposed else weight.contiguous()), None

    def linear(self, x, values, meta, bias):
        if not self.transposed:
            return F.linear(x, values, bias)
        flat = x.reshape(-1, x.shape[-1])
        out = flat @ values if bias is None else torch.addmm(bias, flat, values)
        return out.view(*x.shape[:-1], values.shape[1])

    def weight(self, values, meta):
        return values.T if self.transposed else values


_KERNELS = {"semi-structured": KernelModule("semi-structured", "semi_structured"),
            "triton": KernelModule("triton", "triton24"), "numba": KernelModule("numba", "numba24")}


def auto_backend(device: torch.device) -> str:
    """What ``auto`` means on ``device``: the CUDA 2:4 kernels on a GPU, our numba kernel on CPU."""
    return "semi-structured" if device.type == "cuda" else "numba"


def choose_backend(requested: str, weight: torch.Tensor, name: str, transposed: bool = False
                   ) -> tuple[Backend, tuple[torch.Tensor, torch.Tensor | None], str | None]:
    """The backend that runs the 2:4 ``weight`` ``[out, in]``, its prepared tensors, and why it is not
    ``requested`` (None when it is). A layer a kernel cannot take runs on the exact dense path."""
    if requested not in BACKENDS:
        raise LLMPruneError(f"unknown SparseLinear backend {requested!r}; use one of {', '.join(BACKENDS)}")
    wanted = auto_backend(weight.device) if requested == "auto" else requested
    reason = None
    if wanted != "dense":
        backend = _KERNELS[wanted]
        reason = backend.unavailable(weight)
        if reason is None:
            try:
                return backend, backend.prepare(weight, name), None
            except LLMPruneError as exc:
                reason = str(exc)
    dense = Dense(transposed)
    return dense, dense.prepare(weight, name), reason


def sparse_backends(device: torch.device) -> tuple[str, ...]:
    """The sparse backends worth timing on ``device``."""
    return ("semi-structured", "triton") if device.type == "cuda" else ("numba",)

