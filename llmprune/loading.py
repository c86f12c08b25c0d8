"""Loading models: a causal LM and its tokenizer to prune (a local directory, a .gguf file, or a Hub id),
and a saved checkpoint for inference (sparse-stored linears rebuilt by their codecs, on any backend).

What llmprune learns while loading (tokenizer, source, backends) goes into the model's ``ModelState``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from .checkpoint import is_packed_checkpoint, read_checkpoint
from .checkpoint.reader import build_empty, resolve_dtype
from .checkpoint.safetensors import INDEX_NAME, WEIGHTS_NAME, TensorReader, read_layout
from .device import resolve_device
from .errors import LLMPruneError
from .report import REPORT_FILE, PruneReport
from .state import state

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _resolve_gguf(path: Path) -> tuple[Path, str | None]:
    """Split a checkpoint path into (directory, gguf file name or None)."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise LLMPruneError(f"{path} is a file but not a .gguf; give a model directory or a .gguf file")
        return path.parent, path.name
    if (path / "config.json").exists():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if len(ggufs) > 1:
        raise LLMPruneError(f"{path} holds several .gguf files ({', '.join(ggufs)}); name one of them")
    raise LLMPruneError(f"{path} is not a model: it has no config.json and no .gguf file")


def _detach_gguf_quantizer(model: nn.Module, gguf_file: str) -> None:
    """Make a dequantized GGUF model an ordinary float model, so it can be pruned and saved."""
    if not all(p.dtype.is_floating_point for p in model.parameters()):
        raise LLMPruneError(f"{gguf_file} was loaded with packed GGUF blocks; llmprune needs it dequantized "
                            f"(uninstall the `kernels` package so transformers dequantizes on load)")
    model.hf_quantizer.remove_quantization_config(model)
    for module in model.modules():  # transformers also flags every sub-model's config
        if getattr(getattr(module, "config", None), "_is_quantized", False):
            module.config._is_quantized = False


def load_pretrained(source: str | os.PathLike, dtype: torch.dtype | str | None = None) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer on CPU from a local directory, a .gguf file, or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    extra: dict[str, str] = {}
    if path.is_dir() and is_packed_checkpoint(path):
        raise LLMPruneError(f"{path} is a packed 2:4 checkpoint, already pruned; load it for inference with "
                            f"llmprune.load / llmprune eval, or prune its dense parent")
    if path.exists():
        directory, gguf_file = _resolve_gguf(path)
        location = str(directory)
        if gguf_file:
            extra["gguf_file"] = gguf_file
    elif _HUB_ID.match(str(source)) and not str(source).startswith("."):
        location = str(source)
    else:
        raise LLMPruneError(f"model path {source} does not exist")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype or "auto", **extra)
    except LLMPruneError:
        raise
    except Exception as exc:  # transformers, safetensors and gguf each raise their own types
        where = "local checkpoint" if path.exists() else "Hub id (no local path of that name exists)"
        raise LLMPruneError(f"cannot load model from {source} ({where}): {str(exc).splitlines()[0]}") from exc
    if gguf_file := extra.get("gguf_file"):
        _detach_gguf_quantizer(model, gguf_file)
    model.eval()
    known = state(model)
    known.tokenizer, known.source = tokenizer, str(source)
    return model, tokenizer


def load(source: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         backend: str = "auto") -> nn.Module:
    """Load a (pruned or dense) checkpoint for inference; its tokenizer and report come along in ``state(model)``.

    A checkpoint with sparse-stored linears is built directly on ``device``, its packed 2:4 linears as
    ``SparseLinear``: ``backend`` ``auto`` uses the 2:4 kernels where they apply and the exact dense
    path elsewhere (``state(model).fallbacks`` says which layers fell back and why).
    """
    path = Path(source).expanduser()
    if path.is_dir() and is_packed_checkpoint(path):
        model, backends, fallbacks = read_checkpoint(path, device=resolve_device(device), dtype=dtype, backend=backend)
        tokenizer = None
        if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        known = state(model)
        known.tokenizer, known.source, known.backends, known.fallbacks = tokenizer, str(source), backends, fallbacks
    else:
        model, _ = load_pretrained(source, dtype)
        model = model.to(resolve_device(device))
    if path.is_dir() and (path / REPORT_FILE).is_file():
        state(model).report = PruneReport.read(path)
    return model


def is_safetensors_checkpoint(source: str | os.PathLike) -> bool:
    """A local transformers directory with safetensors weights and no sparse storage: what the out-of-core
    path prunes (a GGUF file, a Hub id or an already pruned checkpoint take the in-memory path)."""
    path = Path(source).expanduser()
    return (path.is_dir() and (path / "config.json").is_file() and not is_packed_checkpoint(path)
            and ((path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file()))


class CheckpointSource:
    """A safetensors checkpoint read a module at a time: the model's skeleton on the meta device (computed
    buffers such as rotary tables are real), and ``load``/``release`` to materialise any module's own
    tensors from the memory-mapped shards and to free them again.

    Every tensor the model needs is checked against the shard headers on construction (present, the
    shape config.json implies), so a broken checkpoint fails before any work, naming the tensor.
    """

    def __init__(self, source: str | os.PathLike, dtype: torch.dtype | str | None = None) -> None:
        from transformers import AutoTokenizer

        self.directory = Path(source).expanduser()
        self.layout = read_layout(self.directory)
        self.dtype = resolve_dtype(dtype)
        self.model = build_empty(self.directory, self.dtype)
        self.model.eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.directory)
        except Exception as exc:  # transformers and tokenizers raise their own types
            raise LLMPruneError(f"cannot load the tokenizer of {self.directory}: {str(exc).splitlines()[0]}") from exc
        known = state(self.model)
        known.tokenizer, known.source = self.tokenizer, str(source)
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        prefix = f"{self.model.base_model_prefix}."
        self.keys: dict[str, str] = {}  # model key → checkpoint key
        for key, tensor in self._tensors(self.model):
            stored = key if key in self.layout else key.removeprefix(prefix)  # a base model saved on its own
            if stored not in self.layout:
                if key in tied:
                    continue  # tied to a tensor that is stored (checked under its own key)
                raise LLMPruneError(f"{key} is missing from {self.directory}: the model built from config.json needs "
                                    f"it (out-of-core pruning reads tensors under transformers' own names; "
                                    f"save the model with save_pretrained, or load it whole with --in-memory)")
            if self.layout[stored].shape != tuple(tensor.shape):
                raise LLMPruneError(f"{stored} has shape {list(self.layout[stored].shape)} in {self.directory}, but "
                                    f"config.json makes it {list(tensor.shape)}")
            self.keys[key] = stored
        self._fetch = TensorReader(self.directory, self.layout)

    @staticmethod
    def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """Parameters and persistent buffers with their keys (tied parameters under every name)."""
        named = list(model.named_parameters(remove_duplicate=False))
        for name, buffer in model.named_buffers():
            owner, _, leaf = name.rpartition(".")
            if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
                named.append((name, buffer))
        return named

    def _slot(self, key: str) -> tuple[nn.Module, str, torch.Tensor]:
        owner, _, leaf = key.rpartition(".")
        holder = self.model.get_submodule(owner)
        current = holder._parameters.get(leaf)
        return holder, leaf, holder._buffers[leaf] if current is None else current

    def load(self, prefix: str = "", exclude: str | None = None) -> int:
        """Materialise the stored tensors whose keys start with ``prefix`` (and not ``exclude``) on CPU, in
        the model's dtype; returns the bytes read."""
        size = 0
        for key, stored in self.keys.items():
            if not key.startswith(prefix) or (exclude and key.startswith(exclude)):
                continue
            holder, leaf, current = self._slot(key)
            if not current.is_meta:
                continue
            tensor = self._fetch(stored)
            if tensor.is_floating_point() and tensor.dtype != current.dtype:
                tensor = tensor.to(current.dtype)
            if leaf in holder._parameters:
                holder._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            else:
                holder._buffers[leaf] = tensor
            size += tensor.numel() * tensor.element_size()
        return size

    def release(self, prefix: str) -> None:
        """Put the stored tensors under ``prefix`` back on the meta device (their memory is freed)."""
        for key in self.keys:
            if key.startswith(prefix):
                holder, leaf, current = self._slot(key)
                if leaf in holder._parameters:
                    holder._parameters[leaf] = nn.Parameter(torch.empty_like(current, device="meta"), requires_grad=False)
                else:
                    holder._buffers[leaf] = torch.empty_like(current, device="meta")

    def fetch(self, key: str) -> torch.Tensor:
        """The stored tensor for model key ``key``, in the model's dtype, without keeping it."""
        tensor = self._fetch(self.keys[key])
        current = self._slot(key)[2]
        return tensor.to(current.dtype) if tensor.is_floating_point() and tensor.dtype != current.dtype else tensor

    def load_outside(self, layers_name: str) -> int:
        """Materialise what runs before, between and after the decoder layers (embeddings, norms, rotary
        tables), and tie the weights transformers ties; returns the bytes read. An untied output head
        (``lm_head``) stays on the meta device: nothing computes with it while pruning, and the writer
        reads it when it gets there (``fetch``)."""
        head = self.model.get_output_embeddings()
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        size = 0
        for key in self.keys:
            if key.startswith(f"{layers_name}."):
                continue
            if head is not None and key not in tied and self._slot(key)[2] is head.weight:
                continue
            size += self.load(key)
        self.model.tie_weights()
        return size
