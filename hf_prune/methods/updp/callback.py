"""UPDPCallback: progressive UPDP inside ``transformers.Trainer``, built on
:class:`hf_prune.trainer.callback.PruningCallback`.

Event flow (step ``t`` = optimizer steps done, ``T`` = ``state.max_steps``):

* ``on_init_end`` (when the callback is passed to ``Trainer(callbacks=[...])``): every candidate block
  (or the given ``blocks``) is wrapped in an :class:`~hf_prune.methods.updp.blocks.AnnealedBlock` at
  ``lam = 0`` — the model computes exactly what it did — *before* the Trainer builds the optimizer
  and DDP, so the new BN parameters are trained and synchronised like any other.
* ``on_train_begin``: the blocks to prune are chosen (``blocks`` as given; otherwise the proxy of
  :func:`hf_prune.methods.updp.depth.score_blocks` on ``example_inputs`` or the first training items, on a
  copy of the model), their new BNs are calibrated; the other wrappers stay at ``lam = 0`` (plain
  forwards of the original blocks) and are removed at the end. If the callback was added after the
  Trainer was built, blocks are wrapped here and the new parameters are added to the optimizer as an
  extra parameter group (not synchronised by an already-built DDP wrapper: a warning says so).
* ``on_step_begin``: ``lam = Annealing(anneal_start, anneal_end, schedule).value(t, T)`` on the chosen
  blocks (0 before ``anneal_start``, 1 from ``anneal_end``; fractions of training or absolute steps).
* ``on_log``: ``updp/lambda`` and ``updp/blocks``.
* ``on_save`` / resume: ``hf_prune_state.json`` holds the chosen block paths, lambda and the step;
  lambda is also in the model's state dict (extra state of each wrapper).
* ``on_train_end``: lambda is forced to 1 if training stopped early (with a warning: the merged model
  then differs from the trained one), the chosen blocks are merged exactly
  (:meth:`~hf_prune.methods.updp.depth.UPDPAnnealer.merge_all`), idle wrappers are removed, and
  :attr:`UPDPCallback.record` holds the merged-block entries (for the structure spec's
  ``merged_blocks``).

:class:`UPDPSupernetCallback` (at the end) is UPDP's stage 1 in the Trainer: it trains the depth supernet
of :mod:`hf_prune.methods.updp.search`, one sampled subnet per optimizer step.

Defaults: ``UPDPCallback()`` prunes a quarter of the candidate blocks (at least one), chosen by the
output-change proxy on the first training items; lambda goes linearly from 0 at the start of training
to 1 at 80% of it, so the last 20% of the steps train the exact mergeable form; a new activation is
added after the residual sum of the pruned blocks (the paper's "BN + activation kept at the end").
"""
from __future__ import annotations

import logging
import warnings

from torch import nn
from transformers import TrainerCallback

from ...trainer.callback import STATE_VERSION, PruningCallback, example_inputs_from_dataloader
from ...errors import PruningError
from ...core.inputs import model_device, to_device
from ...core.schedules import Annealing
from .depth import (UPDPAnnealer, _resolve, _select, anneal, annealed_blocks, calibrate, find_blocks, set_lambda,
                    stripped_copy, unwrap_block)

logger = logging.getLogger(__name__)

__all__ = ["UPDPCallback", "UPDPSupernetCallback"]


class UPDPCallback(PruningCallback):
    """Progressive UPDP depth pruning during ``Trainer.train()``; merges the chosen blocks at the end.

    Args:
        num_blocks: number of blocks to prune, chosen by the output-change proxy.
        blocks: explicit blocks (indices into :func:`~hf_prune.methods.updp.depth.find_blocks`, or module paths).
        target_macs: fraction of dense MACs to keep; blocks chosen greedily by output change per MAC.
            At most one of ``num_blocks`` / ``blocks`` / ``target_macs``; none: a quarter of the blocks.
        anneal_start, anneal_end: where lambda starts rising and reaches 1 (fractions of training as
            float, or optimizer steps as int).
        schedule: ``"linear"`` or ``"cosine"``.
        example_inputs: batch for the proxy and the BN calibration (default: first training items).
        end_act: add the activation after the residual sum (paper); ResNet keeps its own either way.
        merge_at_end: merge in ``on_train_end`` (else leave the annealed wrappers; merge later with
            :meth:`finish`).
    """

    method = "updp"

    def __init__(self, num_blocks: int | None = None, blocks=None, target_macs: float | None = None,
                 anneal_start: float | int = 0.0, anneal_end: float | int = 0.8, *, schedule: str = "linear",
                 example_inputs=None, end_act: bool = True, merge_at_end: bool = True):
        self._annealing = Annealing(anneal_start, anneal_end, schedule)  # validates
        if sum(a is not None for a in (num_blocks, blocks, target_macs)) > 1:
            raise ValueError("give at most one of num_blocks=, blocks= and target_macs=")
        if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int)
                                       or num_blocks < 1):
            raise ValueError(f"num_blocks={num_blocks!r} must be a positive int")
        if target_macs is not None and (isinstance(target_macs, bool) or not isinstance(target_macs, (int, float))
                                        or not 0 < target_macs <= 1):
            raise ValueError(f"target_macs={target_macs!r} must be in (0, 1]: the fraction of dense MACs to keep")
        self.num_blocks, self.blocks, self.target_macs = num_blocks, (list(blocks) if blocks is not None else None), \
            target_macs
        self.example_inputs = example_inputs
        self.end_act = bool(end_act)
        self.compact_at_end = bool(merge_at_end)
        self.reference = None
        self._prewrapped = None
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self.annealer: UPDPAnnealer | None = None
        self.idle: list = []
        self.record: dict | None = None
        self._late_params: list = []

    @property
    def settings(self) -> dict:
        a = self._annealing
        return {"method": self.method, "num_blocks": self.num_blocks, "target_macs": self.target_macs,
                "blocks": self.blocks, "anneal_start": a.start, "anneal_end": a.end, "schedule": a.shape,
                "end_act": self.end_act}

    # ------------------------------------------------------------------ wrapping
    def _prewrap(self, model: nn.Module) -> None:
        refs = _resolve(model, self.blocks) if self.blocks is not None else find_blocks(model)
        if not refs:
            raise PruningError(f"{type(model).__name__} has no block UPDP can merge")
        anneal(model, refs, end_act=self.end_act)
        self._prewrapped = model

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self._prewrapped is None:
            self._prewrap(model)

    # ------------------------------------------------------------------ plain-loop API
    def setup(self, model: nn.Module, total_steps: int, example_inputs=None) -> None:
        """Choose and calibrate the blocks to prune (wrapping them if not done yet) for ``total_steps``.

        Plain loops: call ``on_init_end(None, None, None, model=model)`` or this before building the
        optimizer, so that it holds the new BN parameters (or add ``self.annealer.parameters()``).
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r} must be a positive int (the number of optimizer steps)")
        if self.annealer is not None and self.model is model and not self.finished:
            self.total_steps = total_steps
            self.annealer.total_steps = total_steps
            return
        prewrapped = self._prewrapped
        self._reset()
        inputs = example_inputs if example_inputs is not None else self.example_inputs
        if inputs is not None:
            inputs = to_device(inputs, model_device(model))
        if prewrapped is not model or not annealed_blocks(model):
            self._prewrap(model)
            self._late_params = [p for _, w in annealed_blocks(model) for p in w.parameters()
                                 if not any(p is q for q in w.block.parameters())]
        wrappers = dict(annealed_blocks(model))
        base = stripped_copy(model)
        refs, how, info = _select(base, inputs, self.blocks, self.num_blocks, self.target_macs, copy_model=False)
        del base
        chosen = []
        for r in refs:
            w = wrappers.get(r.path)
            if w is None:
                raise PruningError(f"block '{r.path}' was not wrapped at Trainer init; pass the same blocks")
            w.ref = r
            chosen.append(w)
        self.idle = [w for p, w in wrappers.items() if all(w is not c for c in chosen)]
        set_lambda(self.idle, 0.0)
        if inputs is not None:
            calibrate(model, [inputs], chosen)
        a = self._annealing
        self.annealer = UPDPAnnealer.from_blocks(model, chosen, a.start, a.end, total_steps=total_steps,
                                                 schedule=a.shape, selection=how, info=info)
        self.pruner = self.annealer  # the base class's "set up" marker
        self.model, self.total_steps = model, total_steps
        logger.info("hf_prune: UPDP prunes %d blocks (%s): %s", len(chosen), how, [r.path for r in refs])

    def step_begin(self, step: int) -> bool:
        self._require_setup()
        self.step = step
        if not self.finished:
            self.annealer.step(step)
        return False

    def pre_optimizer_step(self) -> None:
        pass

    def optimizer_step(self) -> None:
        pass

    def finish(self) -> nn.Module | None:
        """Merge the pruned blocks (forcing lambda = 1 if training stopped early) and drop idle wrappers."""
        if self.annealer is None or self.finished:
            return self.model
        lam = self.annealer.lam
        if lam < 1.0:
            warnings.warn(f"UPDP: training ended at lambda={lam:.3f} < 1; forcing lambda=1 before merging, so the "
                          "merged model differs from the trained one (let anneal_end come before the end of "
                          "training, or fine-tune after merging)", stacklevel=2)
        entries = self.annealer.merge_all(force=True)
        for w in self.idle:
            unwrap_block(self.model, w)
        self.idle = []
        self.record = {"method": self.method, "merged_blocks": entries, "removed_blocks": [],
                       "selection": self.annealer.selection, "settings": self.settings}
        self.finished = True
        return self.model

    # ------------------------------------------------------------------ stats, logs, state
    def stats(self) -> dict:
        return {"lambda": self.annealer.lam if self.annealer else 0.0,
                "blocks": len(self.annealer.blocks) if self.annealer else 0}

    def log_entries(self) -> dict:
        if self.annealer is None:
            return {}
        return {"updp/lambda": round(float(self.annealer.lam), 6), "updp/blocks": len(self.annealer.blocks)}

    def state_dict(self) -> dict:
        self._require_setup()
        return {"format_version": STATE_VERSION, "callback": type(self).__name__, "settings": self.settings,
                "total_steps": self.total_steps, "global_step": self.step, "lambda": self.annealer.lam,
                "blocks": [w.ref.path for w in self.annealer.blocks]}

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        self._require_setup()
        if state.get("format_version") != STATE_VERSION:
            raise PruningError(f"UPDP state has format_version {state.get('format_version')!r}; expected "
                               f"{STATE_VERSION}")
        wrappers = dict(annealed_blocks(self.model))
        paths = list(state.get("blocks", []))
        missing = [p for p in paths if p not in wrappers]
        if missing:
            raise PruningError(f"the checkpoint anneals blocks {missing} that are not wrapped in this model")
        current = [w.ref.path for w in self.annealer.blocks]
        if paths != current:
            warnings.warn(f"resuming with the checkpoint's UPDP blocks {paths} instead of {current}", stacklevel=3)
            cands = {r.path: r for r in find_blocks(stripped_copy(self.model))}
            chosen = []
            for p in paths:
                wrappers[p].ref = cands[p]
                chosen.append(wrappers[p])
            self.idle = [w for p, w in wrappers.items() if p not in paths]
            set_lambda(self.idle, 0.0)
            self.annealer.blocks = chosen
        self.step = int(state.get("global_step", 0))
        self.annealer.set_lambda(float(state.get("lambda", 0.0)))

    def _attach_spec(self) -> None:  # merged blocks need the spec's merged_blocks support (not here)
        pass

    # ------------------------------------------------------------------ Trainer events
    def on_train_end(self, args, state, control, **kwargs):
        if self.annealer is None or self.finished or not self.compact_at_end:
            return
        self.finish()

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, train_dataloader=train_dataloader, **kwargs)
        if self._late_params:
            if optimizer is not None:
                group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
                optimizer.add_param_group({**group, "params": self._late_params})
            warnings.warn("UPDPCallback was added after the Trainer was built: the new BN parameters were added to "
                          "the optimizer as an extra group (no learning-rate schedule; not synchronised by DDP). "
                          "Pass the callback to Trainer(callbacks=[...]) instead.", stacklevel=2)
            self._late_params = []


class UPDPSupernetCallback(TrainerCallback):
    """UPDP stage 1 inside ``transformers.Trainer``: train the depth supernet, one sampled subnet per step.

    ``on_init_end`` wraps the candidate blocks in a :class:`~hf_prune.methods.updp.search.DepthSupernet`
    (before the optimizer, so the new BNs are trained); ``on_train_begin`` calibrates the new BNs on
    ``example_inputs`` or the first training items (not when resuming: that would overwrite trained BNs);
    ``on_step_begin`` sets the subnet of optimizer step ``t`` from
    ``SubnetSampler(n, seed=seed, num_blocks=num_blocks, prob=prob)(t)`` — a function of ``(seed, t)``
    only, so every DDP rank runs the same subnet (DDP needs ``find_unused_parameters=True``, the
    Trainer's default). Training ends at choice ``()``; the supernet stays wrapped for
    :func:`~hf_prune.methods.updp.search.search` (``callback.supernet``), then
    :meth:`~hf_prune.methods.updp.search.DepthSupernet.restore` unwraps it. No distillation here (a callback
    cannot change the loss; :func:`~hf_prune.methods.updp.search.train_supernet` has it).
    """

    def __init__(self, blocks=None, *, num_blocks: int | None = None, prob: float = 0.5, seed: int | None = None,
                 example_inputs=None, end_act: bool = True):
        self.blocks, self.num_blocks, self.prob, self.seed = blocks, num_blocks, prob, seed
        self.example_inputs, self.end_act = example_inputs, end_act
        self.supernet = None
        self.sampler = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        from .search import DepthSupernet

        if model is not None and self.supernet is None:
            self.supernet = DepthSupernet(model, self.blocks, end_act=self.end_act)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        from .search import SubnetSampler

        if self.supernet is None or self.supernet.model is not model:
            raise PruningError("UPDPSupernetCallback must be passed to Trainer(callbacks=[...]) so that the supernet "
                               "is built before the optimizer")
        if state.global_step == 0:
            inputs = self.example_inputs
            if inputs is None:
                inputs = example_inputs_from_dataloader(train_dataloader, n=8,
                                                        label_names=getattr(args, "label_names", None))
            self.supernet.calibrate([to_device(inputs, model_device(model))])
        seed = self.seed if self.seed is not None else int(getattr(args, "seed", 0))
        self.sampler = SubnetSampler(self.supernet.num_candidates, seed=seed, num_blocks=self.num_blocks,
                                     prob=self.prob)

    def on_step_begin(self, args, state, control, **kwargs):
        self.supernet.set_choice(self.sampler(state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.supernet is not None:
            logs["updp/supernet_pruned"] = len(self.supernet.choice)

    def on_train_end(self, args, state, control, **kwargs):
        if self.supernet is not None:
            self.supernet.set_choice(())
