"""DSnoT (Zhang et al., "Dynamic Sparse No Training", ICLR 2024): refine a pruned mask without training.

DSnoT runs after a base pruner (magnitude, Wanda, SparseGPT) on one linear at a time. It never
changes a value, only which weights are kept: each cycle, every output row regrows one pruned
weight (with its ORIGINAL dense value) and prunes one kept weight, so the row's zero count (and,
for N:M, every group's) stays exactly what the base pruner gave.

Error. For output row i, with W the dense weight, Ŵ the current sparse one and x the layer input,

    e_i = E[(Wx)_i − (Ŵx)_i] = Σ_j (W_ij − Ŵ_ij)·E[x_j]                    (``stats.mean``)

We use W − Ŵ over ALL inputs, not Σ_{pruned j} W_ij·E[x_j] as in the paper: the two are the
same for magnitude and Wanda, and for SparseGPT (whose kept weights were updated) ours is the
true expected output difference. Regrowing a pruned j lowers e_i by g_ij = W_ij·E[x_j]; pruning
a kept k raises it by p_ik = Ŵ_ik·E[x_k] (Ŵ: the value in place, i.e. SparseGPT's updated value,
or the original one for a weight DSnoT regrew).

One cycle, every active row at once (a loop over cycles only):
  1. Grow. Candidates: pruned j whose regrowth alone reduces the error, |e_i − g_ij| < |e_i|
     (the paper's sign rule sign(g_ij) = sign(e_i), plus no overshoot past −e_i). Among them the
     paper's criterion picks  argmax_j sign(e_i)·g_ij / Var[x_j]^γ : the largest expected
     reduction, discounted by how much it varies from input to input.
  2. Prune. With e' = e_i − g_ij, candidates are kept k whose removal moves e' towards 0,
     |e' + p_ik| < |e'| (the paper's sign rule sign(p_ik) = −sign(e'), plus no overshoot), and
     for N:M only those in j's group of m. The paper's criterion picks the smallest Wanda score
     argmin_k |Ŵ_ik|·‖x_k‖ (``stats.channel_norm``).
  3. Swap and update e_i = e' + p_ik. Both steps reduce |e_i| strictly, so |e| never grows.
If a grow candidate finds no prune partner (frequent with N:M: the group holds only n kept
weights), that position is blocked for the row and the next cycle tries its next-best one; the
blocks are lifted when the row swaps. A row stops when |e_i| < ``threshold`` (absolute, in the
units of the layer's output, as the paper's ε), when it has no grow candidate left, or after
``cycles`` cycles (attempts, swaps or blocked ones). Ties go to the lower input index.

Variances are floored at 1e-12 × the largest one, so a constant (zero-variance, non-zero mean)
input channel ranks first instead of dividing by zero. Work is in ``dtype``
(float32, or float64 for reference runs); the result is in ``pruned``'s dtype with +0.0 zeros.

Report (``Pruned.info``): ``dsnot_err_before`` / ``dsnot_err_after`` (mean |e_i| over rows,
recomputed exactly), ``dsnot_swaps_mean`` / ``dsnot_swaps_max`` (swaps per row),
``dsnot_cycles`` (cycles run until every row stopped).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import LLMPruneError
from ..patterns import NM, Pattern, Unstructured
from ..stats import MOMENTS, SQ_NORM, InputStats
from .base import Pruned, float_dtype



def should_refine(name: str, skip: Iterable[str]) -> bool:
    """Whether DSnoT refines the linear ``name``: no entry of ``skip`` is a substring of it
    (``skip=("mlp",)`` leaves every MLP linear as the base pruner left it)."""
    return not any(part and part in name for part in skip)


class DSnoT:
    name = "dsnot"
    needs = frozenset({SQ_NORM, MOMENTS})

    def __init__(self, cycles: int = 50, threshold: float = 0.1, gamma: float = 1.0, skip: Iterable[str] = (),
                 dtype: torch.dtype | str = torch.float32) -> None:
        if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 0:
            raise LLMPruneError(f"DSnoT cycles must be a non-negative integer (e.g. 50); got {cycles!r}")
        for label, value in (("threshold", threshold), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise LLMPruneError(f"DSnoT {label} must be a non-negative number; got {value!r}")
        if isinstance(skip, str):
            skip = (skip,)
        dtype = float_dtype(dtype, "DSnoT dtype")
        self.cycles = cycles
        self.threshold = float(threshold)
        self.gamma = float(gamma)
        self.skip = frozenset(skip)
        self.dtype = dtype

    def applies_to(self, name: str) -> bool:
        """Whether the linear ``name`` is refined under this instance's ``skip`` filter."""
        return should_refine(name, self.skip)

    def refine(self, original: torch.Tensor, pruned: torch.Tensor, stats: InputStats | None,
               pattern: Pattern) -> Pruned:
        """Refine ``pruned`` (the base pruner's ``[out, in]`` output, zeros = pruned) against the dense
        ``original`` ``[out, in]``; returns a new weight with the same zeros per row and per N:M group."""
        if stats is None or stats.mean is None or stats.sq_norm is None:
            raise LLMPruneError("DSnoT needs the mean, variance and squared norm of the layer inputs; "
                                "collect InputStats with MOMENTS and SQ_NORM (DSnoT.needs)")
        if original.shape != pruned.shape or original.dim() != 2:
            raise LLMPruneError(f"DSnoT needs the dense and pruned weights as [out, in] of the same shape; "
                                f"got {tuple(original.shape)} and {tuple(pruned.shape)}")
        rows, columns = pruned.shape
        if stats.in_features != columns:
            raise LLMPruneError(f"DSnoT got a weight with {columns} inputs but statistics for {stats.in_features}")
        if not isinstance(pattern, (Unstructured, NM)):
            raise LLMPruneError(f"DSnoT does not know the pattern {pattern!r}")
        pattern.validate("the weight", rows, columns)
        device, dtype = pruned.device, self.dtype
        dense = original.to(device=device, dtype=dtype)
        current = pruned.to(dtype=dtype, copy=True)
        mean = stats.mean.to(device=device, dtype=dtype)
        norm = stats.channel_norm.to(device=device, dtype=dtype)
        scale = _variance_scale(stats.variance.to(device), self.gamma).to(dtype)
        error = (dense - current) @ mean
        before = float(error.abs().mean()) if rows else 0.0
        swaps = torch.zeros(rows, dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        blocked: torch.Tensor | None = None  # [out, in] grow positions without a prune partner, made on first need
        group = pattern.m if isinstance(pattern, NM) else None
        cycles_run = 0
        for _ in range(self.cycles):
            rows_active = (~done & (error.abs() >= self.threshold)).nonzero().squeeze(1)
            if rows_active.numel() == 0:
                break
            cycles_run += 1
            w, e = current[rows_active], error[rows_active]
            kept = w != 0
            grow_gain = dense[rows_active] * mean
            grow_ok = ~kept & ((e[:, None] - grow_gain).abs() < e.abs()[:, None])
            if blocked is not None:
                grow_ok &= ~blocked[rows_active]
            grow_score = torch.where(grow_ok, grow_gain * e.sign()[:, None] * scale, float("-inf"))
            grow_at = grow_score.argmax(-1, keepdim=True)
            can_grow = grow_score.gather(-1, grow_at).squeeze(-1) > float("-inf")
            e_grown = e - grow_gain.gather(-1, grow_at).squeeze(-1)
            if group is None:
                candidates = w
                columns_of = None
            else:  # the m columns of the grown position's group
                columns_of = grow_at // group * group + torch.arange(group, device=device)
                candidates = w.gather(-1, columns_of)
            prune_gain = candidates * (mean if columns_of is None else mean[columns_of])
            prune_ok = (candidates != 0) & ((e_grown[:, None] + prune_gain).abs() < e_grown.abs()[:, None])
            prune_score = torch.where(prune_ok, candidates.abs() * (norm if columns_of is None else norm[columns_of]),
                                      float("inf"))
            choice = prune_score.argmin(-1, keepdim=True)
            can_prune = prune_score.gather(-1, choice).squeeze(-1) < float("inf")
            prune_at = choice if columns_of is None else columns_of.gather(-1, choice)

            swap = can_grow & can_prune
            target = rows_active[swap]
            g, p = grow_at[swap].squeeze(-1), prune_at[swap].squeeze(-1)
            current[target, g] = dense[target, g]
            current[target, p] = 0.0
            error[target] = e_grown[swap] + prune_gain.gather(-1, choice)[swap].squeeze(-1)
            swaps[target] += 1
            if blocked is not None:
                blocked[target] = False
            stuck = can_grow & ~can_prune
            if stuck.any():
                if blocked is None:
                    blocked = torch.zeros(rows, columns, dtype=torch.bool, device=device)
                blocked[rows_active[stuck], grow_at[stuck].squeeze(-1)] = True
            done[rows_active[~can_grow]] = True
        after = float(((dense - current) @ mean).abs().mean()) if rows else 0.0
        info = {"dsnot_err_before": float(f"{before:.6g}"), "dsnot_err_after": float(f"{after:.6g}"),
                "dsnot_swaps_mean": float(f"{float(swaps.float().mean()) if rows else 0.0:.4g}"),
                "dsnot_swaps_max": int(swaps.max()) if rows else 0, "dsnot_cycles": cycles_run}
        return Pruned(current.to(pruned.dtype) + 0.0, info)  # + 0.0 turns any −0.0 into +0.0


def _variance_scale(variance: torch.Tensor, gamma: float) -> torch.Tensor:
    """Var[x_j]^(−γ) per input, divided by its largest value (the ranking within a row is unchanged
    and float32 cannot overflow); zero variances are floored at 1e-12 × the largest variance."""
    var = variance.double()
    if gamma == 0 or var.numel() == 0:
        return torch.ones_like(var)
    top = float(var.max())
    floor = top * 1e-12 if top > 0 else 1.0
    scale = var.clamp_min(floor).pow(-gamma)
    return scale / scale.max()
