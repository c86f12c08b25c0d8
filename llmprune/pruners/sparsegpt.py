"""SparseGPT (Frantar & Alistarh, 2023) and GPTQ (Frantar et al., 2022): one optimal-brain-surgeon
sweep over the input columns that prunes, quantizes, or both.

For one output row w and layer inputs x, the error of a changed row ŵ is E‖(w−ŵ)x‖² = ½δHδᵀ with
δ = w−ŵ and H = 2·E[xxᵀ] (``InputStats.hessian``). Columns are processed left to right; when
column j is set to q (0 if pruned; its kept value, or that value rounded to the quantization
grid), the columns not yet processed (F = j..in−1) absorb the error optimally:

    δ_F = −(w_j − q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_j,:        loss += (w_j − q_j)² / (2·[H_F⁻¹]_jj)

Row j of the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) is [H_F⁻¹]_j,: / √[H_F⁻¹]_jj, so with
d_j = U_jj every step reads one row of U:  err = (w_j − q_j)/d_j,  W[:, j+1:] −= err ⊗ U[j, j+1:].
Columns go in blocks of ``blocksize``: updates inside the block are immediate, the rest of the
matrix gets one matmul per block (``lazy batch update``; mathematically identical). Inside a block the
loop runs compiled on CPU where numba is installed (``_obs_numba``: each row through the block's columns,
rows shared among threads), giving the torch loop's results bit for bit; the torch loop runs elsewhere.

What q_j is decides the method, in the same loop:
  * ``SparseGPT.prune``: q_j = w_j if kept else 0, the mask chosen on the way (below).
  * ``SparseGPT.prune(..., quantizer=Q)``: q_j = Q(w_j) if kept else 0, the paper's joint
    sparsification and quantization: both errors are compensated by the columns not yet processed.
  * ``GPTQ.quantize(weight, keep=mask)``: q_j = Q(w_j) if kept else 0 under a fixed mask (magnitude
    and Wanda results; no mask is plain GPTQ, the dense baseline). Given the pruned weight, only the
    quantization error is compensated; given the dense weight and the mask, the pruning error too.

Masks are chosen from the OBS score w²/d², using weights already updated by earlier columns:
  * N:M: at the first column of every group of m, each row prunes its m−n lowest scores there.
  * Unstructured: the paper picks each block's mask by one threshold over the whole block (all
    rows), which gives rows different sparsities and every block the same sparsity. Our
    ``Unstructured`` pattern is per row: every row must hold exactly ``pruned_per_row(in)`` zeros
    (the contract the pipeline checks). So at the start of each block every row ranks the scores
    of all its columns not yet processed (current weights, final d) and prunes those of its
    ``remaining budget`` lowest that fall inside the block; the rest of the budget waits for later
    blocks, whose scores will have absorbed this block's updates. Rows meet their count exactly,
    blocks may differ in sparsity (so a block of strong input channels can keep more weights),
    and with ``blocksize >= in`` this is the one-shot per-row mask. It gives a lower
    reconstruction error and perplexity than a fixed per-block quota (the row budget split by
    block width); the measurements are in eval/RESULTS.md.
Ties are broken as everywhere in llmprune: the lower input index is pruned first (stable sort).

Quantization groups (``Quantizer``) are runs of dense input columns. As in GPTQ, a group's scale
and zero point are fixed when its first column is reached, from the group's weights as they are
then (already moved by the updates of earlier columns), and later updates are rounded onto that
grid. Which of the group's weights the grid is fitted to: those not known to be pruned at that
moment. A pruned weight becomes 0, which every grid holds, so it has no claim on the range; a
weight whose fate is still open must stay representable, or a kept one would be clamped. With a
fixed mask that is exactly the kept weights. Jointly with N:M it is the kept weights of the group
of m just decided plus all weights further right; jointly with unstructured sparsity the current
block's masks are known. Deciding the N:M masks of a whole quantization group ahead, to fit its
grid to kept weights only, would change SparseGPT's masks (each group of m is decided on weights
updated by the columns before it), and guessing them would clamp the kept weights guessed wrong,
so the grid takes what is known. The extremes that set a grid are mostly large weights, which
pruning keeps, so this rule and fitting every weight came out within noise of each other on
synthetic correlated inputs; the rule is kept because it can only drop range that is never used.
What a one-pass grid cannot foresee are the updates still to come: 2:4's are large and push some
kept weights off their group's grid (clamped, the error compensated like any other), so pruning
first and running GPTQ under the fixed mask afterwards is occasionally the better of the two.
Kept weights that round to 0 are zeros too: the zeros of the result cover the mask, not equal it.

``act_order`` processes the columns by decreasing diag(H) instead of left to right (GPTQ's option of
that name; N:M groups move as units of m columns, so every group of m is still decided at once, on
weights updated by all the columns before it). Quantization groups stay runs of dense columns, each
grid fitted when the first of its columns comes, from its columns' current weights wherever they sit
in the order. Not with the hybrid split, which has its own order.

Hybrid split (an ``NM`` with ``dense`` ranges): the columns are reordered so the dense ones come
last, with H permuted to match. The N:M columns are pruned first and the OBS updates carry their
error into every column not yet processed, the whole dense region included: the dense weights are
never pruned but they absorb the compensation, which is what makes the split stronger than
pruning 2:4 and then restoring some columns. With a quantizer the dense weights are quantized;
groups stay by dense column index, so a group split across both regions gets its grid at its
first sparse column, from the current weights of all its columns (pending lazy updates applied).

H is damped first: inputs that were always 0 (diag H = 0) get diag 1 and their weights are
zeroed (free to prune); then λ = percdamp·mean(diag H) is added to the diagonal, ×10 per retry
while the Cholesky factorisation fails (never silently the identity). The factor U depends only
on the inputs, so it is computed once per ``InputStats`` object and reused by every linear
reading it (q/k/v, gate/up); the cache holds the stats weakly and is invalidated if they are
updated again. Work is in the Hessian dtype (float32, or float64 for reference runs).

Report (``Pruned.info``): ``damping`` (λ / mean diag H actually used), ``damp_retries``,
``obs_loss`` (Σ (w−q)²/(2d²) = ½·tr(δ(H+λI)δᵀ), the predicted mean ‖(W−Ŵ)x‖² per token under the
damped H), with a quantizer ``quant_loss`` (the part of ``obs_loss`` from rounding kept weights;
the rest is pruning), ``dead_inputs``, ``factor_reused``.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LLMPruneError
from ..patterns import NM, Pattern, Unstructured
from ..stats import HESSIAN, InputStats
from .base import Pruned, float_dtype
from .quantizer import Quantized, Quantizer


@dataclass
class _Factor:
    """The upper Cholesky factor of (H + λI)⁻¹ for one InputStats, and how it was obtained."""

    hinv: torch.Tensor  # [in, in], upper triangular
    dead: torch.Tensor  # bool [in]: inputs that were always exactly zero (diag H == 0)
    damping: float  # λ as a fraction of mean diag(H)
    retries: int  # how many times the damping was raised ×10
    source: tuple  # (tokens seen, Hessian version, device, dtype, column order) it was computed from


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the column loop single-threaded: its thousands of tiny ops gain nothing from OpenMP, and on
    shared cores the barriers thrash, making it many times slower (measurements in eval/RESULTS.md)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Codes:
    """The quantized weight being built column by column, in processing order (``dense_index[p]`` is
    the dense input column at position p), with the groups of ``quantizer`` in dense column indices."""

    def __init__(self, quantizer: Quantizer, rows: int, dense_index: torch.Tensor) -> None:
        columns = dense_index.numel()
        group = quantizer.group_of(dense_index, columns)
        self.quantizer = quantizer
        self.group = group.tolist()  # group of each position
        self.members = [(group == g).nonzero().flatten() for g in range(quantizer.groups(columns))]  # positions
        self.first = {int(positions[0]): g for g, positions in enumerate(self.members) if positions.numel()}
        self.codes = torch.empty(rows, columns, dtype=torch.uint8, device=dense_index.device)
        self.scales = torch.ones(rows, len(self.members), dtype=torch.float16, device=dense_index.device)
        self.zeros = torch.zeros_like(self.scales)

    def fit(self, group: int, weights: torch.Tensor, kept: torch.Tensor) -> None:
        """Fix the grid of ``group`` from its current ``weights`` ``[out, members]`` not known to be pruned."""
        self.scales[:, group], self.zeros[:, group] = self.quantizer.params(weights, kept)

    def round(self, position: int, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Record the codes of column ``w`` (pruned rows: the zero point) and return its values."""
        scale, zero = self.scales[:, self.group[position]], self.zeros[:, self.group[position]]
        codes = torch.where(keep, self.quantizer.quantize(w, scale, zero), zero.to(torch.uint8))
        self.codes[:, position] = codes
        return Quantizer.dequantize(codes, scale, zero).to(w.dtype)

    def result(self, order: torch.Tensor | None, rows: slice) -> Quantized:
        codes = self.codes[rows]
        codes = codes if order is None else torch.empty_like(codes).index_copy_(1, order, codes)
        return Quantized(codes, self.scales[rows], self.zeros[rows], self.quantizer)


def activation_order(diagonal: torch.Tensor, width: int) -> torch.Tensor:
    """GPTQ's "act-order": the input columns by decreasing diag(H) (the inputs with the most energy first,
    while many columns remain to absorb their error), in runs of ``width`` (an N:M group's m columns stay
    together and in order, ranked by their sum); ties keep the lower index first."""
    columns = diagonal.numel()
    if columns % width:
        raise LLMPruneError(f"act-order moves groups of {width} columns; {columns} inputs are not a multiple")
    energy = diagonal.reshape(-1, width).sum(-1)
    groups = torch.sort(-energy, stable=True).indices
    return (groups[:, None] * width + torch.arange(width, device=groups.device)).flatten()


class GPTQ:
    """The OBS column sweep under a fixed mask: GPTQ quantization of dense or already-pruned weights."""

    name = "gptq"
    title = "GPTQ"  # in messages
    needs = frozenset({HESSIAN})
    max_damp_retries = 4  # damping ×10 per retry, so at most ×10⁴ the requested percdamp

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01,
                 hessian_dtype: torch.dtype | str = torch.float32, act_order: bool = False) -> None:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise LLMPruneError(f"{self.title} blocksize must be a positive integer (e.g. 128); got {blocksize!r}")
        if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 < percdamp < float("inf"):
            raise LLMPruneError(f"{self.title} percdamp must be a positive fraction of mean diag(H) (e.g. 0.01); "
                                f"got {percdamp!r}")
        if not isinstance(act_order, bool):
            raise LLMPruneError(f"{self.title} act_order is True or False; got {act_order!r}")
        self.blocksize = blocksize
        self.percdamp = float(percdamp)
        self.act_order = act_order
        self.hessian_dtype = float_dtype(hessian_dtype, f"{self.title} hessian_dtype")
        self._factors: weakref.WeakKeyDictionary[InputStats, dict[tuple, _Factor]] = weakref.WeakKeyDictionary()

    def quantize(self, weight: torch.Tensor, stats: InputStats | None, quantizer: Quantizer,
                 keep: torch.Tensor | None = None) -> Pruned:
        """Quantize ``weight`` ``[out, in]`` with ``quantizer``, entries where the bool ``keep`` is False set
        to 0 (their current value compensated like a rounding error); ``keep=None`` is dense GPTQ.
        ``Pruned.weight`` is the dequantized weight (in the dtype ``weight`` came in), ``.quantized`` the codes."""
        self._check(weight, stats)
        if keep is not None and (keep.shape != weight.shape or keep.dtype != torch.bool):
            raise LLMPruneError(f"{self.title} needs a bool keep-mask of the weight's shape {tuple(weight.shape)}; "
                                f"got {keep.dtype} {tuple(keep.shape)}")
        return self._sweep(weight, stats, None, quantizer, keep)[0]

    def _check(self, weight: torch.Tensor, stats: InputStats | None) -> None:
        if stats is None or stats.hessian is None:
            raise LLMPruneError(f"{self.title} needs the Hessian of the layer inputs; collect InputStats with HESSIAN")
        if stats.in_features != weight.shape[1]:
            raise LLMPruneError(f"{self.title} got a weight with {weight.shape[1]} inputs but a Hessian for "
                                f"{stats.in_features}")

    def _sweep(self, weight: torch.Tensor, stats: InputStats, pattern: NM | Unstructured | None,
               quantizer: Quantizer | None, mask: torch.Tensor | None, sizes: list[int] | None = None) -> list[Pruned]:
        """The OBS column loop (module docstring): masks chosen by ``pattern`` on the way or fixed by ``mask``
        (None: all kept); kept weights rounded by ``quantizer`` (None: kept as they are). ``weight`` may be
        several linears' rows stacked (``sizes``: rows of each): every row is solved on its own, so one
        loop does the work of many; the result is one ``Pruned`` per linear."""
        rows, columns = weight.shape
        sizes = sizes or [rows]
        order, sparse_width = None, columns
        if isinstance(pattern, NM) and pattern.dense:
            if self.act_order:
                raise LLMPruneError("act-order and the hybrid split both reorder the columns; use one of them")
            dense = pattern.dense_columns(columns, weight.device)
            order = torch.cat([(~dense).nonzero().flatten(), dense.nonzero().flatten()])
            sparse_width = int((~dense).sum())
            weight, pattern = weight[:, order], NM(pattern.n, pattern.m)
        elif self.act_order:
            order = activation_order(stats.hessian.diagonal(), pattern.m if isinstance(pattern, NM) else 1)
            weight = weight[:, order]
            mask = None if mask is None else mask[:, order]
        factor, reused = self._factor(stats, weight.device, order)
        hinv = factor.hinv
        work = weight.to(torch.promote_types(weight.dtype, hinv.dtype), copy=True)
        hinv = hinv.to(work.dtype)
        work[:, factor.dead] = 0.0  # inputs that are always 0: the weight does nothing, drop it for free
        bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
        segments = [slice(a, b) for a, b in zip(bounds, bounds[1:])]  # the rows of each stacked linear
        loss: list[list[torch.Tensor]] = [[] for _ in sizes]  # per linear, each column's loss in order
        quant_loss: list[list[torch.Tensor]] = [[] for _ in sizes]
        keep_all = (torch.ones_like(work, dtype=torch.bool) if mask is None  # known so far
                    else mask.clone(memory_format=torch.contiguous_format))
        codes = None if quantizer is None else _Codes(
            quantizer, rows, torch.arange(columns, device=work.device) if order is None else order)
        if isinstance(pattern, Unstructured):
            budget = torch.full((rows, 1), pattern.pruned_per_row(columns), device=work.device)
        columns_of = _numba_columns if _numba_runs(work) else _torch_columns
        for start in range(0, columns, self.blocksize):
            end = min(start + self.blocksize, columns)
            block, block_hinv = work[:, start:end].clone(), hinv[start:end, start:end].contiguous()
            d = block_hinv.diagonal()
            errors = torch.zeros_like(block)
            keep = keep_all[:, start:end]  # a view: masks chosen here are known to later grid fits
            if isinstance(pattern, Unstructured):
                scores = work[:, start:].square() / hinv.diagonal()[start:].square()
                keep[:] = _keep_in_block(scores, budget, end - start)
                budget -= (~keep).sum(-1, keepdim=True)
            fits = [] if codes is None else sorted(p - start for p in codes.first if start <= p < end)
            cuts = sorted({0, end - start, *fits})
            for j0, j1 in zip(cuts, cuts[1:]):
                if j0 in fits:  # a quantization group starts here: its grid from its weights as they are now,
                    # knowing the mask of an N:M group that starts here too (the columns below decide it again,
                    # from the same weights, to the same mask)
                    _decide_group(pattern if isinstance(pattern, NM) else None, keep, block, d, j0, start, sparse_width)
                    members = codes.members[codes.first[start + j0]]
                    inside, later = members[members < end], members[members >= end]
                    pending = errors @ hinv[start:end, later]  # this block's lazy update, not applied yet
                    now = torch.cat([block[:, inside - start], work[:, later] - pending], 1)
                    codes.fit(codes.first[start + j0], now, keep_all[:, members])
                columns_of(block, block_hinv, d, keep_all, errors, codes, start, j0, j1,
                           pattern if isinstance(pattern, NM) else None, sparse_width)
            # each column's loss, summed over each linear's rows as the torch loop sums one column vector
            by_column = errors.T.contiguous()
            kept = None if codes is None else keep.T.contiguous()
            for s, rows_of in enumerate(segments):
                loss[s].append(by_column[:, rows_of].square().sum(1) / 2)
                if codes is not None:
                    quant_loss[s].append(torch.where(kept[:, rows_of], by_column[:, rows_of], 0.0).square().sum(1) / 2)
            work[:, start:end] = block
            work[:, end:] -= errors @ hinv[start:end, end:]
        if order is not None:
            work = torch.empty_like(work).index_copy_(1, order, work)
        results = []
        for s, rows_of in enumerate(segments):
            info = {"damping": float(f"{factor.damping:.3g}"), "damp_retries": factor.retries,
                    "obs_loss": float(f"{_sum_in_order(loss[s]):.6g}")}
            if codes is not None:
                info["quant_loss"] = float(f"{_sum_in_order(quant_loss[s]):.6g}")
            info |= {"dead_inputs": int(factor.dead.sum()), "factor_reused": reused or s > 0}
            if codes is not None:
                quantized = codes.result(order, rows_of)
                results.append(Pruned(quantized.dequantize().to(weight.dtype), info, quantized))
            else:
                results.append(Pruned(work[rows_of].to(weight.dtype) + 0.0, info))  # + 0.0 turns any −0.0 into +0.0
        return results

    def _factor(self, stats: InputStats, device: torch.device, order: torch.Tensor | None) -> tuple[_Factor, bool]:
        """The cached factor for ``stats`` and column ``order`` if it is still current, else a new one."""
        key = None if order is None else tuple(order.tolist())
        source = (stats.count, stats.hessian._version, torch.device(device), self.hessian_dtype, key)
        cached = self._factors.get(stats, {})
        if source in cached:
            return cached[source], True
        factor = self._factorise(stats.hessian, source, order)
        self._factors[stats] = {**{s: f for s, f in cached.items() if s[:4] == source[:4]}, source: factor}
        return factor, False

    def _factorise(self, hessian: torch.Tensor, source: tuple, order: torch.Tensor | None) -> _Factor:
        """Upper Cholesky factor of (H + λI)⁻¹ (columns in ``order``), raising λ ×10 when H is not positive definite."""
        h = hessian.to(device=source[2], dtype=self.hessian_dtype, copy=True)  # never touch the shared stats
        if order is not None:
            h = h[order][:, order]
        if not torch.isfinite(h).all():
            raise LLMPruneError("the Hessian of a layer's inputs holds NaN or Inf; the activations overflow "
                                "(load the model with --dtype float32)")
        diag = h.diagonal()
        dead = diag == 0
        diag[dead] = 1.0
        mean_diag = diag.mean()
        damping = self.percdamp
        for retry in range(self.max_damp_retries + 1):
            damped = h.clone()
            damped.diagonal().add_(damping * mean_diag)
            lower, failed = torch.linalg.cholesky_ex(damped)
            if not failed:
                upper, failed = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
                if not failed and torch.isfinite(upper).all():
                    return _Factor(upper, dead, damping, retry, source)
            damping *= 10
        raise LLMPruneError(
            f"{self.title} could not factorise a Hessian ({h.shape[0]} inputs): it is not positive definite even with "
            f"damping {damping / 10:g} × mean diag(H) ({self.max_damp_retries} retries from percdamp {self.percdamp:g}); "
            f"the calibration inputs are degenerate. Raise --percdamp or use more --nsamples / --seqlen, "
            f"or compute the Hessian in float64 (hessian_dtype)."
        )


class SparseGPT(GPTQ):
    """Pruning to a pattern with OBS updates; with a ``quantizer`` the kept weights are quantized in the same sweep."""

    name = "sparsegpt"
    title = "SparseGPT"

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern,
              quantizer: Quantizer | None = None) -> Pruned:
        """Prune ``weight`` ``[out, in]`` to ``pattern``; returned (a new tensor) in the dtype it came in,
        pruned entries +0.0. ``stats.hessian`` is read, never written (q/k/v share it). With a ``quantizer``
        the weight is the dequantized one and ``Pruned.quantized`` holds its codes."""
        return self.prune_many([weight], stats, pattern, quantizer)[0]

    def prune_many(self, weights: list[torch.Tensor], stats: InputStats | None, pattern: Pattern,
                   quantizer: Quantizer | None = None) -> list[Pruned]:
        """Prune linears that read the same input (q/k/v, gate/up) in one column loop: given H, every
        row is solved on its own, so their rows stacked are one problem, and the loop's per-column
        overhead is paid once instead of once per linear. A hybrid pattern (dense columns chosen per
        linear) is pruned linear by linear."""
        if len(weights) > 1 and isinstance(pattern, NM) and pattern.dense:
            return [self.prune(weight, stats, pattern, quantizer) for weight in weights]
        stacked = weights[0] if len(weights) == 1 else torch.cat(weights, 0)
        self._check(stacked, stats)
        pattern.validate("the weight", *stacked.shape)
        if isinstance(pattern, NM) and self.blocksize % pattern.m:
            raise LLMPruneError(f"SparseGPT blocksize {self.blocksize} must be a multiple of M={pattern.m} for pattern "
                                f"{pattern}; use --blocksize {max(pattern.m, self.blocksize // pattern.m * pattern.m)}")
        return self._sweep(stacked, stats, pattern, quantizer, None, [w.shape[0] for w in weights])


def _torch_columns(block: torch.Tensor, block_hinv: torch.Tensor, d: torch.Tensor, keep_all: torch.Tensor,
                   errors: torch.Tensor, codes: _Codes | None, start: int, j0: int, j1: int, pattern: NM | None,
                   sparse_width: int) -> None:
    """Columns ``j0 … j1 − 1`` of the block at dense position ``start``, in place (the module docstring's loop;
    grids already fitted): on any device, and the reference of ``_obs_numba.sweep``."""
    keep = keep_all[:, start:start + block.shape[1]]
    zero = torch.zeros((), dtype=block.dtype, device=block.device)
    with _one_thread():
        for j in range(j0, j1):
            _decide_group(pattern, keep, block, d, j, start, sparse_width)
            w = block[:, j]
            q = torch.where(keep[:, j], w, zero) if codes is None else codes.round(start + j, w, keep[:, j])
            err = (w - q) / d[j]
            block[:, j + 1:] -= err[:, None] * block_hinv[j, j + 1:][None, :]
            block[:, j] = q
            errors[:, j] = err


def _decide_group(pattern: NM | None, keep: torch.Tensor, block: torch.Tensor, d: torch.Tensor, j: int, start: int,
                  sparse_width: int) -> None:
    """If an N:M group starts at block column ``j`` (dense position ``start + j``, in the N:M region), choose its
    mask from the OBS scores w²/d² of the block's current weights (``_obs_numba._rows`` does the same)."""
    if pattern is not None and j % pattern.m == 0 and start + j < sparse_width:
        group = slice(j, j + pattern.m)
        keep[:, group] = pattern.keep_mask(block[:, group].square() / d[group].square())


def _numba_columns(block: torch.Tensor, block_hinv: torch.Tensor, d: torch.Tensor, keep_all: torch.Tensor,
                   errors: torch.Tensor, codes: _Codes | None, start: int, j0: int, j1: int, pattern: NM | None,
                   sparse_width: int) -> None:
    """``_torch_columns`` compiled (``_obs_numba``): the same results, bit for bit, on CPU."""
    from ..kernels.numba24 import parallel
    from . import _obs_numba

    dtype = block.numpy().dtype
    if codes is None:
        grids = (np.empty((0, 0), np.uint8), np.empty((0, 0), dtype), np.empty((0, 0), dtype), 0)
    else:
        groups = torch.tensor(codes.group[start + j0:start + j1], dtype=torch.long)
        grids = (codes.codes.numpy(), codes.scales[:, groups].to(block.dtype).numpy(),
                 codes.zeros[:, groups].to(block.dtype).numpy(), codes.quantizer.max_code)
    n, m = (pattern.n, pattern.m) if pattern is not None else (0, 0)
    rows, width = block.shape
    claims = -(-rows // _obs_numba.ROWS_PER_CLAIM_BLOCK)
    parallel(_obs_numba.sweep, claims, rows * (j1 - j0) * width * block.element_size(), block.numpy(),
             block_hinv.numpy(), d.contiguous().numpy(), keep_all.numpy(), errors.numpy(), grids[0], grids[1],
             grids[2], np.zeros(1, dtype), start, j0, j1, n, m, sparse_width, grids[3], codes is not None)


@functools.cache
def _numba_installed() -> bool:
    try:
        from . import _obs_numba  # noqa: F401
    except ImportError:
        return False
    return True


def _numba_runs(work: torch.Tensor) -> bool:
    """Whether the compiled column loop takes this sweep: numba installed, the work on CPU in float32/64."""
    return work.device.type == "cpu" and work.dtype in (torch.float32, torch.float64) and _numba_installed()


def _sum_in_order(terms: list[torch.Tensor]) -> float:
    """The sum of the blocks' column losses left to right in their dtype, as a loop adding one column at a time
    would (one transfer at the end: no device sync per block)."""
    values = torch.cat(terms).cpu().numpy()
    total = values.dtype.type(0)
    for term in values:
        total = total + term
    return float(total)


def _keep_in_block(scores: torch.Tensor, budget: torch.Tensor, width: int) -> torch.Tensor:
    """Keep-mask ``[out, width]`` of a block: each row prunes the block's members among its ``budget``
    (``[out, 1]``) lowest ``scores`` over all remaining columns ``[out, remaining]`` (ties → lower index,
    as a stable sort ranks them).

    Only each row's threshold matters, not the order of everything: the ``budget``-th lowest score ``t``
    (one ``kthvalue`` for all rows, each row padded below its scores up to the largest budget), then a
    member is pruned when below ``t``, or at ``t`` among the first ``budget − #below`` ties. Half the time
    of ranking every column with a stable sort (eval/RESULTS.md)."""
    most = int(budget.max())
    if most == 0:
        return torch.ones(scores.shape[0], width, dtype=torch.bool, device=scores.device)
    padding = torch.arange(most, device=scores.device)[None, :] < most - budget  # [out, most]: below every score
    padded = torch.cat([scores, torch.where(padding, -1.0, torch.inf).to(scores.dtype)], 1)
    threshold = padded.kthvalue(most, dim=-1, keepdim=True).values
    members = scores[:, :width]
    tied = members == threshold
    ties_before = tied.cumsum(-1) - tied.to(torch.int64)
    return ~((members < threshold) | (tied & (ties_before < budget - (scores < threshold).sum(-1, keepdim=True))))
