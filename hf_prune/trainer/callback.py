"""The one callback base: :class:`PruningCallback` drives every method inside ``transformers.Trainer``
(and in plain loops), and :class:`ScheduledPruningCallback` adds sparsity schedules.

Principle: **masks while training, surgery at the boundary.** Inside ``trainer.train()`` a method
keeps the model's shapes (masks, annealed wrappers, width masks), so the optimizer, DDP and
checkpoints stay valid; physical removal or merging happens in :meth:`PruningCallback.finalize`,
when training is over. The base then writes the method record and structure spec onto the model
(:func:`hf_prune.core.record.write_record`), so ``trainer.save_model``, ``model.save_pretrained``,
``Trainer.push_to_hub`` and ``hf_prune.save_pretrained`` all write a checkpoint that
``hf_prune.AutoPrunedModel`` reloads exactly.

**The protocol** a method implements (each a no-op unless said otherwise):

* ``wrap(model)`` — before the optimizer exists (``on_init_end``): add the parameters the method
  trains (UPDP's annealing BNs) or copy a teacher (SP).
* ``prepare(model, example_inputs)`` — required: build the method's state for ``self.total_steps``
  optimizer steps and check the target against what this model can reach (an unreachable target
  fails here, before any training step).
* ``plan(step) -> target | None`` and ``apply(step, target)`` — what the schedule asks for at a step,
  and carrying it out (growing masks, setting an annealing coefficient, drawing subnets).
* ``gradients()`` — after backward and clipping, before ``optimizer.step`` (Taylor scores, sparse
  learning, which adds to ``.grad`` or, decoupled, shrinks the weights by the learning rate of
  ``self.optimizer``: the optimizer the Trainer passes, or the one given to ``pre_optimizer_step``).
* ``enforce()`` — after every optimizer step (re-zero masked weights).
* ``stats() -> dict`` — numbers logged as ``prune/<name>``.
* ``state_dict()`` / ``load_state_dict(state, tensors)`` — the method's JSON state in checkpoints
  (``extra_tensors()`` for tensors).
* ``finalize() -> dict`` — compact / merge / extract; returns the stats recorded with the model.

**Event flow** in a Trainer (step ``t`` = ``state.global_step`` = optimizer steps done):
``on_init_end`` → ``wrap``; ``on_train_begin`` → ``prepare`` (example inputs are taken from the first
training items when not given), then on resume the state in ``checkpoint-<t>/hf_prune_state.json``;
``on_step_begin`` → ``plan``/``apply``; ``on_pre_optimizer_step`` → ``gradients``; ``on_optimizer_step``
→ ``enforce``; ``on_log`` adds ``prune/*``; ``on_save`` writes the state; ``on_train_end`` →
``finalize`` and the record; ``on_push_begin`` makes the card ``Trainer.push_to_hub`` writes hf_prune's
(:func:`use_pruning_card`).

**Plain loops** (accelerate, no Trainer) call the same machinery::

    cb = DepGraphCallback(target_macs=0.5)
    cb.setup(accelerator.unwrap_model(model), total_steps=N, example_inputs=x)
    for step, batch in enumerate(loader):
        cb.step_begin(step)            # prunes on schedule
        accelerator.backward(loss(model, batch))
        cb.pre_optimizer_step(optimizer)  # gradients(): Taylor / sparse learning (the optimizer: its lr)
        optimizer.step(); optimizer.zero_grad()
        cb.optimizer_step()            # enforce(): re-apply masks
    cb.finish()                        # finalize() + record

**Distributed.** Every process runs the same callback on its own replica; methods make the inputs of
each decision identical with :mod:`hf_prune.core.distributed` and check the outcome across ranks.

**Sharded parameters (FSDP2).** When the trained model's parameters are ``DTensor`` shards
(``torch.distributed.fsdp.fully_shard``), the method plans on a *full-shape copy*: ``self.model`` is that
copy (taken on the meta device by :meth:`PruningCallback.before_sharding` — before ``fully_shard`` — and
filled once in :meth:`setup` by gathering the shards), ``self.trained_model`` the sharded model being
trained. Tracing, allocation, the compaction checks and, at :meth:`finish`, compaction / merging run on
the copy, refreshed from the shards (:func:`~hf_prune.core.distributed.gather_full_`); scores are
computed per shard and summed across ranks, and masks and gradient edits are applied to each rank's
local shards (:mod:`hf_prune.core.distributed`). What :meth:`prepare` changes on the copy (BatchNorm
calibration) is written back to the shards, and module extra state (UPDP's annealing coefficient) is
copied to the trained model after every :meth:`apply`. The order in a plain loop::

    cb.before_sharding(model)          # wrap() (UPDP adds its BNs) + the full-shape copy, before fully_shard
    for block in blocks: fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters())
    cb.setup(model, total_steps=N, example_inputs=x)   # gathers the full weights once, traces the copy
    ...                                # the loop above, unchanged
    pruned = cb.finish()               # every rank: gather, compact / merge; a plain full model
    if dist.get_rank() == 0: hf_prune.save_pretrained(pruned, "out")

With a Trainer (accelerate's FSDP2), ``on_init_end`` runs before accelerate shards the model, so the
copy is taken there when FSDP is configured; at the end rank 0 writes the pruned model to
``<output_dir>/pruned``. The trained model keeps the record too, so ``trainer.save_model()`` of the
sharded (masked, unmerged) model gives a checkpoint that loads exactly (weight methods) or is refused
(a structure that was compacted or merged), never a silently different model.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import TrainerCallback

from ..config import PruningConfig
from ..core.checks import check_int
from ..core.distributed import broadcast_, check_shardable, copy_extra_state, gather_full_, has_sharded_parameters, \
    is_main_process, meta_copy, scatter_full_, unwrap
from ..core.inputs import model_device, to_device
from ..core.record import copy_record, write_record
from ..core.schedules import SparsitySchedule, target_from_amount
from ..errors import PruningError
from .state import STATE_NAME, STATE_VERSION, example_inputs_from_dataloader, read_state, \
    reload_checkpoint_weights, write_state

logger = logging.getLogger(__name__)

__all__ = ["PruningCallback", "ScheduledPruningCallback", "use_pruning_card"]


def _calling_instance(cls: type, limit: int = 10):
    """The nearest ``self`` of type ``cls`` among the calling frames (the Trainer, its CallbackHandler), or None."""
    frame = sys._getframe(2)
    for _ in range(limit):
        if frame is None:
            return None
        found = frame.f_locals.get("self")
        if isinstance(found, cls):
            return found
        frame = frame.f_back
    return None


def _first(value):
    """The first of the Trainer's card arguments that may be lists (the card names one dataset)."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


def use_pruning_card(trainer) -> None:
    """Make ``trainer.create_model_card`` write hf_prune's model card for a pruned model.

    ``Trainer.push_to_hub`` saves the model, writes ``README.md`` with ``create_model_card`` and uploads
    ``output_dir``. Once the model carries its structure spec (the callback has finished), the card
    written there is hf_prune's (:func:`hf_prune.hub.card.write_model_card`): what was pruned and how, how
    to load it with ``AutoPrunedModel``, and the metrics of the Trainer's last evaluation. The
    ``create_model_card`` arguments still apply (``dataset``/``dataset_tags``/``dataset_args`` name the
    dataset of those metrics, ``finetuned_from`` the base model; ``tags``, ``license``, ``language``). Before
    that, and for models without a spec, the Trainer's own card is written. Only this Trainer instance is
    changed, once.
    """
    own = trainer.create_model_card
    if getattr(own, "hf_prune_card", False):
        return

    def create_model_card(language=None, license=None, tags=None, model_name=None, finetuned_from=None, tasks=None,
                          dataset_tags=None, dataset=None, dataset_args=None, **kwargs):
        model = unwrap(trainer.model)
        if not isinstance(getattr(getattr(model, "config", None), "hf_prune", None), dict):
            return own(language=language, license=license, tags=tags, model_name=model_name,
                       finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
                       dataset_args=dataset_args, **kwargs)
        if not trainer.is_world_process_zero():
            return None
        from ..hub.card import trainer_metrics, write_model_card

        card_data = {k: v for k, v in (("language", language), ("license", license)) if v}
        if tags:
            card_data["tags"] = [tags] if isinstance(tags, str) else list(tags)
        if dataset or dataset_tags:
            card_data["dataset"] = {k: v for k, v in (("name", _first(dataset)), ("type", _first(dataset_tags)),
                                                      ("config", _first(dataset_args))) if v}
        write_model_card(model, trainer.args.output_dir, metrics=trainer_metrics(trainer.state.log_history),
                         repo_id=getattr(trainer, "hub_model_id", None), card_data=card_data,
                         base_model=_first(finetuned_from))
        return None

    create_model_card.hf_prune_card = True
    trainer.create_model_card = create_model_card


class PruningCallback(TrainerCallback):
    """Base of every method's callback (see the module docstring for the protocol).

    ``PruningCallback(config, example_inputs=None, **fields)``: ``config`` is the method's config
    (or a dict of it); keyword ``fields`` override its fields, so ``UPDPCallback(num_blocks=3)`` and
    ``UPDPCallback(UPDPConfig(num_blocks=3))`` are the same. ``example_inputs`` trace the model
    (default: the first training items).
    """

    config_class: ClassVar[type] = PruningConfig
    needs_example_inputs: ClassVar[bool] = True
    #: None, or why this method cannot train sharded (FSDP2) parameters
    sharding_unsupported: ClassVar[str | None] = None

    def __init__(self, config=None, *, example_inputs=None, **fields):
        self.config = self.config_class.build(config, **fields)
        self.example_inputs = example_inputs
        self.train_dataloader = None
        self.full_copy: nn.Module | None = None  # taken by before_sharding()
        self.optimizer = None  # the training optimizer, once the Trainer or the loop has passed it
        self._reset()

    def _reset(self) -> None:
        self.model: nn.Module | None = None  # what the method plans on (the full-shape copy when sharded)
        self.trained_model: nn.Module | None = None  # what the optimizer trains
        self.sharded = False
        self.total_steps: int | None = None
        self.step = 0
        self.ready = False
        self.finished = False
        self.record: dict | None = None

    @property
    def method(self) -> str:
        return self.config.method

    # ------------------------------------------------------------------ the protocol
    def wrap(self, model: nn.Module) -> None:
        """Before the optimizer exists: add what the method trains."""

    def prepare(self, model: nn.Module, example_inputs) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement prepare(model, example_inputs)")

    def plan(self, step: int):
        return None

    def apply(self, step: int, target) -> None:
        pass

    def gradients(self) -> None:
        pass

    def enforce(self) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def extra_tensors(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        pass

    def finalize(self) -> dict:
        return {}

    # ------------------------------------------------------------------ plain-loop driver
    def before_sharding(self, model: nn.Module) -> nn.Module:
        """Before ``fully_shard`` (FSDP2, plain loops; a Trainer does it in ``on_init_end``): :meth:`wrap`, then
        keep a full-shape copy of the model on the meta device for planning once its parameters are sharded.
        Returns the (unwrapped) model."""
        model = unwrap(model)
        if self.sharding_unsupported:
            raise PruningError(f"{type(self).__name__} cannot train sharded (FSDP2) parameters: "
                               f"{self.sharding_unsupported}")
        check_shardable(model)
        self.wrap(model)
        self.full_copy = meta_copy(model)
        return model

    def setup(self, model: nn.Module, total_steps: int, example_inputs=None) -> None:
        """Prepare the method on ``model`` (a DDP / DataParallel wrapper is unwrapped) for ``total_steps``.

        Sharded (FSDP2) parameters need :meth:`before_sharding` first; every rank then calls this together
        (the full weights are gathered once)."""
        model = unwrap(model)
        if not isinstance(model, nn.Module):
            raise PruningError(f"model is a {type(model).__name__}, not a torch.nn.Module; pass the model being "
                               "trained (for a Trainer this happens automatically)")
        total_steps = check_int("total_steps", total_steps,
                                meaning="the number of optimizer steps; set TrainingArguments.max_steps or "
                                        "num_train_epochs")
        if self.ready and self.trained_model is model and not self.finished:
            self.total_steps = total_steps  # a further train() on the same model: keep the method's state
            return
        check_shardable(model)
        self._reset()
        sharded = has_sharded_parameters(model)
        work = self._gathered_copy(model) if sharded else model
        inputs = example_inputs if example_inputs is not None else self.example_inputs
        if inputs is None and self.needs_example_inputs:
            raise PruningError(f"{type(self).__name__} needs example_inputs to trace the model: pass "
                               "example_inputs= (e.g. {'pixel_values': torch.randn(2, 3, 224, 224)})")
        if inputs is not None:
            inputs = to_device(inputs, model_device(work))
        self.model, self.trained_model, self.sharded, self.total_steps = work, model, sharded, total_steps
        with torch.random.fork_rng(devices=[]):
            self.prepare(work, inputs)
        if sharded:  # what prepare changed on the copy (e.g. BatchNorm calibration) reaches the shards
            scatter_full_(model, work)
            copy_extra_state(work, model)
        self.ready = True

    def _gathered_copy(self, model: nn.Module) -> nn.Module:
        if self.sharding_unsupported:
            raise PruningError(f"{type(self).__name__} cannot train sharded (FSDP2) parameters: "
                               f"{self.sharding_unsupported}")
        if self.full_copy is None:
            raise PruningError(f"the model's parameters are sharded (FSDP2 DTensors), so {type(self).__name__} "
                               "plans on a full-shape copy, which must be taken before sharding: call "
                               "callback.before_sharding(model) before fully_shard (a Trainer does it when the "
                               "callback is passed to Trainer(callbacks=[...]) with FSDP configured)")
        return gather_full_(self.full_copy, model)

    def refresh(self, names=None) -> None:
        """Sharded training: update the full-shape copy (``self.model``) from the shards (all of them, or the
        tensors ``names``). A collective; a no-op without sharding."""
        if self.sharded:
            gather_full_(self.model, self.trained_model, names)

    def publish(self, names=None) -> None:
        """Sharded training: write the copy's tensors (all, or ``names``) into the shards; a no-op otherwise."""
        if self.sharded:
            scatter_full_(self.trained_model, self.model, names)

    def require_setup(self) -> None:
        if not self.ready:
            raise PruningError(f"{type(self).__name__} is not set up: it prepares in on_train_begin (Trainer) or in "
                               "setup(model, total_steps, example_inputs) (plain loops)")

    def step_begin(self, step: int):
        """Carry out what the method plans at ``step`` (optimizer steps done); returns the plan or None."""
        self.require_setup()
        self.step = int(step)
        if self.finished:
            return None
        target = self.plan(self.step)
        if target is not None:
            with torch.random.fork_rng(devices=[]):
                self.apply(self.step, target)
            if self.sharded:
                copy_extra_state(self.model, self.trained_model)
        return target

    def pre_optimizer_step(self, optimizer=None) -> None:
        """Before ``optimizer.step()`` (after backward and clipping); ``optimizer`` is remembered for methods
        that need its learning rates (a Trainer passes its own)."""
        self.require_setup()
        if optimizer is not None:
            self.optimizer = optimizer
        if not self.finished:
            self.gradients()

    def optimizer_step(self) -> None:
        if self.ready and not self.finished:
            self.enforce()

    def finish(self) -> nn.Module | None:
        """Finalize the method and write its record and structure spec onto the model."""
        if not self.ready or self.finished:
            return self.model
        self.refresh()  # sharded: the copy gets the trained weights, and the method finalizes on it
        # DDP keeps parameters in sync, but buffers (BatchNorm statistics) hold what each rank's last local
        # batch left: finalize (merge, compact, extract) from rank 0's, so every rank ends with the same model.
        broadcast_(list(self.model.buffers()))
        stats = self.finalize()
        if stats is None:  # the method left the model in its training form (e.g. compact_at_end=False)
            return self.model
        self.record = write_record(self.model, self.config, stats)
        if self.sharded:  # a later save of the sharded model then loads exactly or is refused (see above)
            copy_record(self.model, self.trained_model)
        self.finished = True
        return self.model

    def save_pruned(self, directory) -> Path | None:
        """Write the finished model with :func:`hf_prune.save_pretrained`, on the main process only."""
        if not self.finished:
            raise PruningError(f"{type(self).__name__} has not finished: call finish() first (on every rank)")
        if not is_main_process():
            return None
        from ..hub.io import save_pretrained

        return save_pretrained(self.model, directory)

    def log_entries(self) -> dict:
        if not self.ready:
            return {}
        return {f"prune/{k}": (round(float(v), 6) if isinstance(v, float) else v) for k, v in self.stats().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, directory) -> Path | None:
        """Write the method's state into ``directory`` (on the main process only; every rank may call it)."""
        self.require_setup()
        if not is_main_process():
            return None
        payload = {"format_version": STATE_VERSION, "callback": type(self).__name__, "method": self.method,
                   "config": self.config.to_dict(), "global_step": int(self.step), "total_steps": self.total_steps,
                   "state": self.state_dict()}
        return write_state(directory, payload, self.extra_tensors())

    def load_state(self, directory) -> None:
        """Restore the method's state from ``directory/hf_prune_state.json`` (after :meth:`setup`)."""
        self.require_setup()
        payload, tensors = read_state(directory, type(self).__name__)
        saved, ours = payload["config"], self.config.to_dict()
        diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if diff:
            warnings.warn(f"resuming with pruning settings that differ from {Path(directory) / STATE_NAME} in {diff}; "
                          "the restored state is kept and the new settings apply from here on", stacklevel=3)
        try:
            self.load_state_dict(payload["state"], tensors)
        except (KeyError, TypeError, ValueError) as exc:
            raise PruningError(f"{Path(directory) / STATE_NAME}: the saved state is incomplete or inconsistent "
                               f"({type(exc).__name__}: {exc}); resume from another checkpoint") from exc
        if self.sharded:
            copy_extra_state(self.model, self.trained_model)
        self.step = payload["global_step"]

    # ------------------------------------------------------------------ Trainer events
    def _run_first(self) -> None:
        """Move this callback to the front of the Trainer's callback list.

        The Trainer puts its reporting integrations (TensorBoard, W&B, MLflow, ...) before the user's
        callbacks and hands every callback the same ``logs`` dict in order, so ``prune/*`` added by a
        callback that runs last never reach them. Events are dispatched by the Trainer's
        ``CallbackHandler``, which is the caller of this event; reordering its list while it iterates is
        safe (the callbacks after this one keep their order).
        """
        from transformers.trainer_callback import CallbackHandler

        # the event method, maybe a subclass's override, then the handler's call_event
        handler = _calling_instance(CallbackHandler)
        if handler is not None and handler.callbacks[0] is not self and any(cb is self for cb in handler.callbacks):
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._run_first()
        if model is not None:
            if fsdp_requested(args):  # accelerate shards the model later, in train()
                self.before_sharding(model)
            else:
                check_shardable(unwrap(model))
                self.wrap(unwrap(model))

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._run_first()
        self.train_dataloader = train_dataloader
        model = unwrap(model)
        inputs = self.example_inputs
        if inputs is None and not (self.ready and self.trained_model is model and not self.finished):
            try:
                inputs = example_inputs_from_dataloader(train_dataloader, label_names=getattr(args, "label_names",
                                                                                               None))
            except PruningError:
                if self.needs_example_inputs:
                    raise
                inputs = None
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
            if (c / STATE_NAME).is_file():
                payload, _ = read_state(c, type(self).__name__)
                if payload["global_step"] != state.global_step:
                    continue
                if not self.sharded:  # sharded checkpoints are the Trainer's (accelerate's) to load
                    reload_checkpoint_weights(self.model, c)
                self.load_state(c)
                logger.info("hf_prune: resumed %s at step %d from %s (%s)", type(self).__name__, state.global_step,
                            c / STATE_NAME, ", ".join(f"{k}={v}" for k, v in self.stats().items()))
                return
        raise PruningError(f"resuming at step {state.global_step}, but none of {[str(c) for c in candidates]} holds "
                           f"a {STATE_NAME} for that step, so the pruning state cannot be restored and the run would "
                           "differ from the interrupted one. Set TrainingArguments.resume_from_checkpoint to the "
                           "checkpoint folder written together with this callback.")

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.pre_optimizer_step(optimizer)

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
        if not self.ready or self.finished:
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
        self.finish()
        if self.sharded and self.finished:
            path = self.save_pruned(Path(args.output_dir) / "pruned")
            if path is not None:
                logger.warning("hf_prune: the pruned model was written to %s (the Trainer's model stays sharded, "
                               "in its training form)", path)

    def on_push_begin(self, args, state, control, **kwargs):
        # Trainer.push_to_hub (the caller of this event) writes its own card after saving: make it ours.
        from transformers import Trainer

        trainer = _calling_instance(Trainer)
        if trainer is not None:
            use_pruning_card(trainer)


def fsdp_requested(args) -> bool:
    """Whether the Trainer's arguments (or accelerate's launch environment) ask for FSDP."""
    if getattr(args, "fsdp", None) or (getattr(args, "fsdp_config", None) or {}).get("version") == 2:
        return True
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


class ScheduledPruningCallback(PruningCallback):
    """A :class:`PruningCallback` whose amount pruned follows a sparsity schedule (``config.schedule``,
    ``start``, ``end``, ``frequency``, ``initial``: see :mod:`hf_prune.core.schedules`).

    Subclasses implement ``prune_to(step, {kind: target}) -> bool`` (grow the masks; True if they
    changed) and ``counts()`` (``macs_ratio``, ``params_ratio`` and their own numbers). ``ready_to_prune()``
    returning False postpones a due pruning step by one step (e.g. no gradients seen yet).
    """

    target_kind: ClassVar[str] = "sparsity"

    def _reset(self) -> None:
        super()._reset()
        self.events: list[dict] = []
        self.pending = False
        self.final_stats: dict | None = None
        self._schedule: SparsitySchedule | None = None

    def schedule_template(self) -> SparsitySchedule:
        """The schedule over the final target of the config (as written, before any conversion)."""
        return self.config.make_schedule(self.target_kind)

    def resolve_schedule(self) -> SparsitySchedule:
        """The schedule this model follows (a method may convert the config's targets)."""
        return self.schedule_template()

    @property
    def schedule(self) -> SparsitySchedule:
        if self._schedule is None:
            self._schedule = self.resolve_schedule()
        return self._schedule

    def ready_to_prune(self) -> bool:
        return True

    def plan(self, step: int):
        sched, total = self.schedule, self.total_steps
        if not (self.pending or sched.is_pruning_step(step, total)):
            return None
        if not self.ready_to_prune():
            self.pending = True
            return None
        self.pending = False
        amount = sched.amount_at(step, total)
        done = self.events[-1]["amount"] if self.events else 0.0
        if amount <= 0.0 or amount <= done:
            return None
        return {"amount": amount, sched.kind: target_from_amount(amount, sched.kind)}

    def apply(self, step: int, target) -> None:
        amount = target.pop("amount")
        changed = self.prune_to(step, target)
        s = self.counts()
        self.events.append({"step": int(step), "amount": float(amount), "target": next(iter(target.values())),
                            "changed": bool(changed), "macs_ratio": s["macs_ratio"], "params_ratio": s["params_ratio"]})
        logger.info("hf_prune: step %d: %s -> MACs %.1f%%, params %.1f%%", step, target, 100 * s["macs_ratio"],
                    100 * s["params_ratio"])

    def prune_to(self, step: int, target: dict) -> bool:
        raise NotImplementedError

    def counts(self) -> dict:
        raise NotImplementedError

    def stats(self) -> dict:
        s = self.final_stats if self.final_stats is not None else self.counts()
        out = {"macs_ratio": s["macs_ratio"], "params_ratio": s["params_ratio"], "events": len(self.events)}
        if "sparsity" in s:
            out["sparsity"] = s["sparsity"]
        if self.ready and not self.finished:
            target = self.schedule.target_at(self.step, self.total_steps)
            if target is not None:
                out["target"] = float(target)
        return out

    def state_dict(self) -> dict:
        return {"events": self.events, "pending": self.pending, "schedule": self.schedule.to_dict()}

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        self.events = list(state["events"])
        self.pending = bool(state["pending"])

    def warn_if_early(self) -> None:
        last = self.schedule.steps(self.total_steps)[1]
        if self.step <= last and self.schedule.final > 0:
            warnings.warn(f"training stopped at step {self.step}, before the schedule's last pruning step {last}: "
                          f"finalizing at {self.counts()['macs_ratio']:.1%} of the MACs", stacklevel=3)
