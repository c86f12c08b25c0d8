"""2:4 packing, byte-compatible with the legacy compressed-tensors ``sparse-24-bitmask`` layout.

A 2:4 weight ``[out, in]`` (``in % 4 == 0``, at most two non-zeros in every group of four
consecutive input weights) is stored as three tensors under its module prefix ``P``:

- ``P.compressed`` ``[out, in/2]``, the weight's dtype: the stored values, exactly two per group,
  row-major and in column order within a row.
- ``P.bitmask`` uint8 ``[out, ceil(in/8)]``: one bit per dense element, bit ``k`` of byte ``b`` is
  column ``8b + k`` (numpy ``packbits(..., bitorder="little")``); 1 = "the value at this position is
  stored". Padding bits past column ``in`` are 0.
- ``P.shape`` int64 ``(out, in)``, written ``[2, 1]`` as the legacy writer and vLLM's loader do.

Groups with more than two zeros (a pruner may zero 3 or 4 weights of a group) still store exactly
two positions, so ``compressed`` is always ``[out, in/2]`` and a reader can reshape without row
offsets. The stored positions are the group's non-zeros first, then its lowest-index zeros, and
those zeros are stored as +0.0. A set bit therefore means "stored", not "non-zero". The legacy
compressor (top-2 by magnitude per group) also marks zeros in such groups, at whatever positions
``topk`` picks among ties, and its decompressor scatters the stored values into a zero tensor, so
either side decodes the other's files to the same dense weight. Decoding is exact: a stored 0.0
comes back as 0.0, every other value bit for bit.

The mask is never recomputed from scores: packing keeps exactly the zeros that are in the weight
and refuses a weight with a group holding more than two non-zeros. ``-0.0`` counts as zero and is
stored as ``+0.0``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import LLMPruneError
from .patterns import range_columns

GROUP = 4
KEEP = 2
PACKABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def bitmask_columns(in_features: int) -> int:
    """Bytes per row of a bitmask over ``in_features`` columns."""
    return (in_features + 7) // 8


def _check_packable(weight: torch.Tensor, name: str) -> None:
    if weight.dim() != 2:
        raise LLMPruneError(f"{name}: 2:4 packing needs a 2-d [out, in] weight; got shape {tuple(weight.shape)}")
    if weight.shape[1] % GROUP:
        in_features = weight.shape[1]
        raise LLMPruneError(f"{name}: 2:4 packing needs in_features divisible by 4; it has "
                            f"{in_features} = {in_features // GROUP}*4+{in_features % GROUP}. Save this tensor dense.")
    if weight.dtype not in PACKABLE_DTYPES:
        raise LLMPruneError(f"{name}: 2:4 packing supports float32/float16/bfloat16/float64 weights; got {weight.dtype}")


def _tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lookup tables over the 16 patterns of a group of 4 (bit k of a pattern = column k of the group).

    ``count[p]``: set bits of ``p``. ``stored[p]``: the two columns stored for a group whose non-zero
    pattern is ``p`` (its non-zeros, then its lowest-index zeros; ascending), meaningless when
    ``count[p] > 2``. For a bitmask nibble with exactly two bits set, ``stored`` gives those bits.
    ``stored_bits[p]``: the same two columns as a nibble.
    """
    count = torch.tensor([bin(p).count("1") for p in range(16)], dtype=torch.int8)
    stored = torch.zeros(16, KEEP, dtype=torch.int64)
    stored_bits = torch.zeros(16, dtype=torch.uint8)
    for pattern in range(16):  # 16 table entries, once at import
        nonzero = [k for k in range(GROUP) if pattern >> k & 1]
        if len(nonzero) > KEEP:
            continue
        zeros = [k for k in range(GROUP) if not pattern >> k & 1]
        columns = sorted(nonzero + zeros[: KEEP - len(nonzero)])
        stored[pattern] = torch.tensor(columns)
        stored_bits[pattern] = sum(1 << k for k in columns)
    return count, stored, stored_bits


_COUNT, _STORED, _STORED_BITS = _tables()


def _patterns(flags: torch.Tensor) -> torch.Tensor:
    """Bool ``[out, in]`` → int64 ``[out, in/4]``: bit k of entry g is ``flags[:, 4g + k]``."""
    out_features, in_features = flags.shape
    groups = flags.to(torch.uint8).reshape(out_features, in_features // GROUP, GROUP)
    packed = groups[..., 0] | (groups[..., 1] << 1) | (groups[..., 2] << 2) | (groups[..., 3] << 3)
    return packed.to(torch.int64)


def _table(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    return table if table.device == device else table.to(device)


def is_24(weight: torch.Tensor) -> bool:
    """True when ``weight`` ``[out, in]`` holds at most two non-zeros in every group of 4 inputs."""
    if weight.dim() != 2 or weight.shape[1] % GROUP or weight.dtype not in PACKABLE_DTYPES:
        return False
    counts = _table(_COUNT, weight.device)[_patterns(weight != 0)]
    return bool((counts <= KEEP).all())


def _stored_pattern(weight: torch.Tensor, name: str) -> torch.Tensor:
    """int64 ``[out, in/4]`` non-zero pattern of every group; raises if one holds more than two non-zeros."""
    _check_packable(weight, name)
    patterns = _patterns(weight != 0)
    crowded = _table(_COUNT, weight.device)[patterns] > KEEP
    if bool(crowded.any()):
        row, group = (int(i) for i in crowded.nonzero()[0])
        raise LLMPruneError(
            f"{name} is declared 2:4 but {int(crowded.sum())} groups of 4 hold more than 2 non-zeros "
            f"(first: row {row}, columns {group * GROUP}..{group * GROUP + GROUP - 1}); "
            f"prune it with --pattern 2:4 or save it dense"
        )
    return patterns


def stored_positions(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Bool ``[out, in]``: the two positions per group that ``pack_24`` stores.

    The non-zeros of each group, topped up with the group's lowest-index zeros. Raises when a
    group holds more than two non-zeros, naming the tensor and the first offending group.
    """
    patterns = _stored_pattern(weight, name)
    columns = _table(_STORED, weight.device)[patterns]
    keep = torch.zeros(*patterns.shape, GROUP, dtype=torch.bool, device=weight.device)
    return keep.scatter_(-1, columns, True).reshape(weight.shape)


def _nibbles_to_bytes(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, in/4]`` of 4-bit group masks → bitmask ``[rows, ceil(in/8)]`` (group 2b low, 2b+1 high)."""
    if nibbles.shape[1] % 2:
        nibbles = F.pad(nibbles, (0, 1))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def pack_24(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 ``weight`` ``[out, in]`` → (``compressed`` ``[out, in/2]``, ``bitmask`` uint8 ``[out, ceil(in/8)]``).

    ``name`` is used in error messages (the module prefix or tensor key).
    """
    weight = weight.detach()
    patterns = _stored_pattern(weight, name)
    out_features, in_features = weight.shape
    columns = _table(_STORED, weight.device)[patterns]  # [out, in/4, 2], ascending within a group
    values = weight.reshape(out_features, in_features // GROUP, GROUP).gather(-1, columns)
    values = values.reshape(out_features, in_features // 2)
    values.masked_fill_(values == 0, 0)  # -0.0 → +0.0; also the zeros that fill sparse groups
    bitmask = _nibbles_to_bytes(_table(_STORED_BITS, weight.device)[patterns])
    return values, bitmask


def hybrid_columns(in_features: int, ranges: Sequence[Sequence[int]], name: str = "weight") -> torch.Tensor:
    """Bool ``[in]`` of a hybrid layer's dense columns, after checking that every range is whole groups
    of 4 inside the layer (the 2:4 part must keep its groups)."""
    for start, end in ranges:
        if not (0 <= start < end <= in_features and start % GROUP == 0 and (end % GROUP == 0 or end == in_features)):
            raise LLMPruneError(f"{name} has dense range {start}:{end}, not whole groups of 4 inside its {in_features} inputs")
    return range_columns(in_features, ranges)


def dense_shape(shape: torch.Tensor | Sequence[int], name: str = "weight") -> tuple[int, int]:
    """``(out, in)`` from a ``.shape`` tensor (``[2]`` or the legacy ``[2, 1]``) or a sequence."""
    values = shape.reshape(-1).tolist() if isinstance(shape, torch.Tensor) else list(shape)
    if len(values) != 2 or any(int(v) != v or v < 0 for v in values):
        raise LLMPruneError(f"{name}.shape must hold two non-negative integers (out, in); got {values}")
    return int(values[0]), int(values[1])


def unpack_24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor | Sequence[int],
              name: str = "weight") -> torch.Tensor:
    """Packed (``compressed``, ``bitmask``, ``shape``) → dense weight ``[out, in]`` in ``compressed``'s dtype.

    Validates the layout and that the bitmask marks exactly two positions in every group of 4;
    errors name ``name`` (the module prefix).
    """
    out_features, in_features = dense_shape(shape, name)
    if in_features % GROUP:
        raise LLMPruneError(f"{name}.shape says in_features={in_features}, which is not divisible by 4; not a 2:4 tensor")
    if tuple(compressed.shape) != (out_features, in_features // 2):
        raise LLMPruneError(f"{name}.compressed has shape {tuple(compressed.shape)}; a 2:4 weight of shape "
                            f"({out_features}, {in_features}) needs ({out_features}, {in_features // 2})")
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (out_features, bitmask_columns(in_features)):
        raise LLMPruneError(f"{name}.bitmask is {bitmask.dtype} {tuple(bitmask.shape)}; expected torch.uint8 "
                            f"({out_features}, {bitmask_columns(in_features)})")
    positions = bitmask_positions(bitmask.to(compressed.device), in_features, name).to(torch.int64)
    groups = in_features // GROUP
    dense = torch.zeros(out_features, groups, GROUP, dtype=compressed.dtype, device=compressed.device)
    dense.scatter_(-1, positions.reshape(out_features, groups, KEEP), compressed.reshape(out_features, groups, KEEP))
    return dense.reshape(out_features, in_features)


# ----------------------------------------------------------------------------- unstructured: sparse-bitmask

def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool ``[out, in]`` → uint8 ``[out, ceil(in/8)]``, bit k of byte b = column 8b + k (little-endian)."""
    out_features, in_features = flags.shape
    padded = F.pad(flags.to(torch.uint8), (0, -in_features % 8)).reshape(out_features, -1, 8)
    weights = (1 << torch.arange(8, device=flags.device, dtype=torch.int32)).to(torch.uint8)
    return (padded * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: bool ``[out, in]``."""
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    bits = (bitmask[..., None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :in_features].bool()


def pack_bitmask(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any ``[out, in]`` weight → legacy compressed-tensors ``sparse-bitmask`` tensors:
    (``compressed`` 1-d non-zeros in row-major order, ``bitmask`` uint8 ``[out, ceil(in/8)]`` with
    1 = non-zero, ``row_offsets`` int64 ``[out]``: where each row starts in ``compressed``)."""
    weight = weight.detach()
    if weight.dim() != 2 or weight.dtype not in PACKABLE_DTYPES:
        raise LLMPruneError(f"{name}: sparse-bitmask storage needs a 2-d float weight; got {weight.dtype} {tuple(weight.shape)}")
    nonzero = weight != 0  # −0.0 counts as zero and is not stored
    counts = nonzero.sum(-1)
    return weight[nonzero], pack_bits(nonzero), torch.cumsum(counts, 0) - counts


def unpack_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor | Sequence[int],
                   row_offsets: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """``sparse-bitmask`` tensors → dense ``[out, in]`` in ``compressed``'s dtype, after checking that
    the bitmask, the value count and the row offsets agree (errors name ``name``)."""
    out_features, in_features = dense_shape(shape, name)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (out_features, bitmask_columns(in_features)):
        raise LLMPruneError(f"{name}.bitmask is {bitmask.dtype} {tuple(bitmask.shape)}; expected torch.uint8 "
                            f"({out_features}, {bitmask_columns(in_features)})")
    if compressed.dim() != 1:
        raise LLMPruneError(f"{name}.compressed must be 1-d (the non-zeros in row-major order); got {tuple(compressed.shape)}")
    bitmask = bitmask.to(compressed.device)
    if bitmask_columns(in_features) and bool((bitmask[:, -1] >> (in_features - 8 * (bitmask.shape[1] - 1))).any()):
        raise LLMPruneError(f"{name}.bitmask is corrupt: bits are set past column {in_features}")
    nonzero = unpack_bits(bitmask, in_features)
    counts = nonzero.sum(-1)
    if int(counts.sum()) != compressed.numel():
        raise LLMPruneError(f"{name}.bitmask marks {int(counts.sum())} values but {name}.compressed holds "
                            f"{compressed.numel()}; the tensors are corrupt or from different layers")
    offsets = row_offsets.reshape(-1).to(device=compressed.device, dtype=torch.int64)
    if offsets.numel() != out_features or not torch.equal(offsets, torch.cumsum(counts, 0) - counts):
        raise LLMPruneError(f"{name}.row_offsets disagrees with the row counts of {name}.bitmask; the tensors are corrupt")
    dense = torch.zeros(out_features, in_features, dtype=compressed.dtype, device=compressed.device)
    dense[nonzero] = compressed
    return dense


# ----------------------------------------------------------------------------- 2:4 with integer codes

class Int24(NamedTuple):
    """A 2:4 weight ``[out, in]`` whose kept values are ``bits``-bit integer codes on a per-group grid:
    the canonical form that the 2:4 + INT4 codec writes and every kernel's ``to_layout`` takes.

    The stored positions are those ``stored_positions`` picks (two per group of 4, ascending); a
    stored value may be 0. Groups of the grid run over ``group_size`` DENSE input columns: column c
    reads ``scales[:, c // group_size]`` and ``zeros[:, c // group_size]``.
    """

    codes: torch.Tensor  # uint8 [out, in/2]: the codes of the two stored positions of each group of 4, column order
    positions: torch.Tensor  # uint8 [out, in/2]: those positions inside their group (0-3), ascending per group
    scales: torch.Tensor  # float16 [out, ceil(in / group_size)]
    zeros: torch.Tensor  # float16 [out, ceil(in / group_size)], integers (2^(bits-1) for a symmetric grid)
    group_size: int
    bits: int = 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], 2 * self.codes.shape[1]

    def columns(self) -> torch.Tensor:
        """int64 ``[out, in/2]``: the dense column of every stored value."""
        base = torch.arange(self.codes.shape[1], device=self.codes.device).div(2, rounding_mode="floor") * GROUP
        return base[None, :] + self.positions.to(torch.int64)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[out, in]``: ``(code − zero)·scale`` at the stored positions (scale and zero read from
        float16), 0 elsewhere. The reference every kernel is tested against."""
        columns = self.columns()
        group = columns.div(self.group_size, rounding_mode="floor")
        scale = self.scales.float().gather(1, group)
        zero = self.zeros.float().gather(1, group)
        values = (self.codes.float() - zero) * scale
        out_features, in_features = self.shape
        dense = torch.zeros(out_features, in_features, dtype=torch.float32, device=self.codes.device)
        return dense.scatter_(1, columns, values)


def int24_from(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, bits: int = 4, name: str = "weight") -> Int24:
    """The ``Int24`` of a 2:4 weight quantized on a grid: ``weight`` ``[out, in]`` its dequantized values
    (which decide the stored positions, as ``pack_24`` does), ``codes`` uint8 ``[out, in]`` the code of
    every position (a pruned one holds its zero point, so a stored zero decodes to 0 either way)."""
    stored = stored_positions(weight, name)
    out_features, in_features = weight.shape
    columns = stored.nonzero()[:, 1].reshape(out_features, in_features // 2)
    return Int24(codes.gather(1, columns).to(torch.uint8), (columns % GROUP).to(torch.uint8), scales.to(torch.float16),
                 zeros.to(torch.float16), group_size, bits)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, 2k]`` of values below 16 → ``[rows, k]``, value 2j in the low nibble of byte j, 2j+1 in the high."""
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def bitmask_positions(bitmask: torch.Tensor, in_features: int, name: str = "weight") -> torch.Tensor:
    """uint8 ``[out, in/2]``: the two positions (0-3, ascending) a 2:4 ``bitmask`` marks in every group of 4,
    after checking it marks exactly two (errors name ``name``)."""
    out_features = bitmask.shape[0]
    groups = in_features // GROUP
    nibbles = torch.stack((bitmask & 0xF, bitmask >> 4), dim=-1).reshape(out_features, -1)[:, :groups].to(torch.int64)
    per_group = _table(_COUNT, bitmask.device)[nibbles]
    wrong = per_group != KEEP
    if bool(wrong.any()):
        row, group = (int(i) for i in wrong.nonzero()[0])
        raise LLMPruneError(
            f"{name}.bitmask is corrupt: {int(wrong.sum())} groups of 4 mark {int(per_group[row, group])} "
            f"positions instead of 2 (first: row {row}, columns {group * GROUP}..{group * GROUP + GROUP - 1})"
        )
    return _table(_STORED, bitmask.device)[nibbles].reshape(out_features, groups * KEEP).to(torch.uint8)


def positions_bitmask(positions: torch.Tensor, in_features: int) -> torch.Tensor:
    """The 2:4 bitmask (``pack_24``'s bit order) of ``positions`` uint8 ``[out, in/2]``."""
    out_features = positions.shape[0]
    bits = torch.ones_like(positions, dtype=torch.uint8) << positions  # one bit per stored value, in its group
    nibbles = bits.reshape(out_features, in_features // GROUP, KEEP).sum(-1, dtype=torch.uint8)
    return _nibbles_to_bytes(nibbles)
