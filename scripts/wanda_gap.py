#!/usr/bin/env python
"""Where Wanda 2:4 masks differ from the original code's: a slow, direct re-implementation of the rule.

The issue: on the same calibration tokens and evaluation, the original Wanda code (locuslab/wanda)
reports WikiText-2 perplexity 170.6 at 2:4 on SmolLM2-135M where llmprune gets 176.3. This script
re-implements the paper's rule (score |W_ij|·‖X_j‖₂, prune the 2 lowest scores of every 4 consecutive
inputs of a row) with its own loop over the decoder layers and forward hooks on each linear, and
switches one suspected difference at a time (a variant is ``key=value,...`` or a preset name):

- ``batch``: samples per forward and per statistics update (original: 1; llmprune: 8)
- ``stats``: how ‖X_j‖² is accumulated: ``f32-tokens`` (float32 running mean over tokens, llmprune's
  arithmetic), ``f32-samples`` (float32 running mean over samples of the squared column norm, what the
  original does), ``f64`` (exact float64 sum)
- ``dtype``: compute dtype of the layers and of the activations (original: float16; protocol: float32)
- ``tie``: among equal scores prune the ``low`` input index first (llmprune), the ``high`` one, or let
  ``topk`` decide (``torch.topk(largest=False)``, what the original calls)
- ``inputs``: layer l+1 sees the ``pruned`` layer l's outputs (both codes) or the ``dense`` model's
- ``mask``: ``none`` (sdpa's is_causal, what transformers 5 passes) or ``explicit`` (a 4-D additive
  causal mask, what the transformers of the original's time passed)
- ``jitter``/``seed``: multiply every linear's channel norms by (1 + jitter·N(0, 1)) before scoring: masks as valid
  as the exact ones (the calibration draw moves the norms by far more), to measure how much perplexity
  moves between equally good masks

Masks are compared as pruned weights (W ⊙ keep): the dequantized checkpoint has exact zeros, and
keeping or dropping a zero is the same model. "Identical" is per 2:4 group of 4 weights.

Subcommands (results merge into one JSON, so they can run one at a time):
  reference   llmprune.prune's masks (cached under --cache) and its perplexity
  aligned     every layer l sees llmprune's own pruned trajectory, so per-layer differences come from
              the rule alone, without compounding; many variants from a few forwards per layer
  trajectory  variants end to end, each on its own outputs; --ppl evaluates them
  sampling    the yardstick: masks from two halves of the calibration set, on the dense model
  table       print the markdown tables from the JSON

Example (the protocol; ~25 min on one thread for aligned, 4-17 min per trajectory):
    python scripts/wanda_gap.py reference --ppl
    python scripts/wanda_gap.py aligned
    python scripts/wanda_gap.py trajectory ours f64 orig --ppl
    python scripts/wanda_gap.py table
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # appended, so a PYTHONPATH snapshot of llmprune wins over the working tree

DEFAULT_MODEL = "/work/shared/models/smollm2-135m-instruct-q4_1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
N, M = 2, 4  # keep N of every M


# ----------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    """One combination of the suspected differences (defaults: llmprune's protocol run)."""

    batch: int = 8
    stats: str = "f32-tokens"
    dtype: str = "float32"
    tie: str = "low"
    inputs: str = "pruned"
    mask: str = "none"
    jitter: float = 0.0
    seed: int = 0

    def __str__(self) -> str:
        changed = [f"{k}={v}" for k, v in asdict(self).items() if v != getattr(Variant(), k)]
        return ",".join(changed) or "llmprune protocol"


PRESETS = {
    "ours": Variant(),
    "f64": Variant(stats="f64"),
    "topk": Variant(tie="topk"),
    "high": Variant(tie="high"),
    "b1": Variant(batch=1, stats="f32-samples", mask="explicit"),
    "bf16": Variant(dtype="bfloat16"),
    "fp16": Variant(dtype="float16"),
    "dense": Variant(inputs="dense"),
    # Everything the original code does differently at once.
    "orig": Variant(batch=1, stats="f32-samples", dtype="float16", tie="topk", mask="explicit"),
}


def parse_variant(text: str) -> Variant:
    if text in PRESETS:
        return PRESETS[text]
    fields = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in Variant.__dataclass_fields__:
            raise SystemExit(f"unknown variant key {key!r}; known: {', '.join(Variant.__dataclass_fields__)} "
                             f"or a preset: {', '.join(PRESETS)}")
        fields[key] = int(value) if key in ("batch", "seed") else float(value) if key == "jitter" else value
    return replace(Variant(), **fields)


# ----------------------------------------------------------------------------- statistics

class SquaredNorm:
    """Per-input-channel ‖X_j‖² estimate of one linear's inputs, accumulated the way ``kind`` says.

    ``f32-tokens`` uses the float32 operations of llmprune's stats.py (running mean over tokens), so
    the re-implementation can reproduce llmprune bit for bit; ``f32-samples`` is the original code's
    scheme (running mean over samples of the per-call squared 2-norm); ``f64`` is the exact sum.
    """

    def __init__(self, kind: str, in_features: int) -> None:
        if kind not in ("f32-tokens", "f32-samples", "f64"):
            raise SystemExit(f"unknown stats {kind!r}")
        self.kind = kind
        self.count = 0
        self.value = torch.zeros(in_features, dtype=torch.float64 if kind == "f64" else torch.float32)

    def update(self, x: torch.Tensor) -> None:
        samples = x.shape[0] if x.dim() == 3 else 1
        flat = x.reshape(-1, x.shape[-1])
        if self.kind == "f32-tokens":
            xf = flat.float()
            total = self.count + flat.shape[0]
            self.value.mul_(self.count / total).add_((xf * xf).sum(0), alpha=1.0 / total)
            self.count = total
        elif self.kind == "f32-samples":
            self.value.mul_(self.count / (self.count + samples))
            self.count += samples
            self.value.add_(torch.linalg.vector_norm(flat.float(), dim=0) ** 2 / self.count)
        else:
            self.value.add_((flat.double() ** 2).sum(0))
            self.count += flat.shape[0]

    def norm(self) -> torch.Tensor:
        """‖X_j‖ up to a factor common to every channel."""
        return (self.value / self.count).sqrt() if self.kind == "f64" else self.value.sqrt()


def linears_of(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of a decoder layer: the same 7 both codes prune (q, k, v, o, gate, up, down)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def causal_mask(seqlen: int, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D additive causal mask older transformers built for LLaMA layers ([1, 1, L, L])."""
    return torch.full((seqlen, seqlen), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


class Runner:
    """Calls one decoder layer on stored hidden states, with llama's keyword inputs built by hand."""

    def __init__(self, model: nn.Module, seqlen: int) -> None:
        self.positions = torch.arange(seqlen)[None]
        probe = torch.zeros(1, seqlen, model.config.hidden_size)
        self.rope = tuple(t.detach() for t in model.model.rotary_emb(probe, self.positions))
        self.seqlen = seqlen

    @torch.no_grad()
    def forward(self, layer: nn.Module, hidden: torch.Tensor, dtype: torch.dtype, batch: int, mask: str,
                hooks: dict[str, list[SquaredNorm]] | None = None, keep_outputs: bool = True) -> torch.Tensor | None:
        """Run ``layer`` (already in ``dtype``) over ``hidden`` [samples, L, H] in chunks of ``batch``;
        every linear's input updates its ``hooks`` accumulators. Returns the outputs in float32."""
        handles = []
        for name, linear in linears_of(layer).items():
            if hooks and name in hooks:
                def fn(module, args, output, accs=hooks[name]):
                    for acc in accs:
                        acc.update(args[0])
                handles.append(linear.register_forward_hook(fn))
        rope = tuple(t.to(dtype) for t in self.rope)
        attention = causal_mask(self.seqlen, dtype) if mask == "explicit" else None
        outputs = []
        try:
            for start in range(0, hidden.shape[0], batch):
                x = hidden[start : start + batch].to(dtype)
                out = layer(x, attention_mask=attention, position_ids=self.positions.expand(x.shape[0], -1),
                            position_embeddings=rope)
                out = out[0] if isinstance(out, tuple) else out
                if keep_outputs:
                    outputs.append(out.float())
        finally:
            for h in handles:
                h.remove()
        return torch.cat(outputs) if keep_outputs else None


# ----------------------------------------------------------------------------- the rule

def keep_mask(weight: torch.Tensor, norm: torch.Tensor, tie: str) -> torch.Tensor:
    """Wanda N:M: score |W_ij|·‖X_j‖, keep the N highest of every M consecutive inputs of a row."""
    score_dtype = torch.float64 if norm.dtype == torch.float64 else torch.float32
    scores = weight.abs().to(score_dtype) * norm.to(score_dtype)[None, :]
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // M, M)
    if tie == "low":  # stable ascending sort: equal scores keep index order, the lower one is pruned first
        pruned = torch.sort(groups, dim=-1, stable=True).indices[..., : M - N]
    elif tie == "high":  # same on the reversed group: the higher index is pruned first
        pruned = (M - 1) - torch.sort(groups.flip(-1), dim=-1, stable=True).indices[..., : M - N]
    elif tie == "topk":
        pruned = torch.topk(groups, M - N, dim=-1, largest=False).indices
    else:
        raise SystemExit(f"unknown tie rule {tie!r}")
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, pruned, False)
    return keep.reshape(rows, cols)


def agreement(keep: torch.Tensor, reference: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """Identical pruned weights: per 2:4 group and per element (a zero kept or dropped is the same)."""
    mine = keep & (dense != 0)
    theirs = reference & (dense != 0)
    same = mine == theirs
    return {"groups": float(same.reshape(same.shape[0], -1, M).all(-1).float().mean()),
            "elements": float(same.float().mean())}


def margins(weight: torch.Tensor, norm: torch.Tensor) -> dict[str, float]:
    """How close each group's decision is: relative gap between the 2nd and 3rd lowest scores."""
    scores = weight.abs().float() * norm.float()[None, :]
    ordered = torch.sort(scores.reshape(scores.shape[0], -1, M), dim=-1).values
    low, high = ordered[..., M - N - 1], ordered[..., M - N]
    gap = (high - low) / high.clamp_min(torch.finfo(torch.float32).tiny)
    out = {"exact_ties": float((high == low).float().mean())}
    for eps in (1e-6, 1e-4, 1e-3, 1e-2):
        out[f"gap<{eps:g}"] = float((gap < eps).float().mean())
    return out


def weighted(rows: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    total = sum(sizes)
    return {k: sum(r[k] * s for r, s in zip(rows, sizes)) / total for k in rows[0]}


# ----------------------------------------------------------------------------- setup and caches

def load(args: argparse.Namespace):
    import llmprune

    started = time.perf_counter()
    model = llmprune.load(args.model, device="cpu", dtype="float32")
    tokens = llmprune.calib.tokens("wikitext2", model.llmprune_tokenizer, nsamples=args.nsamples,
                                   seqlen=args.seqlen, seed=args.seed)
    print(f"loaded in {time.perf_counter() - started:.0f} s; calibration {tuple(tokens.shape)}", flush=True)
    layers = model.model.layers
    write_json(Path(args.json), "shapes", {"layers": len(layers), "linears": {
        name: list(linear.weight.shape) for name, linear in linears_of(layers[0]).items()}})
    return model, tokens


def reference_masks(model: nn.Module, tokens: torch.Tensor, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """llmprune's Wanda 2:4 pruned-weight masks (W ≠ 0 after pruning), computed once and cached."""
    import llmprune

    path = Path(args.cache) / "reference.pt"
    if path.exists():
        return torch.load(path)
    work = copy.deepcopy(model)
    started = time.perf_counter()
    llmprune.prune(work, method="wanda", pattern="2:4", nsamples=args.nsamples, seqlen=args.seqlen,
                   seed=args.seed, device="cpu", batch_size=8, calib_tokens=tokens, progress=False)
    print(f"llmprune.prune: {time.perf_counter() - started:.0f} s", flush=True)
    masks = {f"model.layers.{i}.{name}": linear.weight != 0
             for i, layer in enumerate(work.model.layers) for name, linear in linears_of(layer).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(masks, path)
    return masks


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.{name}": linear.weight.detach().clone()
            for i, layer in enumerate(model.model.layers) for name, linear in linears_of(layer).items()}


@torch.no_grad()
def perplexity(model: nn.Module, masks: dict[str, torch.Tensor], dense: dict[str, torch.Tensor],
               args: argparse.Namespace, dtype: str = "float32") -> dict:
    """The protocol's WikiText-2 perplexity of the fp32 model with ``masks`` applied (then restored)."""
    from llmprune.eval import perplexity as ppl

    modules = dict(model.named_modules())
    for name, keep in masks.items():
        modules[name].weight.copy_(dense[name] * keep)
    try:
        evaluated = model if dtype == "float32" else copy.deepcopy(model).to(DTYPES[dtype])
        result = ppl(evaluated, "wikitext2", seqlen=2048, window_stride=args.window_stride, progress=False)
    finally:
        for name in masks:
            modules[name].weight.copy_(dense[name])
    return {"ppl": round(result.ppl, 3), "eval_dtype": dtype, "windows": f"{len(result.windows)}/{result.total_windows}",
            "eval_s": round(result.seconds, 1)}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, key: str, value) -> None:
    data = read_json(path)
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model.embed_tokens(tokens).float()


# ----------------------------------------------------------------------------- subcommands

def cmd_reference(args: argparse.Namespace) -> None:
    model, tokens = load(args)
    masks = reference_masks(model, tokens, args)
    entry = read_json(Path(args.json)).get("reference", {})
    entry["command"] = "llmprune.prune(method='wanda', pattern='2:4', nsamples=64, seqlen=512, seed=0, device='cpu')"
    if args.ppl:
        dense = dense_weights(model)
        for dtype in args.eval_dtypes:
            entry[f"ppl_{dtype}"] = perplexity(model, masks, dense, args, dtype)
            print(f"llmprune reference, eval {dtype}: {entry[f'ppl_{dtype}']}", flush=True)
    write_json(Path(args.json), "reference", entry)


# Aligned mode: the forwards run per layer on llmprune's trajectory, and the (name, forward, stats, tie,
# weight dtype) combinations compared. "forward" keys: the dtype/batch/mask of the pass.
ALIGNED_FORWARDS = {
    "fp32-b8": ("float32", 8, "none", ("f32-tokens", "f32-samples", "f64")),
    "fp32-b1-explicit": ("float32", 1, "explicit", ("f32-tokens", "f32-samples", "f64")),
    "bf16-b8": ("bfloat16", 8, "none", ("f32-tokens",)),
    "fp16-b1-explicit": ("float16", 1, "explicit", ("f32-tokens", "f32-samples")),
    "dense-fp32-b8": ("float32", 8, "none", ("f32-tokens",)),  # on the dense model's trajectory
}
ALIGNED_VARIANTS = {  # name: (forward, stats, tie, dtype the weights are rounded to for the score)
    "recomputed (= llmprune rule)": ("fp32-b8", "f32-tokens", "low", "float32"),
    "tie high": ("fp32-b8", "f32-tokens", "high", "float32"),
    "tie topk": ("fp32-b8", "f32-tokens", "topk", "float32"),
    "stats f64": ("fp32-b8", "f64", "low", "float32"),
    "stats f32-samples b8": ("fp32-b8", "f32-samples", "low", "float32"),
    "batch 1 + explicit mask": ("fp32-b1-explicit", "f32-tokens", "low", "float32"),
    "batch 1 + f32-samples (orig stats)": ("fp32-b1-explicit", "f32-samples", "low", "float32"),
    "bf16 model": ("bf16-b8", "f32-tokens", "low", "bfloat16"),
    "fp16 weights only": ("fp32-b8", "f32-tokens", "low", "float16"),
    "fp16 activations only": ("fp16-b1-explicit", "f32-tokens", "low", "float32"),
    "fp16 model": ("fp16-b1-explicit", "f32-tokens", "low", "float16"),
    "original (fp16, b1, f32-samples, topk)": ("fp16-b1-explicit", "f32-samples", "topk", "float16"),
    "dense inputs": ("dense-fp32-b8", "f32-tokens", "low", "float32"),
}


def cmd_aligned(args: argparse.Namespace) -> None:
    model, tokens = load(args)
    reference = reference_masks(model, tokens, args)
    runner = Runner(model, args.seqlen)
    pruned_in = embeddings(model, tokens)  # llmprune's trajectory: inputs of layer l after pruning 0..l-1
    dense_in = pruned_in.clone()
    layers_out = []
    started = time.perf_counter()
    forwards = {k: v for k, v in ALIGNED_FORWARDS.items() if k in args.forwards}
    for index, layer in enumerate(model.model.layers):
        clock = time.perf_counter()
        linears = linears_of(layer)
        names = {name: f"model.layers.{index}.{name}" for name in linears}
        dense = {name: linears[name].weight.detach().clone() for name in linears}
        norms: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        outputs: dict[str, torch.Tensor] = {}
        for key, (dtype, batch, mask, kinds) in forwards.items():
            work = copy.deepcopy(layer).to(DTYPES[dtype])
            accs = {name: [SquaredNorm(kind, linears[name].in_features) for kind in kinds] for name in linears}
            source = dense_in if key.startswith("dense") else pruned_in
            outputs[key] = runner.forward(work, source, DTYPES[dtype], batch, mask, accs, keep_outputs=True)
            norms[key] = {name: {acc.kind: acc.norm() for acc in accs[name]} for name in linears}
            del work
        record: dict = {"layer": index, "variants": {}, "margins": {}, "activation_max_abs_diff": {}}
        sizes = [dense[n].numel() // M for n in linears]
        if "fp32-b8" in outputs:
            for key in outputs:
                if key != "fp32-b8" and not key.startswith("dense"):
                    record["activation_max_abs_diff"][key] = float((outputs[key] - outputs["fp32-b8"]).abs().max())
            per = [margins(dense[n], norms["fp32-b8"][n]["f32-tokens"]) for n in linears]
            record["margins"] = {"layer": weighted(per, sizes), "linears": dict(zip(linears, per))}
        for vname, (key, kind, tie, wdtype) in ALIGNED_VARIANTS.items():
            if key not in norms:
                continue
            per_linear = {}
            for name in linears:
                weight = dense[name].to(DTYPES[wdtype]).float()
                keep = keep_mask(weight, norms[key][name][kind], tie)
                per_linear[name] = agreement(keep, reference[names[name]], dense[name])
            record["variants"][vname] = {"layer": weighted(list(per_linear.values()), sizes), "linears": per_linear}
        # Next layer's inputs: llmprune's pruned layer on llmprune's trajectory, the dense layer on the dense one.
        if "dense-fp32-b8" in outputs:
            dense_in = outputs["dense-fp32-b8"]
        for name, linear in linears.items():
            linear.weight.data.mul_(reference[names[name]])
        pruned_in = runner.forward(layer, pruned_in, torch.float32, 8, "none")
        for name, linear in linears.items():
            linear.weight.data.copy_(dense[name])
        record["seconds"] = round(time.perf_counter() - clock, 1)
        layers_out.append(record)
        summary = {v: round(r["layer"]["groups"], 5) for v, r in record["variants"].items()}
        print(f"layer {index} ({record['seconds']} s): {summary}", flush=True)
    write_json(Path(args.json), "aligned", {"forwards": {k: list(v[:3]) + [list(v[3])] for k, v in forwards.items()},
                                            "variants": {k: list(v) for k, v in ALIGNED_VARIANTS.items()},
                                            "seconds": round(time.perf_counter() - started), "layers": layers_out})


def run_trajectory(model: nn.Module, tokens: torch.Tensor, variant: Variant, runner: Runner) -> dict[str, torch.Tensor]:
    """The re-implementation end to end: one decoder layer at a time, statistics from hooks on the
    layer's linears, masks by ``keep_mask``; the next layer sees this variant's own outputs."""
    dtype = DTYPES[variant.dtype]
    hidden = embeddings(model, tokens)
    masks = {}
    for index, original in enumerate(model.model.layers):
        clock = time.perf_counter()
        layer = copy.deepcopy(original).to(dtype)
        linears = linears_of(layer)
        accs = {name: [SquaredNorm(variant.stats, linear.in_features)] for name, linear in linears.items()}
        dense_out = runner.forward(layer, hidden, dtype, variant.batch, variant.mask, accs,
                                   keep_outputs=variant.inputs == "dense")
        for name, linear in linears.items():
            norm = accs[name][0].norm()
            if variant.jitter:
                generator = torch.Generator().manual_seed(zlib.crc32(f"{variant.seed}/{index}/{name}".encode()))
                norm = norm * (1 + variant.jitter * torch.randn(norm.shape, generator=generator, dtype=norm.dtype))
            keep = keep_mask(linear.weight.detach().float(), norm, variant.tie)
            masks[f"model.layers.{index}.{name}"] = keep
            linear.weight.data.mul_(keep.to(linear.weight.dtype))
        if variant.inputs == "dense":
            hidden = dense_out
        else:
            hidden = runner.forward(layer, hidden, dtype, variant.batch, variant.mask)
        print(f"  layer {index}: {time.perf_counter() - clock:.1f} s", flush=True)
        del layer
    return masks


def cmd_trajectory(args: argparse.Namespace) -> None:
    model, tokens = load(args)
    reference = reference_masks(model, tokens, args)
    dense = dense_weights(model)
    runner = Runner(model, args.seqlen)
    results = read_json(Path(args.json)).get("trajectory", {})
    for text in args.variants:
        variant = parse_variant(text)
        cache = Path(args.cache) / f"trajectory-{text.replace('=', '-').replace(',', '_')}.pt"
        started = time.perf_counter()
        if cache.exists():
            masks = torch.load(cache)
            seconds = None
        else:
            print(f"trajectory {text} ({variant})", flush=True)
            masks = run_trajectory(model, tokens, variant, runner)
            seconds = round(time.perf_counter() - started)
            torch.save(masks, cache)
        entry = results.get(text, {})
        entry.update(variant=asdict(variant), description=str(variant))
        if seconds is not None:
            entry["seconds"] = seconds
        per_layer = []
        for index in range(len(model.model.layers)):
            names = [n for n in masks if n.startswith(f"model.layers.{index}.")]
            rows = [agreement(masks[n], reference[n], dense[n]) for n in names]
            per_layer.append(weighted(rows, [dense[n].numel() // M for n in names]))
        entry["layers"] = per_layer
        entry["overall"] = weighted(per_layer, [1] * len(per_layer))  # every layer has the same shapes
        if args.ppl:
            for dtype in args.eval_dtypes:
                entry[f"ppl_{dtype}"] = perplexity(model, masks, dense, args, dtype)
        results[text] = entry
        write_json(Path(args.json), "trajectory", results)
        print(f"{text}: identical groups {entry['overall']['groups']:.5f}; "
              + ", ".join(f"{k} {v['ppl']}" for k, v in entry.items() if k.startswith("ppl_")), flush=True)


def cmd_sampling(args: argparse.Namespace) -> None:
    """The yardstick: how far the calibration draw itself moves the norms and the masks. On the dense
    model, statistics from the first and the second half of the samples are compared per layer."""
    model, tokens = load(args)
    runner = Runner(model, args.seqlen)
    hidden = embeddings(model, tokens)
    half = tokens.shape[0] // 2
    layers_out = []
    for index, layer in enumerate(model.model.layers):
        linears = linears_of(layer)
        parts = {}
        outputs = []
        for part, rows in (("A", slice(0, half)), ("B", slice(half, 2 * half))):
            parts[part] = {name: [SquaredNorm("f32-tokens", lin.in_features)] for name, lin in linears.items()}
            outputs.append(runner.forward(layer, hidden[rows], torch.float32, 8, "none", parts[part]))
        hidden = torch.cat(outputs)
        rows, sizes = [], []
        for name, linear in linears.items():
            weight = linear.weight.detach()
            a, b = parts["A"][name][0].norm(), parts["B"][name][0].norm()
            keep_a, keep_b = keep_mask(weight, a, "low"), keep_mask(weight, b, "low")
            same = agreement(keep_a, keep_b, weight)
            rel = ((a - b).abs() / (0.5 * (a + b))).median().item()
            rows.append({**same, "median_rel_norm_diff": rel})
            sizes.append(weight.numel() // M)
        record = {"layer": index, **weighted(rows, sizes)}
        layers_out.append(record)
        print(f"layer {index}: groups identical {record['groups']:.4f}, median |nA-nB|/n {record['median_rel_norm_diff']:.4f}",
              flush=True)
    write_json(Path(args.json), "sampling", {"halves": [half, half], "layers": layers_out})


def cmd_table(args: argparse.Namespace) -> None:
    print(tables(read_json(Path(args.json))))


def pct(x: float) -> str:
    return f"{100 * x:.3f}"


def tables(data: dict) -> str:
    """Markdown: identical-group fractions (aligned and end to end, per layer) and the perplexities."""
    out = []
    per_layer = sum(o * i // M for o, i in data["shapes"]["linears"].values()) if "shapes" in data else None
    aligned = data.get("aligned")
    if aligned:
        layers = aligned["layers"]
        names = list(layers[0]["variants"])
        out.append("Aligned (every layer on llmprune's own pruned trajectory), all layers:\n")
        out.append("| variant (what differs from llmprune) | identical groups % | worst layer % | differing groups |")
        out.append("|---|---:|---:|---:|")
        for n in names:
            fractions = [r["variants"][n]["layer"]["groups"] for r in layers]
            count = round(sum(1 - f for f in fractions) * per_layer) if per_layer else "-"
            total = f" of {per_layer * len(layers):,}" if per_layer and n == names[0] else ""
            out.append(f"| {n} | {pct(sum(fractions) / len(fractions))} | {pct(min(fractions))} | "
                       f"{count:,}{total} |" if per_layer else f"| {n} | {pct(sum(fractions) / len(fractions))} | "
                       f"{pct(min(fractions))} | - |")
        # Per layer: the variants that change float32 rounding only are folded into their worst case.
        rounding = [n for n in names if all(r["variants"][n]["layer"]["groups"] > 0.9999 for r in layers)
                    and "fp16" not in n and "bf16" not in n]
        shown = [n for n in names if n not in rounding]
        out.append("\nPer layer, % of 2:4 groups identical to llmprune's (aligned); \"fp32 rounding\" is the worst of: "
                   + ", ".join(rounding) + "; the last two columns: groups whose 2nd and 3rd lowest scores tie "
                   "exactly / are within 0.1%\n")
        out.append("| layer | fp32 rounding | " + " | ".join(shown) + " | exact ties | gap<1e-3 |")
        out.append("|---:|---:|" + "---:|" * (len(shown) + 2))
        for r in layers:
            worst = min(r["variants"][n]["layer"]["groups"] for n in rounding) if rounding else 1.0
            marg = r["margins"]["layer"]
            out.append(f"| {r['layer']} | {pct(worst)} | " + " | ".join(pct(r["variants"][n]["layer"]["groups"]) for n in shown)
                       + f" | {pct(marg['exact_ties'])} | {pct(marg['gap<0.001'])} |")
        out.append("")
    trajectory = data.get("trajectory")
    if trajectory:
        names = list(trajectory)
        out.append("End to end (each variant on its own outputs): % of 2:4 groups identical to llmprune's\n")
        out.append("| layer | " + " | ".join(names) + " |")
        out.append("|---:|" + "---:|" * len(names))
        for index in range(len(trajectory[names[0]]["layers"])):
            out.append(f"| {index} | " + " | ".join(pct(trajectory[n]["layers"][index]["groups"]) for n in names) + " |")
        out.append("| **all** | " + " | ".join(f"**{pct(trajectory[n]['overall']['groups'])}**" for n in names) + " |")
        out.append("")
    sampling = data.get("sampling")
    if sampling:
        layers = sampling["layers"]
        out.append(f"Yardstick: masks from two disjoint halves of the calibration set ({sampling['halves'][0]} + "
                   f"{sampling['halves'][1]} samples), dense model: identical groups "
                   f"{pct(sum(r['groups'] for r in layers) / len(layers))}% (worst layer "
                   f"{pct(min(r['groups'] for r in layers))}%), median relative channel-norm difference "
                   f"{100 * sorted(r['median_rel_norm_diff'] for r in layers)[len(layers) // 2]:.2f}%\n")
    rows = []
    if "reference" in data:
        rows.append(("llmprune (reference)", "llmprune.prune", 1.0, data["reference"]))
    for name, entry in (trajectory or {}).items():
        rows.append((name, entry["description"], entry["overall"]["groups"], entry))
    base = data.get("reference", {}).get("ppl_float32", {}).get("ppl")
    if rows:
        out.append("| variant | settings | identical groups % | ppl (fp32 eval) | vs llmprune | prune s |")
        out.append("|---|---|---:|---:|---:|---:|")
        for name, desc, same, entry in rows:
            p32 = entry.get("ppl_float32", {}).get("ppl")
            delta = f"{100 * (p32 / base - 1):+.2f}%" if p32 and base else "-"
            out.append(f"| {name} | {desc} | {pct(same)} | {p32 or '-'} | {delta} | {entry.get('seconds', '-')} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["reference", "aligned", "trajectory", "sampling", "table"])
    parser.add_argument("variants", nargs="*", default=["ours"], help="trajectory: presets or key=value,...")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window-stride", type=int, default=8)
    parser.add_argument("--ppl", action="store_true", help="evaluate WikiText-2 perplexity of the masks")
    parser.add_argument("--eval-dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--forwards", nargs="+", default=list(ALIGNED_FORWARDS), choices=list(ALIGNED_FORWARDS),
                        help="aligned: which forwards to run (fp16 on CPU is the slow one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="/tmp/wanda_gap_cache", help="masks (reference and trajectories)")
    parser.add_argument("--json", default=str(REPO / "eval" / "results" / "wanda_gap.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    commands = {"reference": cmd_reference, "aligned": cmd_aligned, "trajectory": cmd_trajectory,
                "sampling": cmd_sampling, "table": cmd_table}
    commands[args.command](args)


if __name__ == "__main__":
    main()
