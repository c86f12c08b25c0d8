"""Plain ``transformers.from_pretrained`` on an llmprune checkpoint: loaded right, or refused naming ``llmprune.load``.

Our checkpoints declare their sparse linears in the legacy compressed-tensors way
(``quantization_config.sparsity_config.format``: ``sparse-24-bitmask``, ``sparse-bitmask``, or any other
format in ``checkpoint.codecs.CODECS``) and store ``P.compressed``/``P.bitmask``/... where ``P.weight``
was. compressed-tensors >= 0.15 has no sparse decompressor any more, so transformers would build the
model, find no ``P.weight``, initialise those linears at random and only print a table of MISSING keys.
Two mechanisms prevent that:

- **The guard** (written by ``checkpoint.writer``): ``config.json`` carries ``"transformers_weights":
  "<a sentence naming llmprune.load>"``. transformers (>= 4.53) reads that key as the name of the weights
  file and raises ``ValueError`` quoting it, since it does not end in ``.safetensors``. So without llmprune,
  ``from_pretrained`` fails: with compressed-tensors >= 0.15 installed on that ValueError; without it (or
  with an older one, which transformers 5 refuses) already on transformers' ``ImportError`` asking for
  compressed-tensors, whose fix leads to the ValueError. The tensors and the compressed-tensors block stay
  byte for byte what they were, so legacy ``sparse-24-bitmask`` readers that ignore that key still read them.
- **The registration** (this module, when ``llmprune`` is imported): a quantizer for our formats in
  transformers' registry, so ``import llmprune; AutoModelForCausalLM.from_pretrained(dir)`` gives the
  model ``llmprune.load(dir, backend="dense")`` gives, logits bit for bit, whether compressed-tensors is
  installed or not. transformers picks the quantizer by ``quant_method``; ours says
  ``"compressed-tensors"``, which is taken, so the config class registered under that name is wrapped:
  a ``quantization_config`` that one of our codecs declares (and that has no quantization
  ``config_groups``) becomes an ``LLMPruneSparseConfig`` (method ``"llmprune"``, registered with
  ``register_quantization_config``/``register_quantizer``), and every other one goes to the original
  class untouched. The quantizer removes the guard from the config before transformers resolves the
  weights file, swaps each stored linear for a placeholder whose buffers are that linear's stored
  tensors (shapes and dtypes from the safetensors headers, after the same checks ``llmprune.load``
  makes), lets transformers load every tensor by name (device map and dtype included), and then has the
  codec rebuild each module from its placeholder, exactly as ``llmprune.load`` does on the ``dense``
  backend. The quantization config is dropped afterwards, so the result is an ordinary model and
  ``save_pretrained`` writes a dense checkpoint. For the 2:4 kernels use ``llmprune.load(dir, backend=...)``.

A new storage format needs nothing here: a codec in ``CODECS`` is recognised (``reader.declared_format``),
checked (``reader.plan_stored``), loaded (``codec.keys`` name its tensors) and decoded (``codec.decode``),
and the writer guards every checkpoint with a stored linear.

Importing transformers' quantizer registry costs seconds, so ``import llmprune`` does not: ``install``
registers at once when ``transformers.quantizers.auto`` is already imported, and otherwise leaves a
finder on ``sys.meta_path`` that registers right after that module's first import (which any
``from_pretrained`` triggers) and then removes itself. A registration that fails (a transformers whose
API moved) warns and leaves the guard in force: loud, never wrong.
"""
from __future__ import annotations

import copy
import importlib
import importlib.abc
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from .adapter import linear_weight
from .checkpoint.reader import declared_codec, declared_format, plan_stored
from .checkpoint.safetensors import ST_DTYPES, TensorInfo, read_layout
from .checkpoint.writer import GUARD_KEY, PACKING_KEY
from .errors import LLMPruneError

METHOD = "llmprune"  # our name in transformers' quantizer registry
LEGACY_METHOD = "compressed-tensors"  # what our checkpoints' quantization_config declares
REGISTRY_MODULE = "transformers.quantizers.auto"
_TORCH_DTYPES = {name: dtype for dtype, name in ST_DTYPES.items()}
_lock = threading.RLock()
_registered = False


def claims(quantization_config: object) -> bool:
    """True for a ``quantization_config`` dict that llmprune reads: one of our codecs' sparsity format and
    no quantization groups (a compressed-tensors quantized model stays compressed-tensors' business)."""
    quant = quantization_config
    if isinstance(quant, dict) and isinstance(quant.get("quantization_config"), dict):
        quant = quant["quantization_config"]  # the nesting compressed-tensors' from_dict accepts too
    return declared_format(quant) is not None and not quant.get("config_groups")


class PackedPlaceholder(nn.Module):
    """Where transformers loads one stored linear's tensors (``P.compressed``, ``P.bitmask``, ...; ``P.bias``)
    before its codec rebuilds the module; it cannot compute. ``weight`` is a meta tensor of the replaced
    module's weight, not a parameter (so transformers neither expects nor initialises one), for model code
    that looks at it while loading (GPT-2's ``_init_weights`` reads ``c_proj.weight``)."""

    def __init__(self, name: str, entries: dict[str, TensorInfo], replaced: nn.Module) -> None:
        super().__init__()
        self.module_name = name
        self.suffixes = tuple(entries)
        for suffix, info in entries.items():
            if info.dtype not in _TORCH_DTYPES:
                raise LLMPruneError(f"{name}.{suffix} is {info.dtype}, a dtype no llmprune format stores")
            self.register_buffer(suffix, torch.empty(info.shape, dtype=_TORCH_DTYPES[info.dtype], device="meta"))
        self.bias = replaced._parameters.get("bias")
        weight = torch.empty(replaced.weight.shape, dtype=replaced.weight.dtype, device="meta")
        weight._is_hf_initialized = True
        self.weight = weight  # a plain tensor: an attribute, not a parameter or buffer

    def forward(self, *args, **kwargs):
        raise LLMPruneError(f"{self.module_name} still holds its packed tensors (the checkpoint was not decoded); "
                            f"load the checkpoint with llmprune.load(path)")


def _build_classes() -> tuple[type, type]:
    """``LLMPruneSparseConfig`` and ``LLMPruneHfQuantizer``, on the classes of the transformers in use."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LLMPruneSparseConfig(QuantizationConfigMixin):
        """An llmprune checkpoint's ``quantization_config`` while transformers loads it (``raw``: as in config.json)."""

        def __init__(self, **raw) -> None:
            self.raw = copy.deepcopy(raw)
            self.quant_method = METHOD
            self.format = declared_format(raw)
            # The loaded model is an ordinary one: HfQuantizer.postprocess_model drops the quantization config.
            self.dequantize = True

        def to_dict(self) -> dict:
            return copy.deepcopy(self.raw)

    class LLMPruneHfQuantizer(HfQuantizer):
        """Loads the tensors of each stored linear into a ``PackedPlaceholder``, then decodes it with its codec."""

        requires_calibration = True  # only checkpoints written by llmprune: nothing to quantize on the fly

        def __init__(self, quantization_config, **kwargs) -> None:
            super().__init__(quantization_config, **kwargs)
            self._codec = None
            self._stored: dict[str, tuple[nn.Module, tuple]] = {}

        def validate_environment(self, *args, device_map=None, **kwargs) -> None:
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise LLMPruneError("an llmprune checkpoint cannot be offloaded to disk by from_pretrained: its "
                                    "packed linears are decoded in memory; load it on devices that hold it, or with "
                                    "llmprune.load")

        def update_attn_implementation(self, config):
            # Called before transformers resolves the weights file: the guard has done its job.
            if getattr(config, GUARD_KEY, None) is not None:
                try:
                    delattr(config, GUARD_KEY)
                except AttributeError:  # a class-level default
                    setattr(config, GUARD_KEY, None)
            return config

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs) -> None:
            if not checkpoint_files:
                raise LLMPruneError("an llmprune checkpoint loads from its safetensors files, not from a state dict; "
                                    "use llmprune.load(path)")
            directory = Path(checkpoint_files[0]).parent
            packing = getattr(model.config, PACKING_KEY, None) or {}
            codec = declared_codec({"quantization_config": self.quantization_config.raw}, directory)
            layout = read_layout(directory)
            modules = dict(model.named_modules())
            stored, hybrid = plan_stored(codec, packing, layout, modules, directory)
            self._codec = codec
            for name in sorted(stored):
                original, ranges = modules[name], hybrid.get(name, ())
                entries = {key[len(name) + 1:]: layout[key] for key in codec.keys(name, ranges)}
                _replace(model, name, PackedPlaceholder(name, entries, original))
                self._stored[name] = (original, ranges)

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name, (original, ranges) in sorted(self._stored.items()):
                holder = model.get_submodule(name)
                tensors = {f"{name}.{suffix}": getattr(holder, suffix) for suffix in holder.suffixes}
                unloaded = [key for key, tensor in tensors.items() if tensor.is_meta]
                if unloaded:
                    raise LLMPruneError(f"{', '.join(unloaded)} were never loaded by from_pretrained; "
                                        f"load the checkpoint with llmprune.load(path)")
                device = next(iter(tensors.values())).device
                dtype = linear_weight(original).dtype  # what transformers built the model in

                def cast(tensor: torch.Tensor, dtype=dtype, device=device) -> torch.Tensor:
                    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).to(device)

                if holder._parameters.get("bias") is not None:
                    original._parameters["bias"] = holder._parameters["bias"]
                rebuilt = self._codec.decode(name, original, ranges, tensors.__getitem__, cast, "dense", device)
                _replace(model, name, rebuilt)
            self._stored.clear()
            if PACKING_KEY in model.config.__dict__:
                delattr(model.config, PACKING_KEY)
            return model

        def is_serializable(self) -> bool:
            return True  # the loaded model is dense (SparseLinear's state_dict holds the dense weight)

        @property
        def is_trainable(self) -> bool:
            return False

    return LLMPruneSparseConfig, LLMPruneHfQuantizer


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _dispatcher(original: type, ours: type) -> type:
    """A subclass of the config class registered for compressed-tensors whose ``from_dict`` hands our
    checkpoints' configs to ``ours`` and every other one to ``original``, as before."""

    class Dispatch(original):
        _llmprune_original = original

        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
            target = ours if claims(config_dict) else original
            return target.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    Dispatch.__name__ = Dispatch.__qualname__ = f"LLMPruneOr{original.__name__}"
    return Dispatch


def register(auto=None) -> None:
    """Register our checkpoint formats with transformers' quantizer registry (``auto``: its module). Idempotent."""
    global _registered
    with _lock:
        if _registered:
            return
        auto = auto or sys.modules.get(REGISTRY_MODULE) or importlib.import_module(REGISTRY_MODULE)
        config_cls, quantizer_cls = _build_classes()
        configs, quantizers = auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.AUTO_QUANTIZER_MAPPING
        if METHOD not in configs:
            auto.register_quantization_config(METHOD)(config_cls)
        if METHOD not in quantizers:
            auto.register_quantizer(METHOD)(quantizer_cls)
        ours = configs[METHOD]
        original = configs.get(LEGACY_METHOD)
        if original is not None and not hasattr(original, "_llmprune_original"):
            configs[LEGACY_METHOD] = _dispatcher(original, ours)
        _registered = True


def _register_quietly(auto) -> None:
    try:
        register(auto)
    except Exception as exc:  # noqa: BLE001  never break importing transformers; the guard keeps our checkpoints refused
        warnings.warn(f"llmprune could not register its checkpoint formats with transformers ({exc}); "
                      f"from_pretrained will refuse llmprune checkpoints: load them with llmprune.load", stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of transformers' quantizer registry, then registers our formats in it."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _remove_finder()
        _register_quietly(module)

    def __getattr__(self, name):  # get_source, get_filename, ... as the real loader
        return getattr(self._loader, name)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` through the other finders and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegistryFinder)]


def install() -> None:
    """Register now if transformers' quantizer registry is imported, else right after it is (see the module doc)."""
    with _lock:
        module = sys.modules.get(REGISTRY_MODULE)
        if module is not None:
            _register_quietly(module)
        elif not any(isinstance(finder, _RegistryFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegistryFinder())


install()

__all__ = ["METHOD", "PackedPlaceholder", "claims", "install", "register"]
