"""UPDPCallback: progressive UPDP inside ``transformers.Trainer``, on the callback protocol of
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
* ``on_log``: ``prune/lambda`` and ``prune/blocks``.
* ``on_save`` / resume: ``hf_prune_state.json`` holds the chosen block paths, lambda and the step;
  lambda is also in the model's state dict (extra state of each wrapper).
* ``on_train_end``: lambda is forced to 1 if training stopped early (with a warning: the merged model
  then differs from the trained one), the chosen blocks are merged exactly
  (:meth:`~hf_prune.methods.updp.depth.UPDPAnnealer.merge_all`), idle wrappers are removed, and the
  record and structure spec (with ``merged_blocks``) are written onto the model.

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

from ...core.inputs import model_device, to_device
from ...errors import ConfigError, PruningError
from ...trainer.callback import PruningCallback
from ...trainer.state import example_inputs_from_dataloader
from .config import UPDPConfig
from .depth import (UPDPAnnealer, anneal, annealed_blocks, calibrate, find_blocks, macs_of, resolve_blocks,
                    select_blocks, set_lambda, stripped_copy, unwrap_block)

logger = logging.getLogger(__name__)

__all__ = ["UPDPCallback", "UPDPSupernetCallback"]


class UPDPCallback(PruningCallback):
    """Progressive UPDP depth pruning during ``Trainer.train()``; merges the chosen blocks at the end.

    ``UPDPCallback(config=None, *, example_inputs=None, **fields)`` with a :class:`UPDPConfig` or its
    fields: ``num_blocks`` / ``blocks`` / ``target_macs`` (which blocks), ``anneal_start``, ``anneal_end``,
    ``schedule`` (λ's window and shape), ``end_act`` (default: the paper's activation after the residual
    sum), ``merge_at_end``. ``example_inputs`` (default: the first training items) feed the block proxy
    and the BatchNorm calibration.
    """

    config_class = UPDPConfig
    needs_example_inputs = False  # only to choose blocks by the proxy (given blocks need none)

    def __init__(self, config=None, *, example_inputs=None, **fields):
        super().__init__(config, example_inputs=example_inputs, **fields)
        self._prewrapped = None

    @property
    def end_act(self) -> bool:
        return True if self.config.end_act is None else bool(self.config.end_act)

    def _reset(self) -> None:
        super()._reset()
        self.annealer: UPDPAnnealer | None = None
        self.idle: list = []
        self._late_params: list = []
        self._macs_inputs = None

    # ------------------------------------------------------------------ protocol
    def wrap(self, model: nn.Module) -> None:
        """Wrap every candidate block (λ = 0: the model computes exactly what it did) before the optimizer."""
        if self._prewrapped is model:
            return
        blocks = list(self.config.blocks) if self.config.blocks is not None else None
        refs = resolve_blocks(model, blocks) if blocks is not None else find_blocks(model)
        if not refs:
            raise ConfigError(f"{type(model).__name__} has no block UPDP can merge")
        anneal(model, refs, end_act=self.end_act)
        self._prewrapped = model

    def prepare(self, model: nn.Module, example_inputs) -> None:
        """Choose and calibrate the blocks to prune (wrapping them if that was not done yet).

        Plain loops: call ``wrap(model)`` (or this) before building the optimizer, so that it holds the
        new BN parameters (or add ``self.annealer.parameters()``).
        """
        c = self.config
        # sharded training: ``model`` is the full-shape copy of the model wrapped before sharding
        prewrapped = self._prewrapped is model or (self.sharded and self._prewrapped is self.trained_model)
        if not prewrapped or not annealed_blocks(model):
            self._prewrapped = None
            self.wrap(model)
            self._late_params = [p for _, w in annealed_blocks(model) for p in w.parameters()
                                 if not any(p is q for q in w.block.parameters())]
        wrappers = dict(annealed_blocks(model))
        base = stripped_copy(model)
        blocks = list(c.blocks) if c.blocks is not None else None
        try:  # an unreachable target fails now, before any training step, with the model as it was
            refs, how, info = select_blocks(base, example_inputs, blocks, c.num_blocks, c.target_macs,
                                            copy_model=False)
        except PruningError as exc:
            for w in wrappers.values():
                unwrap_block(model, w)
            self._prewrapped = None
            raise ConfigError(str(exc)) from None
        del base
        chosen = []
        for r in refs:
            w = wrappers.get(r.path)
            if w is None:
                raise PruningError(f"block '{r.path}' was not wrapped at Trainer init; pass the same blocks")
            w.ref = r
            chosen.append(w)
        self.idle = [w for p, w in wrappers.items() if all(w is not ch for ch in chosen)]
        set_lambda(self.idle, 0.0)
        if example_inputs is not None:
            calibrate(model, [example_inputs], chosen)
        self._macs_inputs = example_inputs
        self.annealer = UPDPAnnealer.from_blocks(model, chosen, c.anneal_start, c.anneal_end,
                                                 total_steps=self.total_steps, schedule=c.schedule, selection=how,
                                                 info=info)
        logger.info("hf_prune: UPDP prunes %d blocks (%s): %s", len(chosen), how, [r.path for r in refs])

    def plan(self, step: int):
        return step  # λ follows the step every step

    def apply(self, step: int, target) -> None:
        self.annealer.total_steps = self.total_steps
        self.annealer.step(step)

    def stats(self) -> dict:
        return {"lambda": float(self.annealer.lam) if self.annealer else 0.0,
                "blocks": len(self.annealer.blocks) if self.annealer else 0}

    def state_dict(self) -> dict:
        return {"lambda": self.annealer.lam, "blocks": [w.ref.path for w in self.annealer.blocks]}

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        wrappers = dict(annealed_blocks(self.model))
        paths = list(state["blocks"])
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
        self.annealer.set_lambda(float(state["lambda"]))

    def finalize(self) -> dict | None:
        """Merge the pruned blocks (forcing λ = 1 if training stopped early) and drop idle wrappers."""
        if not self.config.merge_at_end:
            return None
        lam = self.annealer.lam
        if lam < 1.0:
            warnings.warn(f"UPDP: training ended at lambda={lam:.3f} < 1; forcing lambda=1 before merging, so the "
                          "merged model differs from the trained one (let anneal_end come before the end of "
                          "training, or fine-tune after merging)", stacklevel=3)
        entries = self.annealer.merge_all(force=True)
        for w in self.idle:
            unwrap_block(self.model, w)
        self.idle = []
        stats = {"merged_blocks": len(entries), "params_after": sum(p.numel() for p in self.model.parameters())}
        if self._macs_inputs is not None:
            stats["macs_after"] = macs_of(self.model, self._macs_inputs)
        return stats

    # ------------------------------------------------------------------ Trainer events
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
