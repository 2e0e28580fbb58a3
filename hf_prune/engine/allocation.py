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

from ..core.execution import single_threaded_fn

MODES = ("global", "local")


def _keep_count(n: int, wanted: float, kind: str, round_to: int | None) -> int:
    wanted = max(0.0, min(float(n), wanted))
    if kind == "channel" and round_to and round_to > 1 and n > round_to:
        k = int(math.floor(wanted / round_to + 0.5)) * round_to
        return max(round_to, min(n, k))
    return max(1, min(n, int(math.floor(wanted + 0.5))))


class _Ranking:
    """All units of all groups in one tensor, ranked by score inside their group."""

    def __init__(self, graph, scores, norm_scores):
        self.units = torch.cat([g.units for g in graph.groups])
        self.group = torch.cat([torch.full((len(g),), i) for i, g in enumerate(graph.groups)])
        self.sizes = [len(g) for g in graph.groups]
        self.kinds = [g.kind for g in graph.groups]
        self.norm = norm_scores[self.units]
        rank = torch.empty_like(self.units)
        offset = 0
        for g in graph.groups:
            order = torch.argsort(scores[g.units], stable=True)
            rank[offset + order] = torch.arange(len(g))
            offset += len(g)
        self.rank = rank

    def removed(self, counts) -> torch.Tensor:
        """The lowest-ranked ``size - count`` units of every group."""
        drop = torch.tensor([n - k for n, k in zip(self.sizes, counts)])
        return self.units[self.rank < drop[self.group]]

    def counts_local(self, ratio: float, round_to) -> list:
        return [_keep_count(n, n * (1 - ratio), kind, round_to) for n, kind in zip(self.sizes, self.kinds)]

    def counts_global(self, threshold: float, round_to) -> list:
        above = torch.zeros(len(self.sizes)).index_add_(0, self.group, (self.norm >= threshold).float())
        return [_keep_count(n, float(a), kind, round_to) for n, a, kind in zip(self.sizes, above, self.kinds)]


@single_threaded_fn
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
    ranking = _Ranking(graph, scores, norm_scores)
    if target_macs is not None:
        if not 0 < target_macs <= 1:
            raise ValueError(f"target_macs={target_macs} must be in (0, 1]: the fraction of dense MACs to keep")
        dense = graph.macs()

        def reached(counts):
            return graph.macs(graph.keep_mask(ranking.removed(counts))) <= target_macs * dense
    else:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity={sparsity} must be in [0, 1): the fraction of prunable parameters to remove")
        prunable = graph.params(only_prunable=True)
        total = graph.params()

        def reached(counts):
            kept = graph.params(graph.keep_mask(ranking.removed(counts)))
            return total - kept >= sparsity * prunable

    if mode == "local":
        lo, hi = 0.0, 1.0
        counts_at = lambda x: ranking.counts_local(x, round_to)  # noqa: E731
    else:
        lo, hi = 0.0, float(ranking.norm.max()) * (1 + 1e-9) + 1e-12
        counts_at = lambda x: ranking.counts_global(x, round_to)  # noqa: E731
    if not reached(counts_at(hi)):
        what = f"target_macs={target_macs}" if target_macs is not None else f"sparsity={sparsity}"
        smallest = graph.macs(graph.keep_mask(ranking.removed(counts_at(hi)))) / graph.macs()
        raise ValueError(f"{what} cannot be reached: removing every prunable unit (keeping round_to="
                         f"{round_to} channels and one head per group) still keeps {smallest:.1%} of MACs. "
                         "Ask for less, set prune_stem=True, or lower round_to.")
    if mode == "global":
        # Counts only change at the scores themselves, so search those: exact, in log2(units) steps.
        cuts = torch.cat([torch.unique(ranking.norm), torch.tensor([hi], dtype=ranking.norm.dtype)])
        first, last = 0, cuts.numel() - 1  # cuts[last] reaches the target
        while first < last:
            mid = (first + last) // 2
            if reached(counts_at(float(cuts[mid]))):
                last = mid
            else:
                first = mid + 1
        return ranking.removed(counts_at(float(cuts[last])))
    for _ in range(40):
        mid = (lo + hi) / 2
        if reached(counts_at(mid)):
            hi = mid
        else:
            lo = mid
    return ranking.removed(counts_at(hi))
