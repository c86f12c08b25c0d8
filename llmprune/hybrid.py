"""Choosing the dense region of each linear in a hybrid sparse-dense split (``--pattern hybrid:2:4``).

The loss of a pruned weight on the calibration inputs is ``L(δ) = Σ_rows δ_r H δ_rᵀ`` with
``δ = W − Ŵ`` and ``H = E[xxᵀ]`` (any constant factor cancels below). Keeping a block ``b`` of input
columns dense sets ``δ[:, b] = 0``. Starting from the base pruner's plain N:M result, two rankings
of the blocks:

* ``saliency``: each block by the diagonal part of its loss, ``Σ_{j∈b} H_jj Σ_i δ_ij²``, taken
  independently (the Wanda/OBS-style per-weight loss summed over the block). Needs only ``E[x_j²]``.
* ``error``: greedily, the block whose restoration lowers the exact ``L`` most given the blocks
  already chosen (cross terms included): with ``G = δH``, restoring ``b`` lowers ``L`` by
  ``2⟨δ_b, G_b⟩ − ⟨δ_b H_bb, δ_b⟩``; then ``G −= δ_b H_b,:``. Needs the full Hessian.

Both give the blocks in order with their marginal gains, relative to ``tr(W H Wᵀ)`` (the output
energy) so that gains of different linears compare. ``allocate_global`` spends one dense budget
across all linears by those gains; the uniform split takes ``Hybrid.uniform_count`` blocks each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LLMPruneError
from .patterns import Hybrid
from .stats import HESSIAN, SQ_NORM, InputStats

STRATEGIES = ("saliency", "error")
BUDGETS = ("uniform", "global")


def needs(strategy: str) -> frozenset[str]:
    """The input statistics a selection strategy reads."""
    if strategy not in STRATEGIES:
        raise LLMPruneError(f"unknown hybrid selection {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return frozenset({HESSIAN}) if strategy == "error" else frozenset({SQ_NORM})


def check_budget(budget: str) -> None:
    if budget not in BUDGETS:
        raise LLMPruneError(f"unknown hybrid budget {budget!r}; use one of {', '.join(BUDGETS)}")


@dataclass
class Ranking:
    """One linear's blocks in the order they should become dense, with each one's marginal gain
    (relative loss reduction) and its size in weights."""

    blocks: list[tuple[int, int]]
    gains: list[float]
    weights: list[int]


def _input_second_moment(stats: InputStats, diagonal_only: bool) -> torch.Tensor:
    """``E[x_j²]`` ``[in]`` or ``E[xxᵀ]`` ``[in, in]`` (up to a constant factor), float64."""
    if stats.hessian is not None:
        hessian = stats.hessian.double()
        return hessian.diagonal().clone() if diagonal_only else hessian
    if not diagonal_only:
        raise LLMPruneError("the error-driven hybrid selection needs the Hessian of the layer inputs")
    return stats.sq_norm.double()


def rank_blocks(original: torch.Tensor, pruned: torch.Tensor, stats: InputStats, split: Hybrid,
                strategy: str) -> Ranking:
    """Order ``original``'s (``[out, in]``) column blocks for the dense region, given its plain N:M
    version ``pruned`` from the base pruner and the statistics of its inputs."""
    needs(strategy)  # a clear error for an unknown name
    delta = (original - pruned).double()
    rows, columns = delta.shape
    blocks = split.blocks(columns)
    if strategy == "saliency":
        second = _input_second_moment(stats, diagonal_only=True)
        energy = float((original.double().square() * second).sum())
        column_loss = delta.square().sum(0) * second
        losses = [float(column_loss[a:b].sum()) for a, b in blocks]
        order = sorted(range(len(blocks)), key=lambda i: -losses[i])
        gains = [losses[i] for i in order]
    else:
        hessian = _input_second_moment(stats, diagonal_only=False)
        energy = float(((original.double() @ hessian) * original.double()).sum())
        gradient = delta @ hessian  # G = δH, [out, in]
        own = [float(((delta[:, a:b] @ hessian[a:b, a:b]) * delta[:, a:b]).sum()) for a, b in blocks]
        left = list(range(len(blocks)))
        order, gains = [], []
        while left:
            scores = [2 * float((delta[:, blocks[i][0]:blocks[i][1]] * gradient[:, blocks[i][0]:blocks[i][1]]).sum())
                      - own[i] for i in left]
            best = max(range(len(left)), key=lambda k: scores[k])
            chosen = left.pop(best)
            order.append(chosen)
            gains.append(scores[best])
            a, b = blocks[chosen]
            gradient -= delta[:, a:b] @ hessian[a:b, :]
    scale = energy if energy > 0 else 1.0
    return Ranking([blocks[i] for i in order], [g / scale for g in gains], [rows * (blocks[i][1] - blocks[i][0]) for i in order])


def allocate_global(rankings: dict[str, Ranking], fraction: float) -> dict[str, int]:
    """How many blocks each linear keeps dense so that about ``fraction`` of all its weights are dense,
    spending the budget on the largest relative gains per weight first.

    Each linear's blocks are taken in its ranking's order; its gains are made non-increasing (a
    running minimum) so that a later block never jumps ahead of an earlier one.
    """
    total = sum(sum(r.weights) for r in rankings.values())
    budget = fraction * total
    items = []
    for name, ranking in rankings.items():
        floor = float("inf")
        for k, (gain, size) in enumerate(zip(ranking.gains, ranking.weights)):
            floor = min(floor, gain / size)
            items.append((-floor, k, name, size))
    items.sort(key=lambda item: (item[0], item[1], item[2]))
    counts = {name: 0 for name in rankings}
    closed: set[str] = set()
    spent = 0
    for _neg_gain, k, name, size in items:
        if name in closed or k != counts[name]:
            continue
        if spent + size > budget + 0.5 * size:  # round to the nearest whole block
            closed.add(name)
            continue
        counts[name] += 1
        spent += size
    return counts
