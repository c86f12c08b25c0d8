"""Unstructured storage in the legacy compressed-tensors ``sparse-bitmask`` layout.

For a linear ``P`` with weight ``[out, in]``: ``P.compressed`` (1-d, the non-zeros in row-major order,
model dtype), ``P.bitmask`` uint8 ``[out, ceil(in/8)]`` (1 = non-zero, bit order as in ``packing``),
``P.shape`` int64 ``[2]`` and ``P.row_offsets`` int64 ``[out]`` (where each row starts in
``P.compressed``). A storage format only: such linears load back as ordinary dense linears, exactly,
once the bitmask, the value count and the row offsets are found to agree.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...adapter import is_linear, linear_weight
from ...errors import LLMPruneError
from ...packing import bitmask_columns, pack_bitmask, unpack_bitmask
from ..safetensors import Section, TensorInfo
from .base import Cast, Codec, Fetch, Ranges, check_entries, linear_shape, owners, tied_to


class Bitmask(Codec):
    format = "sparse-bitmask"
    structure = "unstructured"
    suffixes = ("compressed", "bitmask", "shape", "row_offsets")
    kind = "sparse-bitmask module"

    def select(self, modules, targets, hybrid, aliases):
        """Exactly the ``targets``, each a plain untied linear."""
        if hybrid:
            raise LLMPruneError("hybrid layers are stored packed 2:4 + dense; sparse-bitmask storage is for the other patterns")
        targets = set(targets or ())
        for name in sorted(targets):
            module = modules.get(name)
            if not is_linear(module):
                what = "not a module of this model" if module is None else f"a {type(module).__name__}"
                raise LLMPruneError(f"sparse-bitmask target {name} is {what}; only nn.Linear/Conv1D weights are stored that way")
            if tied_to(f"{name}.weight", aliases) is not None:
                raise LLMPruneError(f"sparse-bitmask target {name}.weight is tied to another tensor; it is stored dense")
        return [name for name in modules if name in targets]

    def section(self, name: str, module: nn.Module, ranges: Ranges, payload=None) -> Section:
        out_features, in_features = linear_shape(module)

        def produce() -> list[torch.Tensor]:
            compressed, bitmask, offsets = pack_bitmask(linear_weight(module), f"{name}.weight")
            tensors = [compressed, bitmask, torch.tensor([out_features, in_features], dtype=torch.int64), offsets]
            return [(key, tensor) for (key, _, _), tensor in zip(keys, tensors)]

        keys = [(f"{name}.compressed", linear_weight(module).dtype, None),
                (f"{name}.bitmask", torch.uint8, (out_features, bitmask_columns(in_features))),
                (f"{name}.shape", torch.int64, (2,)),
                (f"{name}.row_offsets", torch.int64, (out_features,))]
        return Section(keys, produce)

    def claims(self, layout: dict[str, TensorInfo], packed: Iterable[str], directory: Path) -> set[str]:
        return set(packed) | owners(layout, self.suffixes)

    def check(self, name, module, ranges, layout, directory):
        out_features, in_features = self.stored_shape(name, module, directory)
        expect = {"compressed": (None, None), "bitmask": ("U8", (out_features, bitmask_columns(in_features))),
                  "shape": ("I64", None), "row_offsets": ("I64", (out_features,))}
        check_entries(layout, directory, name, self.kind, expect,
                      f"config.json makes {name} [out, in] = [{out_features}, {in_features}]")

    def decode(self, name: str, module: nn.Module, ranges: Ranges, fetch: Fetch, cast: Cast,
               backend: str, device: torch.device) -> nn.Module:
        weight = unpack_bitmask(*(fetch(f"{name}.{suffix}") for suffix in self.suffixes), name=name)
        if tuple(weight.shape) != linear_shape(module):
            raise LLMPruneError(f"{name}.shape says (out, in) = {tuple(weight.shape)}, but config.json makes {name} "
                                f"{linear_shape(module)}")
        weight = cast(weight.T.contiguous() if isinstance(module, Conv1D) else weight)
        module._parameters["weight"] = nn.Parameter(weight, requires_grad=True)
        return module


BITMASK = Bitmask()
