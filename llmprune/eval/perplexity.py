"""Perplexity with the protocol of the SparseGPT/Wanda papers.

The test text is joined (``"\\n\\n".join(rows)`` for WikiText-2), tokenized once, and cut into
non-overlapping windows of ``seqlen``; ppl = exp(mean NLL over all predicted tokens). With
``window_stride`` k only windows 0, k, 2k, ... are scored, a documented subset for quick runs.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapter import check_seqlen
from ..calib import named_text
from ..errors import LLMPruneError
from ..state import state


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    nll: float
    seqlen: int
    windows: list[int]
    total_windows: int
    tokens: int
    seconds: float

    def describe(self) -> str:
        used = len(self.windows)
        subset = "all" if used == self.total_windows else f"{used} of {self.total_windows} (indices {_ranges(self.windows)})"
        return f"{self.dataset}: ppl {self.ppl:.3f} at seqlen {self.seqlen}, windows: {subset}, {self.tokens} tokens"

    def to_json(self) -> dict:
        return asdict(self)


def _ranges(indices: list[int]) -> str:
    if len(indices) > 2 and len({b - a for a, b in zip(indices, indices[1:])}) == 1:
        return f"{indices[0]}, {indices[1]}, ..., {indices[-1]}"
    return ", ".join(map(str, indices))


@torch.no_grad()
def perplexity(model: nn.Module, dataset: str = "wikitext2", tokenizer=None, seqlen: int = 2048,
               window_stride: int = 1, batch_size: int = 1, device: str | torch.device | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset`` over non-overlapping ``seqlen`` windows."""
    tokenizer = tokenizer or state(model).tokenizer
    if tokenizer is None:
        raise LLMPruneError("perplexity needs a tokenizer; pass tokenizer= or load the model with llmprune")
    if window_stride < 1 or batch_size < 1:
        raise LLMPruneError("window_stride and batch_size must be >= 1")
    check_seqlen(model, seqlen)
    text, source = named_text(dataset, "evaluation")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if dataset == "c4":  # SparseGPT's C4 protocol: the first 256 windows of the validation stream
        ids = ids[: 256 * seqlen]
    total = ids.numel() // seqlen
    if total == 0:
        raise LLMPruneError(f"{source} has {ids.numel()} tokens, fewer than one window of seqlen {seqlen}")
    windows = list(range(0, total, window_stride))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    started = time.perf_counter()
    nll_sum, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=f"ppl {dataset}", unit="batch", disable=not progress):
        batch = torch.stack([ids[w * seqlen : (w + 1) * seqlen] for w in windows[start : start + batch_size]]).to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        nll_sum += float(loss)
        count += batch[:, 1:].numel()
    nll = nll_sum / count
    return PerplexityResult(dataset=dataset, ppl=math.exp(nll), nll=nll, seqlen=seqlen, windows=windows,
                            total_windows=total, tokens=len(windows) * seqlen, seconds=time.perf_counter() - started)
