"""Processes that must agree: every helper is a no-op without an initialised process group of size > 1.

Every process runs the same pruning code on its own replica; these make the inputs of each decision
bitwise identical everywhere (scores, masks, pruned weights) and check the outcome, so replicas can
never silently drift apart.
"""
from __future__ import annotations

import torch

from ..errors import PruningError

def process_group():
    """``torch.distributed`` when more than one process takes part, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return torch.distributed
    return None


def comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    dist = process_group()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main_process() -> bool:
    dist = process_group()
    return dist is None or dist.get_rank() == 0


def sync_scores(scores: torch.Tensor, how: str = "all_reduce") -> torch.Tensor:
    """Make per-unit ``scores`` identical on every process.

    ``how="all_reduce"``: the mean over processes; ``"broadcast"``: rank 0's scores. The result is
    broadcast from rank 0 in both cases, so it is bitwise identical everywhere.
    """
    dist = process_group()
    if dist is None:
        return scores
    t = scores.detach().to(comm_device(), torch.float64).contiguous()
    if how == "all_reduce":
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    dist.broadcast(t, src=0)
    return t.to(scores.device, scores.dtype)


def broadcast_(tensors) -> None:
    """Overwrite ``tensors`` in place with rank 0's values."""
    dist = process_group()
    if dist is None:
        return
    dev = comm_device()
    for t in tensors:
        buf = t.detach().to(dev, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()
        dist.broadcast(buf, src=0)
        with torch.no_grad():
            t.copy_(buf.to(t.device, t.dtype))


def check_same_everywhere(values: torch.Tensor, what: str = "pruned units") -> None:
    """Raise :class:`PruningError` if the processes hold different ``values`` (an integer tensor)."""
    dist = process_group()
    if dist is None:
        return
    r = values.reshape(-1).to(torch.int64)
    weights = torch.arange(1, r.numel() + 1, dtype=torch.int64)
    digest = torch.tensor([r.numel(), int(r.sum()), int((r * weights).sum() % 1_000_000_007)],
                          dtype=torch.int64, device=comm_device())
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise PruningError(f"processes disagree on the {what} (rank {dist.get_rank()}: {digest.tolist()}, "
                           f"min {lo.tolist()}, max {hi.tolist()}); they must be identical on every rank")


def unwrap(model):
    """The bare model inside DDP / DataParallel wrappers (and accelerate's compiled or FSDP-wrapped
    modules that keep it in ``.module``)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model
