"""How a packed 2:4 weight is kept in memory and multiplied: one ``Backend`` object per kernel family.

Every kernel module has the same four functions: ``unavailable(weight)`` (why it cannot run this
``[out, in]`` 2:4 weight here, or None), ``to_layout(weight, name)`` → ``(values, meta)``, its own
representation, built once at load time, ``linear(x, values, meta, bias)`` → ``x·Wᵀ + b`` and
``from_layout(values, meta)`` → the dense weight; a module may add ``bind(values, meta)``, ``linear`` with
what does not depend on ``x`` prepared once (the numba kernels do: decode calls are short).
``SparseLinear`` holds ``values``/``meta`` and a ``Backend``; ``choose_backend`` resolves ``auto`` and falls back to the exact dense path with a reason.
A 2:4 weight with 4-bit codes (``packing.Int24``) has kernels of its own under the same names
(``numba24q4``, ``triton24q4``: their ``to_layout``/``unavailable`` take the ``Int24``).
The kernel modules import their optional dependencies (numba, triton) only when used.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import LLMPruneError
from ..packing import Int24

# The user-facing names (the CLI lists them).
BACKENDS = ("dense", "semi-structured", "triton", "numba", "auto")


class Backend:
    """A kernel family, under the name users select it by."""

    name: str
    fixed_dtypes = False  # its layout's dtypes are the kernel's own: casting the model must not change them

    def unavailable(self, weight: torch.Tensor) -> str | None:
        raise NotImplementedError

    def prepare(self, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, values: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, values: torch.Tensor, meta: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor | None],
                                                                              torch.Tensor]:
        """``linear`` for these tensors as ``call(x, bias)``; a kernel may prepare what does not depend on ``x``."""
        return lambda x, bias: self.linear(x, values, meta, bias)

    def traced(self, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor | None, bias: torch.Tensor | None,
               out_features: int) -> torch.Tensor:
        """``linear`` as ``torch.compile`` should see it (its default: traced through)."""
        return self.linear(x, values, meta, bias)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class KernelModule(Backend):
    """The four functions of one kernel module (imported on first use: numba and triton are optional)."""

    def __init__(self, name: str, module: str, fixed_dtypes: bool = False, opaque: bool = True) -> None:
        self.name = name
        self._module_name = module
        self.fixed_dtypes = fixed_dtypes
        self.opaque = opaque  # torch.compile cannot trace into it (numba, Triton launches)

    @functools.cached_property
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

    def bind(self, values, meta):
        module = self._module
        return module.bind(values, meta) if hasattr(module, "bind") else super().bind(values, meta)

    def traced(self, x, values, meta, bias, out_features):
        # an opaque kernel becomes one custom operator, its output shape from the operator's fake
        if not self.opaque or _KERNEL_OP is None:
            return self.linear(x, values, meta, bias)
        return _KERNEL_OP(x, values, meta, bias, self._module_name, out_features)


def _kernel_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                   module: str, out_features: int) -> torch.Tensor:
    """A kernel module's ``linear`` as one operator, so that ``torch.compile(model, fullgraph=True)`` and its
    CUDA graphs (``mode="reduce-overhead"``) take models with numba or Triton 2:4 layers."""
    return importlib.import_module(f"{__name__}.{module}").linear(x, values, meta, bias)


def _register_kernel_op():
    """``llmprune::kernel_linear``, or None on a torch without this custom-operator API (torch.compile then
    traces into the kernels and breaks its graph there; eager use is unaffected). The schema is spelled out:
    inferring it from postponed PEP 604 annotations fails on some torch versions."""
    try:
        op = torch.library.custom_op("llmprune::kernel_linear", mutates_args=(), schema=(
            "(Tensor x, Tensor values, Tensor meta, Tensor? bias, str module, int out_features) -> Tensor"))(_kernel_linear)
        op.register_fake(lambda x, values, meta, bias, module, out_features: x.new_empty(*x.shape[:-1], out_features))
    except (AttributeError, TypeError, RuntimeError, ValueError):
        return None
    return op


_KERNEL_OP = _register_kernel_op()


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


class DenseInt(Dense):
    """The exact path for an ``Int24``: dequantized once, in ``dtype``."""

    def __init__(self, dtype: torch.dtype, transposed: bool = False) -> None:
        super().__init__(transposed)
        self.dtype = dtype

    def prepare(self, weight, name):
        return super().prepare(weight.dequantize().to(self.dtype), name)


_KERNELS = {"semi-structured": KernelModule("semi-structured", "semi_structured", opaque=False),  # torch's own subclass
            "triton": KernelModule("triton", "triton24"), "numba": KernelModule("numba", "numba24", True)}
_INT_KERNELS = {"triton": KernelModule("triton", "triton24q4"), "numba": KernelModule("numba", "numba24q4", True)}


def auto_backend(device: torch.device, quantized: bool = False) -> str:
    """What ``auto`` means on ``device``: our numba kernels on CPU; on a GPU, dense for 2:4 fp weights and
    our Triton kernel for 4-bit codes. Measured on an H200 (torch 2.11, fp16, kernels timed as CUDA-graph
    replays, eval/RESULTS.md, "GPU, third session"): no sparse kernel clearly beat cuBLAS's dense GEMV
    (semi-structured 0.37-0.69x on 7B shapes from M=1 to 16; ours at M=1 0.87-1.05x for 2:4, 0.84-1.03x
    for 2:4 + INT4, 0.4-0.7x at M=4-16), so a 2:4 fp weight gains nothing there; a 4-bit one stays 4-bit
    (the dense path would hold 4.6x the bytes) at 0.92x dense decode speed at batch 1 (7B-shaped model)."""
    if device.type == "cuda":
        return "triton" if quantized else "dense"
    return "numba"


def choose_backend(requested: str, weight: torch.Tensor | Int24, name: str, transposed: bool = False,
                   dtype: torch.dtype = torch.float32) -> tuple[Backend, tuple[torch.Tensor, torch.Tensor | None], str | None]:
    """The backend that runs the 2:4 ``weight`` (a dense ``[out, in]`` tensor, or an ``Int24``), its prepared
    tensors, and why it is not ``requested`` (None when it is). A layer a kernel cannot take runs on the
    exact dense path (an ``Int24`` dequantized in ``dtype``)."""
    if requested not in BACKENDS:
        raise LLMPruneError(f"unknown SparseLinear backend {requested!r}; use one of {', '.join(BACKENDS)}")
    quantized = isinstance(weight, Int24)
    device = weight.codes.device if quantized else weight.device
    wanted = auto_backend(device, quantized) if requested == "auto" else requested
    reason = None
    if wanted != "dense":
        backend = (_INT_KERNELS if quantized else _KERNELS).get(wanted)
        reason = f"no {wanted} kernel for 4-bit codes" if backend is None else backend.unavailable(weight)
        if reason is None:
            try:
                return backend, backend.prepare(weight, name), None
            except LLMPruneError as exc:
                reason = str(exc)
    dense = DenseInt(dtype, transposed) if quantized else Dense(transposed)
    return dense, dense.prepare(weight, name), reason


def sparse_backends(device: torch.device, int4: bool = False) -> tuple[str, ...]:
    """The sparse backends worth timing on ``device`` (with ``int4``, also their 2:4 + INT4 kernels,
    named ``NAME+int4``)."""
    backends = ("semi-structured", "triton") if device.type == "cuda" else ("numba",)
    return backends + ((("triton+int4",) if device.type == "cuda" else ("numba+int4",)) if int4 else ())

