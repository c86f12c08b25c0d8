"""Packed 2:4 (``sparse-24-bitmask``, byte-compatible with the legacy compressed-tensors layout), and the
hybrid sparse-dense split on top of it.

For a 2:4 linear ``P`` with weight ``[out, in]``: ``P.compressed`` ``[out, in/2]`` (model dtype, the two
stored values of every group of 4), ``P.bitmask`` uint8 ``[out, ceil(in/8)]`` (1 = stored) and
``P.shape`` int64 ``[2, 1]`` = ``(out, in)``; see ``packing`` for the bit order and the rules. A hybrid
linear (dense input-column ranges D, listed in ``config.json``'s ``llmprune_packing.hybrid``) packs its
other columns S in order the same way with ``P.shape`` = ``(out, |S|)``, plus ``P.dense`` ``[out, |D|]``.
Reading gives a ``SparseLinear`` on the requested backend.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...adapter import is_linear, linear_weight
from ...errors import LLMPruneError
from ...packing import bitmask_columns, dense_shape, hybrid_columns, is_24, pack_24, unpack_24
from ...patterns import range_columns
from ...sparse_linear import SparseLinear, join_regions
from ..safetensors import Section, TensorInfo
from .base import Cast, Codec, Fetch, Ranges, check_entries, linear_shape, owners, tied_to

HYBRID_SUFFIX = "dense"


def split_regions(weight: torch.Tensor, ranges: Ranges) -> tuple[torch.Tensor, torch.Tensor]:
    """(2:4 part ``[out, |S|]``, dense part ``[out, |D|]``) of a hybrid layer's weight."""
    dense = range_columns(weight.shape[1], ranges, weight.device)
    return weight[:, ~dense], weight[:, dense]


class Sparse24(Codec):
    format = "sparse-24-bitmask"
    structure = "2:4"
    suffixes = ("compressed", "bitmask", "shape")
    kind = "packed 2:4 module"

    def select(self, modules, targets, hybrid, aliases):
        """Every ``SparseLinear`` and the declared ``targets`` (and ``hybrid`` modules); with no declared
        targets (None), every untied linear found to be 2:4. A declared target that is not a linear or
        is tied raises here; one that is not 2:4 raises when it is packed, naming its first crowded group."""
        autodetect = targets is None
        targets = set(targets or ()) | set(hybrid)
        for name in sorted(targets):
            if name not in modules:
                raise LLMPruneError(f"2:4 target {name} is not a module of this model")
            if not (is_linear(modules[name]) or isinstance(modules[name], SparseLinear)):
                raise LLMPruneError(f"2:4 target {name} is a {type(modules[name]).__name__}, not a linear layer")
        packed = []
        for name, module in modules.items():
            if isinstance(module, SparseLinear):
                packed.append(name)
                continue
            if not is_linear(module):
                continue
            key = f"{name}.weight"
            other = tied_to(key, aliases)
            if other is not None:
                if name in targets:
                    raise LLMPruneError(f"2:4 target {key} is tied to {other}; a shared weight is stored dense. "
                                        f"Untie it or drop it from the 2:4 targets.")
                continue
            if name in targets or (autodetect and is_24(linear_weight(module))):
                packed.append(name)
        return packed

    def section(self, name: str, module: nn.Module, ranges: Ranges, payload=None) -> Section:
        if isinstance(module, SparseLinear):
            out_features, in_features, dtype = module.out_features, module.in_features, module.kernel.dtype
        else:
            weight = linear_weight(module)
            (out_features, in_features), dtype = weight.shape, weight.dtype
        dense_columns = int(range_columns(in_features, ranges).sum())
        sparse_columns = in_features - dense_columns

        def produce() -> list[torch.Tensor]:
            if isinstance(module, SparseLinear):
                (compressed, bitmask), dense = module.packed(), module.dense_weight
            else:
                sparse, dense = split_regions(linear_weight(module), ranges)
                compressed, bitmask = pack_24(sparse, f"{name}.weight")
            shape = torch.tensor([[out_features], [sparse_columns]], dtype=torch.int64)
            tensors = [compressed, bitmask, shape] + ([dense.to(dtype) + 0.0] if ranges else [])
            return [(key, tensor) for (key, _, _), tensor in zip(keys, tensors)]

        keys = [(f"{name}.compressed", dtype, (out_features, sparse_columns // 2)),
                (f"{name}.bitmask", torch.uint8, (out_features, bitmask_columns(sparse_columns))),
                (f"{name}.shape", torch.int64, (2, 1))]
        if ranges:
            keys.append((f"{name}.{HYBRID_SUFFIX}", dtype, (out_features, dense_columns)))
        return Section(keys, produce)

    def claims(self, layout: dict[str, TensorInfo], packed: Iterable[str], directory: Path) -> set[str]:
        bitmasked = owners(layout, ("row_offsets",))
        if bitmasked:
            raise LLMPruneError(f"{directory} declares {self.format} but holds {sorted(bitmasked)[0]}.row_offsets "
                                f"(a sparse-bitmask tensor); the checkpoint is inconsistent")
        return set(packed) | owners(layout, self.suffixes)

    def keys(self, name: str, ranges: Ranges) -> list[str]:
        return super().keys(name, ranges) + ([f"{name}.{HYBRID_SUFFIX}"] if ranges else [])

    def check(self, name, module, ranges, layout, directory):
        out_features, in_features = self.stored_shape(name, module, directory)
        dense_columns = int(hybrid_columns(in_features, ranges, f"{directory}: hybrid layer {name}").sum())
        sparse_columns = in_features - dense_columns
        expect = {"compressed": (None, (out_features, sparse_columns // 2)),
                  "bitmask": ("U8", (out_features, bitmask_columns(sparse_columns))),
                  "shape": ("I64", None)}
        if ranges:
            expect[HYBRID_SUFFIX] = (None, (out_features, dense_columns))
        check_entries(layout, directory, name, "hybrid module" if ranges else self.kind, expect,
                      f"config.json makes {name} [out, in] = [{out_features}, {in_features}]"
                      f"{f' with {dense_columns} dense columns' if ranges else ''}")
        if in_features % 4:
            raise LLMPruneError(f"{name} has in_features {in_features}, not divisible by 4, yet is stored packed")

    def decode(self, name: str, module: nn.Module, ranges: Ranges, fetch: Fetch, cast: Cast,
               backend: str, device: torch.device) -> SparseLinear:
        out_features, in_features = linear_shape(module)
        expected = (out_features, in_features - int(range_columns(in_features, ranges).sum()))
        stored = dense_shape(fetch(f"{name}.shape"), name)
        if stored != expected:
            raise LLMPruneError(f"{name}.shape says (out, in) = {stored}, but config.json makes {name}'s "
                                f"{'2:4 part' if ranges else 'weight'} {expected}")
        compressed = cast(fetch(f"{name}.compressed"))
        weight = unpack_24(compressed, cast(fetch(f"{name}.bitmask")), stored, name)
        if ranges:
            weight = join_regions(weight, cast(fetch(f"{name}.{HYBRID_SUFFIX}")), ranges)
        return SparseLinear(weight, module._parameters.get("bias"), backend=backend, name=name,
                            transposed=isinstance(module, Conv1D), dense_ranges=ranges)


SPARSE24 = Sparse24()
