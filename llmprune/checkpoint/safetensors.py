"""Safetensors I/O of our own: a streaming writer and a strict header reader.

The writer computes the header from shapes first, then asks each ``Section`` for its tensors when it
reaches them, so a whole checkpoint never sits in memory twice (one section at a time is produced,
written and dropped). The reader parses and checks headers without reading data: a truncated file
names the first tensor that is cut off. ``TensorReader`` then reads single tensors by key (mmap).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LLMPruneError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file: data offsets are relative to the data section."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    base: int = 0  # where the data section starts in the file (8 + header length)


@dataclass
class Section:
    """Tensors written together: ``produce`` returns them, in ``keys`` order, when the writer reaches them.
    A shape of None is known only once produced (e.g. the non-zero count of a sparse-bitmask tensor);
    ``keys`` None means even the names are (a hybrid layer's parts, before its dense columns are chosen)."""

    keys: list[tuple[str, torch.dtype, tuple[int, ...] | None]] | None
    produce: Callable[[], list[tuple[str, torch.Tensor]]]


def _tensor_bytes(tensor: torch.Tensor):
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in entries:
        if dtype not in ST_DTYPES:
            raise LLMPruneError(f"{key} has dtype {dtype}, which safetensors cannot store")
        nbytes = math.prod(shape) * ST_SIZES[ST_DTYPES[dtype]]
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


class SafetensorsWriter:
    """A safetensors file streamed section by section, in the order the header lists them.

    When every shape is known up front, the header goes first and each section's data follows as it
    is produced, so only one section is ever held. A shape known only once produced makes the writer
    spool the data into a file beside the target and write header + data at ``close``: the bytes are
    the same either way, the spool costs one extra copy of the data.
    """

    def __init__(self, path: Path, sections: list[Section], metadata: dict[str, str]) -> None:
        if sys.byteorder != "little":
            raise LLMPruneError("writing safetensors needs a little-endian machine")
        self.path = Path(path)
        self.sections = sections
        self.metadata = metadata
        self.written = 0  # sections written so far
        self._entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self._spooled = any(section.keys is None or any(shape is None for _, _, shape in section.keys)
                            for section in sections)
        self._data = self.path.with_name(self.path.name + ".spool") if self._spooled else self.path
        self._handle = open(self._data, "wb")
        if not self._spooled:
            self._handle.write(_header([entry for section in sections for entry in section.keys], metadata))

    @property
    def spooled(self) -> bool:
        return self._spooled

    @property
    def done(self) -> bool:
        return self.written == len(self.sections)

    def write_next(self) -> Section:
        """Produce the next section and write it; returns it."""
        section = self.sections[self.written]
        produced = section.produce()
        for index, (key, tensor) in enumerate(produced):
            if section.keys is not None:
                want_key, dtype, shape = section.keys[index]
                if key != want_key or tensor.dtype != dtype or (shape is not None and tuple(tensor.shape) != shape):
                    raise RuntimeError(f"{key}: produced {tensor.dtype} {tuple(tensor.shape)}, header says "
                                       f"{want_key} {dtype} {shape}")
            self._entries.append((key, tensor.dtype, tuple(tensor.shape)))
            self._handle.write(_tensor_bytes(tensor))
        if section.keys is not None and len(produced) != len(section.keys):
            raise RuntimeError(f"a section produced {len(produced)} tensors, its header lists {len(section.keys)}")
        self.written += 1
        return section

    def close(self) -> None:
        """Write what is left, then make the file complete and durable."""
        while not self.done:
            self.write_next()
        self._handle.flush()
        if not self._spooled:
            os.fsync(self._handle.fileno())
        self._handle.close()
        if self._spooled:
            with open(self.path, "wb") as handle, open(self._data, "rb") as data:
                handle.write(_header(self._entries, self.metadata))
                shutil.copyfileobj(data, handle, 64 << 20)
                handle.flush()
                os.fsync(handle.fileno())
            self._data.unlink()

    def abort(self) -> None:
        self._handle.close()
        if self._spooled:
            self._data.unlink(missing_ok=True)


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
        if dtype not in ST_SIZES or end - start != math.prod(shape) * ST_SIZES[dtype] or start < 0:
            raise LLMPruneError(f"{path}: header entry for {key} is inconsistent ({dtype} {list(shape)} at {start}..{end})")
        layout[key] = TensorInfo(path.name, dtype, shape, start, end, 8 + length)
    cut = sorted((info.start, key) for key, info in layout.items() if info.end > data_size)
    if cut:
        key = cut[0][1]
        raise LLMPruneError(f"{path} is truncated: tensor {key} needs bytes {layout[key].start}..{layout[key].end} "
                            f"of the data section, which has {data_size}; {len(cut)} tensors are cut off. "
                            f"Re-save or re-download the checkpoint.")
    return layout


def read_layout(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory (one file, or shards with an index), from the headers alone."""
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


_TORCH_DTYPES = {name: dtype for dtype, name in ST_DTYPES.items()}


class TensorReader:
    """Reads single tensors of a checkpoint by key into memory of their own (a positioned read, not a
    memory map: pages of a mapped file stay in the process's resident set until it is unmapped, so a
    model streamed layer by layer through a map would look as large as the model). Errors name the
    tensor and the file."""

    def __init__(self, directory: Path, layout: dict[str, TensorInfo]) -> None:
        self.directory = directory
        self.layout = layout
        self._handles: dict[str, object] = {}

    def __call__(self, key: str) -> torch.Tensor:
        info = self.layout[key]
        path = self.directory / info.file
        if info.dtype not in _TORCH_DTYPES:
            raise LLMPruneError(f"cannot read {key} from {path}: dtype {info.dtype} has no torch equivalent here")
        data = torch.empty(info.end - info.start, dtype=torch.uint8)
        try:
            if info.file not in self._handles:
                self._handles[info.file] = open(path, "rb")
            handle = self._handles[info.file]
            handle.seek(info.base + info.start)
            read = handle.readinto(data.numpy()) if data.numel() else 0
        except OSError as exc:
            raise LLMPruneError(f"cannot read {key} from {path}: {exc}") from exc
        if read != data.numel():
            raise LLMPruneError(f"cannot read {key} from {path}: the file ends {data.numel() - read} bytes early")
        return data.view(_TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
