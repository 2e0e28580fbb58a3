"""Allocation: how many units each group keeps, for a ``sparsity`` or ``target_macs`` target.

``local`` removes the same fraction of every group; ``global`` ranks all units by their
group-normalised score. Channel groups keep a multiple of ``round_to`` channels (hardware-friendly
widths are what make a pruned model faster, not just smaller); head and block groups keep whole
heads/blocks and at least one. The fraction (local) or score threshold (global) is found by
bisection on the graph's exact parameter and MAC predictions.
"""
from __future__ import annotations

import math

import torch

MODES = ("global", "local")


def _keep_count(n: int, wanted: float, kind: str, round_to: int | None) -> int:
    wanted = max(0.0, min(float(n), wanted))
    if kind == "channel" and round_to and round_to > 1 and n > round_to:
        k = int(math.floor(wanted / round_to + 0.5)) * round_to
        return max(round_to, min(n, k))
    return max(1, min(n, int(math.floor(wanted + 0.5))))


def _removed_for(graph, scores, counts) -> torch.Tensor:
    removed = []
    for g, k in zip(graph.groups, counts):
        if k < len(g):
            order = torch.argsort(scores[g.units], stable=True)
            removed.append(g.units[order[: len(g) - k]])
    return torch.cat(removed) if removed else torch.zeros(0, dtype=torch.int64)


def counts_local(graph, ratio: float, round_to) -> list:
    return [_keep_count(len(g), len(g) * (1 - ratio), g.kind, round_to) for g in graph.groups]


def counts_global(graph, norm_scores, threshold: float, round_to) -> list:
    return [_keep_count(len(g), float((norm_scores[g.units] >= threshold).sum()), g.kind, round_to)
            for g in graph.groups]


def allocate(graph, scores, norm_scores, *, sparsity=None, target_macs=None, mode="global",
             round_to=8) -> torch.Tensor:
    """Roots of the units to remove so that the target is met (or as close as rounding allows)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if (sparsity is None) == (target_macs is None):
        raise ValueError("give exactly one of sparsity= (fraction of prunable parameters to remove) "
                         "or target_macs= (fraction of dense MACs to keep)")
    if not graph.groups:
        raise ValueError("nothing to prune: every channel of this model is pinned "
                         f"({graph.summary()}); see DependencyGraph.trace.pins for the reasons")
    if target_macs is not None:
        if not 0 < target_macs <= 1:
            raise ValueError(f"target_macs={target_macs} must be in (0, 1]: the fraction of dense MACs to keep")
        dense = graph.macs()

        def reached(counts):
            return graph.macs(graph.keep_mask(_removed_for(graph, scores, counts))) <= target_macs * dense
    else:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity={sparsity} must be in [0, 1): the fraction of prunable parameters to remove")
        prunable = graph.params(only_prunable=True)
        total = graph.params()

        def reached(counts):
            kept = graph.params(graph.keep_mask(_removed_for(graph, scores, counts)))
            return total - kept >= sparsity * prunable

    if mode == "local":
        lo, hi = 0.0, 1.0
        counts_at = lambda x: counts_local(graph, x, round_to)  # noqa: E731
    else:
        values = torch.sort(torch.cat([norm_scores[g.units] for g in graph.groups])).values
        lo, hi = 0.0, float(values[-1]) * (1 + 1e-9) + 1e-12
        counts_at = lambda x: counts_global(graph, norm_scores, x, round_to)  # noqa: E731
    if not reached(counts_at(hi)):
        what = f"target_macs={target_macs}" if target_macs is not None else f"sparsity={sparsity}"
        smallest = graph.macs(graph.keep_mask(_removed_for(graph, scores, counts_at(hi)))) / graph.macs()
        raise ValueError(f"{what} cannot be reached: removing every prunable unit (keeping round_to="
                         f"{round_to} channels and one head per group) still keeps {smallest:.1%} of MACs. "
                         "Ask for less, set prune_stem=True, or lower round_to.")
    for _ in range(40):
        mid = (lo + hi) / 2
        if reached(counts_at(mid)):
            hi = mid
        else:
            lo = mid
    return _removed_for(graph, scores, counts_at(hi))
