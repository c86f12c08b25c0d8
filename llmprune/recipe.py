"""The typed ``Recipe``: what a pruning run does, built and validated once for the CLI and the API alike.

``Recipe.build`` turns user-level settings (names and numbers, as on the command line) into objects:
the pruner, the pattern, the refiner, the allocation strategy and the calibration spec. Building it
is where every bad setting fails, before any model is loaded.
"""
from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field

import torch

from . import calib as calibration
from ._version import __version__
from .allocation import Allocation, make_allocation
from .errors import LLMPruneError
from .patterns import Hybrid, Pattern, parse_pattern
from .pruners import Pruner, make_pruner, make_refiner
from .pruners.dsnot import DSnoT
from .pruners.quantizer import Quantizer
from .pruners.sparsegpt import GPTQ, SparseGPT
from .report import RecipeRecord


@dataclass(frozen=True)
class Calibration:
    """Which calibration text, and how many windows of how many tokens, drawn with which seed."""

    spec: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.seqlen < 2:
            raise LLMPruneError(f"need nsamples >= 1 and seqlen >= 2; got {self.nsamples} x {self.seqlen}")

    def tokens(self, tokenizer) -> torch.Tensor:
        """``LongTensor[nsamples, seqlen]`` (see ``calib.tokens``)."""
        return calibration.tokens(self.spec, tokenizer, self.nsamples, self.seqlen, self.seed)


@dataclass
class Recipe:
    method: str
    pruner: Pruner
    pattern: Pattern
    allocation: Allocation
    calibration: Calibration = field(default_factory=Calibration)
    refiner: DSnoT | None = None
    pruner_options: dict = field(default_factory=dict)  # as given, recorded in the report
    refine_options: dict = field(default_factory=dict)
    passes: int | None = None  # 1: each GEMM once, sequential; 2: the papers' order; None: 1 unless it would not fit
    quantizer: Quantizer | None = None  # joint with SparseGPT's sweep; a GPTQ pass under the fixed mask otherwise
    gptq: GPTQ | None = None  # that pass, for pruners that do not quantize themselves

    @classmethod
    def build(cls, method: str = "wanda", pattern: str | Pattern | None = None, sparsity: float | None = None, *,
              refine: str | None = None, refine_options: dict | None = None, allocation: str = "uniform",
              owl_lambda: float = 0.08, owl_m: float = 5.0, dense_fraction: float | None = None,
              hybrid_select: str = "error", hybrid_budget: str = "uniform", hybrid_block: int = 64,
              calib: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048, seed: int = 0, passes: int | None = None,
              quantize: str | None = None, group_size: int = 128, symmetric: bool = False, clip: bool = False,
              **pruner_options) -> Recipe:
        """Validate every setting and build the objects. ``pattern``: ``unstructured`` (with ``sparsity``),
        N:M such as ``2:4``, or ``hybrid:2:4`` (with ``dense_fraction`` of each linear's input columns kept
        dense in blocks of ``hybrid_block``); ``pruner_options`` go to the pruner (e.g. SparseGPT's
        ``blocksize``), ``refine_options`` to the refiner (``refine="dsnot"``). ``passes``: 1 runs every
        GEMM of a layer once and takes each group's statistics with the groups before it already pruned;
        2 is the papers' order (statistics with the dense layer, then the outputs); None (default) is 1
        unless its memory would not fit (``pipeline.choose_passes``). ``quantize``
        (``w4``: 4-bit weights; ``w2`` to ``w8``) quantizes the kept weights on a grid per ``group_size``
        input columns (-1: per row), ``symmetric`` or not, its range searched (``clip``) or min-max, the columns in act-order unless
        ``act_order=False`` (a pruner option): SparseGPT prunes and quantizes in one OBS
        sweep, other methods prune first and then run GPTQ under the fixed mask. With pattern ``dense``
        and no pruning that is plain GPTQ."""
        if passes not in (None, 1, 2):
            raise LLMPruneError(f"--passes must be 1 (each GEMM once, sequential) or 2 (the papers' order); got {passes}")
        # act-order: on by default when quantizing (eval/RESULTS.md: SparseGPT 2:4 + w4 on SmolLM2, 92.9 → 71.5)
        act_order = pruner_options.pop("act_order", None)
        if act_order is None and quantize is not None:
            act_order = True
        gptq_options = {}
        if method == "sparsegpt" and act_order is not None:
            pruner_options["act_order"] = act_order
        elif act_order is not None:  # the option of the GPTQ pass that quantizes another method's mask
            if quantize is None and act_order:
                raise LLMPruneError("--act-order orders the columns of SparseGPT's sweep or of the GPTQ pass of "
                                    "--quantize; with another method it needs --quantize")
            gptq_options["act_order"] = act_order
        pruner = make_pruner(method, **pruner_options)
        refine_options = dict(refine_options or {})
        if refine_options and not refine:
            raise LLMPruneError("--dsnot-* options need --refine dsnot")
        refiner = make_refiner(refine, **refine_options) if refine else None
        if not isinstance(pattern, Pattern.__args__):
            pattern = parse_pattern(pattern, sparsity, dense_fraction, hybrid_block)
        strategy = make_allocation(allocation, pattern, owl_lambda=owl_lambda, owl_m=owl_m,
                                   hybrid_select=hybrid_select, hybrid_budget=hybrid_budget)
        if act_order and isinstance(pattern, Hybrid) and quantize is None:
            raise LLMPruneError("--act-order and the hybrid split both reorder the columns; use one of them")
        quantizer = gptq = None
        if clip and quantize is None:
            raise LLMPruneError("--clip searches the range of the quantization grid; it needs --quantize (e.g. w4)")
        if quantize is not None:
            match = re.fullmatch(r"w(\d+)", str(quantize))
            if not match:
                raise LLMPruneError(f"unknown --quantize {quantize!r}; use w4 (4-bit weights), or w2 to w8")
            quantizer = Quantizer(int(match.group(1)), group_size, symmetric, clip)
            if isinstance(pattern, Hybrid):
                raise LLMPruneError("hybrid:2:4 with --quantize has no packed format; use --pattern 2:4 (2:4 + INT4) "
                                    "or a hybrid split without --quantize")
            if refiner is not None and isinstance(pruner, SparseGPT):
                raise LLMPruneError("--refine dsnot after SparseGPT's joint pruning and quantization would swap "
                                    "quantized weights for unquantized ones; refine Wanda or magnitude instead")
            if not isinstance(pruner, SparseGPT):
                gptq = GPTQ(**gptq_options)
        return cls(method, pruner, pattern, strategy, Calibration(calib, nsamples, seqlen, seed), refiner,
                   {**pruner_options, **gptq_options}, refine_options, passes, quantizer, gptq)

    @property
    def needs(self) -> frozenset[str]:
        """The input statistics the main pass collects."""
        needs = self.pruner.needs | (self.refiner.needs if self.refiner else frozenset()) | self.allocation.needs
        return needs | (self.gptq.needs if self.gptq else frozenset())

    @property
    def hessian_dtype(self) -> torch.dtype:
        return getattr(self.pruner, "hessian_dtype", torch.float32)

    def record(self, source: str | None, device: str, calibration_spec: str | None = None,
               tokens: torch.Tensor | None = None, passes: int | None = None) -> RecipeRecord:
        """The report's view of this recipe (after the run: OWL's ratios are known then)."""
        calib = self.calibration
        nsamples, seqlen = (calib.nsamples, calib.seqlen) if tokens is None else (int(tokens.shape[0]), int(tokens.shape[1]))
        return RecipeRecord(
            method=self.method, pattern=str(self.pattern), target_sparsity=self.pattern.target_sparsity,
            options=self.pruner_options,
            refine={"name": self.refiner.name, **self.refine_options} if self.refiner else None,
            calibration={"spec": calibration_spec or calib.spec, "nsamples": nsamples, "seqlen": seqlen,
                         "seed": calib.seed},
            source=source, device=device, versions=recorded_versions(), passes=passes or self.passes or 1,
            quantize=None if self.quantizer is None else {"bits": self.quantizer.bits, "group_size": self.quantizer.group_size,
                                                          "symmetric": self.quantizer.symmetric, "clip": self.quantizer.clip},
            **self.allocation.record())


def recorded_versions() -> dict[str, str]:
    """The versions a report records (what the numbers of a run depend on)."""
    import transformers

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
