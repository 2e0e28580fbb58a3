"""Pruning during training: :class:`PruningCallback` (shared machinery) and :class:`DepGraphCallback`.

Principle: **masks while training, surgery at the boundary.** Inside ``trainer.train()`` the model
keeps its shapes: pruning installs masks (removed slices zeroed, exact norm hooks) and the masks are
re-applied after every optimizer step, so the optimizer, DDP and checkpoints stay valid. Physical
removal (:func:`hf_prune.compact`) happens in ``on_train_end`` (``compact_at_end=True``), when
training is over; ``trainer.save_model()`` afterwards saves the compact model.

Event flow in a ``transformers.Trainer`` (step ``t`` = ``state.global_step`` = optimizer steps done):

* ``on_train_begin``: build the pruner (traces the model with ``example_inputs`` or, if none were
  given, with the first items of the training set put through the dataloader's collator, without
  touching the sampler), resolve the schedule for ``state.max_steps``; when resuming
  (``state.global_step > 0``) restore masks and schedule state from the checkpoint's
  ``hf_prune_state.json``.
* ``on_step_begin``: if the schedule prunes at step ``t``, score units, make the scores identical on
  every process (see *Distributed*), and grow the masks to the scheduled target.
* ``on_pre_optimizer_step``: method hooks that need gradients (Taylor importance, DepGraph's sparse
  learning, which **adds to ``.grad``** here, after clipping and after DDP averaged the gradients).
* ``on_optimizer_step``: re-zero masked slices.
* ``on_log``: add ``prune/macs_ratio``, ``prune/params_ratio``, ``prune/target`` (and
  ``prune/events``) to the logs (and to ``state.log_history``). Reporters that run before this
  callback in the Trainer's list do not see them; :meth:`PruningCallback.attach` puts the callback
  first.
* ``on_save``: write ``hf_prune_state.json`` (removed units as per-tensor removed indices + schedule
  state; ``hf_prune_scores.safetensors`` for accumulated Taylor scores) into
  ``output_dir/checkpoint-<step>``.
* ``on_train_end``: compact; for transformers models the structure spec is put on
  ``model.config.hf_prune`` so that ``trainer.save_model()`` writes a checkpoint that
  ``hf_prune.AutoPrunedModel.from_pretrained`` reloads.

**Distributed.** Every process runs the same callback on its own replica. At each pruning event the
per-unit scores are made identical on all ranks before allocation: ``sync="all_reduce"`` (default)
averages them (``all_reduce``), ``sync="broadcast"`` uses rank 0's; either way the result is then
broadcast from rank 0 so every rank holds bit-identical scores, and after the step a checksum of the
removed units is compared across ranks (a mismatch raises instead of silently desynchronising).

**Plain loops** (accelerate, no Trainer) call the same machinery directly::

    cb = DepGraphCallback(target_macs=0.5)
    cb.setup(accelerator.unwrap_model(model), total_steps=N, example_inputs=x)
    for step, batch in enumerate(loader):
        cb.step_begin(step)            # prunes on schedule
        accelerator.backward(loss(model, batch))
        cb.pre_optimizer_step()        # Taylor / sparse learning
        optimizer.step(); optimizer.zero_grad()
        cb.optimizer_step()            # re-apply masks
    cb.finish()                        # compact (if compact_at_end)
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from ..errors import PruningError
from ..engine.masks import StructuredMask, get_mask, set_mask
from ..core.schedules import SCHEDULES, SparsitySchedule, make_schedule, target_from_amount
from ..core.inputs import model_device, to_device

logger = logging.getLogger(__name__)

__all__ = ["PruningCallback", "DepGraphCallback", "STATE_NAME", "SCORES_NAME", "sync_scores",
           "example_inputs_from_dataloader", "reload_checkpoint_weights"]

STATE_NAME = "hf_prune_state.json"
SCORES_NAME = "hf_prune_scores.safetensors"
STATE_VERSION = 1
LABEL_KEYS = ("labels", "label", "label_ids")
SYNC_MODES = ("all_reduce", "broadcast")


# --------------------------------------------------------------------------------------- distributed


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return torch.distributed
    return None


def _comm_device():
    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync_scores(scores: torch.Tensor, how: str = "all_reduce") -> torch.Tensor:
    """Make per-unit ``scores`` identical on every process (no-op without torch.distributed).

    ``how="all_reduce"``: the mean over processes; ``"broadcast"``: rank 0's scores. The result
    is broadcast from rank 0 in both cases, so it is bitwise identical everywhere.
    """
    if how not in SYNC_MODES:
        raise ValueError(f"sync={how!r} is not one of {SYNC_MODES}")
    dist = _dist()
    if dist is None:
        return scores
    t = scores.detach().to(_comm_device(), torch.float64).contiguous()
    if how == "all_reduce":
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    dist.broadcast(t, src=0)
    return t.to(scores.device, scores.dtype)


def _check_same_everywhere(removed: torch.Tensor) -> None:
    """Raise if processes disagree on the removed units."""
    dist = _dist()
    if dist is None:
        return
    r = removed.to(torch.int64)
    weights = torch.arange(1, r.numel() + 1, dtype=torch.int64)
    digest = torch.tensor([r.numel(), int(r.sum()), int((r * weights).sum() % 1_000_000_007)],
                          dtype=torch.int64, device=_comm_device())
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise PruningError(f"processes disagree on the pruned units (rank {dist.get_rank()}: {digest.tolist()}, "
                           f"min {lo.tolist()}, max {hi.tolist()}); masks must be identical on every rank")


def _is_main_process() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


# --------------------------------------------------------------------------------------- inputs


def example_inputs_from_dataloader(dataloader, n: int = 2, label_names=()) -> dict | tuple | torch.Tensor:
    """Model inputs made from the first ``n`` items of ``dataloader``'s dataset and its collator.

    The dataset is indexed directly, so the dataloader's sampler and the global RNG are untouched
    (the training order stays exactly what it would have been). Label keys are dropped.
    """
    if dataloader is None:
        raise PruningError("example_inputs were not given and there is no train_dataloader to take them from; "
                           "pass example_inputs= (e.g. {'pixel_values': torch.randn(2, 3, 224, 224)})")
    ds = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    items = []
    try:
        if ds is not None and hasattr(ds, "__getitem__") and hasattr(ds, "__len__"):
            items = [ds[i] for i in range(min(n, len(ds)))]
        elif ds is not None:
            for item in ds:
                items.append(item)
                if len(items) == n:
                    break
    except Exception as exc:
        raise PruningError(f"could not read example items from the training dataset ({exc!r}); pass "
                           "example_inputs= to the pruning callback") from exc
    if not items:
        raise PruningError("the training dataset is empty, so no example_inputs can be taken from it; pass "
                           "example_inputs= to the pruning callback")
    batch = collate(items) if collate is not None else torch.utils.data.default_collate(items)
    drop = set(LABEL_KEYS) | set(label_names or ())
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: v for k, v in dict(batch).items() if k not in drop}
    if isinstance(batch, (tuple, list)):
        return batch[0]  # (inputs, labels) convention
    return batch


def reload_checkpoint_weights(model: nn.Module, checkpoint: str | os.PathLike) -> bool:
    """Load ``checkpoint/model.safetensors`` into ``model`` if the Trainer could not (returns True if it did).

    transformers 5 ``save_pretrained`` writes some models (ViT, ...) under legacy parameter names,
    but ``Trainer._load_from_checkpoint`` loads them with a plain non-strict ``load_state_dict`` and
    only warns about the missing keys (huggingface/transformers#48805): the resumed run would silently
    train from the fresh weights. The names are mapped back through transformers' own reverse
    renaming (``revert_weight_conversion``), matching tensors by identity; loading is strict.
    """
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    own = model.state_dict()
    if keys == set(own):
        return False  # names match: the Trainer has loaded them
    mapping = {k: k for k in own}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(own))
        by_tensor = {(t.data_ptr(), tuple(t.shape), t.dtype): n for n, t in own.items()}
        for saved_name, t in reverted.items():
            name = by_tensor.get((t.data_ptr(), tuple(t.shape), t.dtype))
            if name is not None:
                mapping[saved_name] = name
    except Exception as exc:  # older/newer transformers without this helper
        logger.debug("revert_weight_conversion unavailable: %r", exc)
    unknown = sorted(k for k in keys if k not in mapping)
    targets = {mapping[k] for k in keys if k in mapping}
    missing = sorted(k for k in own if k not in targets)
    if unknown or missing:
        raise PruningError(f"cannot resume from {checkpoint}: its weights do not match the model (unknown names "
                           f"{unknown[:4]}, missing {missing[:4]}); resume with the model the checkpoint was made from")
    from safetensors.torch import load_file

    saved = load_file(str(path))
    model.load_state_dict({mapping[k]: v for k, v in saved.items()}, strict=True)
    logger.warning("hf_prune: the Trainer did not load %s (parameter names saved in transformers' legacy format, "
                   "huggingface/transformers#48805); reloaded it with the names mapped", path)
    return True


# --------------------------------------------------------------------------------------- the callback


class PruningCallback(TrainerCallback):
    """Structured pruning on a sparsity schedule during ``Trainer.train()`` (base of all methods).

    Args:
        target_macs: fraction of dense MACs to keep at the end, in (0, 1]. Exclusive with ``sparsity``.
        sparsity: fraction of prunable parameters to remove at the end, in [0, 1).
        schedule: ``"cubic"`` (Zhu & Gupta), ``"linear"``, ``"oneshot"``, or a
            :class:`~hf_prune.core.schedules.SparsitySchedule` (then the target arguments must be omitted).
        start, end: where pruning starts and reaches the final target: fractions of the training
            steps (float) or absolute optimizer steps (int). ``oneshot`` prunes at ``start``.
        frequency: prune every ``frequency`` optimizer steps between ``start`` and ``end``.
        initial: amount already pruned at ``start`` (linear/cubic).
        compact_at_end: physically remove the masked units in ``on_train_end``.
        example_inputs: inputs to trace the model with; default: the first training items.
        importance: ``"l2"`` or ``"l1"`` (group magnitude); :class:`DepGraphCallback` adds ``"taylor"``.
        mode, round_to, prune_stem, ignored_layers: passed to :class:`~hf_prune.engine.pruner.StructuredPruner`.
        sync: ``"all_reduce"`` or ``"broadcast"``: how scores agree across processes.
        reference: ``{"macs", "params", "prunable_params"}`` of the model the targets refer to
            (staged fine-tuning passes the original dense model's counts, so that each stage's target
            is relative to it rather than to the already-pruned input of the stage).
    """

    method = "magnitude"
    IMPORTANCES = ("l2", "l1")

    def __init__(self, *, target_macs: float | None = None, sparsity: float | None = None,
                 schedule: str | SparsitySchedule = "cubic", start: float | int = 0.0, end: float | int = 0.7,
                 frequency: int = 1, initial: float = 0.0, compact_at_end: bool = True, example_inputs=None,
                 importance: str = "l2", mode: str = "global", round_to: int | None = 8, prune_stem: bool = False,
                 ignored_layers=(), sync: str = "all_reduce", reference: dict | None = None):
        if isinstance(schedule, SparsitySchedule):
            if target_macs is not None or sparsity is not None:
                raise ValueError("schedule is a SparsitySchedule object that already holds the target; omit "
                                 f"target_macs={target_macs!r} / sparsity={sparsity!r} or pass schedule by name")
            self._schedule_template = schedule
        else:
            if schedule not in SCHEDULES:
                raise ValueError(f"schedule={schedule!r} is not supported; use one of {sorted(SCHEDULES)} or a "
                                 "hf_prune.core.schedules.SparsitySchedule")
            # validates targets, start/end, frequency with messages that name the argument
            self._schedule_template = make_schedule(schedule, target_macs=target_macs, sparsity=sparsity,
                                                    start=start, end=end, frequency=frequency, initial=initial)
        if importance not in self.IMPORTANCES:
            raise ValueError(f"importance={importance!r} is not supported by {type(self).__name__}; use one of "
                             f"{self.IMPORTANCES}")
        if mode not in ("global", "local"):
            raise ValueError(f"mode={mode!r} must be 'global' or 'local'")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to={round_to!r} must be a positive int (channel multiple) or None")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync={sync!r} is not one of {SYNC_MODES}")
        if reference is not None and not {"macs", "params", "prunable_params"} <= set(reference):
            raise ValueError(f"reference={reference!r} must have the keys 'macs', 'params', 'prunable_params'")
        self.compact_at_end = bool(compact_at_end)
        self.example_inputs = example_inputs
        self.importance, self.mode, self.round_to = importance, mode, round_to
        self.prune_stem, self.ignored_layers = prune_stem, tuple(ignored_layers)
        self.sync = sync
        self.reference = dict(reference) if reference is not None else None
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.model: nn.Module | None = None
        self.pruner = None
        self.schedule: SparsitySchedule | None = None  # resolved against the model (reference targets)
        self.total_steps: int | None = None
        self.step = 0
        self.events: list[dict] = []
        self.pending = False  # a pruning step was postponed (e.g. Taylor scores not available yet)
        self.finished = False
        self.final_removed: list | None = None  # per-tensor removed indices, recorded before compaction
        self.final_stats: dict | None = None
        self._stats: dict | None = None

    @property
    def settings(self) -> dict:
        """The method's settings, JSON-able (recorded in checkpoints and the saved model's spec)."""
        t = self._schedule_template
        return {"method": self.method, "importance": self.importance, "mode": self.mode, "round_to": self.round_to,
                "prune_stem": self.prune_stem, "sync": self.sync, "schedule": t.to_dict(),
                **({"target_macs": t.final_target} if t.kind == "target_macs" else {"sparsity": t.final_target})}

    # ------------------------------------------------------------------ plain-loop API
    def setup(self, model: nn.Module, total_steps: int, example_inputs=None) -> None:
        """Trace ``model`` and resolve the schedule for ``total_steps`` optimizer steps.

        ``model`` is the bare model (a DDP / DataParallel wrapper is unwrapped here).
        """
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        if not isinstance(model, nn.Module):
            raise PruningError(f"model is a {type(model).__name__}, not a torch.nn.Module; pass the model being "
                               "trained (for a Trainer this happens automatically)")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r} must be a positive int (the number of optimizer steps); "
                             "set TrainingArguments.max_steps or num_train_epochs")
        if self.pruner is not None and self.model is model and not self.finished:
            mask = get_mask(model)
            if mask is not None and mask is self.pruner.mask:
                self.total_steps = total_steps  # a further train() on the same masked model: keep the masks
                self._resolve_schedule()
                return
        if self.finished or self.model is not model:
            self._reset()
        if get_mask(model) is not None:
            raise PruningError("the model already carries pruning masks from another pruner; call "
                               "hf_prune.compact(model) before training it with a new pruning callback")
        inputs = example_inputs if example_inputs is not None else self.example_inputs
        if inputs is None:
            raise PruningError(f"{type(self).__name__} needs example_inputs to trace the model: pass "
                               "example_inputs= (e.g. {'pixel_values': torch.randn(2, 3, 224, 224)})")
        inputs = to_device(inputs, model_device(model))
        self.model, self.total_steps = model, total_steps
        with torch.random.fork_rng(devices=[]):
            self.pruner = self.build_pruner(model, inputs)
        self._resolve_schedule()
        self._stats = None

    def build_pruner(self, model: nn.Module, example_inputs):
        """The engine object that holds the masks (override for other methods)."""
        from ..engine.pruner import StructuredPruner

        return StructuredPruner(model, example_inputs, importance="l2" if self.importance == "taylor" else
                                self.importance, mode=self.mode, round_to=self.round_to,
                                ignored_layers=self.ignored_layers, prune_stem=self.prune_stem)

    def _current_counts(self) -> dict:
        g = self.pruner.graph
        return {"macs": self.pruner.dense_macs, "params": self.pruner.dense_params,
                "prunable_params": g.params(only_prunable=True)}

    def _resolve_schedule(self) -> None:
        """The schedule in terms of the model being trained (targets converted from ``reference``)."""
        t = self._schedule_template
        if self.reference is None:
            self.schedule = t
            return
        cur, ref = self._current_counts(), self.reference
        if t.kind == "target_macs":
            rel = t.final_target * ref["macs"] / max(cur["macs"], 1)
            if rel <= 0:
                raise PruningError(f"target_macs={t.final_target} of the reference model is not reachable")
            final = max(0.0, 1.0 - min(rel, 1.0))
        else:
            want_removed = t.final_target * ref["prunable_params"] - (ref["params"] - cur["params"])
            final = min(max(0.0, want_removed / max(cur["prunable_params"], 1)), 0.999)
        init = min(t.initial, final)
        self.schedule = type(t)(final=final, kind=t.kind, initial=init, start=t.start, end=t.end,
                                frequency=t.frequency)
        if final == 0.0:
            warnings.warn(f"the model already meets the target ({t.kind}={t.final_target} of the reference): "
                          "this stage prunes nothing", stacklevel=3)

    def step_begin(self, step: int) -> bool:
        """Prune if the schedule says so at ``step`` (optimizer steps done). Returns True if it pruned."""
        self._require_setup()
        self.step = step
        sched, total = self.schedule, self.total_steps
        if not (self.pending or sched.is_pruning_step(step, total)):
            return False
        if not self.ready_to_prune():
            self.pending = True
            return False
        self.pending = False
        amount = sched.amount_at(step, total)
        done = self.events[-1]["amount"] if self.events else 0.0
        if amount <= 0.0 or amount <= done:
            return False
        with torch.random.fork_rng(devices=[]):
            changed = self.prune_to(step, {sched.kind: target_from_amount(amount, sched.kind)})
        stats, target = self.stats(), target_from_amount(amount, sched.kind)
        self.events.append({"step": int(step), "amount": float(amount), "target": target, "changed": bool(changed),
                            "macs_ratio": stats["macs_ratio"], "params_ratio": stats["params_ratio"]})
        logger.info("hf_prune: step %d: %s=%.4f -> MACs %.1f%%, params %.1f%%", step, sched.kind, target,
                    100 * stats["macs_ratio"], 100 * stats["params_ratio"])
        return True

    def pre_optimizer_step(self) -> None:
        """Hook with gradients available (after backward and clipping, before ``optimizer.step``)."""
        self._require_setup()

    def optimizer_step(self) -> None:
        """Re-zero masked slices (after every ``optimizer.step()``)."""
        if self.pruner is None or self.finished:
            return
        mask = self.pruner.mask
        if mask is not None:
            mask.enforce(self.model)

    def finish(self) -> nn.Module | None:
        """Record the final masks and, with ``compact_at_end``, compact the model."""
        if self.pruner is None or self.finished:
            return self.model
        self.final_removed = self.removed_slices()
        self.final_stats = self.stats()
        if self.compact_at_end and self.pruner.mask is not None:
            from ..engine.pruner import compact

            compact(self.model)
            self._attach_spec()
            self.finished = True
        return self.model

    # ------------------------------------------------------------------ method hooks
    def ready_to_prune(self) -> bool:
        """False postpones a due pruning step to the next step (e.g. no gradients yet)."""
        return True

    def compute_scores(self) -> torch.Tensor:
        """Raw importance per union-find root, on this process."""
        from ..engine.importance import unit_scores

        return unit_scores(self.pruner.graph, self.importance)

    def after_prune(self) -> None:
        """Called after each pruning event (reset accumulators)."""

    def prune_to(self, step: int, target: dict) -> bool:
        """Grow masks to ``target`` (``{"target_macs": x}`` or ``{"sparsity": x}``); True if masks changed."""
        scores = sync_scores(self.compute_scores().double(), self.sync)
        before = self.pruner.removed
        try:
            planned = self.pruner.plan(scores=scores, **target)
            changed = not torch.equal(planned, before)
            if changed:
                self.pruner.step(scores=scores, **target)
        except PruningError as exc:
            raise PruningError(f"{type(self).__name__}: pruning at step {step} to {target} failed: {exc}") from exc
        _check_same_everywhere(self.pruner.removed)
        self._stats = None
        self.after_prune()
        return changed

    # ------------------------------------------------------------------ stats and logging
    def stats(self) -> dict:
        """MACs/params now and as ratios of the dense (or ``reference``) model."""
        if self._stats is None:
            s = dict(self.pruner.stats())
            if self.reference is not None:
                s["macs_ratio"] = s["macs"] / max(self.reference["macs"], 1)
                s["params_ratio"] = s["params"] / max(self.reference["params"], 1)
            s["dense_macs"] = self.reference["macs"] if self.reference else self.pruner.dense_macs
            s["dense_params"] = self.reference["params"] if self.reference else self.pruner.dense_params
            self._stats = s
        return self._stats

    def log_entries(self) -> dict:
        if self.pruner is None:
            return {}
        if self.finished:
            s = self.final_stats
        else:
            s = self.stats()
        target = self.schedule.target_at(self.step, self.total_steps) if self.schedule is not None else None
        out = {"prune/macs_ratio": round(float(s["macs_ratio"]), 6),
               "prune/params_ratio": round(float(s["params_ratio"]), 6),
               "prune/events": len(self.events)}
        if target is not None:
            out["prune/target"] = round(float(target), 6)
        return out

    # ------------------------------------------------------------------ checkpoint state
    def removed_slices(self) -> list:
        """``[(tensor name, dim, removed indices)]`` for every tensor dim that lost something."""
        if self.pruner is None:
            return []
        g = self.pruner.graph
        keep = g.keep_mask(self.pruner.removed)
        out = []
        for m in g.members:
            gone = torch.nonzero(~keep[m.units]).reshape(-1)
            if gone.numel():
                out.append((m.tensor, int(m.dim), gone.tolist()))
        return out

    def state_dict(self) -> dict:
        """JSON-able state: masks (per-tensor removed indices), schedule and its progress."""
        self._require_setup()
        return {
            "format_version": STATE_VERSION,
            "callback": type(self).__name__,
            "settings": self.settings,
            "schedule": self.schedule.to_dict(),
            "total_steps": self.total_steps,
            "global_step": self.step,
            "pending": self.pending,
            "events": self.events,
            "removed": [{"tensor": t, "dim": d, "indices": i} for t, d, i in self.removed_slices()],
            "removed_roots": self.pruner.removed.tolist(),
            "stats": {k: float(v) for k, v in self.stats().items()},
        }

    def extra_tensors(self) -> dict:
        """Tensors of the method's state that go to ``hf_prune_scores.safetensors``."""
        return {}

    def load_extra_tensors(self, tensors: dict) -> None:
        pass

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        """Restore masks and schedule progress (after :meth:`setup` on the same model)."""
        self._require_setup()
        if state.get("format_version") != STATE_VERSION:
            raise PruningError(f"{STATE_NAME} has format_version {state.get('format_version')!r}; this hf_prune "
                               f"reads version {STATE_VERSION}")
        saved = state.get("settings", {})
        ours = self.settings
        diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if diff:
            warnings.warn(f"resuming with pruning settings that differ from the checkpoint's in {diff}; the "
                          "restored masks are kept and the new settings apply from here on", stacklevel=3)
        removed = self._roots_from_slices(state.get("removed", []))
        self._install(removed)
        self.events = list(state.get("events", []))
        self.pending = bool(state.get("pending", False))
        self.step = int(state.get("global_step", 0))
        self.load_extra_tensors(tensors or {})
        self._stats = None

    def _roots_from_slices(self, records: list) -> torch.Tensor:
        g = self.pruner.graph
        by_key = {(m.tensor, m.dim): m for m in g.members}
        roots = [torch.zeros(0, dtype=torch.int64)]
        for rec in records:
            m = by_key.get((rec["tensor"], rec["dim"]))
            if m is None:
                raise PruningError(f"the checkpoint masks tensor {rec['tensor']!r} dim {rec['dim']}, which is not a "
                                   "prunable dimension of this model: resume with the same model and example inputs")
            idx = torch.tensor(rec["indices"], dtype=torch.int64)
            if idx.numel() and (idx.min() < 0 or idx.max() >= m.units.numel()):
                raise PruningError(f"the checkpoint removes index {int(idx.max())} of {rec['tensor']!r} dim "
                                   f"{rec['dim']}, which has {m.units.numel()} entries: different model?")
            roots.append(m.units[idx])
        removed = torch.unique(torch.cat(roots))
        keep = g.keep_mask(removed)
        got = {(m.tensor, m.dim): torch.nonzero(~keep[m.units]).reshape(-1).tolist() for m in g.members}
        want = {(r["tensor"], r["dim"]): list(r["indices"]) for r in records}
        mismatch = [k for k in set(got) | set(want) if got.get(k, []) != want.get(k, [])]
        if mismatch:
            raise PruningError(f"the checkpoint's removed indices are not whole units of this model's dependency "
                               f"graph (e.g. {mismatch[:3]}); resume with the same model and example inputs")
        return removed

    def _install(self, removed: torch.Tensor) -> None:
        """Install masks for a given set of removed roots (resume)."""
        old = self.pruner.mask
        if old is not None:
            old.remove_hooks()
        if removed.numel() == 0:
            set_mask(self.model, None)
            self.pruner.removed = removed
            return
        keep = self.pruner.graph.keep_mask(removed)
        mask = StructuredMask(self.model, self.pruner.graph, keep)
        nonzero = [n for n, v in mask.saved.items() if bool(v.count_nonzero())]
        mask.saved = {}
        set_mask(self.model, mask)
        self.pruner.removed = removed
        _check_same_everywhere(removed)
        if nonzero:
            # Plain state restore: the weights did not come from the masked checkpoint. Masks are exact anyway.
            logger.info("hf_prune: restored masks zeroed non-zero slices in %d tensors", len(nonzero))

    def save_state(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.extra_tensors()
        if tensors:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / SCORES_NAME))
        path = directory / STATE_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def load_state(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        state = json.loads((directory / STATE_NAME).read_text())
        tensors = {}
        if (directory / SCORES_NAME).is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(directory / SCORES_NAME))
        self.load_state_dict(state, tensors)

    # ------------------------------------------------------------------ Trainer events
    def attach(self, trainer) -> "PruningCallback":
        """Add this callback to ``trainer`` *first*, so reporters (tensorboard, wandb, ...) see ``prune/*``."""
        callbacks = trainer.callback_handler.callbacks
        if any(cb is self for cb in callbacks):
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        inputs = self.example_inputs
        if inputs is None and not (self.pruner is not None and self.model is model):
            inputs = example_inputs_from_dataloader(train_dataloader, label_names=getattr(args, "label_names", None))
        self.setup(model, int(state.max_steps), inputs)
        if state.global_step > 0:
            self._resume(args, state)
        self.step = state.global_step

    def _resume(self, args, state) -> None:
        candidates = []
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        for c in candidates:
            f = c / STATE_NAME
            if f.is_file() and json.loads(f.read_text()).get("global_step") == state.global_step:
                reload_checkpoint_weights(self.model, c)
                self.load_state(c)
                logger.info("hf_prune: resumed pruning state from %s", c)
                return
        warnings.warn(f"resuming at step {state.global_step} but no {STATE_NAME} for that step was found in "
                      f"{[str(c) for c in candidates]}; pruning restarts with empty masks and the next scheduled "
                      "step catches up. Set TrainingArguments.resume_from_checkpoint to the checkpoint directory "
                      "if it is not under output_dir.", stacklevel=3)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.pre_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        entries = self.log_entries()
        if not entries or logs is None:
            return
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def on_save(self, args, state, control, **kwargs):
        if self.pruner is None or self.finished:
            return
        self.step = state.global_step
        if not getattr(args, "should_save", True):
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            warnings.warn(f"checkpoint directory {ckpt} not found; {STATE_NAME} not written", stacklevel=2)
            return
        self.save_state(ckpt)

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner is None or self.finished:
            return
        if self.compact_at_end and self.schedule is not None:
            last = self.schedule.steps(self.total_steps)[1]
            if state.global_step <= last and self.schedule.final > 0:
                warnings.warn(f"training stopped at step {state.global_step}, before the schedule's last pruning "
                              f"step {last}: compacting at {self.stats()['macs_ratio']:.1%} of the MACs",
                              stacklevel=2)
        self.finish()

    # ------------------------------------------------------------------ helpers
    def _require_setup(self) -> None:
        if self.pruner is None:
            raise PruningError(f"{type(self).__name__} is not set up: it builds its pruner in on_train_begin "
                               "(Trainer) or in setup(model, total_steps, example_inputs) (plain loops)")

    def _attach_spec(self) -> None:
        """Leave the structure spec on ``model.config`` so ``Trainer.save_model`` writes a loadable model."""
        config = getattr(self.model, "config", None)
        if config is None:
            return
        try:
            from ..hub import structure_spec
        except ImportError:
            return
        stats = {"macs_before": int(self.final_stats["dense_macs"]), "macs_after": int(self.final_stats["macs"])}
        try:
            config.hf_prune = structure_spec(self.model, method=self.method, settings=self.settings, stats=stats)
        except Exception as exc:  # saving still works; only AutoPrunedModel reloading needs the spec
            warnings.warn(f"could not record the pruned structure on model.config ({exc}); save with "
                          "hf_prune.save_pretrained to get a reloadable checkpoint", stacklevel=3)


class DepGraphCallback(PruningCallback):
    """DepGraph (Fang et al., CVPR 2023): iterative group pruning on a schedule, optional sparse learning.

    Coupled units (a channel with every slice of every tensor it touches, an attention head, ...)
    are removed together; importance is aggregated over the whole unit:

    * ``importance="l2"`` / ``"l1"``: group magnitude (the paper's baseline "w/o SL" with l2);
    * ``importance="taylor"``: first-order Taylor ``|w · ∂L/∂w|``, accumulated in
      ``on_pre_optimizer_step`` over every optimizer step since the previous pruning step (a due
      pruning step is postponed by one step if no gradient has been seen yet, e.g. at step 0).

    ``group_sparsity=λ`` enables the paper's sparse learning: a group-level penalty over every coupled
    unit ``k`` (all slices of all tensors it touches), weighted by
    ``γ_k = 2^{α (I_max − I_k)/(I_max − I_min)}`` inside each group, with ``I_k = ||w_k||²``, so that
    less important units are pushed harder towards zero (γ ∈ [1, 2^α]; ``α = sparse_alpha``,
    default 4). By default the penalty is a group lasso ``λ Σ_k γ_k ||w_k||₂`` (gradient
    ``λ γ_k w / ||w_k||``; ``sparse_penalty="lasso"``, the form METHODS.md describes and the
    reference code's group-norm pruner uses); ``sparse_penalty="squared"`` uses the paper's
    ``λ Σ_k γ_k ||w_k||²`` (gradient ``2 λ γ_k w``). **The callback adds this gradient to ``.grad``
    in ``on_pre_optimizer_step``** (after clipping, after DDP averaged the gradients), on every
    step before the schedule's last pruning step; units already removed are skipped. With
    ``schedule="oneshot"`` put ``start`` > 0 to get sparse-learning steps before the cut.
    """

    method = "depgraph"
    IMPORTANCES = ("l2", "l1", "taylor")

    def __init__(self, *, group_sparsity: float = 0.0, sparse_alpha: float = 4.0, sparse_penalty: str = "lasso",
                 **kwargs):
        if isinstance(group_sparsity, bool) or not isinstance(group_sparsity, (int, float)) or group_sparsity < 0:
            raise ValueError(f"group_sparsity={group_sparsity!r} must be a number >= 0 (the regularisation strength "
                             "λ; 0 disables sparse learning)")
        if not isinstance(sparse_alpha, (int, float)) or sparse_alpha < 0:
            raise ValueError(f"sparse_alpha={sparse_alpha!r} must be >= 0")
        if sparse_penalty not in ("lasso", "squared"):
            raise ValueError(f"sparse_penalty={sparse_penalty!r} must be 'lasso' or 'squared'")
        self.group_sparsity = float(group_sparsity)
        self.sparse_alpha = float(sparse_alpha)
        self.sparse_penalty = sparse_penalty
        super().__init__(**kwargs)

    def _reset(self) -> None:
        super()._reset()
        self._taylor: torch.Tensor | None = None
        self._taylor_count = 0

    @property
    def settings(self) -> dict:
        s = super().settings
        if self.group_sparsity:
            s.update(group_sparsity=self.group_sparsity, sparse_alpha=self.sparse_alpha,
                     sparse_penalty=self.sparse_penalty)
        return s

    # -- importance
    def ready_to_prune(self) -> bool:
        return self.importance != "taylor" or self._taylor_count > 0

    def compute_scores(self) -> torch.Tensor:
        if self.importance == "taylor":
            return self._taylor / max(self._taylor_count, 1)
        return super().compute_scores()

    def after_prune(self) -> None:
        self._taylor, self._taylor_count = None, 0

    def _prunable_params(self):
        g = self.pruner.graph
        tensors = g._named_tensors()
        return g, [(m, tensors[m.tensor]) for m in g.members if m.tensor in g.param_names]

    @torch.no_grad()
    def _accumulate_taylor(self) -> None:
        g, members = self._prunable_params()
        scores = torch.zeros(g.trace.uf.size, dtype=torch.float64)
        cache = {}
        for m, p in members:
            if p.grad is None:
                continue
            if m.tensor not in cache:
                cache[m.tensor] = (p.detach().float() * p.grad.detach().float()).abs()
            s = cache[m.tensor]
            dims = [d for d in range(s.dim()) if d != m.dim]
            per_index = s.sum(dim=dims) if dims else s
            scores.index_add_(0, m.units, per_index.double().cpu())
        self._taylor = scores if self._taylor is None else self._taylor + scores
        self._taylor_count += 1

    # -- sparse learning
    @torch.no_grad()
    def _regularize(self) -> None:
        from ..engine.importance import unit_scores

        g, members = self._prunable_params()
        sq = unit_scores(g, "l2")  # ||w_u||² over every slice of unit u
        keep = g.keep_mask(self.pruner.removed)
        coef = torch.zeros_like(sq)
        for grp in g.groups:
            units = grp.units[keep[grp.units]]
            if units.numel() == 0:
                continue
            imp = sq[units]
            span = float(imp.max() - imp.min())
            rel = (imp.max() - imp) / span if span > 0 else torch.zeros_like(imp)
            gamma = torch.pow(2.0, self.sparse_alpha * rel)
            if self.sparse_penalty == "lasso":
                coef[units] = self.group_sparsity * gamma / imp.sqrt().clamp_min(1e-12)
            else:
                coef[units] = 2.0 * self.group_sparsity * gamma
        for m, p in members:
            if p.grad is None or not p.requires_grad:
                continue
            c = coef[m.units]
            if not bool(c.any()):
                continue
            shape = [1] * p.dim()
            shape[m.dim] = -1
            p.grad.add_(p.detach() * c.to(p.device, p.grad.dtype).view(shape))

    def pre_optimizer_step(self) -> None:
        super().pre_optimizer_step()
        if self.finished:
            return
        last = self.schedule.steps(self.total_steps)[1]
        if self.importance == "taylor" and (self.step < last or self.pending):
            self._accumulate_taylor()
        if self.group_sparsity > 0 and self.step < last:
            self._regularize()

    # -- checkpoint
    def state_dict(self) -> dict:
        s = super().state_dict()
        s["taylor_count"] = self._taylor_count
        return s

    def extra_tensors(self) -> dict:
        return {"taylor": self._taylor} if self._taylor is not None else {}

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        super().load_state_dict(state, tensors)
        self._taylor_count = int(state.get("taylor_count", 0))

    def load_extra_tensors(self, tensors: dict) -> None:
        self._taylor = tensors["taylor"].to(torch.float64) if "taylor" in tensors else None
