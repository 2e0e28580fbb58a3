"""SP's full-net-supervised search: per-stage scores against the full net, combined by a DP over stages.

The supernet is trained stage by stage: stage ``k`` is fed the full net's input of stage ``k`` and
regresses the full net's output of stage ``k`` (:meth:`Supernet.subnet_loss`). The search ranks
subnets by **the same objective on held-out data** instead of by the chained (end-to-end) accuracy of
stages that were never trained on each other's outputs — the mismatch the paper's stage-wise design
exists to avoid:

1. **Variables of a stage.** A group (see :class:`~hf_prune.methods.stagewise.supernet.WidthSpace`)
   *acts in* stage ``k`` when one of its tensors belongs to a module of stage ``k``
   (:attr:`Supernet.module_stage`: the stem counts as stage 0 and the head as the last stage) or when
   it is a channel of stage ``k``'s input (the full net's input is masked to the subnet's channels).
   Groups acting in two consecutive stages (a ResNet's or ConvNeXt's residual stream feeding the next
   stage's downsampling) are the **interface** between them. Groups acting in three or more stages, or
   in two that are not consecutive (a ViT's embedding width when ``prune_stem=True``), **span** the
   network: the search enumerates their widths in an outer loop (every combination when there are at
   most 16, otherwise the same width ratio for all of them) and runs steps 2-4 for each.
2. **Per-stage scores.** For each stage, candidate assignments of the widths of its groups (every one
   when there are at most ``candidates``, otherwise every interface width first, then the same ratio
   for the stage's other groups, then random draws) are scored by :meth:`Supernet.score_stage`: the
   stage's training loss on held-out batches (relative MSE of the stage output over the kept
   channels, plus KD from the full net's logits for the last stage, with the training weights), with
   the stage's BatchNorms recalibrated per candidate. The objective of a subnet is the sum over stages.
3. **MACs per stage.** MACs are exact (the graph's count) and split over stages by inclusion-exclusion
   around the widest subnet: stage ``k`` is charged ``macs(widest with stage k's widths) - macs(widest)``
   minus what its input interface alone already charged the previous stage. This is exact whenever
   every layer's MACs depend on the groups of one stage (plus the spanning ones), which holds when a
   group spans one stage or two consecutive ones (checked in the tests for ResNet, ConvNeXt and ViT;
   the chosen subnet's MACs are always recomputed exactly).
4. **DP over stages** (:func:`best_combinations`): a multiple-choice knapsack along the chain of
   stages, whose state is the interface's widths and the MACs used so far (quantised to ``bins``
   steps, rounded up so that what it returns fits the budget), keeping the ``top_k`` best
   combinations by objective.
5. **Final check.** The ``top_k`` combinations are checked exactly for MACs (and measured latency,
   ``max_latency_ms``: when none fits, the MACs budget shrinks by the measured excess and the DP runs
   again on the cached scores) and scored by their chained proxy accuracy (BatchNorm recalibrated);
   the most accurate wins (ties: the lower objective).

*Departure:* the paper (after DNA) ranks stages independently and combines them under the budget; the
candidate generation, the inclusion-exclusion MAC split and the chained final check are ours.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from ...core.checks import check_choice
from ...core.progress import progress
from ...errors import PruningError
from .config import SEARCHES
from .supernet import SearchResult

__all__ = ["StageOption", "StageLayout", "best_combinations", "stage_layout", "stage_candidates", "stage_charges",
           "stagewise_search", "search_subnet", "search_stats"]

MAX_JOINT = 16  # joint widths of interface / spanning groups enumerated in full up to this many


# --------------------------------------------------------------------------------------- DP


@dataclass(frozen=True)
class StageOption:
    """One way to set a stage's widths: ``inp`` must equal the previous stage's ``out`` (interface widths)."""

    inp: object
    out: object
    cost: float
    macs: int  # >= 0


def best_combinations(options: list, budget: int | None, top_k: int = 1, bins: int | None = None) -> list:
    """The ``top_k`` cheapest chains (one option per stage, ``inp`` of each = ``out`` of the previous;
    stage 0's ``inp`` is None) whose MACs sum to at most ``budget``: ``[(cost, [option index per stage])]``.

    ``bins``: MACs are counted in units of ``ceil(budget / bins)``, each option's rounded up, so every
    returned chain fits the budget (a chain within one unit per stage of the budget may be missed);
    ``None`` counts exactly (integers). ``budget=None``: no MACs constraint.
    Cost: O(stages x options x budget steps x top_k).
    """
    if not options or (budget is not None and budget < 0):
        return []
    if budget is None:
        unit, steps = None, 0
    else:
        unit = 1 if bins is None or budget <= bins else -(-int(budget) // int(bins))
        steps = int(budget) // unit
    start = _empty(steps, top_k)
    start[0, 0] = 0.0
    tables, backs = {None: start}, []
    for opts in options:
        new, back = {}, {}
        for j, o in enumerate(opts):
            q = _units(o.macs, unit)
            if o.inp not in tables or q > steps:
                continue
            src = tables[o.inp][:steps + 1 - q] + o.cost  # (budget steps left, top_k), sorted by cost
            cost = new.setdefault(o.out, _empty(steps, top_k))
            bp = back.setdefault(o.out, torch.full((steps + 1, top_k, 2), -1, dtype=torch.int64))
            ranks = torch.arange(top_k).expand_as(src)
            both = torch.cat([cost[q:], src], 1)
            who = torch.cat([bp[q:], torch.stack([torch.full_like(ranks, j), ranks], -1)], 1)
            order = torch.sort(both, dim=1, stable=True).indices[:, :top_k]
            cost[q:] = both.gather(1, order)
            bp[q:] = who.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
        tables = new
        backs.append(back)
    if None not in tables:
        return []
    flat = tables[None].reshape(-1)
    found = []
    for idx in torch.sort(flat, stable=True).indices[:top_k].tolist():
        if not math.isfinite(float(flat[idx])):
            break
        b, r = divmod(idx, top_k)
        found.append((float(flat[idx]), _backtrack(options, backs, unit, b, r)))
    return found


def _units(macs: int, unit: int | None) -> int:
    return 0 if unit is None else -(-int(macs) // unit)


def _empty(steps: int, top_k: int) -> torch.Tensor:
    return torch.full((steps + 1, top_k), float("inf"), dtype=torch.float64)


def _backtrack(options, backs, unit, b, r) -> list:
    state, picks = None, []
    for k in range(len(options) - 1, -1, -1):
        j, r = backs[k][state][b, r].tolist()
        o = options[k][j]
        picks.append(j)
        b -= _units(o.macs, unit)
        state = o.inp
    return picks[::-1]


# --------------------------------------------------------------------------------------- layout


@dataclass
class StageLayout:
    """Which groups act in which stage (see the module docstring)."""

    variables: list  # per stage: indices of the (non-spanning) groups acting in it
    interfaces: list  # per boundary k (between stage k and k+1): groups acting in both
    spanning: list  # groups searched in the outer loop
    acts_in: list = field(default_factory=list)  # per group: the set of stages it acts in


def stage_layout(sup) -> StageLayout:
    graph, n = sup.graph, len(sup.stages)
    owner = sup.module_stage
    planes = [sup.plane_roots(("in", k)) for k in range(n)]
    acts_in = []
    for g in graph.groups:
        ks = {owner.get(graph.members[i].tensor.rpartition(".")[0], n - 1) for i in g.members}
        ks |= {k for k, p in enumerate(planes) if p is not None and bool(torch.isin(p.reshape(-1), g.units).any())}
        acts_in.append(ks)
    spanning = [i for i, ks in enumerate(acts_in) if len(ks) > 2 or (len(ks) == 2 and max(ks) - min(ks) > 1)]
    span = set(spanning)
    variables = [[i for i, ks in enumerate(acts_in) if k in ks and i not in span] for k in range(n)]
    interfaces = [[i for i, ks in enumerate(acts_in) if ks == {k, k + 1}] for k in range(n - 1)]
    return StageLayout(variables, interfaces, spanning, acts_in)


def joint_options(space, groups: list) -> list:
    """Joint width indices of ``groups``: all combinations up to :data:`MAX_JOINT`, else one ratio for all."""
    sizes = [len(space.counts[g]) for g in groups]
    if math.prod(sizes) <= MAX_JOINT:
        return list(itertools.product(*[range(s) for s in sizes]))
    return _levels(sizes)


def _levels(sizes: list) -> list:
    """The same width ratio for every group: level ``j`` of ``L`` picks index ``round(j/(L-1)*(size-1))``."""
    top = max(sizes, default=1)
    if top <= 1:
        return [tuple(0 for _ in sizes)]
    return list(dict.fromkeys(tuple(round(j * (s - 1) / (top - 1)) for s in sizes) for j in range(top)))


def stage_candidates(space, variables: list, inp: list, out: list, limit: int, generator: torch.Generator) -> list:
    """Width assignments (tuples of indices, in the order of ``variables``) to score for one stage.

    Every assignment when there are at most ``limit``; otherwise the widest and the narrowest, one per
    interface width (so that every width of both interfaces can be chained) with the stage's other
    groups at the same ratio, then random draws, until ``limit``.
    """
    sizes = [len(space.counts[g]) for g in variables]
    if math.prod(sizes) <= limit:
        return list(itertools.product(*[range(s) for s in sizes]))
    pos = {g: i for i, g in enumerate(variables)}
    local = [g for g in variables if g not in inp and g not in out]
    ins, outs, levels = joint_options(space, inp), joint_options(space, out), _levels([sizes[pos[g]] for g in local])
    found: dict = {}

    def add(a, b, c):
        assignment = [0] * len(variables)
        for groups, values in ((inp, a), (out, b), (local, c)):
            for g, v in zip(groups, values):
                assignment[pos[g]] = v
        found.setdefault(tuple(assignment), None)

    found[tuple(s - 1 for s in sizes)] = None
    found[tuple(0 for _ in sizes)] = None
    n_if = max(len(ins), len(outs))
    for i in range(n_if):  # every interface width at least once, the other groups at a matching ratio
        add(ins[i % len(ins)], outs[i % len(outs)], levels[i * len(levels) // n_if])
    for _ in range(limit * 20):
        if len(found) >= limit:
            break
        a = ins[int(torch.randint(len(ins), (1,), generator=generator))]
        b = outs[int(torch.randint(len(outs), (1,), generator=generator))]
        c = tuple(int(torch.randint(sizes[pos[g]], (1,), generator=generator)) for g in local)
        add(a, b, c)
    return list(found)[:max(limit, n_if + 2)]


# --------------------------------------------------------------------------------------- search


def search_subnet(sup, config, evals: list, calib: list | None, *, target_macs: float | None = None,
                  max_latency_ms: float | None = None, example_inputs=None, population: int | None = None,
                  generations: int | None = None, seed: int | None = None, search: str | None = None) -> SearchResult:
    """The best subnet of ``sup`` under the budget with ``config``'s search (:class:`StageWiseConfig`):
    ``"stagewise"`` (:func:`stagewise_search`, the default) or ``"chained"`` (evolutionary search by
    chained proxy accuracy, :meth:`Supernet.search`). ``search``, ``seed``, ``population`` and
    ``generations`` override the config's."""
    c = config
    search = c.search if search is None else check_choice("search", search, SEARCHES)
    seed = c.seed if seed is None else seed
    if search == "stagewise":
        return stagewise_search(sup, evals, calib, target_macs=target_macs, max_latency_ms=max_latency_ms,
                                example_inputs=example_inputs, candidates=c.stage_candidates,
                                top_k=c.final_candidates, seed=seed, temperature=c.temperature,
                                stage_weight=c.stage_weight, kd_weight=c.kd_weight)
    return sup.search(lambda ch: sup.proxy_accuracy(ch, evals, calib), target_macs=target_macs,
                      max_latency_ms=max_latency_ms, example_inputs=example_inputs,
                      population=population or c.population,
                      generations=c.generations if generations is None else generations, seed=seed)


def search_stats(sup, result: SearchResult) -> dict:
    """Parameter / MAC counts of the searched subnet and its proxy scores (for the method record)."""
    stats = {**sup.subnet_stats(result.choice), "proxy_accuracy": result.score}
    if result.objective is not None:
        stats["stage_objective"] = result.objective
    return stats


def stagewise_search(sup, evals: list, calib: list | None, *, target_macs: float | None = None,
                     max_latency_ms: float | None = None, example_inputs=None, candidates: int = 32, top_k: int = 4,
                     seed: int = 0, bins: int = 2048, temperature: float = 1.0, stage_weight: float = 1.0,
                     kd_weight: float = 1.0):
    """The best subnet of ``sup`` under the budget by the stage-wise objective (see the module docstring).

    ``evals``: held-out labelled batches (stage scores, and the chained accuracy of the ``top_k`` best
    combinations); ``calib``: batches for BatchNorm recalibration. Returns a
    :class:`~hf_prune.methods.stagewise.supernet.SearchResult` whose ``score`` is the chained proxy
    accuracy, ``objective`` the summed stage losses and ``history`` the checked combinations.
    """
    if target_macs is None and max_latency_ms is None:
        raise PruningError("search needs a budget: target_macs= (fraction of dense MACs) or max_latency_ms=")
    budget = None if target_macs is None else sup.check_target(target_macs) * sup.dense_macs
    layout = stage_layout(sup)
    weights = {"temperature": temperature, "stage_weight": stage_weight, "kd_weight": kd_weight}
    gen = torch.Generator().manual_seed(int(seed))
    settings = joint_options(sup.space, layout.spanning)
    bar = progress(total=len(settings) * len(sup.stages), desc="SP stage-wise search", unit="stage")
    tables = [_stage_tables(sup, layout, x, evals, calib, candidates, gen, weights, bar) for x in settings]
    bar.close()
    latency: dict = {}
    for _ in range(12):
        combos = _combinations(tables, budget, top_k, bins)
        feasible = []
        for objective, choice in combos:
            if budget is not None and sup.space.macs(choice) > budget:
                continue  # the quantised DP is conservative; this guards the exact count
            if max_latency_ms is not None:
                if choice not in latency:
                    latency[choice] = sup.latency_ms(choice, example_inputs)
                if latency[choice] > max_latency_ms:
                    continue
            feasible.append((objective, choice))
        if feasible or max_latency_ms is None or not combos:
            break
        over = [(sup.space.macs(c), latency[c]) for _, c in combos if c in latency]
        budget = min(m * max_latency_ms / t for m, t in over) * 0.98 if over else (budget or sup.dense_macs) * 0.9
    if not feasible:
        raise PruningError(f"no subnet of this width space fits target_macs={target_macs}, max_latency_ms="
                           f"{max_latency_ms}: raise the budget, add smaller ratios or more candidates")
    checked = {choice: (objective, sup.proxy_accuracy(choice, evals, calib)) for objective, choice in feasible}
    best = max(checked, key=lambda c: (checked[c][1], -checked[c][0]))
    history = [(i, checked[c][1], list(c), checked[c][0]) for i, c in enumerate(checked)]
    return SearchResult(choice=best, score=checked[best][1], widths=sup.space.widths(best), macs=sup.space.macs(best),
                        macs_ratio=sup.macs_ratio(best), history=history, latency_ms=latency.get(best),
                        objective=checked[best][0], method="stagewise")


@dataclass
class _Tables:
    """Scored options of every stage for one setting of the spanning groups."""

    ref: tuple  # the widest subnet with that setting
    groups: list  # per stage: the groups its options set
    assignments: list  # per stage: the widths (tuple, in the order of ``groups``) of each option
    options: list  # per stage: StageOption list
    base_macs: int  # MACs of ``ref`` plus every stage's smallest charge

    def choice(self, picks: list) -> tuple:
        choice = list(self.ref)
        for groups, assignments, j in zip(self.groups, self.assignments, picks):
            for g, v in zip(groups, assignments[j]):
                choice[g] = v
        return tuple(choice)


def _with(ref: tuple, groups: list, values) -> tuple:
    choice = list(ref)
    for g, v in zip(groups, values):
        choice[g] = v
    return tuple(choice)


def _stage_tables(sup, layout, spanning, evals, calib, candidates, gen, weights, bar) -> _Tables:
    space, n = sup.space, len(sup.stages)
    ref = _with(space.max_choice(), layout.spanning, spanning)
    ref_macs = space.macs(ref)
    tables = _Tables(ref, [], [], [], ref_macs)
    for k in range(n):
        groups = layout.variables[k]
        inp = layout.interfaces[k - 1] if k > 0 else []
        out = layout.interfaces[k] if k < n - 1 else []
        cands = stage_candidates(space, groups, inp, out, candidates, gen)
        losses = sup.score_stage(k, [_with(ref, groups, c) for c in cands], evals, calib, **weights)

        def part(c, gs):
            return tuple(c[groups.index(g)] for g in gs)

        charge = stage_charges(space, ref, groups, inp, cands)
        low = min(charge)
        tables.base_macs += low
        tables.groups.append(groups)
        tables.assignments.append(cands)
        tables.options.append([StageOption(part(c, inp) if k > 0 else None, part(c, out) if k < n - 1 else None,
                                           loss, m - low) for c, loss, m in zip(cands, losses, charge)])
        bar.update(1)
    return tables


def stage_charges(space, ref: tuple, groups: list, inp: list, assignments: list) -> list:
    """MACs charged to a stage for each width assignment of its ``groups``: ``macs(ref with them) -
    macs(ref with the input interface ``inp`` alone)`` (that part was charged to the previous stage).
    ``macs(ref) + sum of every stage's charge`` is the subnet's exact MACs (see the module docstring)."""
    pos = {g: i for i, g in enumerate(groups)}
    return [space.macs(_with(ref, groups, a)) - space.macs(_with(ref, inp, [a[pos[g]] for g in inp]))
            for a in assignments]


def _combinations(tables: list, budget: float | None, top_k: int, bins: int) -> list:
    """``[(objective, choice)]``: the ``top_k`` best over every setting of the spanning groups."""
    found = [(cost, t.choice(picks)) for t in tables for cost, picks in
             best_combinations(t.options, None if budget is None else int(budget - t.base_macs), top_k, bins)]
    found.sort(key=lambda x: (x[0], x[1]))
    return found[:top_k]
