"""torch.distributed glue: process-group setup under torchrun, global batch statistics, seeds, rank-0 I/O.

The f-DPG statistics that couple a batch (log Z, the batch baseline, normalised importance weights, ESS, the
divergence estimates) are computed on the *global* batch: every rank gathers the per-sequence scalars of all ranks
(three or four floats a sequence, negligible next to the model), computes the statistics on the concatenation
exactly as one process would, and keeps its own slice. So W ranks with per-rank batch b give the same numbers as
one rank with batch W·b on the same samples, up to nothing but the order of float additions inside all-reduces
that other code may do.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = [
    "is_initialized", "rank", "world_size", "is_main", "setup", "teardown", "all_gather_cat", "all_reduce_sum",
    "all_reduce_mean", "barrier", "rank_seed", "main_first",
]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: str | None = None) -> torch.device:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE`` in the environment); a no-op otherwise.

    Backend: NCCL for CUDA devices, gloo for CPU. Returns this rank's device (``cuda:LOCAL_RANK`` on GPUs).
    """
    want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device or "cpu")


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) along dim 0 over ranks, in rank order."""
    if not is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world_size()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def rank_seed(seed: int, r: int | None = None) -> int:
    """A distinct, reproducible seed per rank (rank 0 keeps ``seed``, so one process reproduces a 1-rank run)."""
    r = rank() if r is None else r
    return (seed + 1_000_003 * r) % (2**63 - 1)


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. writes a file), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
