"""Staged progressive fine-tuning: train (masks) → compact → new optimizer → train (masks) → …

Shapes never change inside a training run. Each stage trains the model with a fresh pruning
callback that grows masks to the stage's target (relative to the **original** dense model); after
the stage's ``train_fn`` returns, the model is compacted, and the next stage's ``train_fn`` builds a
new optimizer, LR scheduler and (for accelerate / DDP) a new prepared wrapper around the smaller
model. With ``transformers`` that means a new ``Trainer`` per stage::

    def train_fn(model, stage):
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[stage.callback]).train()

    model = staged_finetune(model, [0.8, 0.65, 0.5], train_fn)       # target_macs per stage

and with a plain accelerate loop::

    def train_fn(model, stage):
        accelerator = Accelerator()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)          # rebuilt: shapes changed
        wrapped, opt, loader = accelerator.prepare(model, opt, train_loader)
        cb = stage.callback
        cb.setup(model, total_steps=steps, example_inputs=x)
        for step, batch in zip(range(steps), loader):
            cb.step_begin(step)
            accelerator.backward(loss_of(wrapped, batch))
            cb.pre_optimizer_step(); opt.step(); opt.zero_grad(); cb.optimizer_step()
        accelerator.free_memory()                                       # drop the stale wrapper

A stage is a number (the target, of the kind given by ``target=``) or a dict of
:class:`~hf_prune.methods.depgraph.callback.DepGraphCallback` arguments for that stage (e.g.
``{"target_macs": 0.5, "schedule": "cubic", "end": 0.5}``). By default each stage prunes one-shot at
its first step and then fine-tunes with fixed masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..engine.masks import get_mask
from ..errors import PruningError
from .callback import PruningCallback

__all__ = ["Stage", "staged_finetune", "stage_targets"]


@dataclass
class Stage:
    """What ``train_fn`` receives for one stage."""

    index: int
    target: dict  # {"target_macs": x} or {"sparsity": x}, relative to the original dense model
    callback: PruningCallback  # add it to the Trainer, or drive it from a plain loop
    num_stages: int = 1
    stats: dict = field(default_factory=dict)  # filled after the stage (MACs/params ratios, after compaction)

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def stage_targets(stages, target: str = "target_macs") -> list[dict]:
    """Normalise ``stages`` to a list of callback-argument dicts, checking that amounts only grow."""
    if target not in ("target_macs", "sparsity"):
        raise ValueError(f"target={target!r} must be 'target_macs' or 'sparsity'")
    if isinstance(stages, (int, float)) or not len(stages):
        raise ValueError(f"stages={stages!r} must be a non-empty list of targets, e.g. [0.8, 0.6, 0.5]")
    out, last_amount = [], 0.0
    for i, s in enumerate(stages):
        spec = dict(s) if isinstance(s, dict) else {target: s}
        kinds = [k for k in ("target_macs", "sparsity") if spec.get(k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"stages[{i}]={s!r} must give exactly one of target_macs / sparsity")
        value = spec[kinds[0]]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"stages[{i}]: {kinds[0]}={value!r} must be a number")
        amount = 1.0 - value if kinds[0] == "target_macs" else value
        if amount < last_amount - 1e-12:
            raise ValueError(f"stages[{i}]: {kinds[0]}={value} prunes less than the stage before; masks only grow, "
                             "so give targets that prune more at every stage (e.g. target_macs 0.8, 0.6, 0.5)")
        last_amount = amount
        out.append(spec)
    return out


def staged_finetune(model: nn.Module, stages, train_fn: Callable, *, target: str = "target_macs",
                    callback_cls: type | None = None, example_inputs=None,
                    on_stage_end: Callable | None = None, **callback_kwargs) -> nn.Module:
    """Prune ``model`` progressively over ``stages``, compacting between them; returns the final model.

    ``train_fn(model, stage)`` trains ``model`` for one stage with ``stage.callback`` (a
    ``callback_cls`` built from ``callback_kwargs`` and the stage's entry; default schedule
    ``"oneshot"`` at step 0) and builds its own optimizer/scheduler/wrapper; it may return the model
    (e.g. after ``accelerator.unwrap_model``), otherwise the model passed in is used. The callback
    does not compact inside ``train_fn``; this function compacts after it returns, then calls
    ``on_stage_end(stage)`` (``stage.stats`` holds MACs/params ratios of the original model).
    """
    if not isinstance(model, nn.Module):
        raise PruningError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    if not callable(train_fn):
        raise ValueError(f"train_fn={train_fn!r} must be a callable train_fn(model, stage)")
    if get_mask(model) is not None:
        raise PruningError("the model already carries masks; call hf_prune.compact(model) first")
    if callback_cls is None:
        from ..methods.depgraph.callback import DepGraphCallback as callback_cls
    specs = stage_targets(stages, target)
    callback_kwargs.setdefault("schedule", "oneshot")
    callback_kwargs.setdefault("start", 0)
    reference = None
    for i, spec in enumerate(specs):
        kwargs = {**callback_kwargs, **spec, "compact_at_end": False, "reference": reference}
        if example_inputs is not None:
            kwargs.setdefault("example_inputs", example_inputs)
        cb = callback_cls(**kwargs)
        kind = "target_macs" if spec.get("target_macs") is not None else "sparsity"
        stage = Stage(index=i, target={kind: spec[kind]}, callback=cb, num_stages=len(specs))
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        result = train_fn(model, stage)
        if isinstance(result, nn.Module):
            model = result
        if not cb.ready or cb.model is not model:
            raise PruningError(f"stage {i}: train_fn did not train this model with stage.callback (add it to the "
                               "Trainer's callbacks, or call callback.setup(model, total_steps, example_inputs) and "
                               "the step hooks in a plain loop)")
        after = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if after != shapes:
            raise PruningError(f"stage {i}: parameter shapes changed inside train_fn; shapes may only change between "
                               "stages (let staged_finetune compact)")
        if reference is None:
            reference = cb.current_counts()
        cb.config = cb.config.replace(compact_at_end=True)
        cb.finish()  # records final masks/stats, compacts, leaves the structure spec on model.config
        stage.stats = {k: cb.final_stats[k] for k in ("macs", "params", "macs_ratio", "params_ratio")}
        if on_stage_end is not None:
            on_stage_end(stage)
    return model
