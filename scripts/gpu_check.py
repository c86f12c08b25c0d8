#!/usr/bin/env python
"""The checks a session lent a GPU machine runs first; run it through ``scripts/gpu_check.sh``.

Steps (each one row of the summary table; any failure makes the exit status 1):

1. versions: ``llmprune --version`` (torch, CUDA, triton, numba as this machine has them).
2. CUDA tests: the pytest tests that skip without CUDA (any ``skipif`` whose reason names CUDA, in the
   test files that mention ``cuda.is_available``), run in a subprocess; on a GPU none may skip.
3. CPU vs CUDA pruning, Wanda 2:4 and SparseGPT 2:4 in float32 on a synthetic SmolLM2-shaped model
   (``scripts/synthetic_model.py``, 6 layers), each run on both devices, compared linear by linear:
   - both results exactly 2:4 (at most 2 non-zeros in every group of 4);
   - Wanda: kept weights are the original values, so wherever both runs keep a weight it must be equal
     bit for bit; masks may differ only at near-ties of |W|·‖X‖ (the norms are float32 sums taken in
     another order), so at most 1e-4 of the first layer's 2:4 groups and 1e-3 of all groups;
   - SparseGPT: the first decoder layer's q/k/v projections see the same inputs on both devices
     (embeddings run on CPU), so there the results differ only by the order of float32 sums in the
     Hessian and the solve: at most 1e-3 of their groups may pick other weights, and rows with the same
     mask must agree to 1e-5 relative. Everything after is reported, not checked: each later linear's
     inputs come from the device's own attention and MLP over already-pruned weights, and sequential
     pruning compounds near-tie flips, so there the two runs are different, equally good prunings
     (H200, 2026-12-04: q/k/v 0 flips, same-mask rows within 1.5e-7; then o_proj 3.3e-4 of its groups,
     gate/up 2-3e-3, down_proj 5.8e-2, later layers 9-24%; output errors 0.988 vs 0.996);
   - both methods: the two pruned models' output error against the dense model (final hidden states)
     agree within 5%.
   Measured on CPU to set these (this model, float32): perturbing the embeddings by 1e-6 relative, as a
   device's rounding would, left Wanda's masks identical in all 6 layers; SparseGPT's first layer had
   2.8e-5 of its groups flipped and same-mask rows within 9e-6, then 1.4%, 8%, 11%, 13%, 13% of the
   groups in layers 2-6, and output errors 1.028 vs 1.032 (0.4% apart). Changing only the batch size
   (the summation order) gave the same picture.
4. Packed checkpoints on the CUDA backends, each loaded in float16 with each of its sparse backends: no
   layer may fall back to dense, and the logits must match the ``dense`` backend's to 2e-2 relative (fp16
   kernels that sum in another order):
   - the full 30-layer model pruned with Wanda 2:4 on CUDA, on ``semi-structured`` and ``triton``;
   - the same model pruned with magnitude 2:4 and quantized to 4 bits (GPTQ under the mask, group 128) on
     CUDA, on ``triton`` (the 2:4 + INT4 kernel) against its dequantized weights.
5. ``llmprune bench`` on each packed checkpoint (GEMMs on its shapes at M = 1..16, prefill and decode at batch
   1 and 4, eager and as CUDA-graph replays), before the GEMM sweep: the first GPU check spent its time
   limit in that sweep's slow ``semi-structured`` cases and never reached these; in the second, each bench
   step took 100 s at batch 1, 4, 8 and 64 new tokens (eager decoding on the GPU is launch-bound: 20 ms a
   token for the 135M model), hence the smaller sizes.
6. ``scripts/bench_gemm.py`` in float16 on SmolLM2 and Llama-2-7B shapes, ``semi-structured``, ``triton`` and
   ``triton+int4`` (the 2:4 + INT4 kernel) against dense F.linear; every case must have run its own kernel.

It ends with one markdown table (date, GPU, driver, torch and CUDA versions in its heading) to paste
into eval/RESULTS.md, and writes the details under ``--out`` (default ``$OUT``, the folder the device
tool brings back): the log, the summary, bench JSONs.

``--dry-run`` runs the same logic on CPU at tiny sizes (the ``tiny`` preset, ``TRITON_INTERPRET=1`` for
the Triton kernel, the CPU fallbacks elsewhere), with a second CPU run at another batch size standing in
for the CUDA one; CI runs it (tests/test_gpu_check.py).

Also loaded as a pytest plugin (``-p gpu_check``) by step 2, for :func:`pytest_collection_modifyitems`.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree

if TYPE_CHECKING:
    import pytest
    import torch
    from torch import nn

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
# What llmprune and this check import; the GPU machine's image has them (KINDS.md), a missing one
# travels as a wheel in .whl/ (gpu_check.sh installs those first).
REQUIRED = ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "yaml", "tqdm", "pytest")

# Tolerances (see the module docstring for why).
WANDA_FIRST_LAYER_FLIPS = 1e-4
WANDA_ALL_FLIPS = 1e-3
SPARSEGPT_FIRST_LAYER_FLIPS = 1e-3
SPARSEGPT_SAME_MASK_ROW_REL = 1e-5
# The linears that read the first decoder layer's input (the same on both devices).
FIRST_INPUT = re.compile(r"\.self_attn\.[qkv]_proj$")
OUTPUT_ERROR_AGREEMENT = 0.05
BACKEND_LOGITS_REL = 2e-2


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and the dry run."""

    device: str  # where the "CUDA" side runs
    preset: str
    compare_layers: int | None  # depth of the model for the CPU/CUDA comparison (None: the preset's)
    nsamples: int
    seqlen: int
    batch_size: int
    other_batch_size: int  # the CUDA side's (the dry run changes it to change the summation order)
    eval_tokens: tuple[int, int]  # (batch, tokens) for output comparisons
    packed_tokens: tuple[int, int]  # (batch, tokens) for the backends' logits (the dry run's Triton interpreter is slow)
    load_dtype: str  # packed checkpoint and benchmarks
    backends: tuple[str, ...]
    group_size: int  # of the INT4 checkpoint (the tiny model's layers are narrower than 128)
    gemm_args: tuple[str, ...]
    bench_args: tuple[str, ...]
    step_timeout_s: int


REAL = Sizes(device="cuda", preset="smollm2", compare_layers=6, nsamples=16, seqlen=256, batch_size=8,
             other_batch_size=8, eval_tokens=(4, 128), packed_tokens=(4, 64), load_dtype="float16",
             backends=("semi-structured", "triton"), group_size=128,
             gemm_args=("--device", "cuda", "--dtype", "float16", "--ms", "1,4,8,16,128,1024",
                        "--backends", "semi-structured,triton,triton+int4", "--repeats", "30"),
             bench_args=("--device", "cuda", "--dtype", "float16", "--backend", "triton", "--ms", "1,4,8,16",
                         "--batch-sizes", "1,4", "--new-tokens", "32", "--repeats", "30", "--weight-pool-mb", "128"),
             step_timeout_s=300)
DRY = Sizes(device="cpu", preset="tiny", compare_layers=None, nsamples=4, seqlen=64, batch_size=4,
            other_batch_size=2, eval_tokens=(2, 32), packed_tokens=(1, 4), load_dtype="float32",
            backends=("semi-structured", "triton"), group_size=32,
            gemm_args=("--device", "cpu", "--dtype", "float32", "--shapes", "64x128", "--ms", "1,4",
                       "--backends", "semi-structured,triton,triton+int4", "--repeats", "3", "--pool-mb", "0"),
            bench_args=("--device", "cpu", "--dtype", "float32", "--backend", "dense", "--quick",
                        "--weight-pool-mb", "0"), step_timeout_s=120)


@dataclass
class Row:
    check: str
    status: str  # pass | fail
    detail: str
    seconds: float = 0.0


@dataclass
class Context:
    sizes: Sizes
    dry_run: bool
    out: Path
    work: Path
    log: Callable[[str], None] = print
    models: dict[str, Path] = field(default_factory=dict)


class CheckFailed(Exception):
    """A check ran and its result is wrong (the message says what and by how much)."""


# --- pytest plugin (step 2) -------------------------------------------------------------------------

def _needs_cuda(item: pytest.Item) -> bool:
    return any("cuda" in str(mark.kwargs.get("reason", "")).lower() for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep only the tests that skip without CUDA (active when this module is loaded with ``-p gpu_check``)."""
    selected = [item for item in items if _needs_cuda(item)]
    config.hook.pytest_deselected(items=[item for item in items if not _needs_cuda(item)])
    items[:] = selected


# --- helpers ----------------------------------------------------------------------------------------

def _subprocess(ctx: Context, label: str, command: list[str], timeout: int) -> str:
    """Run a command of this check with the same interpreter and environment; its output goes to the log."""
    ctx.log(f"$ {' '.join(command)}")
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    ctx.log((proc.stdout + (f"\n{proc.stderr}" if proc.stderr.strip() else "")).rstrip())
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise CheckFailed(f"{label} exited with {proc.returncode}: {last}")
    return proc.stdout


def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: float32 CPU weight}`` of every linear inside the decoder layers."""
    import torch

    return {name: module.weight.detach().float().cpu().clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and re.search(r"\.layers\.\d+\.", name)}


def _layer_index(name: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


def _fallbacks(model: nn.Module) -> dict[str, str]:
    """Packed linears that run dense instead of the requested backend, and why."""
    import llmprune

    return dict(llmprune.state(model).fallbacks)


def _max_nonzeros_per_group(weight: torch.Tensor) -> int:
    return int((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1).max())


def compare_prunings(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per linear: share of 2:4 groups whose kept weights differ, share of rows with any mask difference,
    relative difference ‖ΔW‖/‖W‖, the largest relative difference among rows with identical masks, and
    whether weights kept by both runs are equal bit for bit."""
    import torch

    stats = {}
    for name, weight in reference.items():
        theirs = other[name]
        keep, their_keep = weight != 0, theirs != 0
        differs = keep != their_keep
        rows_same = ~differs.any(1)
        both = keep & their_keep
        row_rel = ((weight - theirs)[rows_same].norm(dim=1) / weight[rows_same].norm(dim=1).clamp_min(1e-30))
        stats[name] = {
            "layer": _layer_index(name),
            "groups": differs.reshape(weight.shape[0], -1, 4).any(-1).float().mean().item(),
            "rows": (~rows_same).float().mean().item(),
            "rel": ((weight - theirs).norm() / weight.norm().clamp_min(1e-30)).item(),
            "same_mask_row_rel": row_rel.max().item() if row_rel.numel() else 0.0,
            "kept_equal": bool(torch.equal(weight[both], theirs[both])),
            "max_nonzeros": max(_max_nonzeros_per_group(weight), _max_nonzeros_per_group(theirs)),
        }
    return stats


def _output_error(model: nn.Module, dense_hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """‖h − h_dense‖ / ‖h_dense‖ of the final hidden states on ``ids`` (CPU, float32)."""
    import torch

    model = model.float().cpu().eval()
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]
    return ((hidden - dense_hidden).norm() / dense_hidden.norm()).item()


def _group_mean(stats: dict[str, dict], key: str, first_layer_only: bool = False) -> float:
    """Mean of a per-linear share weighted equally per linear (all linears, or the first decoder layer's)."""
    first = min(s["layer"] for s in stats.values())
    values = [s[key] for s in stats.values() if not first_layer_only or s["layer"] == first]
    return sum(values) / len(values)


# --- steps ------------------------------------------------------------------------------------------

def step_versions(ctx: Context) -> str:
    from llmprune.versions import describe, versions

    info = versions()
    ctx.log(describe(info))
    if not ctx.dry_run:
        if not info["cuda"]["available"]:
            raise CheckFailed("CUDA is not usable: " + describe(info).splitlines()[-1])
        if not info["triton_kernel"]["usable"]:
            raise CheckFailed(f"triton kernel not usable: {info['triton_kernel']['reason']}")
    triton = "usable" if info["triton_kernel"]["usable"] else "not usable"
    numba = "usable" if info["numba_kernel"]["usable"] else "not usable"
    return (f"llmprune {info['llmprune']}, torch {info['torch']}, transformers {info['transformers']}, "
            f"triton {info['triton'] or '-'} ({triton}), numba {info['numba'] or '-'} ({numba}), "
            f"cuSPARSELt {'yes' if info['cuda']['cusparselt'] else 'no'}")


def step_cuda_tests(ctx: Context) -> str:
    files = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")
                   if "cuda.is_available" in path.read_text())
    if not files:
        raise CheckFailed("no test file mentions cuda.is_available; nothing to run")
    report = ctx.out / "cuda_tests.xml"
    env_path = os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "gpu_check", "-p", "no:cacheprovider",
               f"--junitxml={report}", *files]
    ctx.log(f"$ PYTHONPATH={env_path} {' '.join(command)}")
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=ctx.sizes.step_timeout_s,
                          env={**os.environ, "PYTHONPATH": env_path}, check=False)
    ctx.log((proc.stdout + proc.stderr).rstrip())
    if not report.is_file():
        raise CheckFailed(f"pytest wrote no report (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    modules = sorted({case.get("classname", "").rpartition(".")[2] for case in suite.iter("testcase")})
    detail = f"{total} tests in {', '.join(modules) or '-'}: {total - failed - errors - skipped} passed, " \
             f"{failed + errors} failed, {skipped} skipped"
    if total == 0:
        raise CheckFailed("no test carries a CUDA skipif; the selection found nothing")
    if failed or errors or proc.returncode not in (0, 5):
        raise CheckFailed(detail)
    if not ctx.dry_run and skipped:
        raise CheckFailed(detail + " (on a GPU machine none may skip; see the log for the reasons)")
    return detail + (" (no CUDA: skipping is expected in a dry run)" if ctx.dry_run else "")


def step_synthetic_models(ctx: Context) -> str:
    from synthetic_model import build

    sizes = ctx.sizes
    ctx.models["compare"] = ctx.work / f"{sizes.preset}-compare"
    record = build(sizes.preset, ctx.models["compare"], layers=sizes.compare_layers, log=ctx.log)
    detail = f"{sizes.preset}: {record['layers']} layers, {record['parameters'] / 1e6:.1f}M parameters"
    if sizes.compare_layers is None:
        ctx.models["full"] = ctx.models["compare"]
    else:
        ctx.models["full"] = ctx.work / f"{sizes.preset}-full"
        full = build(sizes.preset, ctx.models["full"], log=ctx.log)
        detail += f" (comparison); {full['layers']} layers, {full['parameters'] / 1e6:.1f}M parameters (packed, bench)"
    return detail


def _prune_both(ctx: Context, method: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, float]:
    """Prune the comparison model on CPU and on the check's device; (weights, weights, output errors)."""
    import torch
    from transformers import AutoModelForCausalLM

    import llmprune

    sizes, model_dir = ctx.sizes, ctx.models["compare"]
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch, tokens = sizes.eval_tokens
    ids = torch.randint(3, dense.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_hidden = dense(ids, output_hidden_states=True).hidden_states[-1]
    results = []
    for device, batch_size in (("cpu", sizes.batch_size), (sizes.device, sizes.other_batch_size)):
        started = time.perf_counter()
        model = llmprune.prune(model_dir, method=method, pattern="2:4", calib=str(model_dir / "calib.txt"),
                               nsamples=sizes.nsamples, seqlen=sizes.seqlen, device=device, dtype="float32",
                               batch_size=batch_size, progress=False)
        ctx.log(f"{method} 2:4 on {device} (batch {batch_size}): {time.perf_counter() - started:.1f} s")
        results.append((_linear_weights(model), _output_error(model, dense_hidden, ids)))
        del model
    (cpu, cpu_error), (other, other_error) = results
    return cpu, other, cpu_error, other_error


def _common_checks(stats: dict[str, dict], cpu_error: float, other_error: float) -> list[str]:
    """What both methods must satisfy: exact 2:4, and output errors against dense that agree."""
    problems = []
    not_24 = [name for name, s in stats.items() if s["max_nonzeros"] > 2]
    if not_24:
        problems.append(f"not 2:4 (a group keeps more than 2): {', '.join(not_24[:3])}")
    if abs(cpu_error - other_error) > OUTPUT_ERROR_AGREEMENT * max(cpu_error, other_error):
        problems.append(f"output error against dense {cpu_error:.4f} (CPU) vs {other_error:.4f}: more than "
                        f"{OUTPUT_ERROR_AGREEMENT:.0%} apart")
    return problems


def _log_comparison(ctx: Context, method: str, stats: dict[str, dict]) -> None:
    ctx.log(f"{method}: per linear, CPU vs {ctx.sizes.device}")
    ctx.log("| linear | groups differ | rows differ | rel ΔW | same-mask rows max rel | kept equal |")
    ctx.log("|---|---:|---:|---:|---:|---|")
    for name, s in stats.items():
        ctx.log(f"| {name} | {s['groups']:.2e} | {s['rows']:.3f} | {s['rel']:.2e} | {s['same_mask_row_rel']:.2e} | "
                f"{s['kept_equal']} |")


def step_wanda(ctx: Context) -> str:
    cpu, other, cpu_error, other_error = _prune_both(ctx, "wanda")
    stats = compare_prunings(cpu, other)
    _log_comparison(ctx, "wanda", stats)
    first, overall = _group_mean(stats, "groups", True), _group_mean(stats, "groups")
    problems = _common_checks(stats, cpu_error, other_error)
    if not all(s["kept_equal"] for s in stats.values()):
        problems.append("weights kept by both runs differ (Wanda keeps the original values)")
    if first > WANDA_FIRST_LAYER_FLIPS:
        problems.append(f"{first:.2e} of the first layer's groups differ (at most {WANDA_FIRST_LAYER_FLIPS:g})")
    if overall > WANDA_ALL_FLIPS:
        problems.append(f"{overall:.2e} of all groups differ (at most {WANDA_ALL_FLIPS:g})")
    detail = (f"2:4 exact; groups differing: first layer {first:.1e}, all {overall:.1e}; kept weights equal; "
              f"output error vs dense {cpu_error:.4f} (CPU) / {other_error:.4f}")
    if problems:
        raise CheckFailed("; ".join(problems) + f" [{detail}]")
    return detail


def step_sparsegpt(ctx: Context) -> str:
    cpu, other, cpu_error, other_error = _prune_both(ctx, "sparsegpt")
    stats = compare_prunings(cpu, other)
    _log_comparison(ctx, "sparsegpt", stats)
    first_layer = min(s["layer"] for s in stats.values())
    checked = {name: s for name, s in stats.items() if s["layer"] == first_layer and FIRST_INPUT.search(name)}
    if not checked:
        raise CheckFailed(f"no q/k/v projection in decoder layer {first_layer}: {', '.join(list(stats)[:4])}")
    first = _group_mean(checked, "groups")
    row_rel = max(s["same_mask_row_rel"] for s in checked.values())
    overall, overall_rel = _group_mean(stats, "groups"), _group_mean(stats, "rel")
    problems = _common_checks(stats, cpu_error, other_error)
    if first > SPARSEGPT_FIRST_LAYER_FLIPS:
        problems.append(f"{first:.2e} of the first layer's q/k/v groups differ (at most {SPARSEGPT_FIRST_LAYER_FLIPS:g})")
    if row_rel > SPARSEGPT_SAME_MASK_ROW_REL:
        problems.append(f"first-layer q/k/v rows with the same mask differ by {row_rel:.2e} relative "
                        f"(at most {SPARSEGPT_SAME_MASK_ROW_REL:g})")
    detail = (f"2:4 exact; first layer q/k/v: {first:.1e} of groups differ, same-mask rows within {row_rel:.1e}; all "
              f"layers (compounding, not checked): {overall:.1e} of groups, mean rel ΔW {overall_rel:.1e}; output "
              f"error vs dense {cpu_error:.4f} (CPU) / {other_error:.4f}")
    if problems:
        raise CheckFailed("; ".join(problems) + f" [{detail}]")
    return detail


@dataclass(frozen=True)
class Packed:
    """A packed checkpoint the check prunes on the device and loads on its sparse backends."""

    key: str  # its name in ``ctx.models`` and on disk
    method: str
    quantize: str | None  # None, or ``w4``: the 2:4 + INT4 format
    backends: Callable[[Sizes], tuple[str, ...]]


PACKED_24 = Packed("packed-wanda-24", "wanda", None, lambda sizes: sizes.backends)
PACKED_INT4 = Packed("packed-magnitude-24-w4", "magnitude", "w4", lambda sizes: ("triton",))


def step_packed_backends(ctx: Context, packed: Packed) -> str:
    import torch

    import llmprune

    sizes = ctx.sizes
    started = time.perf_counter()
    quantize = {"quantize": packed.quantize, "group_size": sizes.group_size} if packed.quantize else {}
    model = llmprune.prune(ctx.models["full"], method=packed.method, pattern="2:4",
                           calib=str(ctx.models["full"] / "calib.txt"), nsamples=sizes.nsamples, seqlen=sizes.seqlen,
                           device=sizes.device, progress=False, **quantize)
    ctx.models[packed.key] = Path(llmprune.save(model, ctx.work / packed.key))
    del model
    ctx.log(f"pruned on {sizes.device} and saved packed to {ctx.models[packed.key]} in "
            f"{time.perf_counter() - started:.1f} s")
    vocab = json.loads((ctx.models["full"] / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, sizes.packed_tokens, generator=torch.Generator().manual_seed(2))

    def logits(backend: str) -> tuple[torch.Tensor, dict[str, str]]:
        loaded = llmprune.load(ctx.models[packed.key], device=sizes.device, dtype=sizes.load_dtype, backend=backend)
        with torch.no_grad():
            out = loaded(ids.to(sizes.device)).logits.float().cpu()
        return out, _fallbacks(loaded)

    reference, _ = logits("dense")
    parts, problems = [], []
    for backend in packed.backends(sizes):
        out, fallbacks = logits(backend)
        rel = ((out - reference).norm() / reference.norm()).item()
        reasons = sorted(set(fallbacks.values()))
        parts.append(f"{backend}: logits within {rel:.1e} of dense, "
                     f"{len(fallbacks)} layer(s) fell back" + (f" ({'; '.join(reasons)[:120]})" if reasons else ""))
        if not math.isfinite(rel) or rel > BACKEND_LOGITS_REL:
            problems.append(f"{backend} logits differ from the dense backend's by {rel:.2e} (at most {BACKEND_LOGITS_REL:g})")
        if fallbacks and not ctx.dry_run:
            problems.append(f"{backend}: {len(fallbacks)} layer(s) fell back to dense: {'; '.join(reasons)[:300]}")
    detail = f"{packed.method} 2:4{' + ' + packed.quantize if packed.quantize else ''}, {sizes.load_dtype}; " + \
        "; ".join(parts)
    if problems:
        raise CheckFailed("; ".join(problems) + f" [{detail}]")
    return detail


def _speedups(rows: list[dict], shape: tuple[int, int] | None = None) -> str:
    """``backend: speedup at each M`` for one shape (the largest by default)."""
    shape = shape or max({(r["out"], r["in"]) for r in rows}, key=lambda s: s[0] * s[1])
    parts = []
    for backend in dict.fromkeys(r["backend"] for r in rows if r["backend"] != "dense"):
        cases = sorted((r["m"], r["speedup"]) for r in rows if (r["out"], r["in"]) == shape and r["backend"] == backend)
        parts.append(f"{backend} " + ", ".join(f"M={m}: {s:.2f}x" for m, s in cases))
    return f"{shape[0]}x{shape[1]}: " + "; ".join(parts)


def _check_gemm_rows(ctx: Context, rows: list[dict]) -> None:
    if not rows:
        raise CheckFailed("no GEMM results")
    bad = [r for r in rows if not all(math.isfinite(r[key]) and r[key] > 0 for key in ("dense_us", "sparse_us"))]
    if bad:
        raise CheckFailed(f"{len(bad)} GEMM case(s) without a valid time, e.g. {bad[0]}")
    fell_back = [r for r in rows if r["backend"] != "dense" and r["ran"] != r["backend"]]
    if fell_back and not ctx.dry_run:
        cases = sorted({f"{r['out']}x{r['in']} {r['backend']}" for r in fell_back})
        raise CheckFailed(f"{len(fell_back)} case(s) ran dense instead of their kernel: {', '.join(cases[:6])}")


def step_bench_gemm(ctx: Context) -> str:
    result = ctx.out / "gemm.json"
    _subprocess(ctx, "bench_gemm.py", [sys.executable, str(SCRIPTS / "bench_gemm.py"), *ctx.sizes.gemm_args,
                                       "--json", str(result)], ctx.sizes.step_timeout_s)
    record = json.loads(result.read_text())
    _check_gemm_rows(ctx, record["gemm"])
    return f"{record['dtype']}, {len({(r['out'], r['in']) for r in record['gemm']})} shapes; " + _speedups(record["gemm"])


def step_llmprune_bench(ctx: Context, packed: Packed) -> str:
    result = ctx.out / f"bench-{packed.key}.json"
    _subprocess(ctx, "llmprune bench", [sys.executable, "-m", "llmprune", "bench", str(ctx.models[packed.key]),
                                        *ctx.sizes.bench_args, "--json", str(result), "--quiet"],
                ctx.sizes.step_timeout_s)
    record = json.loads(result.read_text())
    _check_gemm_rows(ctx, [r for r in record["gemm"] if r["backend"] != "dense"] or record["gemm"])
    decode = record["decode"]
    if not decode or not all(r["decode_tok_s"] > 0 for r in decode):
        raise CheckFailed(f"decode benchmark without results: {decode}")
    dense = {r["batch"]: r["decode_tok_s"] for r in decode if r["model"] == "dense"}
    tok_s = ", ".join(f"batch {r['batch']}: {r['decode_tok_s']:.0f} tok/s ({r['decode_tok_s'] / dense[r['batch']]:.2f}x)"
                      for r in decode if r["model"] == "sparse")
    return f"sparse backends run: {', '.join(record.get('sparse_backends_run', ['?']))}; decode {tok_s}"


STEPS: list[tuple[str, Callable[[Context], str]]] = [
    ("versions", step_versions),
    ("CUDA-only tests", step_cuda_tests),
    ("synthetic models", step_synthetic_models),
    ("Wanda 2:4, CPU vs CUDA", step_wanda),
    ("SparseGPT 2:4, CPU vs CUDA", step_sparsegpt),
    ("packed 2:4 on CUDA backends", functools.partial(step_packed_backends, packed=PACKED_24)),
    ("packed 2:4 + INT4 on CUDA", functools.partial(step_packed_backends, packed=PACKED_INT4)),
    ("llmprune bench, 2:4", functools.partial(step_llmprune_bench, packed=PACKED_24)),
    ("llmprune bench, 2:4 + INT4", functools.partial(step_llmprune_bench, packed=PACKED_INT4)),
    ("bench_gemm.py", step_bench_gemm),
]
# A step that cannot run without an earlier one's output.
NEEDS = {"Wanda 2:4, CPU vs CUDA": "synthetic models", "SparseGPT 2:4, CPU vs CUDA": "synthetic models",
         "packed 2:4 on CUDA backends": "synthetic models", "packed 2:4 + INT4 on CUDA": "synthetic models",
         "llmprune bench, 2:4": "packed 2:4 on CUDA backends",
         "llmprune bench, 2:4 + INT4": "packed 2:4 + INT4 on CUDA"}


def _output(*command: str) -> str:
    """A helper command's stdout, or "" when it is missing or fails (heading facts only)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def heading(dry_run: bool) -> str:
    """Date, GPU, driver, torch/CUDA and the commit checked."""
    import torch

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = "no GPU"
    if torch.cuda.is_available():
        driver = _output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines()
        gpu = f"{torch.cuda.get_device_name(0)}, driver {driver[0] if driver else 'unknown'}"
    commit = _output("git", "-C", str(REPO), "rev-parse", "--short", "HEAD") or "unknown (no git metadata in this copy)"
    if _output("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    kind = "dry run on CPU (tiny sizes; not a GPU result)" if dry_run else "GPU check"
    return (f"### {kind}, {now}\n{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}); "
            f"commit {commit}; `scripts/gpu_check.sh{' --dry-run' if dry_run else ''}`")


def summary(rows: list[Row], dry_run: bool) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [heading(dry_run), "", "| check | result | details | s |", "|---|---|---|---:|"]
    lines += [f"| {row.check} | {row.status} | {cell(row.detail)} | {row.seconds:.0f} |" for row in rows]
    failed = sum(row.status == "fail" for row in rows)
    lines += ["", f"{len(rows) - failed} of {len(rows)} checks passed" + (f", {failed} FAILED" if failed else "")]
    return "\n".join(lines)


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    status: dict[str, str] = {}
    try:
        for name, step in STEPS:
            needed = NEEDS.get(name)
            if needed and status.get(needed) != "pass":
                rows.append(Row(name, "fail", f"not run: {needed} did not pass"))
                status[name] = "fail"
                continue
            ctx.log(f"\n== {name}")
            started = time.perf_counter()
            try:
                detail = step(ctx)
                rows.append(Row(name, "pass", detail, time.perf_counter() - started))
            except Exception as exc:  # one broken step must not hide the others' results
                ctx.log(traceback.format_exc())
                message = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
                rows.append(Row(name, "fail", message[:600], time.perf_counter() - started))
            status[name] = rows[-1].status
    except KeyboardInterrupt:  # gpu_check.sh's time limit: report what ran, and what did not
        done = {row.check for row in rows}
        rows += [Row(name, "fail", "not run: time limit reached") for name, _ in STEPS if name not in done]
    return rows


def missing_modules() -> list[str]:
    import importlib.util

    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same logic on CPU at tiny sizes (no GPU needed)")
    parser.add_argument("--out", default=os.environ.get("OUT") or None,
                        help="folder for the log, summary and JSON results (default $OUT, else a temporary folder)")
    args = parser.parse_args(argv)
    missing = missing_modules()
    if missing:
        print(f"gpu_check: error: {', '.join(missing)} not importable by {sys.executable}; carry wheels in .whl/ "
              f"(README, Development)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-out-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernel on CPU, as its own test runs it
    else:
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_check: error: no CUDA device visible to torch {torch.__version__}; on a machine without "
                  f"a GPU run `scripts/gpu_check.sh --dry-run`", file=sys.stderr)
            return 2
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))  # synthetic_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint load would bury the log
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Context(sizes=DRY if args.dry_run else REAL, dry_run=args.dry_run, out=out, work=Path(work))
        rows = run(ctx)
    text = summary(rows, args.dry_run)
    (out / "summary.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\n(details: {out})")
    return 1 if any(row.status == "fail" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
