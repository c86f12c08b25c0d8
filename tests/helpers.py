"""Helpers shared by several test modules: tiny models, an independent safetensors reader, the float64
OBS reference, and running the CLI."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from llmprune.checkpoint.safetensors import WEIGHTS_NAME
from llmprune.cli import main
from llmprune.packing import Int24
from llmprune.patterns import NM, Unstructured
from llmprune.stats import HESSIAN, InputStats


# --------------------------------------------------------------------------- models and checkpoints

def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def logits(model: torch.nn.Module, vocab: int = 128) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).logits


_NP_DTYPES = {"F32": "<u4", "F16": "<u2", "BF16": "<u2", "I64": "<i8", "U8": "u1"}  # floats as raw bit patterns


def read_raw(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse a safetensors file from its bytes: (header, {key: array of raw values})."""
    raw = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    data = raw[8 + length:]
    arrays = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        arrays[key] = np.frombuffer(data[start:end], dtype=_NP_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return header, arrays


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def rewrite(directory: Path, change) -> None:
    tensors = load_file(directory / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})



# --------------------------------------------------------------------------- 2:4 weights

def random_24(out_features: int, in_features: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Random weight with exactly two zeros at random positions in every group of 4."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    order = torch.rand(out_features, in_features // 4, 4, generator=gen).argsort(-1)
    drop = torch.zeros(out_features, in_features // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return weight.masked_fill(drop.reshape(out_features, in_features), 0).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that -0.0 != +0.0 and NaN == NaN."""
    return tensor.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[tensor.element_size()])


# the six ways to keep two of four positions, ascending
PAIRS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.uint8)


def random_int24(rows: int, columns: int, group_size: int, seed: int = 0, symmetric: bool = False) -> Int24:
    """Random codes, two distinct ascending positions per group of 4, a float16 grid (zero points 8 when
    ``symmetric``, random integers 0-15 otherwise)."""
    generator = torch.Generator().manual_seed(seed)
    positions = PAIRS[torch.randint(len(PAIRS), (rows, columns // 4), generator=generator)].reshape(rows, -1)
    codes = torch.randint(16, (rows, columns // 2), generator=generator, dtype=torch.uint8)
    grid = (rows, -(-columns // group_size))
    scales = (torch.rand(grid, generator=generator) / 8 + 1e-3).half()
    zeros = torch.full(grid, 8.0) if symmetric else torch.randint(16, grid, generator=generator).float()
    return Int24(codes, positions, scales, zeros.half(), group_size)


# --------------------------------------------------------------------------- SparseGPT reference

ROWS, COLUMNS, PERCDAMP = 64, 128, 0.01


def correlated_inputs(columns: int = COLUMNS, tokens: int = 512, seed: int = 0, decay: float = 1.0) -> torch.Tensor:
    """``[tokens, columns]`` inputs X = Z·A: strongly correlated channels, so H is far from diagonal.

    ``decay`` < 1 shrinks the latent factors geometrically down to ``decay``, giving the
    fast-decaying spectrum of real LLM activations (a few directions carry most of the energy).
    """
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=gen, dtype=torch.float64) / columns**0.5
    mixing += torch.eye(columns, dtype=torch.float64) * 0.3
    scales = torch.linspace(0.2, 3.0, columns, dtype=torch.float64)
    latent = torch.randn(tokens, columns, generator=gen, dtype=torch.float64)
    latent *= torch.logspace(0, torch.log10(torch.tensor(decay)).item(), columns, dtype=torch.float64)
    return (latent @ mixing) * scales


def stats_for(inputs: torch.Tensor, dtype: torch.dtype = torch.float32, needs=frozenset({HESSIAN})) -> InputStats:
    stats = InputStats(inputs.shape[-1], needs, hessian_dtype=dtype)
    for batch in inputs.split(128):
        stats.update(batch)
    return stats


def random_weight(rows: int = ROWS, columns: int = COLUMNS, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def reference_obs(weight: torch.Tensor, hessian: torch.Tensor, pattern, reselect_every: int | None = None,
                  percdamp: float = PERCDAMP):
    """Column-by-column OBS in float64, no blocks, no lazy updates, no Cholesky trick.

    With F = {j, ..., in−1} the columns not yet fixed, H_F⁻¹ = inv(H[F, F]) directly; pruning
    column j to q moves the free columns by −(w_j − q)/H_F⁻¹[0,0] · H_F⁻¹[0, :]. The score of
    column j is w_j² / H_F⁻¹[0,0]. N:M picks each group's mask at its first column (none in its
    ``dense`` ranges). Unstructured
    picks at column 0 (and again every ``reselect_every`` columns): each row ranks its remaining
    columns and prunes those among its remaining-budget lowest that come before the next pick.
    Returns the pruned weight and the summed OBS loss Σ (w_j − q)² / (2 H_F⁻¹[0,0]).
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    rows, columns = w.shape
    tails = [torch.linalg.inv(h[j:, j:]) for j in range(columns)]  # H_F⁻¹ for F = j..in−1
    d2 = torch.stack([t[0, 0] for t in tails])
    keep = torch.ones_like(w, dtype=torch.bool)
    reselect_every = reselect_every or columns
    budget = [pattern.pruned_per_row(columns) if isinstance(pattern, Unstructured) else 0] * rows

    def lowest(scores: list[float], count: int) -> list[int]:  # ties → lower index
        return sorted(range(len(scores)), key=lambda c: (scores[c], c))[:count]

    loss = 0.0
    for j in range(columns):
        if isinstance(pattern, NM) and j % pattern.m == 0 and not any(a <= j < b for a, b in pattern.dense):
            for r in range(rows):
                scores = (w[r, j:j + pattern.m].square() / d2[j:j + pattern.m]).tolist()
                for c in lowest(scores, pattern.m - pattern.n):
                    keep[r, j + c] = False
        if isinstance(pattern, Unstructured) and j % reselect_every == 0:
            for r in range(rows):
                scores = (w[r, j:].square() / d2[j:]).tolist()
                for c in lowest(scores, budget[r]):
                    if c < reselect_every:
                        keep[r, j + c] = False
                        budget[r] -= 1
        q = torch.where(keep[:, j], w[:, j], torch.zeros(()).double())
        step = (w[:, j] - q) / tails[j][0, 0]
        loss += float(((w[:, j] - q).square() / tails[j][0, 0]).sum() / 2)
        w[:, j:] -= step[:, None] * tails[j][0][None, :]
        w[:, j] = q
    return w, loss



# --------------------------------------------------------------------------- the CLI

def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temp dir was left behind"


def prune_args(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", model, "--calib", calib, "--nsamples", "4", "--seqlen", "16", "--device", "cpu",
            "--out", out, "--quiet", *extra]
