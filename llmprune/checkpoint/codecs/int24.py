"""2:4 with 4-bit codes: the kept values of a 2:4 weight as integers on a per-group grid (``--quantize w4``).

For a linear ``P`` with weight ``[out, in]`` (``in`` divisible by 4), the tensors are:

| tensor | dtype | shape | content |
|---|---|---|---|
| ``P.codes`` | uint8 | ``[out, in/4]`` | the two stored values of every group of 4 as codes 0-15, one byte per group: the first (lower position) in the low nibble, the second in the high nibble |
| ``P.bitmask`` | uint8 | ``[out, ceil(in/8)]`` | which two positions of each group are stored, exactly as in ``sparse-24-bitmask`` |
| ``P.scales`` | float16 | ``[out, ceil(in/G)]`` | the grid's scale per row and group of G dense input columns |
| ``P.zeros`` | float16 | ``[out, ceil(in/G)]`` | its zero point (an integer; 8 everywhere for a symmetric grid) |
| ``P.grid`` | int64 | ``[2]`` | (G, bits) |
| ``P.shape`` | int64 | ``[2, 1]`` | (out, in) |

A stored value reads back as ``(code − zero)·scale``, computed in float32 from the float16 grid; the
other two positions of the group are 0. With G = 128 that is 0.41 bytes per weight, 0.20 of float16.
Reading is strict: every shape, the bitmask's two bits per group, codes within ``2^bits``, a
positive finite grid with integer zero points are checked, the tensor named on failure.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...adapter import linear_weight
from ...errors import LLMPruneError
from ...packing import GROUP, Int24, bitmask_columns, bitmask_positions, dense_shape, pack_nibbles, positions_bitmask, \
    unpack_nibbles
from ...sparse_linear import SparseLinear
from ..safetensors import Section, TensorInfo
from .base import Cast, Codec, Fetch, Ranges, check_entries, owners, tied_to


class Int24Codec(Codec):
    format = "sparse-24-int4"
    structure = "2:4"
    suffixes = ("codes", "bitmask", "scales", "zeros", "grid", "shape")
    kind = "2:4 + INT4 module"

    def select(self, modules, targets, hybrid, aliases):
        """The declared ``targets`` (the pruned linears of a quantized 2:4 run) and every quantized ``SparseLinear``."""
        if hybrid:
            raise LLMPruneError("the 2:4 + INT4 format has no hybrid (dense) region; save a hybrid run without --quantize")
        targets = set(targets or ())
        for name in sorted(targets):
            if name not in modules:
                raise LLMPruneError(f"2:4 + INT4 target {name} is not a module of this model")
            if tied_to(f"{name}.weight", aliases) is not None:
                raise LLMPruneError(f"2:4 + INT4 target {name}.weight is tied to another tensor; it is stored dense")
        return [name for name, module in modules.items() if name in targets
                or (isinstance(module, SparseLinear) and module.quantized() is not None)]

    def section(self, name: str, module: nn.Module, ranges: Ranges, payload: Int24 | None = None) -> Section:
        if isinstance(module, SparseLinear):
            payload = module.quantized()
            out_features, in_features = module.out_features, module.in_features
        else:
            out_features, in_features = linear_weight(module).shape
        if payload is None:
            raise LLMPruneError(f"{name} is declared 2:4 + INT4 but the run left no codes for it "
                                f"(prune with --quantize w4 and save the same model)")
        grid = tuple(payload.scales.shape)
        keys = [(f"{name}.codes", torch.uint8, (out_features, in_features // GROUP)),
                (f"{name}.bitmask", torch.uint8, (out_features, bitmask_columns(in_features))),
                (f"{name}.scales", torch.float16, grid), (f"{name}.zeros", torch.float16, grid),
                (f"{name}.grid", torch.int64, (2,)), (f"{name}.shape", torch.int64, (2, 1))]

        def produce() -> list[tuple[str, torch.Tensor]]:
            tensors = [pack_nibbles(payload.codes), positions_bitmask(payload.positions, in_features),
                       payload.scales, payload.zeros, torch.tensor([payload.group_size, payload.bits]),
                       torch.tensor([[out_features], [in_features]], dtype=torch.int64)]
            return [(key, tensor) for (key, _, _), tensor in zip(keys, tensors)]

        return Section(keys, produce)

    def claims(self, layout: dict[str, TensorInfo], packed: Iterable[str], directory: Path) -> set[str]:
        return set(packed) | owners(layout, ("codes", "scales", "grid"))

    def check(self, name, module, ranges, layout, directory):
        out_features, in_features = self.stored_shape(name, module, directory)
        if in_features % GROUP:
            raise LLMPruneError(f"{name} has in_features {in_features}, not divisible by 4, yet is stored 2:4 + INT4")
        check_entries(layout, directory, name, self.kind,
                      {"codes": ("U8", (out_features, in_features // GROUP)),
                       "bitmask": ("U8", (out_features, bitmask_columns(in_features))),
                       "scales": ("F16", None), "zeros": ("F16", None), "grid": ("I64", (2,)), "shape": ("I64", None)},
                      f"config.json makes {name} [out, in] = [{out_features}, {in_features}]")

    def decode(self, name: str, module: nn.Module, ranges: Ranges, fetch: Fetch, cast: Cast,
               backend: str, device: torch.device) -> SparseLinear:
        out_features, in_features = linear_weight(module).shape
        stored = dense_shape(fetch(f"{name}.shape"), name)
        if stored != (out_features, in_features):
            raise LLMPruneError(f"{name}.shape says (out, in) = {stored}, but config.json makes {name} "
                                f"{(out_features, in_features)}")
        group_size, bits = (int(v) for v in fetch(f"{name}.grid").tolist())
        if not 2 <= bits <= 4 or group_size < GROUP or group_size % GROUP:
            raise LLMPruneError(f"{name}.grid says group size {group_size} and {bits} bits; the format stores 2-4 bit "
                                f"codes in groups of a positive multiple of 4 columns")
        groups = -(-in_features // group_size)
        scales, zeros = fetch(f"{name}.scales"), fetch(f"{name}.zeros")
        for what, tensor in (("scales", scales), ("zeros", zeros)):
            if tuple(tensor.shape) != (out_features, groups):
                raise LLMPruneError(f"{name}.{what} has shape {list(tensor.shape)}; group size {group_size} over "
                                    f"{in_features} inputs needs [{out_features}, {groups}]")
        if not (scales.float().isfinite().all() and (scales.float() > 0).all()):
            raise LLMPruneError(f"{name}.scales holds a value that is not positive and finite; the tensor is corrupt")
        if not ((zeros.float() == zeros.float().round()).all() and (zeros.float() >= 0).all()
                and (zeros.float() <= (1 << bits) - 1).all()):
            raise LLMPruneError(f"{name}.zeros holds a value that is not an integer in [0, {(1 << bits) - 1}]; "
                                f"the tensor is corrupt")
        codes = unpack_nibbles(fetch(f"{name}.codes"))
        if bool((codes >= 1 << bits).any()):
            raise LLMPruneError(f"{name}.codes holds codes of more than {bits} bits; the tensor is corrupt")
        positions = bitmask_positions(fetch(f"{name}.bitmask"), in_features, name)
        q = Int24(codes.to(device), positions.to(device), scales.to(device), zeros.to(device), group_size, bits)
        return SparseLinear(q, module._parameters.get("bias"), backend=backend, name=name,
                            transposed=isinstance(module, Conv1D), dtype=linear_weight(module).dtype)


INT24 = Int24Codec()
