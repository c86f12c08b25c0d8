"""Writing a model as a checkpoint: dense tensors as they are, the chosen linears through a codec.

The directory is a transformers checkpoint whose ``config.json`` carries the legacy compressed-tensors
sparsity block when any linear is stored sparse, so tools that read that format recognise it::

    "quantization_config": {
      "quant_method": "compressed-tensors",
      "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                          "targets": ["Linear"], "ignore": ["lm_head"], "global_sparsity": 45.1,
                          "registry_requires_subclass": false}},
    "llmprune_packing": {"version": 1, "packed": [module names], "tied": {alias: stored key},
                         "hybrid": {module name: [[start, end], ...]}},
    "transformers_weights": "this llmprune checkpoint stores its pruned linears packed ... llmprune.load ..."

``targets`` are the class names of the stored modules and ``ignore`` the modules of those classes
left dense (or hybrid, which legacy readers cannot rebuild), as llm-compressor writes them;
``global_sparsity`` is the percentage of zeros over all parameters (the legacy definition).
``llmprune_packing`` sits outside ``quantization_config`` so compressed-tensors' parser never mistakes
it for a quantization scheme. ``transformers_weights`` is a guard (``guard_message``): transformers
(>= 4.53) reads that key as the name of the weights file and refuses one that does not end in
``.safetensors``, quoting it, so plain ``from_pretrained`` fails naming ``llmprune.load`` instead of
loading random weights where the packed linears are (compressed-tensors >= 0.15 no longer decodes the
sparse layouts); ``llmprune.hf_integration`` removes the guard and decodes them.

A tensor shared by several keys (``lm_head`` tied to the embeddings) is stored once, under the first
key in ``state_dict`` order, and never through a codec. The file is streamed
(``safetensors.SafetensorsWriter``): writing needs one layer of extra memory.
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..adapter import is_linear, linear_weight
from ..errors import LLMPruneError
from ..sparse_linear import SparseLinear
from .codecs import Codec, Ranges
from .safetensors import WEIGHTS_NAME, SafetensorsWriter, Section

PACKING_KEY = "llmprune_packing"
PACKING_VERSION = 1
GUARD_KEY = "transformers_weights"


def guard_message(format_name: str) -> str:
    """The ``transformers_weights`` value of a checkpoint with linears stored as ``format_name``: what plain
    transformers quotes when it refuses the checkpoint."""
    return (f"this llmprune checkpoint stores its pruned linears packed ({format_name}), which plain transformers "
            f"cannot rebuild (it would load random weights in their place); load it with llmprune.load(path), "
            f"or import llmprune before from_pretrained")


def state_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor | None, bool]]:
    """What ``model.state_dict()`` holds, in its order, without computing anything: (key, tensor, is a parameter).

    A ``SparseLinear``'s weight appears as ``(key, None, True)``: it only exists packed or in a kernel.
    The tensors may be on the meta device (a skeleton whose layers are loaded one at a time).
    """
    entries: list[tuple[str, torch.Tensor | None, bool]] = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module._parameters.items():
            if isinstance(module, SparseLinear) and name == "kernel":
                entries.append((prefix + "weight", None, True))
            elif param is not None:
                entries.append((prefix + name, param, True))
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                entries.append((prefix + name, buffer, False))
    return entries


def _storage_key(tensor: torch.Tensor) -> tuple:
    if tensor.numel() == 0 or tensor.is_meta:
        return ("object", id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def tied_aliases(entries: Iterable[tuple[str, torch.Tensor | None, bool]]) -> dict[str, str]:
    """``{key: first key}`` for every key whose tensor is the same as an earlier key's (tied weights)."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor, _ in entries:
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for _key, tensor, _ in state_tensors(model):
        if tensor is not None and tensor.is_floating_point():
            return tensor.dtype
    for module in model.modules():
        if isinstance(module, SparseLinear):
            return module.kernel.dtype
    return None


class CheckpointWriter:
    """Writes a model into an existing directory: ``model.safetensors``, ``config.json``, generation config.

    The plan comes from the model's structure alone (a skeleton on the meta device is enough): which
    linears ``codec`` stores (``targets`` declared by a pruning run; without targets, every
    ``SparseLinear`` and every untied 2:4 linear found), the tensor keys, dtypes and shapes. Data is
    produced section by section in ``state_dict`` order, reading each module when the writer reaches
    it, so a caller that materialises one decoder layer at a time calls ``write_ready`` after each and
    ``close`` at the end. With nothing stored through the codec the result is a plain dense
    transformers checkpoint (no ``quantization_config``).
    """

    def __init__(self, model: nn.Module, directory: str | os.PathLike, codec: Codec,
                 targets: set[str] | None = None, hybrid: dict[str, Ranges] | None = None,
                 ranges_later: bool = False, fetch: Callable[[str], torch.Tensor] | None = None,
                 payloads: dict[str, object] | None = None) -> None:
        """``payloads`` maps a linear to what its pruning made besides the weight (a quantized linear's
        ``Int24``), for the codec. ``ranges_later``: the hybrid modules' dense ranges (and the payloads)
        are filled into ``hybrid`` (and ``payloads``) while writing, as each layer is pruned, so those
        tensors are named when produced. ``fetch(key)`` reads a dense tensor the model holds only on the
        meta device (an output head nothing computed with), for the moment it is written."""
        self._payloads = payloads if payloads is not None else {}
        self.model, self.directory, self.codec, self._fetch = model, Path(directory), codec, fetch
        if not self.directory.is_dir():
            raise LLMPruneError(f"{self.directory} is not a directory")
        self._modules = dict(model.named_modules())
        self._hybrid = hybrid if hybrid is not None else {}
        entries = state_tensors(model)
        self.aliases = tied_aliases(entries)
        self.stored = codec.select(self._modules, targets, {} if ranges_later else self._ranges_now(), self.aliases)
        stored = set(self.stored)
        self._zeros = self._total = 0
        sections: list[Section] = []
        self._owners: list[str] = []  # the first key of each section: what must be loaded before it is written
        for key, tensor, is_param in entries:
            if key in self.aliases:
                continue
            module_name, _, leaf = key.rpartition(".")
            if module_name in stored and leaf == "weight":
                sections.append(self._linear(module_name, ranges_later))
            elif tensor is not None:
                sections.append(Section([(key, tensor.dtype, tuple(tensor.shape))], self._dense(key, is_param)))
            else:
                continue
            self._owners.append(key)
        self._file = SafetensorsWriter(self.directory / WEIGHTS_NAME, sections, {"format": "pt"})

    def size_bound(self) -> int:
        """Bytes the directory will need at most while it is written (tensors whose size is known only when
        produced count as their dense weight plus a bitmask; a spooled file counts twice)."""
        total = 0
        for section, owner in zip(self._file.sections, self._owners):
            if section.keys is not None and all(shape is not None for _, _, shape in section.keys):
                total += sum(math.prod(shape) * _itemsize(dtype) for _, dtype, shape in section.keys)
            else:
                weight = linear_weight(self._modules[owner.rpartition(".")[0]])
                total += weight.numel() * _itemsize(weight.dtype) + weight.numel() // 8 + 16 * weight.shape[0]
        return total * (2 if self._file.spooled else 1) + (1 << 20)  # + configs and tokenizer

    def _ranges_now(self) -> dict[str, Ranges]:
        return {name: tuple(tuple(r) for r in ranges) for name, ranges in self._hybrid.items() if ranges}

    def ranges_of(self, name: str) -> Ranges:
        """A stored module's dense column ranges (``SparseLinear`` modules bring their own)."""
        module = self._modules[name]
        if isinstance(module, SparseLinear):
            return module.dense_ranges
        return tuple(tuple(r) for r in self._hybrid.get(name) or ())

    def _linear(self, name: str, ranges_later: bool) -> Section:
        """The codec's section of a stored linear, counting its zeros for ``global_sparsity`` as it is produced."""
        module = self._modules[name]
        planned = None if ranges_later else self.codec.section(name, module, self.ranges_of(name),
                                                                self._payloads.get(name))

        def produce() -> list[tuple[str, torch.Tensor]]:
            self._count(module.weight if isinstance(module, SparseLinear) else linear_weight(module))
            return (planned or self.codec.section(name, module, self.ranges_of(name), self._payloads.get(name))).produce()

        return Section(None if planned is None else planned.keys, produce)

    def _dense(self, key: str, is_param: bool) -> Callable[[], list[torch.Tensor]]:
        """Produces the tensor at ``key`` as the model holds it when the writer gets there."""

        def produce() -> list[tuple[str, torch.Tensor]]:
            tensor = self.model.get_parameter(key) if is_param else self.model.get_buffer(key)
            if tensor.is_meta and self._fetch is not None:
                tensor = self._fetch(key)
            if tensor.is_meta:
                raise LLMPruneError(f"{key} is on the meta device (never loaded); cannot save it")
            if is_param:
                self._count(tensor)
            return [(key, tensor)]

        return produce

    def _count(self, tensor: torch.Tensor) -> None:
        self._total += tensor.numel()
        self._zeros += int((tensor == 0).sum())

    def write_ready(self, ready: Callable[[str], bool]) -> None:
        """Write every pending section, in order, up to the first whose first key is not ``ready``."""
        while not self._file.done and ready(self._owners[self._file.written]):
            self._file.write_next()

    def close(self) -> list[str]:
        """Write the rest and the configs; returns the module names stored through the codec."""
        self._file.close()
        modules = dict(self.model.named_modules())
        config = copy.deepcopy(self.model.config)
        for attr in ("quantization_config", PACKING_KEY, GUARD_KEY):  # a source's weights file name is not ours
            if hasattr(config, attr):
                delattr(config, attr)
        dtype = _model_dtype(self.model)
        if dtype is not None:
            config.dtype = dtype
        if self.stored:
            stored = set(self.stored)
            ranges_of = {name: self.ranges_of(name) for name in self.stored}
            ranges_of = {name: ranges for name, ranges in ranges_of.items() if ranges}
            classes = sorted({_class_name(modules[name]) for name in self.stored})
            ignore = sorted(name for name, module in modules.items()
                            if (name not in stored or name in ranges_of)
                            and (is_linear(module) or isinstance(module, SparseLinear)) and _class_name(module) in classes)
            config.quantization_config = {
                "quant_method": "compressed-tensors",
                "sparsity_config": {
                    "format": self.codec.format,
                    "sparsity_structure": self.codec.structure,
                    "targets": classes,
                    "ignore": ignore,
                    "global_sparsity": round(100.0 * self._zeros / max(self._total, 1), 4),
                    "registry_requires_subclass": False,
                },
            }
            packing = {"version": PACKING_VERSION, "packed": self.stored, "tied": self.aliases}
            if ranges_of:
                packing["hybrid"] = {name: [list(r) for r in ranges] for name, ranges in ranges_of.items()}
            setattr(config, PACKING_KEY, packing)
        config.save_pretrained(self.directory)
        if self.stored:  # save_pretrained never writes this key, so it is added to the file, formatted the same way
            path = self.directory / "config.json"
            written = json.loads(path.read_text(encoding="utf-8"))
            written[GUARD_KEY] = guard_message(self.codec.format)
            path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(self.directory)
        return self.stored

    def abort(self) -> None:
        self._file.abort()


def write_checkpoint(model: nn.Module, directory: str | os.PathLike, codec: Codec, targets: set[str] | None = None,
                     hybrid: dict[str, Ranges] | None = None, payloads: dict[str, object] | None = None) -> list[str]:
    """Write a model held in memory (see ``CheckpointWriter``); returns the module names stored through the codec."""
    writer = CheckpointWriter(model, directory, codec, targets, hybrid, payloads=payloads)
    try:
        return writer.close()
    except BaseException:
        writer.abort()
        raise
