"""Packed 2:4 checkpoints: write a model with its 2:4 linears packed, read it back with ``SparseLinear``.

The directory is a transformers checkpoint whose ``config.json`` carries the legacy compressed-tensors
sparsity block, so tools that read that format see a ``sparse-24-bitmask`` model::

    "quantization_config": {
      "quant_method": "compressed-tensors",
      "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                          "targets": ["Linear"], "ignore": ["lm_head"], "global_sparsity": 45.1,
                          "registry_requires_subclass": false}},
    "llmprune_packing": {"version": 1, "packed": [module names], "tied": {alias: stored key},
                         "hybrid": {module name: [[start, end], ...]}}

``targets`` are the class names of the packed modules and ``ignore`` the modules of those classes
left dense, as llm-compressor writes them; ``global_sparsity`` is the percentage of zeros over all
parameters (the legacy definition). ``llmprune_packing`` sits outside ``quantization_config`` so
compressed-tensors' parser never mistakes it for a quantization scheme.

``model.safetensors`` holds, for each packed module ``P``, ``P.compressed``/``P.bitmask``/``P.shape``
(see ``sparse24``) and ``P.bias`` if any; every other tensor dense under its usual key.

A hybrid (sparse-dense split) module ``P`` lists its dense input-column ranges under
``llmprune_packing.hybrid``. Its 2:4 part, the other columns in order, is packed as above with
``P.shape`` = ``(out, |S|)``, and its dense columns are ``P.dense`` ``[out, |D|]`` in the model
dtype, in column order. Legacy ``sparse-24-bitmask`` readers cannot rebuild such a module; it is
listed in the sparsity config's ``ignore``, and only llmprune reads it. A tensor
shared by several keys (``lm_head`` tied to the embeddings) is stored once, under the first key in
``state_dict`` order, and is never packed. The file is streamed: its header is computed from shapes,
then each tensor is packed and written in turn, so writing needs one layer of extra memory.
``write_packed(..., storage="sparse-bitmask")`` writes the legacy unstructured layout instead, for
the storage savings of any sparsity: each target linear ``P`` as ``P.compressed`` (1-d non-zeros,
row-major), ``P.bitmask`` (1 = non-zero), ``P.shape`` (int64 ``[2]``) and ``P.row_offsets`` (int64
``[out]``), with ``format: "sparse-bitmask"``. Such modules load back as ordinary dense linears.

Reading builds the model on the meta device, loads tensor by tensor and replaces each packed linear
with a ``SparseLinear``, so it never holds more than the checkpoint plus one layer beyond the result.
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import LLMPruneError
from ..resources import read_json
from ..sparse_linear import BACKENDS, SparseLinear
from ..patterns import range_columns
from .sparse24 import hybrid_columns, bitmask_columns, dense_shape, is_24, pack_24, pack_bitmask, stored_positions, unpack_bitmask

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
SPARSE_FORMAT = "sparse-24-bitmask"
BITMASK_FORMAT = "sparse-bitmask"
FORMATS = (SPARSE_FORMAT, BITMASK_FORMAT)
PACKING_KEY = "llmprune_packing"
PACKED_SUFFIXES = ("compressed", "bitmask", "shape")
HYBRID_SUFFIX = "dense"
BITMASK_SUFFIXES = ("compressed", "bitmask", "shape", "row_offsets")

Ranges = tuple[tuple[int, int], ...]
_MAX_HEADER = 100 * 1024 * 1024

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


# ----------------------------------------------------------------------------- model traversal

def _linear_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` view of a linear's weight (``Conv1D`` stores ``[in, out]``)."""
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight


def _state_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    """What ``model.state_dict()`` holds, in its order, without computing anything.

    A ``SparseLinear``'s weight appears as ``(key, None)``: it only exists packed or in a kernel.
    """
    entries: list[tuple[str, torch.Tensor | None]] = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module._parameters.items():
            if isinstance(module, SparseLinear) and name == "kernel":
                entries.append((prefix + "weight", None))
            elif param is not None:
                entries.append((prefix + name, param))
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                entries.append((prefix + name, buffer))
    return entries


def _storage_key(tensor: torch.Tensor) -> tuple:
    if tensor.numel() == 0 or tensor.is_meta:
        return ("object", id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def _aliases(entries: Iterable[tuple[str, torch.Tensor | None]]) -> dict[str, str]:
    """``{key: first key}`` for every key whose tensor is the same as an earlier key's (tied weights)."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in entries:
        if tensor is None:
            continue
        storage = _storage_key(tensor)
        if storage in first:
            aliases[key] = first[storage]
        else:
            first[storage] = key
    return aliases


def _class_name(module: nn.Module) -> str:
    if isinstance(module, SparseLinear):
        return "Conv1D" if module.transposed else "Linear"
    return type(module).__name__


def _split_regions(weight: torch.Tensor, ranges: Ranges) -> tuple[torch.Tensor, torch.Tensor]:
    """(2:4 part ``[out, |S|]``, dense part ``[out, |D|]``) of a hybrid layer's weight."""
    dense = range_columns(weight.shape[1], ranges, weight.device)
    return weight[:, ~dense], weight[:, dense]


def _module_ranges(module: nn.Module, hybrid: dict[str, Ranges], name: str) -> Ranges:
    return module.dense_ranges if isinstance(module, SparseLinear) else hybrid.get(name, ())


def choose_packed(model: nn.Module, targets: set[str] | None = None, hybrid: dict[str, Ranges] | None = None) -> list[str]:
    """Names of the linears ``write_packed`` packs: every ``SparseLinear``, every 2:4 ``nn.Linear``/``Conv1D``.

    ``targets`` (module names) must all be packable: each one that is not 2:4, not a linear, or
    tied to another tensor raises, naming it. ``hybrid`` maps module names to their dense column
    ranges: those modules are targets whose other columns must be 2:4. Tied weights are never packed.
    """
    modules = dict(model.named_modules())
    hybrid = hybrid or {}
    targets = set(targets or ()) | set(hybrid)
    for name in sorted(targets):
        if name not in modules:
            raise LLMPruneError(f"2:4 target {name} is not a module of this model")
        if not isinstance(modules[name], (nn.Linear, Conv1D, SparseLinear)):
            raise LLMPruneError(f"2:4 target {name} is a {type(modules[name]).__name__}, not a linear layer")
    aliases = _aliases(_state_tensors(model))
    tied = set(aliases) | set(aliases.values())
    packed = []
    for name, module in modules.items():
        if isinstance(module, SparseLinear):
            packed.append(name)
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        key = f"{name}.weight"
        if key in tied:
            if name in targets:
                other = aliases.get(key) or next(k for k, v in aliases.items() if v == key)
                raise LLMPruneError(f"2:4 target {key} is tied to {other}; a shared weight is stored dense. "
                                    f"Untie it or drop it from the 2:4 targets.")
            continue
        weight = _linear_weight(module)
        if name in hybrid:
            weight = _split_regions(weight, hybrid[name])[0]
        if name in targets:
            if not is_24(weight):
                stored_positions(weight, key)  # raises with the details (shape, dtype, first crowded group)
                raise LLMPruneError(f"{key} cannot be packed as 2:4")
            packed.append(name)
        elif is_24(weight):
            packed.append(name)
    return packed


# ----------------------------------------------------------------------------- safetensors I/O

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file: data offsets are relative to the data section."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class _Section:
    """Tensors written together: ``produce`` returns them in ``keys`` order when the writer reaches them."""

    keys: list[tuple[str, torch.dtype, tuple[int, ...]]]
    produce: Callable[[], list[torch.Tensor]]


def _tensor_bytes(tensor: torch.Tensor):
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def _write_safetensors(path: Path, sections: list[_Section], metadata: dict[str, str]) -> None:
    """Stream ``sections`` into a safetensors file (header first, then each section as produced)."""
    if sys.byteorder != "little":
        raise LLMPruneError("writing safetensors needs a little-endian machine")
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for section in sections:
        for key, dtype, shape in section.keys:
            if dtype not in _ST_DTYPES:
                raise LLMPruneError(f"{key} has dtype {dtype}, which safetensors cannot store")
            nbytes = math.prod(shape) * _ST_SIZES[_ST_DTYPES[dtype]]
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for section in sections:
            tensors = section.produce()
            for (key, dtype, shape), tensor in zip(section.keys, tensors, strict=True):
                if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise RuntimeError(f"{key}: produced {tensor.dtype} {tuple(tensor.shape)}, header says {dtype} {shape}")
                handle.write(_tensor_bytes(tensor))
            del tensors
        handle.flush()
        os.fsync(handle.fileno())


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; a truncated file raises naming the first tensor cut off."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise LLMPruneError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > _MAX_HEADER:
            raise LLMPruneError(f"{path} is truncated or corrupt: its header claims {length} bytes, the file has {size}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LLMPruneError(f"{path} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise LLMPruneError(f"{path} has a corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - length
    layout: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError) as exc:
            raise LLMPruneError(f"{path}: header entry for {key} is corrupt ({entry!r})") from exc
        if dtype not in _ST_SIZES or end - start != math.prod(shape) * _ST_SIZES[dtype] or start < 0:
            raise LLMPruneError(f"{path}: header entry for {key} is inconsistent ({dtype} {list(shape)} at {start}..{end})")
        layout[key] = TensorInfo(path.name, dtype, shape, start, end)
    cut = sorted((info.start, key) for key, info in layout.items() if info.end > data_size)
    if cut:
        key = cut[0][1]
        raise LLMPruneError(f"{path} is truncated: tensor {key} needs bytes {layout[key].start}..{layout[key].end} "
                            f"of the data section, which has {data_size}; {len(cut)} tensors are cut off. "
                            f"Re-save or re-download the checkpoint.")
    return layout


def read_layout(directory: Path) -> dict[str, TensorInfo]:
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LLMPruneError(f"{index} is corrupt: {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_NAME).exists():
        weight_map, files = {}, [WEIGHTS_NAME]
    else:
        raise LLMPruneError(f"{directory} has no {WEIGHTS_NAME} (or {INDEX_NAME}); it is not a saved checkpoint")
    layout: dict[str, TensorInfo] = {}
    for name in files:
        if not (directory / name).exists():
            raise LLMPruneError(f"{directory / name} is missing (listed in {INDEX_NAME})")
        layout.update(read_safetensors_header(directory / name))
    for key, name in weight_map.items():
        if key not in layout or layout[key].file != name:
            raise LLMPruneError(f"{key} is missing from {directory / name} (listed there in {INDEX_NAME})")
    return layout


# ----------------------------------------------------------------------------- writing

def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for _key, tensor in _state_tensors(model):
        if tensor is not None and tensor.is_floating_point():
            return tensor.dtype
    for module in model.modules():
        if isinstance(module, SparseLinear):
            return module.kernel.dtype
    return None


def _global_sparsity(model: nn.Module) -> float:
    """Percentage of zeros over all parameters, each counted once (compressed-tensors' ``global_sparsity``)."""
    zeros = total = 0
    seen: set[tuple] = set()
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if isinstance(module, SparseLinear) and name == "kernel":
                param = module.weight  # count the dense weight, whatever the kernel stores
            else:
                storage = _storage_key(param)
                if storage in seen:
                    continue
                seen.add(storage)
            total += param.numel()
            zeros += int((param == 0).sum())
    return round(100.0 * zeros / max(total, 1), 4)


def _packed_section(name: str, module: nn.Module, ranges: Ranges) -> _Section:
    if isinstance(module, SparseLinear):
        out_features, in_features, dtype = module.out_features, module.in_features, module.kernel.dtype
    else:
        weight = _linear_weight(module)
        (out_features, in_features), dtype = weight.shape, weight.dtype
    dense_columns = int(range_columns(in_features, ranges).sum())
    sparse_columns = in_features - dense_columns

    def produce() -> list[torch.Tensor]:
        if isinstance(module, SparseLinear):
            (compressed, bitmask), dense = module.packed(), module.dense_weight
        else:
            sparse, dense = _split_regions(_linear_weight(module), ranges)
            compressed, bitmask = pack_24(sparse, f"{name}.weight")
        shape = torch.tensor([[out_features], [sparse_columns]], dtype=torch.int64)
        return [compressed, bitmask, shape] + ([dense.to(dtype) + 0.0] if ranges else [])

    keys = [(f"{name}.compressed", dtype, (out_features, sparse_columns // 2)),
            (f"{name}.bitmask", torch.uint8, (out_features, bitmask_columns(sparse_columns))),
            (f"{name}.shape", torch.int64, (2, 1))]
    if ranges:
        keys.append((f"{name}.{HYBRID_SUFFIX}", dtype, (out_features, dense_columns)))
    return _Section(keys, produce)


def _bitmask_section(name: str, module: nn.Module) -> _Section:
    weight = _linear_weight(module)
    (out_features, in_features), nonzeros = weight.shape, int((weight != 0).sum())

    def produce() -> list[torch.Tensor]:
        compressed, bitmask, offsets = pack_bitmask(_linear_weight(module), f"{name}.weight")
        return [compressed, bitmask, torch.tensor([out_features, in_features], dtype=torch.int64), offsets]

    keys = [(f"{name}.compressed", weight.dtype, (nonzeros,)),
            (f"{name}.bitmask", torch.uint8, (out_features, bitmask_columns(in_features))),
            (f"{name}.shape", torch.int64, (2,)),
            (f"{name}.row_offsets", torch.int64, (out_features,))]
    return _Section(keys, produce)


def _choose_bitmask(model: nn.Module, targets: set[str] | None) -> list[str]:
    """The linears stored as ``sparse-bitmask``: the ``targets``, each a plain untied linear."""
    modules = dict(model.named_modules())
    aliases = _aliases(_state_tensors(model))
    tied = set(aliases) | set(aliases.values())
    for name in sorted(targets or ()):
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, Conv1D)):
            what = "not a module of this model" if module is None else f"a {type(module).__name__}"
            raise LLMPruneError(f"sparse-bitmask target {name} is {what}; only nn.Linear/Conv1D weights are stored that way")
        if f"{name}.weight" in tied:
            raise LLMPruneError(f"sparse-bitmask target {name}.weight is tied to another tensor; it is stored dense")
    return [name for name in modules if name in (targets or ())]


def write_packed(model: nn.Module, directory: str | os.PathLike, targets: set[str] | None = None,
                 hybrid: dict[str, Ranges] | None = None, storage: str = SPARSE_FORMAT) -> list[str]:
    """Write ``model`` into the existing ``directory``: ``model.safetensors``, ``config.json``, generation config.

    Every 2:4 linear (and each module named in ``targets``, which must be 2:4) is packed; the rest
    is stored dense. ``hybrid`` names the modules of a sparse-dense split with their dense column
    ranges (``SparseLinear`` modules bring their own). ``storage="sparse-bitmask"`` stores exactly the
    ``targets`` in the unstructured bitmask layout instead. Returns the packed module names. With none
    packed, the result is a plain dense transformers checkpoint (no ``quantization_config``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LLMPruneError(f"{directory} is not a directory")
    if storage not in FORMATS:
        raise LLMPruneError(f"unknown sparse storage format {storage!r}; use one of {', '.join(FORMATS)}")
    modules = dict(model.named_modules())
    hybrid = {name: tuple(tuple(r) for r in ranges) for name, ranges in (hybrid or {}).items() if ranges}
    if storage == BITMASK_FORMAT and hybrid:
        raise LLMPruneError("hybrid layers are stored packed 2:4 + dense; sparse-bitmask storage is for the other patterns")
    packed = _choose_bitmask(model, targets) if storage == BITMASK_FORMAT else choose_packed(model, targets, hybrid)
    layouts = {name: _module_ranges(modules[name], hybrid, name) for name in packed}
    layouts = {name: ranges for name, ranges in layouts.items() if ranges}
    packed_set = set(packed)
    entries = _state_tensors(model)
    aliases = _aliases(entries)
    sections: list[_Section] = []
    for key, tensor in entries:
        if key in aliases:
            continue
        module_name, _, leaf = key.rpartition(".")
        if module_name in packed_set and leaf == "weight" and storage == BITMASK_FORMAT:
            sections.append(_bitmask_section(module_name, modules[module_name]))
        elif module_name in packed_set and leaf == "weight":
            sections.append(_packed_section(module_name, modules[module_name], layouts.get(module_name, ())))
        elif tensor is not None:
            if tensor.is_meta:
                raise LLMPruneError(f"{key} is on the meta device (never loaded); cannot save it")
            sections.append(_Section([(key, tensor.dtype, tuple(tensor.shape))], lambda t=tensor: [t]))
    _write_safetensors(directory / WEIGHTS_NAME, sections, {"format": "pt"})

    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", PACKING_KEY):
        if hasattr(config, attr):
            delattr(config, attr)
    dtype = _model_dtype(model)
    if dtype is not None:
        config.dtype = dtype
    if packed:
        classes = sorted({_class_name(modules[name]) for name in packed})
        ignore = sorted(name for name, module in modules.items()
                        if (name not in packed_set or name in layouts)
                        and isinstance(module, (nn.Linear, Conv1D, SparseLinear)) and _class_name(module) in classes)
        config.quantization_config = {
            "quant_method": "compressed-tensors",
            "sparsity_config": {
                "format": storage,
                "sparsity_structure": "2:4" if storage == SPARSE_FORMAT else "unstructured",
                "targets": classes,
                "ignore": ignore,
                "global_sparsity": _global_sparsity(model),
                "registry_requires_subclass": False,
            },
        }
        packing = {"version": 1, "packed": packed, "tied": aliases}
        if layouts:
            packing["hybrid"] = {name: [list(r) for r in ranges] for name, ranges in layouts.items()}
        setattr(config, PACKING_KEY, packing)
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    return packed


# ----------------------------------------------------------------------------- reading

def _read_config_json(directory: Path) -> dict:
    return read_json(directory / CONFIG_NAME, f"{directory} has no {CONFIG_NAME}; it is not a saved checkpoint")


def is_packed_checkpoint(directory: str | os.PathLike) -> bool:
    """True when ``directory``'s config.json declares compressed-tensors ``sparse-24-bitmask`` or
    ``sparse-bitmask`` sparsity."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    quant = raw.get("quantization_config") or {}
    return (isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"
            and (quant.get("sparsity_config") or {}).get("format") in FORMATS)


def _plan_bitmask(names: set[str], modules: dict[str, nn.Module], layout: dict[str, TensorInfo], directory: Path) -> None:
    """Check every ``sparse-bitmask`` module's tensors against the model built from config.json."""
    for name in sorted(names):
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, Conv1D)):
            what = "has no such module" if module is None else f"has a {type(module).__name__} there"
            raise LLMPruneError(f"{directory}: tensors {name}.compressed/.bitmask/.row_offsets describe a "
                                f"sparse-bitmask linear but the model built from config.json {what}")
        out_features, in_features = _linear_shape(module)
        expect = {"compressed": (None, None), "bitmask": ("U8", (out_features, bitmask_columns(in_features))),
                  "shape": ("I64", None), "row_offsets": ("I64", (out_features,))}
        _check_entries(layout, directory, name, "sparse-bitmask module", expect,
                       f"config.json makes {name} [out, in] = [{out_features}, {in_features}]")


def _check_entries(layout: dict[str, TensorInfo], directory: Path, name: str, what: str,
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


def _read_hybrid(packing: dict, directory: Path) -> dict[str, Ranges]:
    """``llmprune_packing.hybrid``: module name → dense column ranges, checked for shape."""
    raw = packing.get("hybrid") or {}
    try:
        return {str(name): tuple((int(a), int(b)) for a, b in ranges) for name, ranges in raw.items() if ranges}
    except (AttributeError, TypeError, ValueError) as exc:
        raise LLMPruneError(f"{directory / CONFIG_NAME}: {PACKING_KEY}.hybrid is corrupt ({exc}); it must map "
                            f"module names to [[start, end], ...]") from exc


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise LLMPruneError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return resolved


def _build_empty(directory: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model from config.json with parameters on the meta device and real (computed) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
        for attr in ("quantization_config", PACKING_KEY):  # never let transformers look for compressed-tensors
            if hasattr(config, attr):
                delattr(config, attr)
        if dtype is None:
            dtype = getattr(config, "dtype", None)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LLMPruneError(f"cannot build the model from {directory / CONFIG_NAME}: {str(exc).splitlines()[0]}") from exc


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = _linear_weight(module).shape
    return int(out_features), int(in_features)


def read_packed(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                backend: str = "dense") -> nn.Module:
    """Load a packed 2:4 checkpoint as a transformers model whose packed linears are ``SparseLinear``.

    ``dtype`` casts floating tensors (default: as stored). ``backend`` is ``dense``,
    ``semi-structured`` or ``auto`` (see ``SparseLinear``). The model comes back in eval mode with
    ``llmprune_backends`` (module → backend run) and ``llmprune_fallbacks`` (module → why it is not
    the requested backend). Missing or unexpected tensors, a truncated file, a bitmask that does not
    mark 2 of every 4, or a ``.shape`` that disagrees with config.json raise ``LLMPruneError`` naming
    the tensor; no model is returned then.
    """
    from safetensors import SafetensorError, safe_open

    if backend not in BACKENDS:
        raise LLMPruneError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    directory = Path(directory)
    device = torch.device(device)
    target_dtype = _resolve_dtype(dtype)
    raw = _read_config_json(directory)
    if not is_packed_checkpoint(directory):
        raise LLMPruneError(f"{directory} is not a packed checkpoint (config.json declares no "
                            f"compressed-tensors {' or '.join(FORMATS)} sparsity); load it as a dense model")
    quant = raw["quantization_config"]
    if quant.get("config_groups"):
        raise LLMPruneError(f"{directory} is quantized as well as 2:4 sparse (quantization_config.config_groups); "
                            f"llmprune reads sparse-only checkpoints")
    packing = raw.get(PACKING_KEY) or {}
    layout = read_layout(directory)
    model = _build_empty(directory, target_dtype)
    modules = dict(model.named_modules())
    bitmasked = {key.rpartition(".")[0] for key in layout if key.endswith(".row_offsets")}
    if quant["sparsity_config"]["format"] == BITMASK_FORMAT:
        bitmasked |= set(packing.get("packed", []))
        bitmasked |= {key.rpartition(".")[0] for key in layout if key.rpartition(".")[2] in BITMASK_SUFFIXES}
        _plan_bitmask(bitmasked, modules, layout, directory)
    elif bitmasked:
        raise LLMPruneError(f"{directory} declares {SPARSE_FORMAT} but holds {sorted(bitmasked)[0]}.row_offsets "
                            f"(a sparse-bitmask tensor); the checkpoint is inconsistent")

    # --- plan and check everything against the headers before reading any tensor data
    packed = set(packing.get("packed", [])) - bitmasked
    packed |= {key.rpartition(".")[0] for key in layout if key.rpartition(".")[2] in PACKED_SUFFIXES} - bitmasked
    hybrid = _read_hybrid(packing, directory)
    for name in sorted(packed | set(hybrid)):
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, Conv1D)) or name not in packed:
            what = "has no such module" if module is None else f"has a {type(module).__name__} there"
            raise LLMPruneError(f"{directory}: tensors {name}.compressed/.bitmask/.shape describe a packed linear "
                                f"but the model built from config.json {what}" if name in packed else
                                f"{directory}: config.json lists {name} as a hybrid layer but it is not packed")
        out_features, in_features = _linear_shape(module)
        ranges = hybrid.get(name, ())
        dense_columns = int(hybrid_columns(in_features, ranges, f"{directory}: hybrid layer {name}").sum())
        sparse_columns = in_features - dense_columns
        expect = {"compressed": (None, (out_features, sparse_columns // 2)),
                  "bitmask": ("U8", (out_features, bitmask_columns(sparse_columns))),
                  "shape": ("I64", None)}
        if ranges:
            expect[HYBRID_SUFFIX] = (None, (out_features, dense_columns))
        _check_entries(layout, directory, name, "hybrid module" if ranges else "packed 2:4 module", expect,
                       f"config.json makes {name} [out, in] = [{out_features}, {in_features}]"
                       f"{f' with {dense_columns} dense columns' if ranges else ''}")
        if in_features % 4:
            raise LLMPruneError(f"{name} has in_features {in_features}, not divisible by 4, yet is stored packed")

    tied = dict(packing.get("tied", {}))
    for alias, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.setdefault(alias, source)
    dense: list[tuple[str, nn.Module, str]] = []  # (key, owning module, attribute)
    aliases: list[tuple[str, str, nn.Module, str]] = []
    consumed = {f"{name}.{suffix}" for name in packed for suffix in PACKED_SUFFIXES}
    consumed |= {f"{name}.{HYBRID_SUFFIX}" for name in hybrid}
    consumed |= {f"{name}.{suffix}" for name in bitmasked for suffix in BITMASK_SUFFIXES}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        names = [n for n, p in module._parameters.items() if p is not None]
        names += [n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]
        for attr in names:
            key = prefix + attr
            if (module_name in packed or module_name in bitmasked) and attr == "weight":
                continue
            if key in layout:
                current = getattr(module, attr)
                if layout[key].shape != tuple(current.shape):
                    raise LLMPruneError(f"{key} has shape {list(layout[key].shape)} in {directory}, but the model "
                                        f"built from config.json expects {list(current.shape)}")
                dense.append((key, module, attr))
                consumed.add(key)
            elif key in tied and tied[key] in layout:
                aliases.append((key, tied[key], module, attr))
            else:
                raise LLMPruneError(f"{key} is missing from {directory}: the model built from config.json needs it")
    unexpected = sorted(set(layout) - consumed)
    if unexpected:
        raise LLMPruneError(f"{directory} holds tensors the model built from config.json has no place for: "
                            f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")

    # --- load tensor by tensor
    handles: dict[str, object] = {}

    def fetch(key: str) -> torch.Tensor:
        info = layout[key]
        try:
            if info.file not in handles:
                handles[info.file] = safe_open(str(directory / info.file), framework="pt", device="cpu")
            return handles[info.file].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise LLMPruneError(f"cannot read {key} from {directory / info.file}: {exc}") from exc

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if target_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(target_dtype)
        return tensor.to(device)

    loaded: dict[str, torch.Tensor] = {}
    for key, module, attr in dense:
        tensor = cast(fetch(key))
        if attr in module._parameters:
            tensor = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
            module._parameters[attr] = tensor
        else:
            module._buffers[attr] = tensor
        loaded[key] = tensor
    for alias, source, module, attr in aliases:
        if source not in loaded:
            raise LLMPruneError(f"{alias} is missing from {directory} and the tensor it is tied to, {source}, is not there either")
        if attr in module._parameters:
            module._parameters[attr] = loaded[source]
        else:
            module._buffers[attr] = loaded[source]

    for name in sorted(bitmasked):
        module = modules[name]
        weight = unpack_bitmask(*(fetch(f"{name}.{suffix}") for suffix in ("compressed", "bitmask", "shape", "row_offsets")),
                                name=name)
        if tuple(weight.shape) != _linear_shape(module):
            raise LLMPruneError(f"{name}.shape says (out, in) = {tuple(weight.shape)}, but config.json makes {name} "
                                f"{_linear_shape(module)}")
        weight = cast(weight.T.contiguous() if isinstance(module, Conv1D) else weight)
        module._parameters["weight"] = nn.Parameter(weight, requires_grad=True)

    backends: dict[str, str] = {}
    fallbacks: dict[str, str] = {}
    for name in sorted(packed):
        module = modules[name]
        ranges = hybrid.get(name, ())
        out_features, in_features = _linear_shape(module)
        expected = (out_features, in_features - int(range_columns(in_features, ranges).sum()))
        stored = dense_shape(fetch(f"{name}.shape"), name)
        if stored != expected:
            raise LLMPruneError(f"{name}.shape says (out, in) = {stored}, but config.json makes {name}'s "
                                f"{'2:4 part' if ranges else 'weight'} {expected}")
        compressed = cast(fetch(f"{name}.compressed"))
        bitmask = fetch(f"{name}.bitmask").to(device)
        bias = module._parameters.get("bias")
        dense = cast(fetch(f"{name}.{HYBRID_SUFFIX}")) if ranges else None
        sparse = SparseLinear.from_packed(compressed, bitmask, stored, bias=bias, backend=backend, name=name,
                                          transposed=isinstance(module, Conv1D), dense=dense, dense_ranges=ranges)
        del compressed, bitmask
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sparse)
        backends[name] = sparse.backend
        if sparse.fallback_reason:
            fallbacks[name] = sparse.fallback_reason
    handles.clear()

    for module_name, module in model.named_modules():  # computed buffers (rotary inv_freq) were built on CPU
        for attr, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device and not buffer.is_meta:
                module._buffers[attr] = buffer.to(device)
    left = [name for name, p in model.named_parameters() if p.is_meta]
    left += [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise LLMPruneError(f"{directory}: {', '.join(left[:5])} were never loaded (not in the checkpoint)")

    generation = directory / "generation_config.json"
    if generation.exists() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()
    model.llmprune_backends = backends
    model.llmprune_fallbacks = fallbacks
    return model
