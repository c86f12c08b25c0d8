"""Command line: ``llmprune prune | eval | info | compare``. Parses, calls the API, prints."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

from .errors import LLMPruneError
from .kernels import BACKENDS

EPILOG = """examples:
  llmprune prune ../shared/models/smollm2-135m-instruct-q4_1 --method wanda --pattern 2:4 --out smollm2-wanda-24
  llmprune eval smollm2-wanda-24 --ppl wikitext2 --window-stride 8
  llmprune info smollm2-wanda-24
  llmprune eval smollm2-wanda-24 --tasks piqa,arc_easy,hellaswag --limit 500 --json wanda.json
  llmprune compare --results dense.json wanda.json --out report/
"""


# CLI flags forwarded to the pruner's constructor when given.
PRUNER_OPTIONS = ("blocksize", "percdamp", "hessian_dtype", "act_order")
# CLI flags forwarded to the refiner's constructor (``dsnot_cycles`` → ``cycles``).
REFINE_OPTIONS = ("dsnot_cycles", "dsnot_threshold", "dsnot_skip")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="dtype to load the model in (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be positive, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def _add_task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=None,
                        help="comma-separated zero-shot tasks on local data: hellaswag, piqa, arc_easy, arc_challenge, "
                             "winogrande, boolq, openbookqa, lambada_openai")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="score only the first N documents of each task (a fraction < 1 takes that share)")
    parser.add_argument("--data-dir", default=None,
                        help="folder of the task .jsonl files (default $LLMPRUNE_SHARED/data/tasks, i.e. ../shared/data/tasks)")
    parser.add_argument("--tasks-dir", default=None, help="folder of lm-eval task configs (default: the ones llmprune ships, llmprune/eval/tasks)")


def build_parser() -> argparse.ArgumentParser:
    from .eval.speed import GEMM_MS

    from .pruners import PRUNERS
    from .versions import VersionAction

    parser = argparse.ArgumentParser(prog="llmprune", description="Post-training pruning for LLMs.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=VersionAction,
                        help="print the versions of llmprune, torch, transformers and lm-eval, whether the numba and "
                             "triton kernels and CUDA are usable here, and exit")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="prune a model layer by layer and save it",
                                description="Prune a causal LM one decoder layer at a time on calibration text and save the "
                                            "result. A local safetensors checkpoint directory is pruned out of core: "
                                            "its layers are read from the shards, pruned and written one at a time, "
                                            "so the model need not fit in memory. A .gguf file or a Hub id is loaded "
                                            "whole first (GGUF tensors are dequantized together by transformers).")
    prune.add_argument("model", help="local HF directory, .gguf file or directory, or a Hub id")
    prune.add_argument("--method", default="wanda", help=f"one of: {', '.join(sorted(PRUNERS))} (default wanda)")
    prune.add_argument("--pattern", default=None, help="'unstructured' (default), N:M such as 2:4 or 4:8 (N kept of every M), "
                                                        "hybrid:2:4 (2:4 with a dense region, see --dense-fraction), or "
                                                        "dense (nothing pruned, with --quantize)")
    prune.add_argument("--sparsity", type=float, default=None, help="fraction pruned per row for unstructured, in [0, 1) (default 0.5)")
    prune.add_argument("--calib", default="wikitext2", help="wikitext2, c4, or a local .txt/.json/.jsonl/.parquet file")
    prune.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    prune.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    prune.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    prune.add_argument("--blocksize", type=int, default=None, help="SparseGPT: columns per lazy-update block (default 128)")
    prune.add_argument("--percdamp", type=float, default=None, help="SparseGPT: damping as a fraction of mean diag(H) (default 0.01)")
    prune.add_argument("--act-order", dest="act_order", action=argparse.BooleanOptionalAction, default=None,
                       help="SparseGPT and the GPTQ pass of --quantize: process the input columns by decreasing "
                            "diag(H), N:M groups as units (GPTQ's act-order). Default: on with --quantize, off "
                            "otherwise")
    prune.add_argument("--hessian-dtype", dest="hessian_dtype", default=None, choices=["float32", "float64"],
                       help="SparseGPT: accumulation and factorisation dtype (default float32)")
    prune.add_argument("--refine", default=None, choices=["dsnot"], help="refine every base mask with DSnoT prune-and-grow")
    prune.add_argument("--dsnot-cycles", dest="dsnot_cycles", type=int, default=None, help="DSnoT: grow/prune cycles per row (default 50)")
    prune.add_argument("--dsnot-threshold", dest="dsnot_threshold", type=float, default=None,
                       help="DSnoT: stop a row when its expected error |e| falls under this (default 0.1)")
    prune.add_argument("--dsnot-skip", dest="dsnot_skip", default=None,
                       help="DSnoT: comma-separated name parts of linears not to refine, e.g. 'mlp' as in the paper's code")
    prune.add_argument("--allocation", default="uniform", choices=["uniform", "owl"],
                       help="per-layer sparsity: uniform (default) or OWL outlier-weighted (unstructured only)")
    prune.add_argument("--owl-lambda", dest="owl_lambda", type=float, default=0.08, help="OWL: sparsity spread ±λ (default 0.08)")
    prune.add_argument("--owl-m", dest="owl_m", type=float, default=5.0, help="OWL: outlier threshold, M × the layer's mean score (default 5)")
    prune.add_argument("--dense-fraction", dest="dense_fraction", type=float, default=None,
                       help="hybrid: fraction of each linear's input columns kept dense, in [0, 1) (default 0.25); "
                            "sparsity is (1 - F) / 2")
    prune.add_argument("--hybrid-select", dest="hybrid_select", default="error", choices=["error", "saliency"],
                       help="hybrid: choose dense blocks greedily by measured reconstruction error (default) or by "
                            "per-block saliency")
    prune.add_argument("--hybrid-budget", dest="hybrid_budget", default="uniform", choices=["uniform", "global"],
                       help="hybrid: the same fraction in every linear (default), or one model-wide budget spent "
                            "where it lowers the error most (a dense pre-pass)")
    prune.add_argument("--hybrid-block", dest="hybrid_block", type=int, default=64,
                       help="hybrid: width of a dense block in input columns (default 64, the 2:4 kernels' granularity)")
    prune.add_argument("--format", dest="storage", default="auto", choices=["auto", "bitmask"],
                       help="auto (default): 2:4 and hybrid packed, other patterns dense safetensors; bitmask: other "
                            "patterns in the legacy compressed-tensors sparse-bitmask layout (smaller files, loads dense)")
    prune.add_argument("--quantize", default=None, metavar="wB",
                       help="quantize the kept weights to B bits (w4): SparseGPT prunes and quantizes in one OBS sweep, "
                            "other methods prune and then run GPTQ under the mask; with --pattern dense it is plain "
                            "GPTQ. A 2:4 run is saved as 2:4 + INT4 codes")
    prune.add_argument("--group-size", dest="group_size", type=int, default=128,
                       help="--quantize: input columns per scale (default 128; -1: one scale per row)")
    grid = prune.add_mutually_exclusive_group()
    grid.add_argument("--sym", dest="symmetric", action="store_true", default=False,
                      help="--quantize: symmetric grid, zero point 2^(B-1)")
    grid.add_argument("--asym", dest="symmetric", action="store_false",
                      help="--quantize: a zero point per group (default: the same bytes, a closer grid)")
    prune.add_argument("--clip", action="store_true",
                       help="--quantize: search each group's range (shrinking it up to half) for the least rounding "
                            "error instead of spanning min to max")
    prune.add_argument("--passes", type=int, default=None, choices=[1, 2],
                       help="1: every GEMM of a layer runs once, and each group of linears gets its statistics with "
                            "the groups before it already pruned; 2: the papers' order, statistics with the dense "
                            "layer, then a second pass for the outputs (holds less). Default: 1 unless its memory "
                            "(every calibration token's MLP activations) would take over half of what is free")
    prune.add_argument("--out", required=True, help="output directory (written atomically)")
    prune.add_argument("--in-memory", dest="in_memory", action="store_true",
                       help="load the whole model first even when MODEL is a safetensors checkpoint directory "
                            "(by default those are pruned out of core: one decoder layer in memory at a time)")
    prune.add_argument("--offload-activations", dest="offload_activations", default=None, metavar="DIR",
                       help="keep the calibration activations between layers in a memory-mapped file under DIR "
                            "instead of RAM")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    _add_common(prune)

    evaluate = commands.add_parser("eval", help="measure perplexity and zero-shot task accuracy of a model or a pruned checkpoint",
                                   description="Perplexity with the paper protocol (non-overlapping windows of --seqlen) "
                                               "and/or zero-shot lm-eval tasks on local data (--tasks). --batch-size "
                                               "defaults to 1 for perplexity and 16 for tasks.")
    evaluate.add_argument("model", help="checkpoint directory, .gguf, or Hub id")
    evaluate.add_argument("--ppl", default=None, help="wikitext2, c4, or a local text file (default wikitext2 unless --tasks is given)")
    _add_task_options(evaluate)
    evaluate.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    evaluate.add_argument("--window-stride", type=int, default=1, help="score every k-th window only (protocol subset: 8)")
    evaluate.add_argument("--backend", default="auto", choices=BACKENDS,
                          help="how packed 2:4 layers compute: CUDA 2:4 kernels (semi-structured), our Triton (CUDA) or numba "
                               "(CPU) decode kernels, exact dense, or auto (default: numba on CPU where it applies; on CUDA dense, triton for 2:4+INT4)")
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file (llmprune compare --results reads it)")
    _add_common(evaluate)
    evaluate.set_defaults(batch_size=None)

    export = commands.add_parser("export", help="unpack a packed 2:4 checkpoint into a plain dense one",
                                 description="Write an ordinary dense transformers checkpoint from a packed llmprune checkpoint.")
    export.add_argument("directory", help="a checkpoint written by llmprune prune")
    export.add_argument("--dense", required=True, metavar="OUT", help="output directory (written atomically)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    export.add_argument("--debug", action="store_true", help="show tracebacks")

    info = commands.add_parser("info", help="show the recipe, per-layer sparsity and size of a pruned checkpoint")
    info.add_argument("directory")
    info.add_argument("--debug", action="store_true", help="show tracebacks")

    compare = commands.add_parser("compare", help="one table and plots of a dense model against pruned ones",
                                  description="Dense and pruned models side by side (method, pattern, sparsity, perplexity, "
                                              "task accuracy, size) in OUT/report.md with PNG plots. Rows come from "
                                              "`llmprune eval --json` files (--results) or from evaluating the models "
                                              "here (--ppl and/or --tasks).")
    compare.add_argument("models", nargs="*", help="dense model first, then pruned checkpoints")
    compare.add_argument("--results", nargs="+", default=[], metavar="JSON",
                         help="result files of llmprune eval --json; a listed model with one is not re-evaluated")
    compare.add_argument("--ppl", default=None, help="evaluate models without a result file on this perplexity set")
    _add_task_options(compare)
    compare.add_argument("--seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    compare.add_argument("--window-stride", type=int, default=1, help="score every k-th perplexity window only")
    compare.add_argument("--out", required=True, help="report directory (report.md, plots, comparison.json)")
    _add_common(compare)
    compare.set_defaults(batch_size=None)

    bench = commands.add_parser("bench", help="speed of 2:4 sparse against dense: GEMMs on the model's shapes, and decode",
                                description="(a) y = x·Wᵀ on each linear shape of the model for several M, dense F.linear "
                                            "against each sparse backend; (b) prefill time and greedy decode tokens/s of "
                                            "the dense and the sparse model on the same prompts, and of the sparse model "
                                            "with its 2:4 linears taking no time (the end-to-end ceiling). A packed "
                                            "checkpoint is compared with itself on the dense backend; a dense model with a 2:4 "
                                            "(magnitude) copy of itself.")
    bench.add_argument("model", help="packed checkpoint directory, or a dense model (local dir, .gguf, Hub id)")
    bench.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="sparse backend of the sparse model (default auto: numba on CPU where it applies; on CUDA dense, triton for 2:4+INT4)")
    bench.add_argument("--ms", default=",".join(map(str, GEMM_MS)), help="GEMM rows M (batch × tokens), comma-separated")
    bench.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes, comma-separated (default 1,8,32)")
    bench.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    bench.add_argument("--new-tokens", type=int, default=128, help="generated tokens per sequence (default 128)")
    bench.add_argument("--repeats", type=int, default=100, help="GEMM repeats per case (median; fewer past 2 s)")
    bench.add_argument("--weight-pool-mb", type=int, default=None,
                       help="GEMM weights rotate through copies of at least this many MiB, so that they stream from "
                            "memory as in decode (default 256; 0 times one weight, hot in cache)")
    bench.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                       help="skip the decode run with the 2:4 linears taking no time (the most 2:4 can gain end to end)")
    bench.add_argument("--int4", action="store_true",
                       help="with a dense model: the 2:4 copy's kept values become random 4-bit codes (a 2:4 + INT4 "
                            "model of the same shapes, for speed only; a packed 2:4 + INT4 checkpoint needs no flag)")
    bench.add_argument("--quick", action="store_true", help="small run for a smoke test: M 1,16, batch 1, 16+8 tokens")
    bench.add_argument("--json", default=None, help="write the results here")
    bench.add_argument("--plot", default=None, help="PNG of GEMM speedup against M (default: next to --json)")
    _add_common(bench)
    return parser


def recipe_from_args(args: argparse.Namespace):
    """The ``Recipe`` of ``llmprune prune``'s flags; building it validates all of them."""
    from .recipe import Recipe

    options = {k: getattr(args, k) for k in PRUNER_OPTIONS if getattr(args, k) is not None}
    refine_options = {k.removeprefix("dsnot_"): getattr(args, k) for k in REFINE_OPTIONS if getattr(args, k) is not None}
    if "skip" in refine_options:
        refine_options["skip"] = tuple(part for part in refine_options["skip"].split(",") if part)
    return Recipe.build(args.method, args.pattern, args.sparsity, refine=args.refine, refine_options=refine_options,
                        allocation=args.allocation, owl_lambda=args.owl_lambda, owl_m=args.owl_m,
                        dense_fraction=args.dense_fraction, hybrid_select=args.hybrid_select,
                        hybrid_budget=args.hybrid_budget, hybrid_block=args.hybrid_block, calib=args.calib,
                        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, passes=args.passes,
                        quantize=args.quantize, group_size=args.group_size, symmetric=args.symmetric,
                        clip=args.clip, **options)


def cmd_prune(args: argparse.Namespace) -> None:
    from . import distributed
    from .checkpoint import check_output_dir, check_storage, save
    from .loading import is_safetensors_checkpoint, load_pretrained
    from .pipeline import prune, prune_checkpoint
    from .resources import peak_rss_mb
    from .state import state

    recipe = recipe_from_args(args)
    check_storage(args.storage, recipe.pattern)
    check_output_dir(args.out, args.overwrite)
    distributed.init_from_env(args.device)
    options = {"device": args.device, "batch_size": args.batch_size, "progress": not args.quiet,
               "offload_activations": args.offload_activations}
    out_of_core = is_safetensors_checkpoint(args.model) and not args.in_memory
    if out_of_core:
        report = prune_checkpoint(args.model, args.out, recipe, dtype=args.dtype, overwrite=args.overwrite,
                                  storage=args.storage, **options)
    else:
        model, tokenizer = load_pretrained(args.model, args.dtype)
        prune(model, recipe=recipe, **options)
        report = state(model).report
        if distributed.is_leader():
            save(model.to("cpu"), args.out, tokenizer=tokenizer, overwrite=args.overwrite, storage=args.storage)
    leader, ranks = distributed.is_leader(), distributed.world()
    distributed.finish()
    if not leader:
        return
    summary = report.summary
    dense = f" ({summary.dense_fraction:.3f} of them in dense regions)" if summary.dense_fraction else ""
    print(f"pruned {args.model} with {args.method} {report.recipe.pattern}: "
          f"sparsity {summary.sparsity:.4f} of {summary.prunable_params:,} prunable weights{dense} "
          f"in {summary.seconds:.1f} s; saved to {args.out}")
    print(f"{'out-of-core (one decoder layer in memory at a time)' if out_of_core else 'in memory'}"
          f"{f', data-parallel over {ranks} processes' if ranks > 1 else ''}; peak RSS of this process "
          f"{peak_rss_mb() / 1024:.2f} GiB")


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval import perplexity
    from .eval.harness import check_data, describe_tasks, evaluate_tasks, resolve_tasks
    from .eval.report import result_record
    from .loading import load
    from .state import state

    if args.tasks:  # a bad task name or missing data fails before the model loads
        check_data(resolve_tasks(args.tasks, args.tasks_dir), args.data_dir)

    model = load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    reasons = Counter(state(model).fallbacks.values())
    for reason, count in reasons.items():
        print(f"{count} packed linear(s) run on the exact dense path: {reason}", file=sys.stderr)
    ppl = args.ppl or (None if args.tasks else "wikitext2")
    ppl_result = task_result = None
    if ppl:
        ppl_result = perplexity(model, ppl, seqlen=args.seqlen, window_stride=args.window_stride,
                                batch_size=args.batch_size or 1, progress=not args.quiet)
        print(ppl_result.describe())
    if args.tasks:
        task_result = evaluate_tasks(model, args.tasks, limit=args.limit, batch_size=args.batch_size or 16,
                                     tasks_dir=args.tasks_dir, data_dir=args.data_dir, progress=not args.quiet)
        print(describe_tasks(task_result))
    if args.json:
        Path(args.json).write_text(json.dumps(result_record(args.model, ppl_result, task_result), indent=1))


def linear_sizes(directory: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """(bytes on disk, bytes if stored dense in the model's dtype) per linear (``shapes``: name → (out, in)),
    from config.json and the safetensors headers alone; works for every storage format."""
    import torch

    from .checkpoint.safetensors import ST_DTYPES, ST_SIZES, read_layout
    from .resources import read_json

    config = read_json(directory / "config.json", f"{directory} has no config.json")
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    itemsize = ST_SIZES[ST_DTYPES.get(dtype, "F32")]
    layout = read_layout(directory)
    sizes = {}
    for name, (out_features, in_features) in shapes.items():
        keys = {k.removeprefix(name + "."): info for k, info in layout.items() if k.startswith(name + ".")}
        bias = keys.get("bias")
        dense = out_features * in_features * itemsize + (bias.end - bias.start if bias else 0)
        sizes[name] = (sum(info.end - info.start for info in keys.values()), dense)
    return sizes


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import read_report

    directory = Path(args.directory)
    report = read_report(directory)
    recipe, summary = report.recipe, report.summary
    calib = recipe.calibration
    print(f"{directory}: {recipe.method} {recipe.pattern} from {recipe.source}")
    print(f"calibration: {calib['spec']}, {calib['nsamples']} x {calib['seqlen']} tokens, seed {calib['seed']}")
    phases = ", ".join(f"{k} {v} s" for k, v in summary.phase_seconds.items())
    dense = f" ({summary.dense_fraction:.3f} of them in dense regions)" if summary.dense_fraction else ""
    print(f"sparsity {summary.sparsity:.4f} over {summary.prunable_params:,} prunable weights{dense}, "
          f"pruned in {summary.seconds} s ({phases})")
    sizes = linear_sizes(directory, {layer.name: layer.shape for layer in report.layers})
    files = sorted(directory.glob("*.safetensors"))
    on_disk = sum(f.stat().st_size for f in files)
    dense_total = on_disk + sum(dense - disk for disk, dense in sizes.values())
    print(f"size on disk: {on_disk / 2**20:.2f} MiB in {len(files)} safetensors file(s); dense would be "
          f"{dense_total / 2**20:.2f} MiB ({on_disk / dense_total:.3f} of dense)")
    width = max(len(layer.name) for layer in report.layers)
    print(f"{'linear':<{width}}  {'shape':>11}  {'sparsity':>8}  {'rel_error':>9}  {'KiB':>8}  {'of dense':>8}")
    for layer in report.layers:
        shape = "x".join(map(str, layer.shape))
        error = "-" if layer.rel_error is None else f"{layer.rel_error:.4f}"
        disk, dense = sizes[layer.name]
        print(f"{layer.name:<{width}}  {shape:>11}  {layer.sparsity:>8.4f}  {error:>9}  {disk / 1024:>8.1f}  {disk / dense:>8.3f}")


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise LLMPruneError(f"{what} must be positive integers separated by commas; got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> None:
    import platform

    import torch

    from .adapter import ModelAdapter
    from .checkpoint import is_packed_checkpoint
    from .device import resolve_device
    from .eval.speed import FREE, POOL_BYTES, QUICK_MS, decode_benchmark, decode_table, free_copy, gemm_benchmark, \
        gemm_table, plot_speedups, sparse_copy
    from .kernels import sparse_backends
    from .loading import load
    from .sparse_linear import SparseLinear

    ms = list(QUICK_MS) if args.quick else _int_list(args.ms, "--ms")
    batch_sizes = [1] if args.quick else _int_list(args.batch_sizes, "--batch-sizes")
    prompt_len, new_tokens, repeats = (16, 8, 10) if args.quick else (args.prompt_len, args.new_tokens, args.repeats)
    for flag, value in (("--prompt-len", prompt_len), ("--new-tokens", new_tokens), ("--repeats", repeats)):
        if value < 1:
            raise LLMPruneError(f"{flag} must be a positive integer; got {value}")
    device = resolve_device(args.device)
    packed = Path(args.model).is_dir() and is_packed_checkpoint(args.model)
    if packed and args.int4:
        raise LLMPruneError(f"--int4 makes a 2:4 + INT4 copy of a dense model; {args.model} is a packed checkpoint, "
                            f"timed in its own format")
    dense = load(args.model, device=device, dtype=args.dtype, backend="dense")
    sparse = (load(args.model, device=device, dtype=args.dtype, backend=args.backend) if packed
              else sparse_copy(dense, args.backend, int4=args.int4))
    dtype = next(p.dtype for p in dense.parameters() if p.is_floating_point())
    linears = ([m for m in sparse.modules() if isinstance(m, SparseLinear)] if packed
               else ModelAdapter(dense).all_linears().values())
    shapes = list(dict.fromkeys((linear.out_features, linear.in_features) for linear in linears))
    int4 = args.int4 or packed and any(m.quantized() is not None for m in linears)  # 2:4 + INT4: time both formats
    backends = ["dense"] + ([] if args.backend == "dense" else list(sparse_backends(device, int4)))
    ran = sorted({m.backend for m in sparse.modules() if hasattr(m, "backend")})
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"{torch.get_num_threads()} threads, {dtype}; sparse model: "
          f"{'packed checkpoint' if packed else '2:4 magnitude copy of the dense model' + (', random 4-bit codes' if args.int4 else '')}, "
          f"backends run: {', '.join(ran)}")
    pool_mb = args.weight_pool_mb if args.weight_pool_mb is not None else (1 if args.quick else POOL_BYTES >> 20)
    if pool_mb < 0:
        raise LLMPruneError(f"--weight-pool-mb must be 0 or more; got {pool_mb}")
    gemm = gemm_benchmark(shapes, tuple(ms), backends, dtype, device, repeats=repeats, pool_bytes=pool_mb << 20,
                          progress=not args.quiet)
    print(gemm_table(gemm))
    models = {"dense": dense, "sparse": sparse, **({FREE: free_copy(sparse)} if args.ceiling else {})}
    decode = decode_benchmark(models, batch_sizes, prompt_len, new_tokens, device, progress=not args.quiet)
    print(decode_table(decode))
    if args.json:
        record = {"model": args.model, "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "sparse_backends_run": ran, "packed": packed,
                  "gemm": gemm, "decode": decode}
        Path(args.json).write_text(json.dumps(record, indent=1))
    # The plot beside --json is a bonus that needs matplotlib (the eval extra); --plot asks for it.
    beside = args.json and importlib.util.find_spec("matplotlib") is not None
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if beside else None)
    if plot:
        plot_speedups(gemm, plot)
        print(f"plot: {plot}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .eval.report import compare

    report = compare(args.models, args.results, out=args.out, ppl=args.ppl, tasks=args.tasks, limit=args.limit,
                     seqlen=args.seqlen, window_stride=args.window_stride, device=args.device, dtype=args.dtype,
                     batch_size=args.batch_size, tasks_dir=args.tasks_dir, data_dir=args.data_dir,
                     progress=not args.quiet)
    print(report.read_text().rstrip())
    print(f"\nwritten to {report.parent}/ ({', '.join(sorted(p.name for p in report.parent.iterdir() if p.is_file()))})")


def cmd_export(args: argparse.Namespace) -> None:
    from .checkpoint import export_dense

    out = export_dense(args.directory, args.dense, overwrite=args.overwrite)
    print(f"wrote a dense checkpoint of {args.directory} to {out}")


def _terminate_handler(pid: int):
    """SIGTERM (a scheduler's kill, torchrun ending the other ranks) unwinds like Ctrl-C, so the
    temporary output directory is removed instead of left behind at the size of a model. A process
    forked meanwhile (a multiprocessing worker) inherits the handler and dies as SIGTERM means: its
    pool terminates it that way and would otherwise wait for it forever."""

    def handler(signum: int, frame) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"prune": cmd_prune, "eval": cmd_eval, "info": cmd_info, "compare": cmd_compare,
               "export": cmd_export, "bench": cmd_bench}[args.command]
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate_handler(os.getpid())) if installed else None
    try:
        handler(args)
    except LLMPruneError as exc:
        if args.debug:
            raise
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if installed:  # main() called in-process (tests, notebooks) leaves no handler behind
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
