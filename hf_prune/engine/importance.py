"""Group importance (DepGraph): a score per unit, aggregated over every tensor slice it owns.

``l1`` / ``l2`` are magnitude scores; ``taylor`` is first-order Taylor ``|w * dL/dw|`` and needs
gradients on the parameters (run a backward pass first, or pass ``calib`` to :func:`hf_prune.prune`).
Scores are summed over all coupled slices of a unit, then divided by the mean score of its group
so that global allocation compares groups of different sizes and scales fairly.
"""
from __future__ import annotations

import torch

from ..core.distributed import ShardedSum, local_part, shard_region
from ..core.execution import caller_threads, single_threaded_fn

IMPORTANCES = ("l1", "l2", "taylor")


def _elementwise_score(param: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element score of this rank's part of ``param`` (all of it unless sharded)."""
    t = local_part(param).float()
    if kind == "l2":
        return t.pow(2)
    if kind == "l1":
        return t.abs()
    if kind == "taylor":
        if param.grad is None:
            raise ValueError("importance='taylor' needs gradients: call loss.backward() before pruning, "
                             "or pass calib=<DataLoader> so hf_prune computes them")
        return (t * local_part(param.grad).float()).abs()
    raise ValueError(f"unknown importance {kind!r}; choose one of {IMPORTANCES}")


@single_threaded_fn
def unit_scores(graph, kind: str = "l2", tensors: dict | None = None) -> torch.Tensor:
    """Raw score per union-find root (0 for roots that are not units).

    ``tensors``: ``{name: tensor}`` to score instead of the traced model's (default), e.g. the parameters of
    the FSDP2-sharded model being trained: each rank scores its shards and the sums are reduced across
    ranks (every score is a sum of per-element terms), so every rank gets the scores of the full tensors.
    """
    if kind not in IMPORTANCES:
        raise ValueError(f"unknown importance {kind!r}; choose one of {IMPORTANCES}")
    tensors = graph._named_tensors() if tensors is None else tensors
    scores = ShardedSum(graph.trace.uf.size)
    cache: dict[str, torch.Tensor] = {}
    for m in graph.members:
        if m.tensor not in graph.param_names:
            continue  # running statistics say nothing about importance
        if bool(graph.pinned[m.units].all()):
            continue  # no prunable unit along this dim (e.g. a kept residual stream): nothing to rank
        t = tensors[m.tensor]
        local = local_part(t)
        dims = [d for d in range(local.dim()) if d != m.dim]
        with caller_threads():  # whole weights: the one heavy step here
            if kind == "taylor":
                if m.tensor not in cache:
                    cache[m.tensor] = _elementwise_score(t, kind)
                per_index = cache[m.tensor].sum(dim=dims) if dims else cache[m.tensor]
            elif not dims:
                per_index = _elementwise_score(local, kind)
            else:  # a fused norm reads the weight once and allocates nothing of its size
                per_index = torch.linalg.vector_norm(local.float(), ord=1 if kind == "l1" else 2, dim=dims)
                per_index = per_index if kind == "l1" else per_index.square()
        scores.add(m.units[shard_region(t)[m.dim]], per_index.double(), t)
    return scores.total()


@single_threaded_fn
def normalized_scores(graph, scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their group's mean, so groups can be ranked together."""
    out = scores.clone()
    for g in graph.groups:
        s = scores[g.units]
        out[g.units] = s / s.mean().clamp_min(1e-30)
    return out
