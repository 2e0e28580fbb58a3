"""Iterative structured pruning on one traced graph: :class:`StructuredPruner`.

A pruner traces the model once, then each :meth:`StructuredPruner.step` scores units, allocates
a target and installs masks (which only ever grow), after checking on a throw-away compaction that
the result will compact and run. :meth:`StructuredPruner.compact` removes the masked units. The
one-shot :func:`hf_prune.prune` and the training callbacks are both built on it.
"""
from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .allocation import allocate, check_targets
from ..core.checks import check_choice, check_names, check_round_to, check_sparsity, check_target_macs
from ..errors import CompactionError, ConfigError, PruningError
from .graph import DependencyGraph
from .graph.shape_only import NeedsValues, ShapeOnly, tensors_of
from .importance import normalized_scores, unit_scores
from .masks import StructuredMask, get_mask, set_mask
from .surgery import compact_units
from ..core.execution import eval_pass
from ..core.inputs import model_inputs


def _run(model: nn.Module, example_inputs) -> None:
    """Check that the model runs; on failure raise :class:`_BrokenForward` naming the innermost failing module.

    Shapes are what a compaction can break, so the pass first skips the heavy ops' compute (see
    :mod:`hf_prune.engine.graph.shape_only`); where that pass stops or fails, a real forward decides.
    """
    args, kwargs = model_inputs(model, example_inputs)
    stack: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def push(module, _):
        stack.append(names.get(id(module), ""))

    def pop(module, _, __):
        stack.pop()  # not reached when the module raises, so the culprit stays on top

    handles = [nn.modules.module.register_module_forward_pre_hook(push),
               nn.modules.module.register_module_forward_hook(pop)]
    try:
        with torch.no_grad():
            try:
                with eval_pass(model), ShapeOnly():
                    model(*args, **kwargs)
                return
            except (NeedsValues, Exception):  # only a real forward decides that the model is broken
                stack.clear()
            with eval_pass(model):
                model(*args, **kwargs)
    except Exception as exc:
        raise _BrokenForward(stack[-1] if stack else "") from exc
    finally:
        for h in handles:
            h.remove()


class _BrokenForward(Exception):
    """The pruned model did not run (the model has been restored); ``args[0]`` names the module."""


def check_model_and_inputs(model, example_inputs) -> None:
    """Where the engine receives a model and its inputs: refuse what would fail obscurely or prune nothing.

    Raises :class:`PruningError` naming the argument for a model that is not an ``nn.Module``, a
    TorchScript module, a model with tensors on the ``meta`` device, missing example inputs, inputs
    without a tensor, and empty inputs (batch size 0).
    """
    if not isinstance(model, nn.Module):
        raise PruningError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise PruningError(f"model is a TorchScript module ({type(model).__name__}): its forward cannot be traced "
                           "op by op. Prune the eager nn.Module, then script or trace the pruned model")
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise PruningError(f"model has tensors on the meta device (e.g. '{meta}'): they hold no values to score "
                           "or run. Materialise the weights first (model.to_empty(device='cpu') and "
                           "load_state_dict, or from_pretrained without device_map='meta')")
    if example_inputs is None:
        raise PruningError("structured pruning needs example_inputs (a tensor, tuple or dict such as "
                           "{'pixel_values': x}) to trace the model")
    tensors = tensors_of(dict(example_inputs) if isinstance(example_inputs, Mapping) else example_inputs)
    if not tensors:
        raise PruningError(f"example_inputs holds no tensor (got {type(example_inputs).__name__}); pass a batch "
                           "such as torch.randn(1, 3, 224, 224) or {'pixel_values': x}")
    for t in tensors:
        if t.is_meta or t.numel() == 0:
            raise PruningError(f"example_inputs has {'a meta' if t.is_meta else 'an empty'} tensor of shape "
                               f"{tuple(t.shape)}{' (batch size 0)' if t.numel() == 0 else ''}: the trace would "
                               "see no data. Pass at least one real example")


def resolve_layers(model: nn.Module, layers, name: str = "ignored_layers") -> tuple:
    """Module names for ``layers`` (names or modules of ``model``, or one module).

    A bare string, an unknown name (with the closest names in the message), a module that is not
    part of ``model`` and the model itself raise :class:`~hf_prune.errors.ConfigError`.
    """
    if isinstance(layers, nn.Module):
        layers = [layers]
    items = check_names(name, layers)
    named = list(model.named_modules())
    by_id = {id(m): n for n, m in reversed(named)}  # a module under several names: the first one
    known = {n for n, _ in named}
    out = []
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ConfigError(f"{name}: the {type(item).__name__} given is not a submodule of this "
                                  f"{type(model).__name__}; pass modules of the model being pruned, or their names")
            item = by_id[id(item)]
        elif not isinstance(item, str):
            raise ConfigError(f"{name} entries must be module names or modules, got {type(item).__name__} {item!r}")
        elif item not in known:
            close = difflib.get_close_matches(item, [n for n, _ in named if n], n=3, cutoff=0.6)
            raise ConfigError(f"{name}: {type(model).__name__} has no module named {item!r}"
                              + (f"; did you mean {close}?" if close else
                                 "; use the names of model.named_modules()"))
        if item == "":
            raise ConfigError(f"{name} names the whole model, which would keep every channel; name its layers")
        out.append(item)
    return tuple(out)


def build_graph(model: nn.Module, example_inputs, **options) -> DependencyGraph:
    """Trace ``model``; a failure names the module where the forward pass broke.

    The model and inputs are checked first (:func:`check_model_and_inputs`), and ``ignored_layers``
    resolved to module names (:func:`resolve_layers`).
    """
    check_model_and_inputs(model, example_inputs)
    if "ignored_layers" in options:
        options["ignored_layers"] = resolve_layers(model, options["ignored_layers"])
    stack: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def push(module, _):
        stack.append(names.get(id(module), type(module).__name__))

    def pop(module, _, __):
        stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(push),
               nn.modules.module.register_module_forward_hook(pop)]
    try:
        return DependencyGraph(model, example_inputs, **options)
    except PruningError:
        raise
    except Exception as exc:
        where = stack[-1] if stack else "the model's forward"
        raise PruningError(f"could not trace the model: {type(exc).__name__} in module '{where}': {exc}. "
                           "Check that example_inputs run through model(...) as given.") from exc
    finally:
        for h in handles:
            h.remove()


MAX_REPAIRS = 6
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _role(model: nn.Module, name: str) -> tuple:
    """(layer type, type of the outermost block holding it, path inside that block, indices as '#').

    A layer that breaks the forward pass usually does so because of how its block uses it (a width
    stored in the block, a split of fixed size), so the same layer at the same place in every other
    instance of that block breaks alike, while the same layer type elsewhere is fine. The outermost
    block (below the model and its containers) makes "the same place" as specific as possible.
    """
    parts = name.split(".")
    for cut in range(1, len(parts)):
        owner = model.get_submodule(".".join(parts[:cut]))
        if not isinstance(owner, _CONTAINERS):
            rel = tuple("#" if p.isdigit() else p for p in parts[cut:])
            return type(model.get_submodule(name)), type(owner), rel
    return type(model.get_submodule(name)), None, ()


def _same_role(model: nn.Module, culprit: str) -> list[str]:
    """The culprit and every layer in the same role; an outermost block's peers are the blocks of its type."""
    if not culprit:
        return [culprit]
    role = _role(model, culprit)
    return [n for n, m in model.named_modules() if n and type(m) is role[0] and _role(model, n) == role]


def with_repairs(model: nn.Module, build, attempt, *, what: str = "pruning"):
    """``attempt(build(frozen_modules, frozen_splits))`` until the compacted model runs; returns the pruner.

    ``build`` makes a :class:`StructuredPruner`; ``attempt`` masks or compacts with it and raises
    :class:`_BrokenForward` (through :meth:`StructuredPruner.apply`) when a layer reads a width the
    trace cannot see: a split of sizes stored in an enclosing block, or a head size computed as
    ``C // num_heads``. First the inputs of the splits in the enclosing blocks are kept whole; if
    there are none (or that did not help), the layer is kept whole wherever it plays the same role.
    Every method that picks units goes through here, so the repairs are the same everywhere.
    """
    frozen: list[str] = []
    frozen_splits: set[str] = set()
    for repairs in range(MAX_REPAIRS + 1):
        pruner = build(frozen, frozen_splits)
        try:
            attempt(pruner)
            return pruner
        except _BrokenForward as exc:
            culprit = exc.args[0]
            peers = _same_role(model, culprit) if culprit else []
            enclosing = {n.rsplit(".", k)[0] for n in peers for k in range(1, n.count(".") + 1)} | set(peers)
            splits = enclosing & {m for m, _ in pruner.graph.trace.splits} - frozen_splits
            if not culprit or repairs == MAX_REPAIRS or (culprit in frozen and not splits):
                raise PruningError(f"{what} failed and the model was restored: {exc.__cause__!r} in "
                                   f"module '{culprit}'. That layer reads a width the trace cannot see; "
                                   "pass it in ignored_layers or use a smaller target.") from exc.__cause__
            warnings.warn(f"{what} '{culprit}' broke the forward pass ({exc.__cause__!r}); "
                          f"keeping {'the inputs of splits around it' if splits else 'that layer'} whole and "
                          "retrying", stacklevel=3)
            if splits:
                frozen_splits |= splits
            else:
                frozen.extend(peers)
    raise AssertionError("unreachable")


class StructuredPruner:
    """Masks that grow step by step on one dependency graph; ``compact`` ends it."""

    def __init__(self, model: nn.Module, example_inputs, *, importance="l2", mode="global", round_to=8,
                 ignored_layers=(), prune_stem=False, frozen_modules=(), frozen_splits=(), watch=()):
        if get_mask(model) is not None:
            raise PruningError("this model already carries masks from an earlier prune(..., compact=False); "
                               "call hf_prune.compact(model) first")
        check_choice("mode", mode, ("global", "local"))
        round_to = check_round_to(round_to)
        self.model = model
        self.example_inputs = example_inputs
        self.importance, self.mode, self.round_to = importance, mode, round_to
        self.graph = build_graph(model, example_inputs, ignored_layers=ignored_layers,
                                 prune_stem=prune_stem, frozen_modules=frozen_modules,
                                 frozen_splits=frozen_splits, watch=watch)
        self.removed = torch.zeros(0, dtype=torch.int64)
        self.dense_macs = self.graph.macs()
        self.dense_params = self.graph.params()

    @property
    def mask(self) -> StructuredMask | None:
        return get_mask(self.model)

    def plan(self, *, sparsity=None, target_macs=None, target_latency=None, scores=None, latency_device=None,
             latency_batch_size=None, latency_dtype=None, latency=None, verify=True) -> torch.Tensor:
        """Roots to remove for a target; units removed earlier stay removed.

        ``target_latency``: the fraction of the dense model's latency to keep, measured on
        ``latency_device`` (default: the model's) at ``latency_batch_size`` (1) and ``latency_dtype``
        (the model's), in the example inputs' layout. A :class:`~hf_prune.engine.latency.LatencyModel`
        is built from measurements (cached on disk) or taken from ``latency``; the allocator maximises
        kept importance under it. With ``verify`` (and no masks installed) the plan is compacted on the
        side and timed against the dense model; if the measured ratio misses the target by more than
        10 %, the latency model is corrected by that measurement (its residual refit, the budget scaled
        by the error the refit leaves) and the plan made and measured once more; the attempt measured
        closer to the target is kept. What was predicted and measured is in ``self.latency_report``.
        """
        check_targets(sparsity, target_macs, target_latency)
        if scores is None:
            try:
                scores = unit_scores(self.graph, self.importance)
            except ValueError as exc:  # e.g. Taylor scores without gradients
                raise PruningError(str(exc)) from exc
        scores = scores.clone()
        scores[self.removed] = 0.0
        if target_latency is None:
            return self._allocate(scores, sparsity=sparsity, target_macs=target_macs)
        if latency is None:
            latency = self.latency_model(device=latency_device, batch_size=latency_batch_size, dtype=latency_dtype)
        return self._plan_latency(scores, float(target_latency), latency, verify)

    def _allocate(self, scores, **target) -> torch.Tensor:
        try:
            if "target_latency" in target:
                target["removed"] = self.removed
            removed = allocate(self.graph, scores, normalized_scores(self.graph, scores), mode=self.mode,
                               round_to=self.round_to, **target)
        except ConfigError:
            raise
        except ValueError as exc:
            raise PruningError(str(exc)) from exc
        return torch.unique(torch.cat([self.removed, removed]))

    def latency_model(self, *, device=None, batch_size=None, dtype=None, **options):
        """The latency model of this graph for these settings (built once, then reused)."""
        from .latency import LatencyModel, Settings

        settings = Settings.of(self.model, self.example_inputs, device=device, batch_size=batch_size, dtype=dtype)
        models = self.__dict__.setdefault("_latency_models", {})
        if settings not in models:
            models[settings] = LatencyModel(self.model, self.graph, self.example_inputs, settings, **options)
        return models[settings].build()

    def _plan_latency(self, scores, target: float, latency, verify: bool) -> torch.Tensor:
        from .latency import TOLERANCE

        latency.build()
        note = None
        try:
            removed = self._allocate(scores, target_latency=target, latency=latency)
        except PruningError as exc:
            if not verify or self.mask is not None or latency.fixed_share == 0:
                raise
            # Out of reach only if the measured fixed share of the residual is right: plan with a
            # residual that shrinks, and let the verification's measurement decide.
            note = f"planned with a shrinking residual: {exc}"
            latency.fixed_share = 0.0
            removed = self._allocate(scores, target_latency=target, latency=latency)
        attempts = [{"budget": target, "predicted_ratio": latency.ratio(self.graph.keep_mask(removed))}]
        report = {"target_latency": target, **latency.summary(), "attempts": attempts, "verified": False}
        if note:
            report["note"] = note
        self.latency_report = report
        if not verify or self.mask is not None:
            report["why_not_verified"] = ("verify=False" if not verify else
                                          "the model carries masks; measure after compaction (measure_speedup)")
            return removed
        attempts[0]["measured"] = self._measure(removed, latency)
        plans = [removed]
        measured = attempts[0]["measured"]["latency_ratio"]
        share, missed = latency.fixed_share, abs(measured / target - 1) > TOLERANCE
        budget = min(1.0, target / latency.calibrate(self.graph.keep_mask(removed), measured)) if missed else target
        if missed and (abs(budget / target - 1) > 0.01 or latency.fixed_share != share):  # else: the same plan
            try:
                plans.append(self._allocate(scores, target_latency=budget, latency=latency))
            except PruningError as exc:  # the corrected budget is out of reach: keep the first plan
                attempts.append({"budget": budget, "error": str(exc)})
            else:
                attempts.append({"budget": budget, "residual_fixed_share": latency.fixed_share,
                                 "predicted_ratio": latency.ratio(self.graph.keep_mask(plans[-1]))})
                attempts[-1]["measured"] = self._measure(plans[-1], latency)
        best = min(range(len(plans)), key=lambda i: abs(attempts[i]["measured"]["latency_ratio"] / target - 1))
        report.update(verified=True, corrected=len(attempts) > 1, chosen=best,
                      measured=attempts[best]["measured"],
                      within_tolerance=abs(attempts[best]["measured"]["latency_ratio"] / target - 1) <= TOLERANCE)
        return plans[best]

    def _measure(self, removed: torch.Tensor, latency) -> dict:
        """The plan compacted on a copy, timed against the dense model (the model is restored)."""
        undo = self._compact_checked(self.graph.keep_mask(removed))
        try:
            pruned = copy.deepcopy(self.model)
        finally:
            undo.restore()
        return latency.measure_plan(pruned)

    def step(self, *, sparsity=None, target_macs=None, scores=None, compacted=False, after=None,
             **latency) -> StructuredMask | None:
        """Mask more units to reach the target; the model keeps its shapes (see :meth:`apply`).
        ``latency``: ``target_latency`` and the other latency arguments of :meth:`plan`."""
        for value, check in ((target_macs, check_target_macs), (sparsity, check_sparsity)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                check(value)  # a string, a bool, ...: refused here; the allocation checks the ranges
        return self.apply(self.plan(sparsity=sparsity, target_macs=target_macs, scores=scores, **latency),
                          compacted=compacted, after=after)

    def apply(self, removed: torch.Tensor, *, compacted: bool = False, after=None) -> StructuredMask | None:
        """Mask exactly the units ``removed`` (root ids of ``self.graph``), checked to compact.

        Replaces any earlier mask of this pruner; the model keeps its shapes. Methods that choose
        units themselves (searched widths, a resumed checkpoint) go through here. With
        ``compacted=True`` the units are removed for good instead (one-shot pruning: the check's
        compaction is kept, which saves a second compaction and forward pass); returns None then.
        ``after(pruner)``, with ``compacted=True``: more work on the compacted model inside the same
        transaction (e.g. reconstruction): if it fails, the compaction is undone too.
        """
        removed = torch.unique(torch.as_tensor(removed, dtype=torch.int64).reshape(-1))
        prunable = torch.cat([torch.zeros(0, dtype=torch.int64)] + [g.units for g in self.graph.groups])
        stray = removed[~torch.isin(removed, prunable)]
        if stray.numel():
            raise PruningError(f"apply() got {stray.numel()} ids that are not prunable units of this graph (e.g. "
                               f"{stray[:3].tolist()}); take them from DependencyGraph.groups[i].units")
        keep = self.graph.keep_mask(removed)
        old = self.mask
        if compacted:
            if old is not None:
                raise PruningError("this pruner's model carries masks; call compact() instead of compacted=True")
            undo, before = self._compact_checked(keep), self.removed
            self.removed = removed
            if after is not None:
                try:
                    after(self)
                except BaseException:
                    self.removed = before
                    undo.restore()
                    raise
            undo.discard()
            return None
        if old is not None:
            old.remove_hooks()
        try:
            mask = StructuredMask(self.model, self.graph, keep)  # undoes itself if interrupted
            try:
                mask.remove_hooks()
                # Only hand out masks that compact: try it and put the model back. The masked model has the
                # dense shapes and exact norm hooks, so the compacted forward is the one that can break.
                self._compact_checked(keep).restore()
                mask.install_hooks(self.model)
            except BaseException:
                mask.restore(self.model)
                raise
        except BaseException:  # an interrupt too: the earlier mask (if any) is back, exactly as it was
            if old is not None:
                old.install_hooks(self.model)
            raise
        mask.saved = {}
        set_mask(self.model, mask)
        self.removed = removed
        return mask

    def _compact_checked(self, keep: torch.Tensor):
        """Compact and run the example inputs; on any failure the model is restored and the error raised."""
        try:
            undo = compact_units(self.model, self.graph, keep)
        except CompactionError as exc:  # handled like a forward that breaks: keep that layer whole
            raise _BrokenForward(exc.module) from exc
        try:
            _run(self.model, self.example_inputs)
        except BaseException:
            undo.restore()
            raise
        return undo

    def stats(self) -> dict:
        keep = self.graph.keep_mask(self.removed)
        macs, params = self.graph.macs(keep), self.graph.params(keep)
        return {"macs": macs, "params": params, "macs_ratio": macs / max(self.dense_macs, 1),
                "params_ratio": params / max(self.dense_params, 1)}

    def compact(self) -> nn.Module:
        return compact(self.model)


def compact(model: nn.Module) -> nn.Module:
    """Physically remove what masks removed; the outputs stay the same.

    Transactional: on any failure (an interrupt included) the masked model is left exactly as it
    was, its norm hooks reinstalled, and the error raised (a broken forward as :class:`PruningError`).
    """
    mask = get_mask(model)
    if mask is None:
        raise PruningError("this model has no masks to compact; prune it with compact=False first")
    mask.remove_hooks()
    try:
        undo = compact_units(model, mask.graph, mask.keep)
        try:
            _run(model, mask.graph.example_inputs)
        except BaseException:
            undo.restore()
            raise
    except _BrokenForward as exc:
        mask.install_hooks(model)
        raise PruningError(f"compaction broke the forward pass in '{exc.args[0]}': {exc.__cause__!r}; "
                           "the masked model is unchanged") from exc.__cause__
    except BaseException:
        mask.install_hooks(model)
        raise
    set_mask(model, None)
    return model
