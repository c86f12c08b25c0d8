"""Load a causal LM and find what the streaming engine needs: the decoder layers and their linears.

One generic adapter instead of per-family tables: the decoder stack is the ``nn.ModuleList``
of identical blocks holding the most parameters, and the prunable linears are every
``nn.Linear`` (or GPT-2 ``Conv1D``, stored transposed) inside those blocks. Linears that read
the same input (q/k/v, gate/up) are grouped at run time by tensor identity in ``stream.py``,
which works for fused and unfused projections alike.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import LLMPruneError
from .formats.packed import is_packed_checkpoint

# Leaf names of linears inside a decoder layer that are not weight matrices worth pruning:
# mixture-of-experts routers choose experts, and pruning them changes routing, not compute.
ROUTER_NAMES = frozenset({"gate", "router"})

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Prunable:
    """One prunable matrix, always seen as ``[out, in]`` whatever the module stores."""

    name: str
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def weight(self) -> torch.Tensor:
        """``[out, in]`` view of the stored weight (no copy)."""
        w = self.module.weight.data
        return w.T if self.transposed else w

    def set_weight(self, weight: torch.Tensor) -> None:
        """Write a ``[out, in]`` weight back in the module's layout and dtype."""
        self.weight.copy_(weight)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


class ModelAdapter:
    """The view of a causal LM that the streaming engine and the pruners work on."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers_name, self.layers = self._find_layers(model)

    @staticmethod
    def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
        best: tuple[int, str, nn.ModuleList] | None = None
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if len({type(block) for block in module}) != 1:
                continue
            if not any(_is_linear(m) for m in module[0].modules()):
                continue
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
        if best is None:
            raise LLMPruneError(
                f"unknown architecture {type(model).__name__}: found no stack of decoder layers "
                f"(an nn.ModuleList of identical blocks containing nn.Linear or Conv1D)"
            )
        return best[1], best[2]

    def __len__(self) -> int:
        return len(self.layers)

    def linears(self, index: int) -> dict[str, Prunable]:
        """Prunable matrices of decoder layer ``index``, keyed by their full module name."""
        prefix = f"{self.layers_name}.{index}."
        return {
            prefix + name: Prunable(prefix + name, module)
            for name, module in self.layers[index].named_modules()
            if _is_linear(module) and name.rsplit(".", 1)[-1] not in ROUTER_NAMES
        }

    def all_linears(self) -> dict[str, Prunable]:
        return {name: p for i in range(len(self)) for name, p in self.linears(i).items()}


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


def load(source: str | os.PathLike, dtype: torch.dtype | str | None = None) -> tuple[nn.Module, object]:
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
    model.llmprune_tokenizer = tokenizer
    model.llmprune_source = str(source)
    return model, tokenizer


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None, backend: str = "auto") -> nn.Module:
    """Load a (pruned or dense) checkpoint for inference; the tokenizer rides along on the model.

    A packed 2:4 checkpoint (compressed-tensors ``sparse-24-bitmask``) gets ``SparseLinear`` layers,
    built directly on ``device``: ``backend`` ``auto`` uses the CUDA 2:4 kernels where they apply and
    the exact dense path elsewhere (``model.llmprune_fallbacks`` says which layers fell back and why).
    """
    from .formats.packed import read_packed
    from .stream import resolve_device

    path = Path(source).expanduser()
    if path.is_dir() and is_packed_checkpoint(path):
        model = read_packed(path, device=resolve_device(device), dtype=dtype, backend=backend)
        tokenizer = None
        if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        model.llmprune_tokenizer = tokenizer
        model.llmprune_source = str(source)
        return model
    model, _ = load(source, dtype)
    return model.to(resolve_device(device))
