"""Statistics of a linear's inputs, accumulated batch by batch as running means.

Running means (rather than sums) keep float32 accumulators in range over long
calibration sets; the Hessian can be accumulated in float64 for reference tests.

XᵀX is symmetric, so for wide inputs only its upper triangle is accumulated, in column blocks
(``hessian_blocks``: each block's rows against the columns from it onwards), and the lower triangle
is mirrored when the Hessian is read. With k blocks that is k(k+1)/2 of k² block products; narrow
inputs keep the one full GEMM, where splitting would only cost GEMM efficiency (measurements in
eval/RESULTS.md).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# Names a pruner can list in ``needs``.
SQ_NORM = "sq_norm"  # E[x_j²] per input channel (Wanda)
HESSIAN = "hessian"  # 2·E[x xᵀ] (SparseGPT)
MOMENTS = "moments"  # E[x_j] and Var[x_j] per input channel (DSnoT)
KNOWN = frozenset({SQ_NORM, HESSIAN, MOMENTS})
BLOCK_WIDTH = 384  # inputs per block of the triangular Hessian accumulation; at most MAX_BLOCKS blocks
MAX_BLOCKS = 8


def hessian_blocks(in_features: int) -> list[tuple[int, int]]:
    """Column ranges of the triangular accumulation (one range: the plain full GEMM)."""
    count = min(MAX_BLOCKS, max(1, in_features // BLOCK_WIDTH))
    edges = [in_features * i // count for i in range(count + 1)]
    return list(zip(edges, edges[1:]))


class InputStats:
    """Streaming statistics of one input tensor, shared by every linear that reads it."""

    def __init__(self, in_features: int, needs: frozenset[str], device: torch.device | str = "cpu",
                 hessian_dtype: torch.dtype = torch.float32) -> None:
        unknown = set(needs) - KNOWN
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(KNOWN)}")
        self.in_features = in_features
        self.needs = frozenset(needs)
        self.count = 0  # tokens seen
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device) if SQ_NORM in needs else None
        self._hessian = (torch.zeros(in_features, in_features, dtype=hessian_dtype, device=device)
                         if HESSIAN in needs else None)
        self._blocks = hessian_blocks(in_features)
        self._mirrored = True  # whether the lower triangle is up to date
        self.mean = torch.zeros(in_features, dtype=torch.float64, device=device) if MOMENTS in needs else None
        self._m2 = torch.zeros(in_features, dtype=torch.float64, device=device) if MOMENTS in needs else None

    def update(self, inputs: torch.Tensor) -> None:
        """Fold a batch ``[..., in]`` of inputs into the running statistics."""
        x = inputs.detach().reshape(-1, self.in_features)
        batch = x.shape[0]
        if batch == 0:
            return
        total = self.count + batch
        old_share = self.count / total
        if self.sq_norm is not None:
            xf = x.float()
            self.sq_norm.mul_(old_share).add_((xf * xf).sum(0), alpha=1.0 / total)
        if self._hessian is not None:
            xh = x.to(self._hessian.dtype)
            if len(self._blocks) == 1:
                self._hessian.mul_(old_share).addmm_(xh.T, xh, alpha=2.0 / total)
            else:
                for start, end in self._blocks:
                    upper = self._hessian[start:end, start:]
                    upper.mul_(old_share).addmm_(xh[:, start:end].T, xh[:, start:], alpha=2.0 / total)
                self._mirrored = False
        if self.mean is not None:
            # Chan et al.'s parallel update: exact merge of two (count, mean, M2) summaries.
            xd = x.double()
            batch_mean = xd.mean(0)
            delta = batch_mean - self.mean
            self._m2.add_(((xd - batch_mean) ** 2).sum(0)).add_(delta * delta * (self.count * batch / total))
            self.mean.add_(delta * (batch / total))
        self.count = total

    @property
    def hessian(self) -> torch.Tensor | None:
        """2·E[xxᵀ] ``[in, in]``, symmetric (None unless collected)."""
        if self._hessian is not None and not self._mirrored:
            h = self._hessian
            for start, end in self._blocks:  # block by block: no temporary of the full size
                block = h[start:end, start:end]
                block.copy_(block.triu() + block.triu(1).T)
                h[end:, start:end] = h[start:end, end:].T
            self._mirrored = True
        return self._hessian

    def combine(self, sum_across: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Merge the statistics of other processes' inputs into these, in place, so that every process
        holds those of all inputs; ``sum_across(t)`` adds ``t`` over the processes in place
        (``distributed.sum_``). Running means are weighted by token counts; variances merge exactly
        (Chan et al.): M2 = Σ_r [M2_r + n_r·(mean_r − mean)²]."""
        device = next(t.device for t in (self.sq_norm, self.hessian, self.mean) if t is not None)
        local = self.count
        total = int(sum_across(torch.tensor([float(local)], dtype=torch.float64, device=device)).item())
        if total == 0:
            return
        share = local / total
        for accumulator in (self.sq_norm, self.hessian):
            if accumulator is not None:
                sum_across(accumulator.mul_(share))
        if self.mean is not None:
            local_mean = self.mean.clone()
            sum_across(self.mean.mul_(share))
            self._m2.add_((local_mean - self.mean).square_().mul_(local))
            sum_across(self._m2)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """Population variance per input channel."""
        if self._m2 is None:
            raise ValueError("variance was not collected; add MOMENTS to the pruner's needs")
        return self._m2 / max(self.count, 1)

    @property
    def channel_norm(self) -> torch.Tensor:
        """‖X_j‖₂ up to a constant factor (sqrt of the mean square), the Wanda activation scale."""
        if self.sq_norm is None:
            raise ValueError("sq_norm was not collected; add SQ_NORM to the pruner's needs")
        return self.sq_norm.sqrt()
