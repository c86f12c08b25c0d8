"""Storage formats of a linear's weight: one ``Codec`` object per format, the same few methods each.

Writing: ``select`` says which linears of a model the codec stores (and refuses declared targets it
cannot store, naming them), ``section`` gives the header entries of one linear's tensors with a
function that produces them when the streaming writer reaches them. Reading: ``claims`` finds the
linears a checkpoint stores with this codec, ``check`` compares their headers with the model built
from ``config.json`` before any data is read, and ``decode`` rebuilds the module.

Every codec stores its tensors where the linear's ``weight`` was, under the module prefix ``P``
(``P.compressed``, ``P.bitmask``, ...); a bias stays ``P.bias``, dense. Tensors no codec takes are
written as they are: that is the dense format (``DENSE``), needing no conversion either way.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ...adapter import is_linear, linear_weight
from ...errors import LLMPruneError
from ..safetensors import Section, TensorInfo

Ranges = tuple[tuple[int, int], ...]
Fetch = Callable[[str], torch.Tensor]
Cast = Callable[[torch.Tensor], torch.Tensor]
DENSE = "dense"


class Codec:
    """One storage format for linears (see the module docstring for the lifecycle)."""

    format: str  # the compressed-tensors sparsity_config format it is declared under
    structure: str  # that config's sparsity_structure
    suffixes: tuple[str, ...]  # the tensors it stores per linear, in file order
    kind: str  # how errors name such a module ("packed 2:4 module")

    def select(self, modules: dict[str, nn.Module], targets: set[str] | None, hybrid: dict[str, Ranges],
               aliases: dict[str, str]) -> list[str]:
        """The module names this codec stores, in ``modules`` order, from the structure alone (the weights
        may not be loaded yet). ``targets`` (declared by a pruning run) must all be storable; None lets
        the codec look for what it can store. ``aliases`` maps each tied tensor key to the key it is
        stored under (tied weights stay dense)."""
        raise NotImplementedError

    def section(self, name: str, module: nn.Module, ranges: Ranges, payload=None) -> Section:
        """The header entries of ``name``'s tensors and the function that produces them; ``payload`` is what
        the pruning run made besides the weight (the ``Int24`` of a quantized linear), when the codec needs it."""
        raise NotImplementedError

    def claims(self, layout: dict[str, TensorInfo], packed: Iterable[str], directory: Path) -> set[str]:
        """Module names a checkpoint stores with this codec: those listed as packed, and those owning its tensors."""
        raise NotImplementedError

    def keys(self, name: str, ranges: Ranges) -> list[str]:
        """The tensor keys one stored module occupies."""
        return [f"{name}.{suffix}" for suffix in self.suffixes]

    def check(self, name: str, module: nn.Module | None, ranges: Ranges, layout: dict[str, TensorInfo],
              directory: Path) -> None:
        raise NotImplementedError

    def stored_shape(self, name: str, module: nn.Module | None, directory: Path) -> tuple[int, int]:
        """``(out, in)`` of the linear the model built from config.json has where ``name``'s tensors go."""
        if not is_linear(module):
            what = "has no such module" if module is None else f"has a {type(module).__name__} there"
            raise LLMPruneError(f"{directory}: tensors {'/'.join(f'{name}.{s}' for s in self.suffixes)} describe "
                                f"a {self.kind} but the model built from config.json {what}")
        return linear_shape(module)

    def decode(self, name: str, module: nn.Module, ranges: Ranges, fetch: Fetch, cast: Cast,
               backend: str, device: torch.device) -> nn.Module:
        """The module that replaces ``module`` (which may be rewritten in place and returned); ``cast`` moves a
        tensor to ``device`` and floating ones to the model's dtype."""
        raise NotImplementedError


def check_entries(layout: dict[str, TensorInfo], directory: Path, name: str, what: str,
                  expect: dict[str, tuple[str | None, tuple[int, ...] | None]], context: str) -> None:
    """Check each ``name.suffix`` of ``expect`` (suffix → (dtype, shape), None = any) against the headers;
    ``what`` names the kind of module, ``context`` where the expected shapes come from."""
    for suffix, (want_dtype, want_shape) in expect.items():
        key = f"{name}.{suffix}"
        if key not in layout:
            raise LLMPruneError(f"{key} is missing from {directory}: {what} {name} needs "
                                f"{', '.join('.' + s for s in expect)}")
        info = layout[key]
        if suffix == "shape" and (info.dtype != "I64" or math.prod(info.shape) != 2):
            raise LLMPruneError(f"{key} must be int64 with 2 elements (out, in); it is {info.dtype} {list(info.shape)}")
        if want_dtype and info.dtype != want_dtype:
            raise LLMPruneError(f"{key} is {info.dtype}; the format stores it as {want_dtype}")
        if want_shape and info.shape != want_shape:
            raise LLMPruneError(f"{key} has shape {list(info.shape)}, but {context}, which needs {list(want_shape)}")


def tied_to(key: str, aliases: dict[str, str]) -> str | None:
    """The other key of a tied pair ``key`` belongs to (None when it is not tied)."""
    if key in aliases:
        return aliases[key]
    return next((alias for alias, source in aliases.items() if source == key), None)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a linear, whatever layout it stores."""
    out_features, in_features = linear_weight(module).shape
    return int(out_features), int(in_features)


def owners(layout: dict[str, TensorInfo], suffixes: Iterable[str]) -> set[str]:
    """Module prefixes of the keys ending in one of ``suffixes``."""
    wanted = set(suffixes)
    return {key.rpartition(".")[0] for key in layout if key.rpartition(".")[2] in wanted}
