"""Allocation: how many units each group keeps, for a ``sparsity``, ``target_macs`` or ``target_latency`` target.

``local`` removes the same fraction of every group; ``global`` ranks all units by their
group-normalised score. Channel groups keep a multiple of ``round_to`` channels (hardware-friendly
widths are what make a pruned model faster, not just smaller); head and block groups keep whole
heads/blocks and at least one. For parameters and MACs, the fraction (local) or score threshold
(global) is found by bisection on the graph's exact predictions.

For ``target_latency`` (a fraction of the dense model's latency as predicted by a
:class:`~hf_prune.engine.latency.LatencyModel`), ``global`` is a knapsack over groups solved
greedily (:class:`LatencyKnapsack`): starting from the dense model, repeatedly take the step (one
``round_to`` of channels, or one head) whose lost value per millisecond saved is smallest, with
each step's saving computed from the measured table at the current widths of the layers it touches
(so coupled neighbours are accounted for), until the budget is met; then steps that still fit are
added back, best first. That is the classic ratio rule for a knapsack, which needs no additive cost
model; the ratio of the last step is the Lagrange multiplier of the budget (the price of a
millisecond). The value of the k-th best unit of a group of n is its group-normalised score × the
MACs one unit owns × n / k: scores alone make the average unit of every group worth the same,
whatever its size; the MACs make a head worth more than one channel; and n / k (a logarithmic
utility per group) makes the last units of a thinning group worth more, so that no layer is emptied
merely because it is slow per MAC. When time follows MACs, every group then keeps about the same
fraction (ranked inside by score); where time per MAC differs, the slow groups are cut deeper. With
``round_to="measured"`` the steps are multiples of 8 and then every channel group's width is
chosen among nearby multiples of 8/16/32/64 by timing them: the candidate with the best
importance − price × measured time wins, so a wider width that runs faster is always taken.
"""
from __future__ import annotations

import heapq
import math

import torch

from ..core.checks import MEASURED, check_choice, check_fraction
from ..core.execution import single_threaded_fn
from ..errors import ConfigError

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




def check_targets(sparsity=None, target_macs=None, target_latency=None) -> str:
    """The one target given, checked; returns its name. A :class:`ConfigError` names what is wrong."""
    given = {k: v for k, v in (("sparsity", sparsity), ("target_macs", target_macs),
                               ("target_latency", target_latency)) if v is not None}
    if len(given) != 1:
        raise ConfigError("give exactly one target: sparsity= (fraction of prunable parameters to remove), "
                          "target_macs= (fraction of dense MACs to keep) or target_latency= (fraction of the "
                          f"dense model's measured latency to keep); got {given or 'none'}")
    (name, value), = given.items()
    if name == "sparsity":
        check_fraction("sparsity", value, closed_low=True, closed_high=False)
    else:
        check_fraction(name, value)
    return name


def _check_round_to(round_to, target: str) -> None:
    if round_to == MEASURED:
        if target != "target_latency":
            raise ConfigError(f"round_to={MEASURED!r} picks widths by timing them, so it needs target_latency=; "
                              f"with {target} use an int (e.g. 8) or None")
    elif round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to={round_to!r} must be a positive int (channel multiple), None, or "
                          f"{MEASURED!r} (with target_latency)")


@single_threaded_fn
def allocate(graph, scores, norm_scores, *, sparsity=None, target_macs=None, target_latency=None, latency=None,
             removed=None, mode="global", round_to=8) -> torch.Tensor:
    """Roots of the units to remove so that the target is met (or as close as rounding allows).

    ``target_latency`` needs ``latency``, a :class:`~hf_prune.engine.latency.LatencyModel` of this graph;
    ``removed`` (units removed earlier, scored 0 by the caller) is where its search starts.
    """
    check_choice("mode", mode, MODES)
    target = check_targets(sparsity, target_macs, target_latency)
    _check_round_to(round_to, target)
    if not graph.groups:
        raise ValueError("nothing to prune: every channel of this model is pinned "
                         f"({graph.summary()}); see DependencyGraph.trace.pins for the reasons")
    ranking = _Ranking(graph, scores, norm_scores)
    if target == "target_latency":
        if latency is None:
            raise ConfigError("target_latency needs a latency model (hf_prune.engine.latency.LatencyModel) of "
                              "this graph; StructuredPruner.plan builds one")
        knapsack = LatencyKnapsack(graph, ranking, latency.build(), round_to)
        if mode == "global":
            return ranking.removed(knapsack.solve(target_latency, removed))
        round_to = knapsack.round_to
        budget = target_latency * knapsack.total(knapsack.sizes)

        def reached(counts):
            return knapsack.total(counts) <= budget
    elif target == "target_macs":
        dense = graph.macs()

        def reached(counts):
            return graph.macs(graph.keep_mask(ranking.removed(counts))) <= target_macs * dense
    else:
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
        if target == "target_latency":
            raise ValueError(knapsack.unreachable(counts_at(hi), budget))
        what = f"target_macs={target_macs}" if target == "target_macs" else f"sparsity={sparsity}"
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


class LatencyKnapsack:
    """Kept units per group under a latency budget (see the module docstring).

    Works on counts: group ``g`` keeps its ``counts[g]`` best-ranked units, so a member's width is
    its pinned indices plus, per group it holds, the indices of those units (prefix sums ``cum``).
    """

    def __init__(self, graph, ranking: _Ranking, latency, round_to):
        self.graph, self.ranking, self.latency = graph, ranking, latency
        self.measured = round_to == MEASURED
        self.round_to = 8 if self.measured else round_to
        self.sizes = list(ranking.sizes)
        self.step = [self.round_to if k == "channel" and self.round_to and self.round_to > 1 and n > self.round_to
                     else 1 for n, k in zip(self.sizes, ranking.kinds)]
        self.lo = list(self.step)
        order = self._orders()
        # value kept at each count: prefix sums, best unit first, of group-normalised score × MACs per
        # unit × n / rank (see _unit_macs and the module docstring)
        weight = self._unit_macs()
        self.importance = []
        for o, w in zip(order, weight):
            thinning = len(o) / torch.arange(1, len(o) + 1, dtype=torch.float64)
            self.importance.append([0.0] + torch.cumsum(ranking.norm[o].double() * w * thinning, 0).tolist())
        self._members(order)
        self.layers_of = [[] for _ in self.sizes]
        for i, layer in enumerate(latency.layers):
            for g in {g for m in (layer.in_member, layer.out_member) if m is not None for g, _ in self.parts[m]}:
                self.layers_of[g].append(i)
        self.neighbours = [sorted({h for i in ls for h in self._groups_of_layer(i)}) for ls in self.layers_of]
        self.price = 0.0

    def _unit_macs(self) -> list:
        """MACs one unit of each group owns (in the dense model), relative to the mean over all units.

        Normalised scores make the average unit of every group worth 1, whatever its size; a head
        owns far more compute than one MLP channel, so for a budget in time a unit's value is weighted
        by its MACs.
        """
        dense = self.graph.macs()
        per = [max(0, dense - self.graph.macs(self.graph.keep_mask(g.units[:1]))) for g in self.graph.groups]
        mean = sum(p * n for p, n in zip(per, self.sizes)) / max(1, sum(self.sizes))
        return [p / mean if mean > 0 else 1.0 for p in per]

    def _orders(self) -> list:
        """Per group, positions in the ranking of its units, most important first."""
        orders, offset = [], 0
        for n in self.sizes:
            rank = self.ranking.rank[offset: offset + n]
            orders.append(offset + torch.argsort(rank, descending=True))
            offset += n
        return orders

    def _members(self, order) -> None:
        """``fixed[m]`` pinned indices and ``parts[m] = [(group, cum)]`` of every member a layer uses."""
        group_of = torch.full((self.graph.trace.uf.size,), -1, dtype=torch.int64)
        group_of[self.ranking.units] = self.ranking.group
        self.fixed, self.parts = {}, {}
        for layer in self.latency.layers:
            for m in (layer.in_member, layer.out_member):
                if m is None or m in self.fixed:
                    continue
                units = self.graph.members[m].units
                owner = group_of[units]
                self.fixed[m] = int((owner < 0).sum())
                present, mult = torch.unique(units[owner >= 0], return_counts=True)
                self.parts[m] = []
                for g in torch.unique(owner[owner >= 0]).tolist():
                    where = torch.searchsorted(present, self.ranking.units[order[g]])
                    self.parts[m].append((g, [0] + torch.cumsum(mult[where], 0).tolist()))

    def _groups_of_layer(self, i) -> set:
        layer = self.latency.layers[i]
        return {g for m in (layer.in_member, layer.out_member) if m is not None for g, _ in self.parts[m]}

    # -------------------------------------------------------------- cost of a state
    def _width(self, m, dense, counts) -> int:
        if m is None:
            return dense
        return self.fixed[m] + sum(cum[counts[g]] for g, cum in self.parts[m])

    def _widths_of(self, i, counts) -> tuple:
        layer = self.latency.layers[i]
        cout = self._width(layer.out_member, layer.dense_out, counts)
        cin = (cout * layer.dense_in // layer.dense_out if layer.in_follows_out
               else self._width(layer.in_member, layer.dense_in, counts))
        return cin, cout

    def layer_cost(self, i, counts) -> float:
        """Time of layer ``i`` plus its share of the residual, at ``counts``."""
        cin, cout = self._widths_of(i, counts)
        layer = self.latency.layers[i]
        return (self.latency.layer_ms(i, cin, cout)
                + self.latency.residual(layer.out_tokens * cout, layer.out_tokens * layer.dense_out))

    def total(self, counts) -> float:
        return sum(self.layer_cost(i, counts) for i in range(len(self.latency.layers)))

    def cost_at(self, g, count, counts) -> float:
        """Time of the layers that group ``g`` touches, with ``g`` at ``count``."""
        saved, counts[g] = counts[g], count
        try:
            return sum(self.layer_cost(i, counts) for i in self.layers_of[g])
        finally:
            counts[g] = saved

    # -------------------------------------------------------------- greedy
    def _next(self, g, k) -> int | None:
        if k <= self.lo[g]:
            return None
        return max(self.lo[g], (k - 1) // self.step[g] * self.step[g])

    def _offer(self, g, counts):
        """(lost value per ms saved, new count) of group ``g``'s next step that saves time, or None.

        A step may save nothing (a measured width slower than a narrower one, a flat stretch of the
        table): then the offer reaches on to the first count that does save time."""
        base, nk = self.cost_at(g, counts[g], counts), self._next(g, counts[g])
        while nk is not None:
            saved = base - self.cost_at(g, nk, counts)
            if saved > 1e-12:
                return (self.importance[g][counts[g]] - self.importance[g][nk]) / saved, nk
            nk = self._next(g, nk)
        return None  # no timed layer sees this group, or nothing below saves time

    def _greedy(self, counts, budget) -> None:
        total = self.total(counts)
        version = [0] * len(self.sizes)
        heap = []

        def push(g):
            version[g] += 1
            offer = self._offer(g, counts)
            if offer is not None:
                heapq.heappush(heap, (offer[0], g, version[g], offer[1]))

        for g in range(len(self.sizes)):
            push(g)
        while total > budget and heap:
            ratio, g, v, nk = heapq.heappop(heap)
            if v != version[g]:
                continue
            before = self.cost_at(g, counts[g], counts)
            counts[g] = nk
            total += self.cost_at(g, nk, counts) - before
            self.price = ratio
            for h in {g, *self.neighbours[g]}:
                push(h)
        if total > budget * (1 + 1e-9):
            raise ValueError(self.unreachable(counts, budget))

    def unreachable(self, counts, budget) -> str:
        dense = self.total(self.sizes)
        return (f"target_latency={budget / dense:.3g} cannot be reached: removing every prunable unit (keeping "
                f"round_to={self.round_to} channels and one head per group) still takes "
                f"{self.total(counts) / dense:.1%} of the dense latency as measured. Ask for less, set "
                "prune_stem=True, or lower round_to.")

    def _fill(self, counts, budget, ceiling) -> None:
        """Add back, best value per ms first, every step that still fits the budget (the greedy's last
        step, or a rounding that went below the budget, can leave room)."""
        total = self.total(counts)
        while True:
            best = None
            for g in range(len(self.sizes)):
                for up in self._ups(g, counts[g], ceiling[g]):
                    extra = self.cost_at(g, up, counts) - self.cost_at(g, counts[g], counts)
                    gain = self.importance[g][up] - self.importance[g][counts[g]]
                    if total + extra <= budget and gain > 0:
                        rate = gain / max(extra, 1e-12)
                        if best is None or rate > best[0]:
                            best = (rate, g, up, extra)
            if best is None:
                return
            _, g, counts[g], extra = best
            total += extra

    def _ups(self, g, k, ceiling) -> list:
        """Counts to grow group ``g`` to from ``k``: the next step; with measured rounding also the next
        multiples of 16, 32 and 64 (a misaligned step between them may be slower than both)."""
        if k >= ceiling:
            return []
        ups = {min(ceiling, (k // self.step[g] + 1) * self.step[g])}
        if self.measured and self.step[g] > 1:
            ups |= {min(ceiling, (k // m + 1) * m) for m in (16, 32, 64)}
        return sorted(ups)

    def solve(self, target: float, removed: torch.Tensor | None = None) -> list:
        """Kept count per group for ``target`` × the predicted dense latency; ``removed`` units (removed
        earlier, so ranked last) are gone from the start."""
        counts = list(self.sizes)
        if removed is not None and removed.numel():
            gone = torch.bincount(self.ranking.group[torch.isin(self.ranking.units, removed)],
                                  minlength=len(self.sizes))
            counts = [n - int(k) for n, k in zip(self.sizes, gone)]
        floor = list(counts)
        budget = target * self.total(self.sizes)
        self._greedy(counts, budget)
        if self.measured and self.price > 0:
            self._refine(counts)
            # The widths chosen are timed again, afresh: the fastest of several noisy candidates is
            # biased low (the winner's curse). Then the budget is met again from there.
            chosen = [(i, *self._widths_of(i, counts)) for i in range(len(self.latency.layers))]
            self.latency.forget(chosen)
            self.latency.ensure(chosen)
            self._greedy(counts, budget)
        self._fill(counts, budget, floor)
        self.counts = counts
        return counts

    # -------------------------------------------------------------- measured rounding
    def candidates(self, g, k) -> list:
        """Widths near ``k`` for a channel group: multiples of 8 within about 12 %, and the nearest
        multiples of 16, 32 and 64 on either side (within the group's size)."""
        n, window = self.sizes[g], max(16, k // 64 * 8)
        found = {c for c in range(k - window, k + window + 1) if c % 8 == 0}
        for m in (16, 32, 64):
            found |= {k // m * m, -(-k // m) * m}
        if k == n or n - k <= window:
            found.add(n)
        return sorted(c for c in found if self.lo[g] <= c <= n)

    def _refine(self, counts) -> None:
        """Time the candidate widths of every channel group and keep the best (see module docstring)."""
        groups = [g for g, kind in enumerate(self.ranking.kinds) if kind == "channel" and self.layers_of[g]
                  and self.step[g] > 1]
        points = []
        for g in groups:
            for c in self.candidates(g, counts[g]):
                saved, counts[g] = counts[g], c
                points += [(i, *self._widths_of(i, counts)) for i in self.layers_of[g]]
                counts[g] = saved
        self.latency.ensure(points)
        groups.sort(key=lambda g: -self.cost_at(g, counts[g], counts))
        for g in groups:
            counts[g] = max(self.candidates(g, counts[g]),
                            key=lambda c: (self.importance[g][c] - self.price * self.cost_at(g, c, counts), c))
