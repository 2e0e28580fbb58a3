"""Group importance (DepGraph): a score per unit, aggregated over every tensor slice it owns.

``l1`` / ``l2`` are magnitude scores; ``taylor`` is first-order Taylor ``|w * dL/dw|`` and needs
gradients on the parameters (run a backward pass first, or pass ``calib`` to :func:`hf_prune.prune`).
Scores are summed over all coupled slices of a unit, then divided by the mean score of its group
so that global allocation compares groups of different sizes and scales fairly.
"""
from __future__ import annotations

import torch

IMPORTANCES = ("l1", "l2", "taylor")


def _slice_score(t: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    if kind == "l2":
        s = t.detach().double().pow(2)
    elif kind == "l1":
        s = t.detach().double().abs()
    elif kind == "taylor":
        if t.grad is None:
            raise ValueError("importance='taylor' needs gradients: call loss.backward() before pruning, "
                             "or pass calib=<DataLoader> so hf_prune computes them")
        s = (t.detach().double() * t.grad.detach().double()).abs()
    else:
        raise ValueError(f"unknown importance {kind!r}; choose one of {IMPORTANCES}")
    dims = [d for d in range(t.dim()) if d != dim]
    return s.sum(dim=dims) if dims else s


def unit_scores(graph, kind: str = "l2") -> torch.Tensor:
    """Raw score per union-find root (0 for roots that are not units)."""
    tensors = graph._named_tensors()
    scores = torch.zeros(graph.trace.uf.size, dtype=torch.float64)
    for m in graph.members:
        if m.tensor not in graph.param_names:
            continue  # running statistics say nothing about importance
        scores.index_add_(0, m.units, _slice_score(tensors[m.tensor], m.dim, kind).cpu())
    return scores


def normalized_scores(graph, scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their group's mean, so groups can be ranked together."""
    out = scores.clone()
    for g in graph.groups:
        s = scores[g.units]
        out[g.units] = s / s.mean().clamp_min(1e-30)
    return out
