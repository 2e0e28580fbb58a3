"""SP in ``transformers.Trainer``: :class:`StageWiseCallback` (schedule, sandwich sampling, checkpointed
sampler state) and :class:`StageWiseTrainer` (the stage-wise distillation loss, and :meth:`search`).

The supernet itself (widths, stages, masking, BN recalibration, search, extraction) is
:mod:`hf_prune.methods.stagewise.supernet`; read its docstring for what is faithful to the paper and what is not.

Event flow (step ``t`` = optimizer steps done):

* ``on_init_end``: the model handed to the Trainer is copied and frozen as the teacher (the unpruned
  full net) — before any checkpoint is loaded, so a resumed run distils from the same net.
* ``on_train_begin``: the supernet is built on the model (traced with ``example_inputs`` or the first
  training items); on resume the unit orders (which channels are "leading") come from the
  checkpoint's ``hf_prune_state.json`` rather than from the trained weights.
* ``on_step_begin``: the subnets of step ``t`` are drawn — the largest, the smallest (sandwich rule)
  and ``num_random`` random ones — from a generator seeded with ``(seed, t)`` only, so every process
  draws the same ones (checked across ranks every step when distributed) and a resumed run draws
  what the uninterrupted run would have drawn. With ``stage_schedule="sequential"`` only the groups
  of the stage being trained vary (stage ``k`` during the ``k``-th equal share of the steps).
* ``compute_loss`` (trainer): the teacher runs once; every sampled subnet runs through the shared
  weights with its masks and adds its stage-wise loss (or, ``supervision="logits"``, its KD loss);
  one backward pass for all of them (DDP-safe).
* ``on_log``: ``prune/loss_max``, ``prune/loss_min``, ``prune/loss_random``.
* ``on_save``: ``hf_prune_state.json`` (settings, unit orders, step, digest of the last draw).
* ``on_train_end`` (``search_at_end``, the default): the best subnet under ``target_macs`` on held-out
  data (the evaluation set, else the first training items), by the config's ``search`` (default
  ``"stagewise"``: every stage scored by its training loss against the full net, stages combined by a
  DP, the best few checked by chained proxy accuracy with BN recalibrated) is extracted in place and
  compacted, and its record and spec are written, so
  ``trainer.save_model`` saves the pruned model. With ``search_at_end=False`` the supernet stays and
  :meth:`StageWiseTrainer.search` returns an extracted copy.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from transformers import Trainer

from ...core.distributed import check_same_everywhere, process_group, unwrap
from ...core.inputs import model_device, split_batch, to_device
from ...core.record import write_record
from ...errors import ConfigError, PruningError
from ...trainer.callback import PruningCallback
from ...trainer.state import calib_from_dataloader
from .config import StageWiseConfig
from .stage_search import search_stats, search_subnet
from .supernet import Supernet, digest

logger = logging.getLogger(__name__)

__all__ = ["StageWiseCallback", "StageWiseTrainer", "proxy_batches"]


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s draw: a function of ``(seed, step)`` only, identical on every rank."""
    return (int(seed) * 1_000_003 + int(step) * 7919 + 12345) % (2 ** 62)


class StageWiseCallback(PruningCallback):
    """Schedule and sandwich sampling of SP's width supernet; pair it with :class:`StageWiseTrainer`.

    ``StageWiseCallback(config=None, *, example_inputs=None, **fields)`` with a :class:`StageWiseConfig`
    or its fields (``target_macs``, ``ratios``, ``num_random``, ``supervision``, ...).
    """

    config_class = StageWiseConfig
    sharding_unsupported = ("its subnets run through torch.func.functional_call with masked copies of the "
                            "parameters, which FSDP2 replaces by its own gathered ones in every forward (the masks "
                            "would be silently lost), and its teacher is a full frozen copy on every rank; train SP "
                            "with DDP")

    def __init__(self, config=None, *, example_inputs=None, **fields):
        super().__init__(config, example_inputs=example_inputs, **fields)
        self.teacher: nn.Module | None = None
        self.bound = False  # set by StageWiseTrainer: the loss is ours
        self.eval_dataloader = None
        self.search_result = None  # the last search's SearchResult (choice, widths, MACs, score)

    def _reset(self) -> None:
        super()._reset()
        self.supernet: Supernet | None = None
        self.current: list | None = None
        self.history: list = []  # (step, digest of the draw), last 256 steps
        self._losses: dict = {}
        self._inputs = None

    # ------------------------------------------------------------------ protocol
    def wrap(self, model: nn.Module) -> None:
        """Freeze a copy of ``model`` (the unpruned full net) as the teacher, before any checkpoint is loaded."""
        if self.teacher is None:
            self.set_teacher(model)

    def set_teacher(self, model: nn.Module) -> None:
        self.teacher = Supernet.frozen_copy(unwrap(model))

    def prepare(self, model: nn.Module, example_inputs, orders=None) -> None:
        c = self.config
        if self.teacher is None:
            self.set_teacher(model)
        self._inputs = example_inputs
        self.supernet = Supernet(model, example_inputs, ratios=c.ratios, round_to=c.round_to,
                                 stages=c.stages if c.stages == "auto" else list(c.stages), num_stages=c.num_stages,
                                 teacher=self.teacher, importance=c.importance, orders=orders,
                                 ignored_layers=c.ignored_layers, prune_stem=c.prune_stem)
        try:  # an unreachable budget fails now, before the supernet is trained
            self.supernet.check_target(c.target_macs)
        except PruningError as exc:
            raise ConfigError(str(exc)) from None
        logger.info("hf_prune: SP supernet with %d groups over %d stages (%s)", len(self.supernet.space),
                    len(self.supernet.stages), ", ".join(s.name for s in self.supernet.stages))

    def active_stages(self, step: int) -> list:
        n = len(self.supernet.stages)
        if self.config.stage_schedule == "parallel":
            return list(range(n))
        return [min(n - 1, int(step) * n // max(self.total_steps or 1, 1))]

    def sample(self, step: int) -> list:
        """``[(tag, choice)]`` for ``step``: ``max``, ``min`` and ``num_random`` ``random`` subnets."""
        self.require_setup()
        space = self.supernet.space
        stages = self.active_stages(step)
        groups = None if self.config.stage_schedule == "parallel" else [
            i for i, s in enumerate(self.supernet.group_stage) if s in stages]
        gen = torch.Generator().manual_seed(step_seed(self.config.seed, step))
        smallest = list(space.max_choice())
        for i in (range(len(space)) if groups is None else groups):
            smallest[i] = 0
        draws = [("max", space.max_choice()), ("min", tuple(smallest))]
        draws += [("random", space.sample(gen, groups)) for _ in range(self.config.num_random)]
        return draws

    def plan(self, step: int):
        return step if self.supernet is not None else None

    def apply(self, step: int, target) -> None:
        self.current = self.sample(step)
        self.history = (self.history + [(self.step, digest([c for _, c in self.current]))])[-256:]
        if process_group() is not None:  # identical draws everywhere, or fail loudly
            check_same_everywhere(torch.cat([self.supernet.space.removed(c) for _, c in self.current]),
                                  "sampled subnets")

    def record_loss(self, tag: str, value: float) -> None:
        total, n = self._losses.get(tag, (0.0, 0))
        self._losses[tag] = (total + float(value), n + 1)

    def stats(self) -> dict:
        return {f"loss_{tag}": total / max(n, 1) for tag, (total, n) in self._losses.items()}

    def log_entries(self) -> dict:
        entries = super().log_entries()
        self._losses = {}
        return entries

    def state_dict(self) -> dict:
        return {"stages": [s.blocks for s in self.supernet.stages], "orders": self.supernet.orders_state(),
                "history": [list(h) for h in self.history[-16:]]}

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        """Rebuild the supernet with the checkpoint's unit orders and continue its draw sequence."""
        self.prepare(self.model, self._inputs, orders=state["orders"])
        if [s.blocks for s in self.supernet.stages] != state["stages"]:
            raise PruningError(f"the checkpoint's stages {state['stages']} differ from this model's "
                               f"{[s.blocks for s in self.supernet.stages]}; resume with the same model and stages=")
        self.history = [tuple(h) for h in state["history"]]

    def finalize(self) -> dict | None:
        """Search the best subnet under the budget, extract it in place and compact it (``search_at_end``)."""
        if not self.config.search_at_end:
            return None
        evals, calib = self.search_batches()
        sup = self.supernet
        result = self.run_search(evals, calib)
        stats = search_stats(sup, result)
        sup.extract(result.choice, calib, inplace=True)
        self.supernet = None
        return stats

    # ------------------------------------------------------------------ search
    def run_search(self, evals: list, calib: list, *, target_macs=None, max_latency_ms=None, population=None,
                   generations=None, seed=None, latency_inputs=None, search=None):
        """The best choice under the budget on held-out ``evals`` (BN recalibrated on ``calib``), by the
        config's ``search`` (or ``search=``): ``"stagewise"`` or ``"chained"`` (see :class:`StageWiseConfig`)."""
        c, sup = self.config, self.supernet
        if target_macs is None and max_latency_ms is None:
            target_macs, max_latency_ms = c.target_macs, c.max_latency_ms
        result = search_subnet(sup, c, evals, calib, target_macs=target_macs, max_latency_ms=max_latency_ms,
                               example_inputs=latency_inputs or self._inputs, population=population,
                               generations=generations, seed=seed, search=search)
        check_same_everywhere(sup.space.removed(result.choice), "searched subnet")
        self.search_result = result
        logger.info("hf_prune: SP search: proxy accuracy %.4f at %.1f%% MACs, widths %s", result.score,
                    100 * result.macs_ratio, result.widths)
        return result

    def search_batches(self) -> tuple[list, list]:
        """Held-out batches (the evaluation set, else the first training items) and calibration batches."""
        n = self.config.calib_batches
        device = model_device(self.supernet.model)
        calib = [to_device(b, device) for b in self._training_batches(n)]
        evals = []
        if self.eval_dataloader is not None:
            for batch in self.eval_dataloader:  # every rank scores the same data: no sampler sharding here
                if len(evals) >= n:
                    break
                evals.append(to_device(dict(batch) if hasattr(batch, "keys") else batch, device))
        if not evals:
            warnings.warn("SP search without an evaluation set: candidates are scored on training items "
                          "(pass eval_dataset= to the Trainer for a held-out proxy)", stacklevel=3)
            evals = calib
        return evals, calib

    def _training_batches(self, n: int) -> list:
        if self.train_dataloader is None:
            raise PruningError("the SP search needs labelled batches: train with a Trainer or call "
                               "StageWiseTrainer.search(eval_dataset=...)")
        bs = getattr(self.train_dataloader, "batch_size", None) or 16
        return calib_from_dataloader(self.train_dataloader, n * bs, bs)

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None,
                       **kwargs):
        if not self.bound:
            raise PruningError("StageWiseCallback changes the training loss, which a callback cannot do: train with "
                               "hf_prune.StageWiseTrainer(..., callbacks=[StageWiseCallback(...)]) instead of Trainer")
        self.eval_dataloader = eval_dataloader
        super().on_train_begin(args, state, control, model=model, train_dataloader=train_dataloader, **kwargs)


class StageWiseTrainer(Trainer):
    """``transformers.Trainer`` that trains SP's width supernet with stage-wise distillation.

    Pass a :class:`StageWiseCallback` in ``callbacks`` (one with default settings is added otherwise).
    ``teacher``: the unpruned full net (default: a frozen copy of ``model`` as given). In evaluation
    (``trainer.evaluate()``) the model runs at full width with the plain loss.
    """

    def __init__(self, *args, callbacks=None, teacher: nn.Module | None = None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.ddp_find_unused_parameters is None:
            # every step runs several subnets through the same DDP module; all parameters take part
            # (masked ones as zeros), and DDP's unused-parameter search would mark them ready twice
            training_args.ddp_find_unused_parameters = False
        callbacks = list(callbacks or [])
        cb = next((c for c in callbacks if isinstance(c, StageWiseCallback)), None)
        if cb is None:
            cb = StageWiseCallback()
            callbacks.insert(0, cb)
        cb.bound = True
        if teacher is not None:
            cb.set_teacher(teacher)
        self.stagewise = cb
        self.search_result = None
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cb = self.stagewise
        c = cb.config
        if cb.supernet is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        sup = cb.supernet
        if cb.current is None or cb.step != self.state.global_step:
            cb.step_begin(self.state.global_step)
        inputs, labels = split_batch(inputs)
        device = model_device(sup.model)
        if model_device(sup.teacher) != device:
            sup.teacher.to(device)
        teacher = sup.teacher_features(inputs)
        stages = cb.active_stages(cb.step)
        total, outputs = None, None
        for tag, choice in cb.current:
            loss, logits = sup.subnet_loss(choice, inputs, module=model, teacher=teacher, supervision=c.supervision,
                                           stages=stages, temperature=c.temperature, stage_weight=c.stage_weight,
                                           kd_weight=c.kd_weight)
            if tag == "max":
                outputs = {"logits": logits}
                if c.ce_weight and labels is not None:
                    loss = loss + c.ce_weight * nn.functional.cross_entropy(logits, labels)
            cb.record_loss(tag, loss.detach())
            total = loss if total is None else total + loss
        return (total, outputs) if return_outputs else total

    # ------------------------------------------------------------------ search
    def _batches(self, dataset, batch_size: int, limit: int | None, shuffle: bool, seed: int) -> list:
        # Not sharded across processes: every rank scores candidates on the same data, so all agree.
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                             collate_fn=self.data_collator)
        device = model_device(self.stagewise.supernet.model)
        out = []
        for batch in loader:
            if limit is not None and len(out) >= limit:
                break
            out.append(to_device(dict(batch) if hasattr(batch, "keys") else batch, device))
        return out

    def search(self, target_macs: float | None = None, *, max_latency_ms: float | None = None, eval_dataset=None,
               calib_dataset=None, calib_batches: int | None = None, eval_batches: int | None = None,
               batch_size: int | None = None, population: int | None = None, generations: int | None = None,
               seed: int | None = None, latency_inputs=None, search: str | None = None) -> nn.Module:
        """Best subnet under the budget on held-out data; returns it extracted and compacted.

        For callbacks with ``search_at_end=False`` (the default searches when training ends).
        ``target_macs`` (default: the config's) and/or ``max_latency_ms`` (measured on ``latency_inputs``).
        ``search`` (default: the config's): ``"stagewise"`` scores every stage by its training loss against
        the full net on ``eval_dataset`` and combines stages by a DP under the budget, then checks the best
        few by chained proxy accuracy; ``"chained"`` is the evolutionary search by chained proxy accuracy
        (``population``, ``generations``). Proxy accuracy: accuracy on ``eval_dataset`` (default: the
        trainer's) inside the supernet, BN statistics recalibrated on ``calib_batches`` batches of
        ``calib_dataset`` (default: the training set). :attr:`search_result` keeps the choice, widths,
        MACs, score and history. The supernet is left untouched; the returned copy carries the method record.
        """
        cb = self.stagewise
        if cb.supernet is None:
            raise PruningError("search() needs a trained supernet: call trainer.train() first (with "
                               "StageWiseCallback(search_at_end=False); by default the search ran at the end of "
                               "training and the model is already pruned)")
        sup = cb.supernet
        evalset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if evalset is None:
            raise PruningError("search() scores subnets on held-out data: pass eval_dataset= or give the trainer one")
        calibset = calib_dataset if calib_dataset is not None else self.train_dataset
        seed = cb.config.seed if seed is None else seed
        bs = batch_size or self.args.per_device_eval_batch_size
        n = calib_batches or cb.config.calib_batches
        evals = self._batches(evalset, bs, eval_batches, False, seed)
        calib = self._batches(calibset, self.args.per_device_train_batch_size, n, True, seed)
        result = cb.run_search(evals, calib, target_macs=target_macs, max_latency_ms=max_latency_ms,
                               population=population, generations=generations, seed=seed,
                               latency_inputs=latency_inputs, search=search)
        self.search_result = result
        model = sup.extract(result.choice, calib)
        config = cb.config.replace(target_macs=target_macs or cb.config.target_macs, search=result.method)
        write_record(model, config, search_stats(sup, result))
        return model



def proxy_batches(dataset, batch_size: int = 64, limit: int | None = None) -> list:
    """Labelled batches (dicts) of ``dataset`` for :meth:`Supernet.proxy_accuracy` outside a Trainer."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    out = []
    for batch in loader:
        if limit is not None and len(out) >= limit:
            break
        split_batch(batch, require_labels=True)  # validates that it is labelled
        out.append(batch)
    return out
