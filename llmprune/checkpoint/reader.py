"""Reading a checkpoint for inference: the model from ``config.json`` on the meta device, every tensor
checked against the headers before any data is read, then loaded tensor by tensor, each stored linear
rebuilt by its codec. It never holds more than the checkpoint plus one layer beyond the result.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import LLMPruneError
from ..kernels import BACKENDS
from ..resources import read_json
from ..sparse_linear import SparseLinear
from .codecs import CODECS, Codec, Ranges, codec_for
from .safetensors import TensorInfo, TensorReader, read_layout
from .writer import GUARD_KEY, PACKING_KEY

CONFIG_NAME = "config.json"


def _read_config_json(directory: Path) -> dict:
    return read_json(directory / CONFIG_NAME, f"{directory} has no {CONFIG_NAME}; it is not a saved checkpoint")


def declared_format(quant: object) -> str | None:
    """The storage format of one of our codecs that a ``quantization_config`` (a dict as in config.json)
    declares, or None. Checkpoints written before and after the ``transformers_weights`` guard both declare
    it the same way; ``hf_integration`` uses this too, so a new codec is recognised everywhere at once."""
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return None
    sparsity = quant.get("sparsity_config") or {}
    declared = sparsity.get("format") if isinstance(sparsity, dict) else None
    return declared if declared in CODECS else None


def sparse_format(directory: str | os.PathLike) -> str | None:
    """The sparse storage format ``directory``'s config.json declares (None for a dense checkpoint)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return declared_format(raw.get("quantization_config")) if isinstance(raw, dict) else None


def is_packed_checkpoint(directory: str | os.PathLike) -> bool:
    """True when ``directory``'s config.json declares one of our sparse storage formats."""
    return sparse_format(directory) is not None


def _read_hybrid(packing: dict, directory: Path) -> dict[str, Ranges]:
    """``llmprune_packing.hybrid``: module name → dense column ranges."""
    raw = packing.get("hybrid") or {}
    try:
        return {str(name): tuple((int(a), int(b)) for a, b in ranges) for name, ranges in raw.items() if ranges}
    except (AttributeError, TypeError, ValueError) as exc:
        raise LLMPruneError(f"{directory / CONFIG_NAME}: {PACKING_KEY}.hybrid is corrupt ({exc}); it must map "
                            f"module names to [[start, end], ...]") from exc


def declared_codec(raw: dict, directory: Path) -> Codec:
    """The codec a checkpoint's config.json (``raw``) declares; a clear error when it declares none we read."""
    declared = declared_format(raw.get("quantization_config"))
    if declared is None:
        raise LLMPruneError(f"{directory} is not a packed checkpoint (config.json declares no "
                            f"compressed-tensors {' or '.join(CODECS)} sparsity); load it as a dense model")
    if raw["quantization_config"].get("config_groups"):
        raise LLMPruneError(f"{directory} is quantized as well as 2:4 sparse (quantization_config.config_groups); "
                            f"llmprune reads sparse-only checkpoints")
    return codec_for(declared)


def plan_stored(codec: Codec, packing: dict, layout: dict[str, TensorInfo], modules: dict[str, nn.Module],
                directory: Path) -> tuple[set[str], dict[str, Ranges]]:
    """(module names stored through ``codec``, hybrid dense ranges), every stored module checked against the
    headers (``layout``) and the model built from config.json (``modules``), before any data is read."""
    stored = codec.claims(layout, packing.get("packed", []), directory)
    hybrid = _read_hybrid(packing, directory)
    for name in sorted(set(hybrid) - stored):
        raise LLMPruneError(f"{directory}: config.json lists {name} as a hybrid layer but it is not packed")
    for name in sorted(stored):
        codec.check(name, modules.get(name), hybrid.get(name, ()), layout, directory)
    return stored, hybrid


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise LLMPruneError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return resolved


def build_empty(directory: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model from config.json with parameters on the meta device and real (computed) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
        # never let transformers look for compressed-tensors, nor a save_pretrained of the result carry our guard
        for attr in ("quantization_config", PACKING_KEY, GUARD_KEY):
            if hasattr(config, attr):
                delattr(config, attr)
        if dtype is None:
            dtype = getattr(config, "dtype", None)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LLMPruneError(f"cannot build the model from {directory / CONFIG_NAME}: {str(exc).splitlines()[0]}") from exc


def _set_tensor(module: nn.Module, attr: str, tensor: torch.Tensor) -> torch.Tensor:
    if attr in module._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor
    return tensor


def read_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None, backend: str = "dense"
                    ) -> tuple[nn.Module, dict[str, str], dict[str, str]]:
    """Load a checkpoint with sparse-stored linears as a transformers model, in eval mode.

    ``dtype`` casts floating tensors (default: as stored). ``backend`` says how packed 2:4 linears
    compute (see ``SparseLinear``). Returns the model, ``{module: backend run}`` and ``{module: why it
    is not the requested backend}``. Missing or unexpected tensors, a truncated file, a bitmask that
    does not mark 2 of every 4, or a ``.shape`` that disagrees with config.json raise ``LLMPruneError``
    naming the tensor; no model is returned then.
    """
    if backend not in BACKENDS:
        raise LLMPruneError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    directory = Path(directory)
    device = torch.device(device)
    target_dtype = resolve_dtype(dtype)
    raw = _read_config_json(directory)
    codec = declared_codec(raw, directory)
    packing = raw.get(PACKING_KEY) or {}
    layout = read_layout(directory)
    model = build_empty(directory, target_dtype)
    modules = dict(model.named_modules())

    # --- plan and check everything against the headers before reading any tensor data
    stored, hybrid = plan_stored(codec, packing, layout, modules, directory)

    tied = dict(packing.get("tied", {}))
    for alias, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.setdefault(alias, source)
    dense: list[tuple[str, nn.Module, str]] = []  # (key, owning module, attribute)
    aliases: list[tuple[str, str, nn.Module, str]] = []
    consumed = {key for name in stored for key in codec.keys(name, hybrid.get(name, ()))}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        names = [n for n, p in module._parameters.items() if p is not None]
        names += [n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]
        for attr in names:
            key = prefix + attr
            if module_name in stored and attr == "weight":
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
    fetch = TensorReader(directory, layout)

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if target_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(target_dtype)
        return tensor.to(device)

    loaded = {key: _set_tensor(module, attr, cast(fetch(key))) for key, module, attr in dense}
    for alias, source, module, attr in aliases:
        if source not in loaded:
            raise LLMPruneError(f"{alias} is missing from {directory} and the tensor it is tied to, {source}, is not there either")
        _set_tensor(module, attr, loaded[source])

    backends: dict[str, str] = {}
    fallbacks: dict[str, str] = {}
    for name in sorted(stored):
        rebuilt = codec.decode(name, modules[name], hybrid.get(name, ()), fetch, cast, backend, device)
        if rebuilt is not modules[name]:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)
        if isinstance(rebuilt, SparseLinear):
            backends[name] = rebuilt.backend
            if rebuilt.fallback_reason:
                fallbacks[name] = rebuilt.fallback_reason
    fetch.close()

    for module in model.modules():  # computed buffers (rotary inv_freq) were built on CPU
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
    return model, backends, fallbacks
