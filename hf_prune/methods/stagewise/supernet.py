"""SP / SWP — stage-wise channel pruning (Zhang et al., arXiv 2011.04908): the supernet, the stages,
width sampling, proxy evaluation, search and extraction. No transformers import here; the Trainer
subclass and the callback live in :mod:`hf_prune.methods.stagewise.callback`.

**Widths.** The supernet is the model itself, with weights shared across widths. Its searchable
dimensions are the engine's groups (:class:`~hf_prune.engine.graph.DependencyGraph`), so coupling is
respected by construction: a residual stream, a concatenation or an attention's heads is one
dimension. The units of each group are ordered once, by l2 magnitude of the weights the supernet
starts from (the pretrained full net), and a width keeps the *leading* (most important) units.
Candidate widths are ``ratios`` (default 0.25 … 1.0 in steps of 0.125) of the group, rounded to
multiples of ``round_to`` (channel groups) or to whole heads / blocks, duplicates dropped. A subnet
is a *choice*: one index into the candidate widths of every group. The stem's output channels and
the classifier stay whole (the graph pins them), as in the paper.

**Masking is non-destructive and exact.** A subnet runs through ``torch.func.functional_call`` with
every parameter slice of a removed unit multiplied by 0 (the slices the engine's compaction would
cut), so gradients reach only the active channels and no weight is overwritten. LayerNorm-like
normalisations get the engine's :class:`~hf_prune.engine.masks.MaskedNorm` hook with the active channels,
so a masked subnet computes exactly what the extracted, compacted subnet computes (tested, fp32).

**BatchNorm.** In training mode BN uses batch statistics, which are exact for any width (BN is per
channel and the active channels see exactly the subnet's inputs). The running statistics mix
widths and mean nothing, so — as slimmable networks and the paper do — they are *recalibrated* for
each subnet before it is evaluated or extracted: reset, accumulated over a few training batches
with the subnet's masks (cumulative average), used, then the supernet's own statistics are put
back (:meth:`Supernet.recalibrated`).

**Stages.** The network is split where the spatial resolution changes: a container named
``stages`` (timm, HF ConvNeXt / ResNet), sibling ``layer1 … layerN`` (timm ResNet), otherwise the
longest block list (``blocks``, ``encoder.layer``, ``layers``) cut where a block's output shape
changes. *Departure:* a plain ViT / DeiT never changes resolution, so its blocks are cut into
``num_stages`` equal chunks. Each group belongs to the first stage that holds one of its tensors;
a group spanning stages (a ViT's embedding width, coupled through the whole residual stream) is
searched with its first stage but masks every stage it touches. Groups outside every stage (stem,
head) count as stage 0.

**Stage-wise supervision** (paper; details after DNA, see METHODS.md). The unpruned full net is a
frozen teacher. Stage ``k > 0`` of a sampled subnet receives the teacher's input of stage ``k``
(masked to the subnet's active channels) instead of its own previous stage's output, and is trained
to match the teacher's output of stage ``k`` (relative MSE over the active channels). The head
after the last stage is supervised by the teacher's logits (KD). Because every stage's input comes
from the teacher, the stages are independent problems: training them together in one pass
(``stage_schedule="parallel"``) is the same objective as training them one after another
(``"sequential"``, the literal reading), at a fraction of the cost. Sandwich rule: every step trains
the largest subnet, the smallest, and ``num_random`` random ones; sampling is seeded from
``(seed, step)`` only, so every process draws the same subnets.

**Search.** By default full-net supervised (:mod:`hf_prune.methods.stagewise.stage_search`): every
stage is scored by its own training loss against the full net on held-out data (:meth:`Supernet.score_stage`),
stages are combined under the MACs budget (exact, from the graph) by a DP, and the few best combinations
are checked by chained proxy accuracy. ``search="chained"`` keeps the evolutionary (Once-for-All style)
search over choices by chained proxy accuracy (:meth:`Supernet.search`), under a MACs or a
measured-latency budget. *Departure:* how candidates are generated is ours. Extraction goes through
:meth:`hf_prune.engine.pruner.StructuredPruner.apply` and :func:`hf_prune.compact`.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import PruningError
from ...core.execution import eval_mode, recalibrate_batchnorm
from ...core.inputs import call_model, first_tensor, logits_of, model_inputs, split_batch
from ...core.progress import progress
from ...engine.masks import MaskedNorm, get_mask, set_mask
from .config import DEFAULT_RATIOS, SUPERVISIONS

__all__ = ["Stage", "WidthSpace", "Supernet", "SearchResult", "find_stages", "evolutionary_search",
           "kendall_tau", "digest", "DEFAULT_RATIOS", "SUPERVISIONS"]

_BLOCK_LISTS = ("blocks", "layer", "layers")


# --------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """Consecutive blocks (module paths): the input enters ``blocks[0]``, the output leaves ``blocks[-1]``."""

    blocks: list

    @property
    def first(self) -> str:
        return self.blocks[0]

    @property
    def last(self) -> str:
        return self.blocks[-1]

    @property
    def name(self) -> str:
        return self.first if len(self.blocks) == 1 else f"{self.first}..{self.last}"


def _container_children(module: nn.Module) -> list:
    return [n for n, c in module.named_children() if any(True for _ in c.parameters())]


def _output_shapes(model: nn.Module, paths: list, example_inputs) -> dict:
    shapes, handles = {}, []
    for p in paths:
        def hook(_m, _a, out, p=p):
            t = first_tensor(out)
            shapes[p] = tuple(t.shape) if t is not None else None
        handles.append(model.get_submodule(p).register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def find_stages(model: nn.Module, example_inputs, stages="auto", num_stages: int = 4) -> list:
    """The model's stages (see the module docstring); ``stages`` may be module paths or lists of them."""
    modules = dict(model.named_modules())
    if stages != "auto":
        if isinstance(stages, str) or not isinstance(stages, (list, tuple)) or len(stages) < 1:
            raise PruningError(f"stages={stages!r} is not understood: pass 'auto' or a list of module paths "
                               "(one per stage, e.g. ['stages.0', 'stages.1']) or of lists of consecutive block paths")
        out = []
        for s in stages:
            blocks = [s] if isinstance(s, str) else list(s)
            for b in blocks:
                if b not in modules or not b:
                    raise PruningError(f"stages: {b!r} is not a submodule of the model; pass module paths as "
                                       "listed by model.named_modules() (e.g. 'convnext.encoder.stages.0')")
            out.append(Stage(blocks))
        return out
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise PruningError(f"num_stages={num_stages!r} must be a positive int (stages cut from a block list)")
    # 1. a container named "stages" (timm, HF ConvNeXt / ResNet / RegNet ...)
    for name, m in modules.items():
        if name.rpartition(".")[2] == "stages" and isinstance(m, (nn.ModuleList, nn.Sequential)):
            kids = _container_children(m)
            if len(kids) >= 2:
                return [Stage([f"{name}.{k}"]) for k in kids]
    # 2. sibling layer1..layerN (timm / torchvision ResNet)
    for name, m in modules.items():
        kids = sorted((int(k[5:]), k) for k, _ in m.named_children() if re.fullmatch(r"layer\d+", k))
        if len(kids) >= 2:
            prefix = f"{name}." if name else ""
            return [Stage([prefix + k]) for _, k in kids]
    # 3. the longest block list, cut where the output shape changes (else equal chunks)
    lists = [(len(_container_children(m)), name) for name, m in modules.items()
             if name and name.rpartition(".")[2] in _BLOCK_LISTS and isinstance(m, (nn.ModuleList, nn.Sequential))]
    lists = [x for x in lists if x[0] >= 2]
    if not lists:
        raise PruningError(f"could not find the stages of {type(model).__name__} (no 'stages' container, no "
                           "layer1..layerN, no block list named blocks/layer/layers); pass stages=[module paths]")
    _, name = max(lists)
    paths = [f"{name}.{k}" for k in _container_children(model.get_submodule(name))]
    shapes = _output_shapes(model, paths, example_inputs)
    cuts = [i for i in range(1, len(paths)) if shapes[paths[i]] != shapes[paths[i - 1]]]
    if not cuts:  # plain ViT: no resolution change -> equal chunks (a departure, see the docstring)
        n = min(num_stages, len(paths))
        bounds = [round(i * len(paths) / n) for i in range(n + 1)]
        return [Stage(paths[bounds[i]:bounds[i + 1]]) for i in range(n)]
    starts = [0] + cuts
    ends = cuts + [len(paths)]
    return [Stage(paths[a:b]) for a, b in zip(starts, ends)]


# --------------------------------------------------------------------------------------- widths


class WidthSpace:
    """Candidate widths of every group and the units each width keeps (leading units of a fixed order)."""

    def __init__(self, graph, orders: list, ratios=DEFAULT_RATIOS, round_to: int | None = 8):
        self.graph = graph
        self.orders = orders  # per group: units (root ids), most important first
        self.ratios = tuple(ratios)
        self.round_to = round_to
        self.counts = [self._counts(g) for g in graph.groups]
        self._macs: dict = {}  # choice -> MACs (searches ask for the same choices many times)

    def _counts(self, group) -> list:
        n = len(group)
        step = self.round_to if (group.kind == "channel" and self.round_to) else 1
        out = set()
        for r in self.ratios:
            c = int(round(r * n / step)) * step
            out.add(min(n, max(min(step, n), c)))
        return sorted(out)

    def __len__(self) -> int:
        return len(self.counts)

    def max_choice(self) -> tuple:
        return tuple(len(c) - 1 for c in self.counts)

    def min_choice(self) -> tuple:
        return tuple(0 for _ in self.counts)

    def widths(self, choice) -> list:
        return [c[i] for c, i in zip(self.counts, choice)]

    def removed(self, choice) -> torch.Tensor:
        parts = [order[c[i]:] for order, c, i in zip(self.orders, self.counts, choice)]
        return torch.cat([torch.zeros(0, dtype=torch.int64)] + parts)

    def keep(self, choice) -> torch.Tensor:
        return self.graph.keep_mask(self.removed(choice))

    def macs(self, choice) -> int:
        choice = tuple(choice)
        if choice not in self._macs:
            if len(self._macs) > 100_000:
                self._macs.clear()
            self._macs[choice] = self.graph.macs(self.keep(choice))
        return self._macs[choice]

    def validate(self, choice) -> tuple:
        choice = tuple(int(i) for i in choice)
        if len(choice) != len(self.counts) or any(not 0 <= i < len(c) for i, c in zip(choice, self.counts)):
            raise PruningError(f"choice {list(choice)[:8]}... does not fit this width space ({len(self.counts)} "
                               f"groups with {[len(c) for c in self.counts][:8]}... candidate widths each)")
        return choice

    def sample(self, generator: torch.Generator, groups=None) -> tuple:
        """A uniformly random choice; only ``groups`` (indices) vary if given, the others are at maximum."""
        choice = list(self.max_choice())
        for i in (range(len(self.counts)) if groups is None else groups):
            choice[i] = int(torch.randint(len(self.counts[i]), (1,), generator=generator))
        return tuple(choice)


def digest(choices) -> str:
    return hashlib.sha256(repr([tuple(c) for c in choices]).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------- supernet


class Supernet:
    """A weight-sharing width supernet over a model's channel groups, split into stages.

    Args:
        model: the full net (its weights are the shared weights; never overwritten by masking).
        example_inputs: inputs to trace the model with (tensor, tuple or dict such as ``{'pixel_values': x}``).
        ratios: candidate width ratios per group; round_to: channel multiple (None: any count).
        stages: ``"auto"`` or module paths; num_stages: chunks for models without resolution changes.
        teacher: the frozen full net for stage-wise supervision (default: a copy of ``model`` now).
        importance: ``"l2"`` / ``"l1"`` order of the units (leading = most important); orders: restore
            saved orders instead (positions within each group, as :meth:`orders_state` returns).
        ignored_layers, prune_stem: as for :class:`~hf_prune.engine.pruner.StructuredPruner`.
    """

    def __init__(self, model: nn.Module, example_inputs, *, ratios=DEFAULT_RATIOS, round_to: int | None = 8,
                 stages="auto", num_stages: int = 4, teacher: nn.Module | None = None, importance: str = "l2",
                 orders=None, ignored_layers=(), prune_stem: bool = False, make_teacher: bool = True):
        ratios = tuple(ratios)
        if not ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios):
            raise PruningError(f"ratios={ratios!r} must be numbers in (0, 1] (fractions of each group to keep), "
                               "e.g. (0.25, 0.5, 0.75, 1.0)")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise PruningError(f"round_to={round_to!r} must be a positive int (channel multiple) or None")
        if importance not in ("l2", "l1"):
            raise PruningError(f"importance={importance!r}: the supernet orders units by 'l2' or 'l1' magnitude")
        if get_mask(model) is not None:
            raise PruningError("the model carries masks from an earlier prune(..., compact=False); call "
                               "hf_prune.compact(model) before building a supernet on it")
        self.model = model
        self.stages = find_stages(model, example_inputs, stages, num_stages)
        self._build(example_inputs, ratios, round_to, importance, orders, ignored_layers, prune_stem)
        self.teacher = teacher if teacher is not None or not make_teacher else self.frozen_copy(model)

    # ------------------------------------------------------------------ construction
    def _build(self, example_inputs, ratios, round_to, importance, orders, ignored_layers, prune_stem) -> None:
        """Trace, order and check that the smallest subnet compacts; layers that read a width the trace
        cannot see (found by that check) are kept whole and the graph is rebuilt, as hf_prune.prune does."""
        from ...engine.pruner import with_repairs

        def build(frozen, frozen_splits):
            self.pruner, self._planes = self._trace(self.model, example_inputs, ignored_layers, prune_stem, frozen,
                                                    frozen_splits)
            self.graph = self.pruner.graph
            self.space = WidthSpace(self.graph, self._orders(importance, orders), ratios, round_to)
            return self.pruner

        with_repairs(self.model, build,
                     lambda pruner: _copy_pruner(pruner, None).apply(self.space.removed(self.space.min_choice())),
                     what="narrowing")
        self.dense_macs = self.graph.macs()
        self.dense_params = self.graph.params()
        self.group_stage = self._group_stages()
        self._param_members = self._members_by_param()
        self.module_stage = self._module_stages()

    def _trace(self, model, example_inputs, ignored_layers, prune_stem, frozen, frozen_splits):
        """Build the pruner, with the channel labels of every stage's input and output.

        The labels say which channels of a stage's input/output a subnet keeps (to mask the
        teacher's features exactly like the subnet's own)."""
        from ...engine.pruner import StructuredPruner

        watch = sorted({s.first for s in self.stages} | {s.last for s in self.stages})
        pruner = StructuredPruner(model, example_inputs, importance="l2", round_to=None,
                                  ignored_layers=ignored_layers, prune_stem=prune_stem, frozen_modules=frozen,
                                  frozen_splits=frozen_splits, watch=watch)
        trace = pruner.graph.trace
        planes = {}
        for k, stage in enumerate(self.stages):
            planes[("in", k)] = trace.watched[stage.first][0]
            planes[("out", k)] = trace.watched[stage.last][1]
        return pruner, {key: (None if p is None else trace.uf.find(p)) for key, p in planes.items()}

    def _orders(self, importance, orders) -> list:
        groups = self.graph.groups
        if orders is not None:
            if len(orders) != len(groups) or any(sorted(o) != list(range(len(g))) for o, g in zip(orders, groups)):
                raise PruningError("the saved unit orders do not match this model's groups (different model or "
                                   "example inputs?); resume with the model the supernet was built on")
            return [g.units[torch.as_tensor(o, dtype=torch.int64)] for o, g in zip(orders, groups)]
        from ...engine.importance import unit_scores

        scores = unit_scores(self.graph, importance)
        return [g.units[torch.argsort(-scores[g.units], stable=True)] for g in groups]

    def orders_state(self) -> list:
        """Unit orders as positions within each group (JSON-able; pass back as ``orders=``)."""
        out = []
        for order, g in zip(self.space.orders, self.graph.groups):
            pos = {int(u): i for i, u in enumerate(g.units.tolist())}
            out.append([pos[int(u)] for u in order.tolist()])
        return out

    def _group_stages(self) -> list:
        prefixes = [[b + "." for b in s.blocks] for s in self.stages]
        out = []
        for g in self.graph.groups:
            found = [k for i in g.members for k, ps in enumerate(prefixes)
                     if any(self.graph.members[i].tensor.startswith(p) for p in ps)]
            out.append(min(found) if found else 0)
        return out

    def _module_stages(self) -> dict:
        """``{module name: stage}``: the stage holding the module; a module outside every stage belongs to
        the first stage that starts after it (the stem to stage 0), or to the last stage (the head)."""
        names = [n for n, _ in self.model.named_modules()]
        inside = {}
        for k, stage in enumerate(self.stages):
            for pos, n in enumerate(names):
                if any(n == b or n.startswith(b + ".") for b in stage.blocks):
                    inside[n] = k
        ends = [max(pos for pos, n in enumerate(names) if inside.get(n) == k) for k in range(len(self.stages))]
        last = len(self.stages) - 1
        return {n: inside[n] if n in inside else min(last, sum(e < pos for e in ends)) for pos, n in enumerate(names)}

    def plane_roots(self, key) -> torch.Tensor | None:
        """Unit roots of the channels of a stage's input (``("in", k)``) or output (``("out", k)``)."""
        return self._planes.get(key)

    def _members_by_param(self) -> dict:
        by = {}
        for m in self.graph.members:
            if m.tensor in self.graph.param_names:
                by.setdefault(m.tensor, []).append((m.dim, m.units))
        return by

    @staticmethod
    def frozen_copy(model: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    # ------------------------------------------------------------------ masking
    def masked_params(self, keep: torch.Tensor, prefix: str = "", params: dict | None = None) -> dict:
        """``{name: weight * mask}`` for every parameter that loses a slice under ``keep``."""
        params = dict(self.model.named_parameters()) if params is None else params
        out = {}
        for name, dims in self._param_members.items():
            p = params[name]
            mask = None
            for dim, units in dims:
                k = keep[units]
                if bool(k.all()):
                    continue
                shape = [1] * p.dim()
                shape[dim] = -1
                v = k.to(device=p.device, dtype=p.dtype).view(shape)
                mask = v if mask is None else mask * v
            if mask is not None:
                out[prefix + name] = p * mask
        return out

    def channel_mask(self, key, keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """0/1 mask (broadcastable to ``like``) of the active channels of a stage input/output."""
        roots = self._planes.get(key)
        if roots is None:
            return None
        k = keep[roots]
        if bool(k.all()):
            return None
        while k.dim() < like.dim():
            k = k.unsqueeze(0)
        return k.to(device=like.device, dtype=like.dtype)

    @contextlib.contextmanager
    def _norm_hooks(self, keep: torch.Tensor):
        handles = []
        uf = self.graph.trace.uf
        for rec in self.graph.trace.norms:
            roots = uf.find(rec.channels)
            active = keep[roots]
            if bool(active.all()):
                continue
            # the engine's exact hook: statistics over the active channels only
            hook = MaskedNorm(torch.nonzero(active).reshape(-1), roots.numel())
            handles.append(self.model.get_submodule(rec.module).register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _prefix(wrapper: nn.Module, model: nn.Module) -> str:
        if wrapper is model:
            return ""
        for name, m in wrapper.named_modules():
            if m is model:
                return name + "."
        raise PruningError(f"the module passed ({type(wrapper).__name__}) does not contain the supernet's model; "
                           "pass the model the supernet was built on (or its DDP / accelerate wrapper)")

    def forward(self, keep: torch.Tensor, inputs, *, module: nn.Module | None = None, capture: dict | None = None,
                inject: dict | None = None):
        """Run the subnet ``keep`` (weights shared, nothing overwritten); returns the model's output.

        ``module``: the model or a wrapper of it (DDP), called through ``functional_call`` so that the
        wrapper's gradient hooks keep working. ``capture``: filled with ``{("in"|"out", k): tensor}``
        of every stage; ``inject``: ``{k: tensor}`` replaces the input of stage ``k``.
        """
        module = self.model if module is None else module
        prefix = self._prefix(module, self.model)
        params = self.masked_params(keep, prefix)
        with self._norm_hooks(keep), self._stage_hooks(self.model, capture, inject):
            if not params:
                return call_model(module, inputs)
            args, kwargs = model_inputs(self.model, inputs)
            return torch.func.functional_call(module, params, args, kwargs, strict=False)

    @contextlib.contextmanager
    def _stage_hooks(self, model: nn.Module, capture: dict | None, inject: dict | None):
        handles = []
        for k, stage in enumerate(self.stages):
            first, last = model.get_submodule(stage.first), model.get_submodule(stage.last)
            if inject is not None and k in inject:
                handles.append(first.register_forward_pre_hook(_Inject(inject[k]), with_kwargs=True))
            if capture is not None:
                def pre(_m, args, kwargs, k=k):
                    capture[("in", k)] = first_tensor((args, kwargs))

                def post(_m, _a, out, k=k):
                    capture[("out", k)] = first_tensor(out)

                handles.append(first.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(last.register_forward_hook(post))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def teacher_features(self, inputs) -> tuple:
        """(features ``{("in"|"out", k): tensor}``, logits) of the frozen full net."""
        if self.teacher is None:
            raise PruningError("this supernet has no teacher; build it with teacher= (the unpruned full net)")
        feats: dict = {}
        with torch.no_grad(), eval_mode(self.teacher), self._stage_hooks(self.teacher, feats, None):
            logits = logits_of(call_model(self.teacher, inputs))
        return feats, logits

    # ------------------------------------------------------------------ per-stage scores (the search's objective)
    def stage_error(self, k: int, keep: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Stage ``k``'s training loss term: relative MSE to the full net's stage output over the kept channels."""
        m = self.channel_mask(("out", k), keep, teacher)
        if m is not None:
            student, teacher = student * m, teacher * m
        return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)

    def _is_last(self, k: int) -> bool:
        return k == len(self.stages) - 1

    def teacher_stage(self, inputs, k: int) -> tuple:
        """(input, output, logits) of the full net's stage ``k``; logits only for the last stage (the
        forward stops after stage ``k`` otherwise)."""
        if self.teacher is None:
            raise PruningError("this supernet has no teacher; build it with teacher= (the unpruned full net)")
        feats: dict = {}
        hook = _StageOutput(stop=not self._is_last(k))
        logits = None
        with torch.no_grad(), eval_mode(self.teacher), self._stage_hooks(self.teacher, feats, None):
            handle = self.teacher.get_submodule(self.stages[k].last).register_forward_hook(hook)
            try:
                logits = logits_of(call_model(self.teacher, inputs))
            except _StageDone:
                pass
            finally:
                handle.remove()
        return feats[("in", k)], hook.out, logits

    def stage_forward(self, keep: torch.Tensor, inputs, k: int, stage_input: torch.Tensor | None) -> tuple:
        """(output, logits) of stage ``k`` of the subnet ``keep`` fed the full net's input of stage ``k``
        (masked to the subnet's channels; stage 0 gets the subnet's own stem output), as in training.
        Nothing after stage ``k`` runs, except for the last stage, whose logits the head computes."""
        inject = None
        if k > 0:
            m = self.channel_mask(("in", k), keep, stage_input)
            inject = {k: stage_input if m is None else stage_input * m}
        hook = _StageOutput(stop=not self._is_last(k))
        handle = self.model.get_submodule(self.stages[k].last).register_forward_hook(hook)
        logits = None
        try:
            logits = logits_of(self.forward(keep, inputs, inject=inject))
        except _StageDone:
            pass
        finally:
            handle.remove()
        return hook.out, logits

    def stage_loss(self, k: int, keep: torch.Tensor, inputs, teacher: tuple, *, temperature: float = 1.0,
                   stage_weight: float = 1.0, kd_weight: float = 1.0) -> torch.Tensor:
        """What training minimises for stage ``k`` (:meth:`subnet_loss` with ``stages=[k]``): the weighted
        stage error, plus KD from the full net's logits for the last stage. ``teacher``: :meth:`teacher_stage`."""
        x_in, t_out, t_logits = teacher
        s_out, s_logits = self.stage_forward(keep, inputs, k, x_in)
        loss = stage_weight * self.stage_error(k, keep, s_out, t_out)
        if self._is_last(k):
            loss = loss + kd_weight * kd_loss(s_logits, t_logits, temperature)
        return loss

    def stage_batchnorms(self, k: int) -> list:
        """BatchNorms whose statistics stage ``k``'s score depends on (those of its modules: :attr:`module_stage`)."""
        owned = {id(m) for n, m in self.model.named_modules() if self.module_stage.get(n) == k}
        return [m for m in self._batchnorms() if id(m) in owned]

    @torch.no_grad()
    def score_stage(self, k: int, choices, batches, calib_batches=None, *, temperature: float = 1.0,
                    stage_weight: float = 1.0, kd_weight: float = 1.0) -> list:
        """Mean :meth:`stage_loss` of stage ``k`` over ``batches`` for each of ``choices`` (eval mode).

        The full net's stage input and output are computed once per batch. With ``calib_batches``, the
        BatchNorms of stage ``k`` are recalibrated for each choice first (fed the full net's input of the
        stage, as in training) and put back afterwards. Only the groups acting in stage ``k`` matter.
        """
        evals = [(inputs, self.teacher_stage(inputs, k)) for inputs in (split_batch(b)[0] for b in batches)]
        bns = self.stage_batchnorms(k)
        calib = [(inputs, self.teacher_stage(inputs, k)[0]) for inputs in
                 (split_batch(b)[0] for b in (calib_batches or []))] if bns else []
        saved = self.bn_state()
        weights = {"temperature": temperature, "stage_weight": stage_weight, "kd_weight": kd_weight}
        scores = []
        try:
            with eval_mode(self.model):
                for choice in choices:
                    keep = self.space.keep(self.space.validate(choice))
                    if calib:
                        recalibrate_batchnorm(self.model, bns, calib,
                                              lambda item: self.stage_forward(keep, item[0], k, item[1]))
                    total = sum(float(self.stage_loss(k, keep, inputs, t, **weights)) for inputs, t in evals)
                    scores.append(total / max(len(evals), 1))
        finally:
            self.load_bn_state(saved)
        return scores

    def stage_scores(self, choice, batches, calib_batches=None, **weights) -> list:
        """:meth:`score_stage` of every stage for one subnet; their sum is the stage-wise search's objective."""
        return [self.score_stage(k, [choice], batches, calib_batches, **weights)[0] for k in range(len(self.stages))]

    # ------------------------------------------------------------------ losses
    def subnet_loss(self, choice, inputs, *, module=None, teacher=None, supervision="stage", stages=None,
                    temperature: float = 1.0, stage_weight: float = 1.0, kd_weight: float = 1.0):
        """Loss of one sampled subnet and its logits.

        ``supervision="stage"``: stage ``k > 0`` gets the teacher's input of stage ``k``; each stage in
        ``stages`` (default all) regresses the teacher's stage output (relative MSE over the active
        channels); the head is distilled from the teacher's logits (KD at ``temperature``) when the last
        stage is trained. ``"logits"`` (the plain supernet): end to end, KD from the teacher's logits.
        """
        if supervision not in SUPERVISIONS:
            raise PruningError(f"supervision={supervision!r} must be one of {SUPERVISIONS}")
        feats, t_logits = teacher if teacher is not None else self.teacher_features(inputs)
        keep = self.space.keep(choice)
        stages = list(range(len(self.stages))) if stages is None else list(stages)
        capture: dict = {}
        inject = None
        if supervision == "stage":
            inject = {}
            for k in range(1, len(self.stages)):
                x = feats[("in", k)]
                m = self.channel_mask(("in", k), keep, x)
                inject[k] = x if m is None else x * m
        s_logits = logits_of(self.forward(keep, inputs, module=module, capture=capture, inject=inject))
        loss = s_logits.new_zeros(())
        if supervision == "stage":
            for k in stages:
                loss = loss + stage_weight * self.stage_error(k, keep, capture[("out", k)], feats[("out", k)])
        if supervision == "logits" or (len(self.stages) - 1) in stages:
            loss = loss + kd_weight * kd_loss(s_logits, t_logits, temperature)
        return loss, s_logits

    # ------------------------------------------------------------------ BN recalibration and proxy
    def _batchnorms(self) -> list:
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.track_running_stats]

    def bn_state(self) -> list:
        """Snapshot of every BN's running statistics (for :meth:`load_bn_state`)."""
        return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                for m in self._batchnorms()]

    @staticmethod
    @torch.no_grad()
    def load_bn_state(state: list) -> None:
        for m, mean, var, n in state:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)

    @contextlib.contextmanager
    def recalibrated(self, choice, batches, persist: bool = False):
        """BN running statistics recomputed for ``choice`` over ``batches`` (cumulative average);
        the supernet's own statistics come back on exit unless ``persist``."""
        saved = self.bn_state()
        keep = self.space.keep(choice)
        recalibrate_batchnorm(self.model, self._batchnorms(), batches or [],
                              lambda batch: self.forward(keep, split_batch(batch)[0]))
        try:
            yield self
        finally:
            if not persist:
                self.load_bn_state(saved)

    @torch.no_grad()
    def evaluate(self, choice, batches) -> float:
        """Top-1 accuracy of the subnet ``choice`` (eval mode) on labelled ``batches``."""
        keep = self.space.keep(self.space.validate(choice))
        correct = total = 0
        with eval_mode(self.model):
            for batch in batches:
                inputs, labels = split_batch(batch, require_labels=True)
                pred = logits_of(self.forward(keep, inputs)).argmax(-1)
                correct += int((pred == labels.to(pred.device)).sum())
                total += int(labels.numel())
        return correct / max(total, 1)

    def proxy_accuracy(self, choice, eval_batches, calib_batches=None) -> float:
        """Accuracy of ``choice`` inside the supernet, BN recalibrated on ``calib_batches`` first."""
        with self.recalibrated(choice, calib_batches):
            return self.evaluate(choice, eval_batches)

    # ------------------------------------------------------------------ budgets, search, extraction
    def macs_ratio(self, choice) -> float:
        return self.space.macs(choice) / max(self.dense_macs, 1)

    def check_target(self, target_macs) -> float:
        if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not 0 < target_macs <= 1:
            raise PruningError(f"target_macs={target_macs!r} must be in (0, 1]: the fraction of the dense MACs to keep")
        smallest = self.macs_ratio(self.space.min_choice())
        if smallest > target_macs:
            raise PruningError(f"target_macs={target_macs} is below the smallest subnet of this supernet "
                               f"({smallest:.3f} of the dense MACs with ratios down to {min(self.space.ratios)}); "
                               "raise target_macs or add smaller ratios")
        return float(target_macs)

    def search(self, fitness, *, target_macs: float | None = None, max_latency_ms: float | None = None,
               example_inputs=None, population: int = 16, generations: int = 4, seed: int = 0,
               mutate_prob: float = 0.15) -> "SearchResult":
        """Best choice by ``fitness(choice) -> float`` under a MACs and/or measured-latency budget."""
        if target_macs is None and max_latency_ms is None:
            raise PruningError("search needs a budget: target_macs= (fraction of dense MACs) or max_latency_ms=")
        budget = None if target_macs is None else self.check_target(target_macs) * self.dense_macs
        latency_cache: dict = {}

        def feasible(choice) -> bool:
            if budget is not None and self.space.macs(choice) > budget:
                return False
            if max_latency_ms is not None:
                if choice not in latency_cache:
                    latency_cache[choice] = self.latency_ms(choice, example_inputs)
                return latency_cache[choice] <= max_latency_ms
            return True

        if not feasible(self.space.min_choice()):
            raise PruningError(f"max_latency_ms={max_latency_ms} is below the measured latency of the smallest "
                               f"subnet ({latency_cache.get(self.space.min_choice(), float('nan')):.3f} ms); raise it")
        best, score, history = evolutionary_search(self.space, fitness, feasible, population=population,
                                                   generations=generations, seed=seed, mutate_prob=mutate_prob)
        return SearchResult(choice=best, score=score, widths=self.space.widths(best),
                            macs=self.space.macs(best), macs_ratio=self.macs_ratio(best), history=history,
                            latency_ms=latency_cache.get(best))

    def latency_ms(self, choice, example_inputs, iters: int = 10) -> float:
        """Median measured latency of the compacted subnet ``choice`` on ``example_inputs`` (ms)."""
        if example_inputs is None:
            raise PruningError("a latency budget needs example_inputs= (the batch to time)")
        sub = self.extract(choice)
        sub.eval()
        times = []
        with torch.no_grad():
            for i in range(iters + 2):
                t0 = time.perf_counter()
                call_model(sub, example_inputs)
                if i >= 2:
                    times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    def subnet_stats(self, choice) -> dict:
        """Parameters and MACs of the subnet ``choice`` and of the full net (for the method record)."""
        return {"params_before": self.dense_params, "params_after": self.graph.params(self.space.keep(choice)),
                "macs_before": self.dense_macs, "macs_after": self.space.macs(choice)}

    def extract(self, choice, calib_batches=None, *, inplace: bool = False) -> nn.Module:
        """The subnet ``choice`` as a physically smaller model (BN recalibrated on ``calib_batches``).

        By default the supernet's model is left untouched and a compacted copy is returned (in eval
        mode); ``inplace=True`` prunes the model itself (the supernet is unusable afterwards).
        """
        choice = self.space.validate(choice)
        removed = self.space.removed(choice)
        if inplace:
            saved = {k: v.clone() for k, v in self.model.state_dict().items()}  # weights and BN statistics
            removed_before = self.pruner.removed
            try:
                with self.recalibrated(choice, calib_batches, persist=True):
                    pass
                self.pruner.apply(removed)
                model = self.pruner.compact()
            except BaseException:  # compact() left the masked model intact: take the masks off, then the values
                mask = get_mask(self.model)
                if mask is not None:
                    mask.remove_hooks()
                    set_mask(self.model, None)
                self.model.load_state_dict(saved)
                self.pruner.removed = removed_before
                raise
        else:
            with self.recalibrated(choice, calib_batches):  # (a one-shot supernet is its own teacher: copy it)
                pruner = _copy_pruner(self.pruner, None if self.teacher is self.model else self.teacher)
            pruner.apply(removed)
            model = pruner.compact().eval()  # a fresh model, like from_pretrained gives
        return model


class _StageDone(Exception):
    """Raised by :class:`_StageOutput` to skip the rest of a forward once a stage's output is known."""


class _StageOutput:
    """Forward hook on a stage's last block: keep its output, then (``stop``) end the forward there."""

    def __init__(self, stop: bool):
        self.stop = stop
        self.out = None

    def __call__(self, _module, _args, out):
        self.out = first_tensor(out)
        if self.stop:
            raise _StageDone


class _Inject:
    """Forward pre-hook: replace a stage's input (first tensor argument) with a given tensor."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __call__(self, _module, args, kwargs):
        if args:
            return (self.x,) + tuple(args[1:]), kwargs
        key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        return args, dict(kwargs, **{key: self.x})


def _copy_pruner(pruner, teacher):
    # The teacher is not part of the pruner; keep it out of the copy's memo anyway (it can be large).
    memo = {id(teacher): teacher} if teacher is not None else {}
    return copy.deepcopy(pruner, memo)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher.detach() / t, -1), reduction="batchmean",
                    log_target=True) * t * t


# --------------------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    """A searched subnet. ``score``: its chained proxy accuracy. ``method``: ``"chained"`` (evolutionary,
    ``history`` = (generation, best score, best choice)) or ``"stagewise"`` (per-stage scores and DP,
    ``history`` = (index, chained accuracy, choice, objective) of every combination checked at the end;
    ``objective``: the chosen subnet's summed stage losses)."""

    choice: tuple
    score: float
    widths: list
    macs: int
    macs_ratio: float
    history: list = field(default_factory=list)
    latency_ms: float | None = None
    objective: float | None = None
    method: str = "chained"


def _shrink_to_fit(space: WidthSpace, choice, feasible, generator) -> tuple | None:
    """Lower random genes until ``choice`` fits (None if it cannot): each round lowers every movable
    gene by one notch with probability 1/4 (at least one), so the result stays a random shape."""
    choice = list(choice)
    while not feasible(tuple(choice)):
        movable = [i for i, c in enumerate(choice) if c > 0]
        if not movable:
            return None
        picks = [i for i in movable if float(torch.rand((), generator=generator)) < 0.25]
        for i in picks or [movable[int(torch.randint(len(movable), (1,), generator=generator))]]:
            choice[i] -= 1
    return tuple(choice)


def evolutionary_search(space: WidthSpace, fitness, feasible, *, population: int = 16, generations: int = 4,
                        seed: int = 0, mutate_prob: float = 0.15, parent_fraction: float = 0.25):
    """Once-for-All-style evolution over choices; infeasible children are shrunk until they fit.

    Returns (best choice, its fitness, history). Deterministic for a given ``seed``; ``fitness`` is
    called once per distinct choice.
    """
    if population < 2 or generations < 1:
        raise PruningError(f"population={population} and generations={generations} must be >= 2 and >= 1")
    gen = torch.Generator().manual_seed(int(seed))
    cache: dict = {}
    # one tick per distinct subnet scored; repeats come from the cache, so the bar may end early
    bar = progress(total=population * generations, desc="SP width search", unit="subnet")

    def score(c):
        if c not in cache:
            cache[c] = float(fitness(c))
            bar.update(1)
        return cache[c]

    pop = []
    uniform = [tuple(min(i, len(c) - 1) for c in space.counts) for i in range(max(len(c) for c in space.counts))]
    fits = [c for c in uniform if feasible(c)]
    if fits:
        pop.append(fits[-1])  # the widest uniform-ratio subnet that fits: a sane seed for the population
    for _ in range(population * 8):
        if len(pop) >= population:
            break
        c = _shrink_to_fit(space, space.sample(gen), feasible, gen)
        if c is not None and c not in pop:
            pop.append(c)
    if not pop:
        raise PruningError("no subnet of this width space fits the budget; raise the budget or add smaller ratios")
    history = []
    for g in range(generations):
        ranked = sorted(pop, key=lambda c: (-score(c), c))
        history.append((g, score(ranked[0]), list(ranked[0])))
        bar.set_postfix(generation=f"{g + 1}/{generations}", best=f"{score(ranked[0]):.4f}")
        if g == generations - 1:
            break
        parents = ranked[:max(2, int(round(parent_fraction * len(ranked))))]
        children = list(parents)
        for _ in range(population * 8):
            if len(children) >= population:
                break
            a = parents[int(torch.randint(len(parents), (1,), generator=gen))]
            if torch.rand((), generator=gen) < 0.5:
                b = parents[int(torch.randint(len(parents), (1,), generator=gen))]
                pick = torch.rand(len(a), generator=gen) < 0.5
                child = tuple(x if p else y for x, y, p in zip(a, b, pick.tolist()))
            else:
                flip = (torch.rand(len(a), generator=gen) < mutate_prob).tolist()
                child = tuple(int(torch.randint(len(space.counts[i]), (1,), generator=gen)) if f else a[i]
                              for i, f in enumerate(flip))
            child = _shrink_to_fit(space, child, feasible, gen)
            if child is not None and child not in children:
                children.append(child)
        pop = children
    bar.close()
    best = max(cache, key=lambda c: (cache[c], tuple(-x for x in c)))
    return best, cache[best], history


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties handled) of two score lists."""
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


# --------------------------------------------------------------------------------------- one-shot
