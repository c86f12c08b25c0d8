"""Data-parallel calibration with ``torch.distributed`` (``torchrun --nproc-per-node N -m llmprune prune ...``).

Every rank draws the same calibration windows and streams its contiguous share of them through each
decoder layer. After the statistics pass the accumulators are summed across ranks (``InputStats.combine``),
so every rank holds the statistics of the whole calibration set. Rank 0 alone decides the pruned weights
and broadcasts them: one decision, made once, so ranks on different hardware can never disagree (and
the others skip the OBS solve). Each rank then runs its share through the pruned layer for the next
one. Rank 0 alone writes the checkpoint and prints. gloo on CPU, NCCL on CUDA; with one process none
of this runs and ``torch.distributed`` is never initialised.
"""
from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

from .errors import LLMPruneError


def active() -> bool:
    """Whether this process is one of several ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_leader() -> bool:
    return rank() == 0


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1); no-op otherwise.

    A rank that torchrun stops (because another died) exits through ``SystemExit``, so rank 0's
    half-written output directory is removed on the way out."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return
    if not dist.is_available():
        raise LLMPruneError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def finish() -> None:
    """Leave the process group (all ranks together)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def shard(tokens: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows ``[nsamples, seqlen]``."""
    if not active():
        return tokens
    if tokens.shape[0] < world():
        raise LLMPruneError(f"{tokens.shape[0]} calibration windows cannot be split across {world()} ranks; "
                            f"use --nsamples {world()} or more")
    return torch.tensor_split(tokens, world())[rank()]


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank, in place."""
    if active():
        dist.broadcast(tensor, src=0)
    return tensor


def barrier() -> None:
    if active():
        dist.barrier()
