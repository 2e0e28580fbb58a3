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
* ``on_log``: ``stagewise/loss_max``, ``stagewise/loss_min``, ``stagewise/loss_random``.
* ``on_save``: ``hf_prune_state.json`` (settings, unit orders, step, digest of the last draw).

After training, :meth:`StageWiseTrainer.search` finds the best subnet under the budget by proxy
accuracy on held-out data (BN recalibrated per candidate), extracts and compacts it.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ...trainer.callback import (STATE_NAME, _check_same_everywhere, _dist, example_inputs_from_dataloader,
                                 reload_checkpoint_weights)
from ...errors import PruningError
from ...core.inputs import model_device, to_device
from .supernet import DEFAULT_RATIOS, SUPERVISIONS, Supernet, _digest, _split_batch

logger = logging.getLogger(__name__)

__all__ = ["StageWiseCallback", "StageWiseTrainer"]

STATE_VERSION = 1
STAGE_SCHEDULES = ("parallel", "sequential")


def _step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + 12345) % (2 ** 62)


class StageWiseCallback(TrainerCallback):
    """Schedule and sandwich sampling of SP's width supernet; pair it with :class:`StageWiseTrainer`.

    Args:
        target_macs: default budget of :meth:`StageWiseTrainer.search` (fraction of dense MACs).
        ratios: candidate width ratios of every group; round_to: channel multiple of a width.
        num_random: random subnets per step besides the largest and the smallest (sandwich rule).
        stages: ``"auto"`` or module paths; num_stages: chunks for models without resolution changes.
        supervision: ``"stage"`` (paper: each stage fed the teacher's input, regressing its output) or
            ``"logits"`` (plain supernet: end-to-end KD from the teacher, the baseline).
        stage_schedule: ``"parallel"`` (all stages every step) or ``"sequential"`` (one stage after the other).
        seed: sampling seed (the draw of step ``t`` depends only on ``seed`` and ``t``).
        temperature, stage_weight, kd_weight: loss settings; ce_weight: optional cross-entropy on the
            labels for the largest subnet (0 by default: the full net supervises, as in the paper).
        example_inputs: to trace the model; default: the first training items.
        importance: ``"l2"`` / ``"l1"`` order of the units; prune_stem, ignored_layers: as for the engine.
    """

    method = "stagewise"

    def __init__(self, target_macs: float = 0.5, *, ratios=DEFAULT_RATIOS, round_to: int | None = 8,
                 num_random: int = 2, stages="auto", num_stages: int = 4, supervision: str = "stage",
                 stage_schedule: str = "parallel", seed: int = 0, temperature: float = 1.0,
                 stage_weight: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0, example_inputs=None,
                 importance: str = "l2", prune_stem: bool = False, ignored_layers=()):
        if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not 0 < target_macs <= 1:
            raise PruningError(f"target_macs={target_macs!r} must be in (0, 1]: the fraction of dense MACs the "
                               "searched subnet may keep (e.g. 0.5)")
        if isinstance(num_random, bool) or not isinstance(num_random, int) or num_random < 0:
            raise PruningError(f"num_random={num_random!r} must be an int >= 0 (random subnets per step besides "
                               "the largest and the smallest)")
        if supervision not in SUPERVISIONS:
            raise PruningError(f"supervision={supervision!r} must be one of {SUPERVISIONS}")
        if stage_schedule not in STAGE_SCHEDULES:
            raise PruningError(f"stage_schedule={stage_schedule!r} must be one of {STAGE_SCHEDULES}")
        if stages != "auto" and (isinstance(stages, str) or not isinstance(stages, (list, tuple)) or not stages):
            raise PruningError(f"stages={stages!r} is not understood: pass 'auto' or a list of module paths, one per "
                               "stage (e.g. ['stages.0', 'stages.1'])")
        for name, v in (("temperature", temperature), ("stage_weight", stage_weight), ("kd_weight", kd_weight),
                        ("ce_weight", ce_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "temperature" and v == 0):
                raise PruningError(f"{name}={v!r} must be a number >= 0"
                                   + (" (and > 0)" if name == "temperature" else ""))
        self.target_macs = float(target_macs)
        self.ratios, self.round_to = tuple(ratios), round_to
        self.num_random, self.stages, self.num_stages = num_random, stages, num_stages
        self.supervision, self.stage_schedule, self.seed = supervision, stage_schedule, int(seed)
        self.temperature, self.stage_weight = float(temperature), float(stage_weight)
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        self.example_inputs = example_inputs
        self.importance, self.prune_stem, self.ignored_layers = importance, prune_stem, tuple(ignored_layers)
        self.teacher: nn.Module | None = None
        self.supernet: Supernet | None = None
        self.model: nn.Module | None = None
        self.total_steps: int | None = None
        self.step = 0
        self.current: list | None = None
        self.history: list = []  # (step, digest of the draw), last 256 steps
        self._bound = False  # set by StageWiseTrainer: the loss is ours
        self._losses: dict = {}

    @property
    def settings(self) -> dict:
        return {"method": self.method, "target_macs": self.target_macs, "ratios": list(self.ratios),
                "round_to": self.round_to, "num_random": self.num_random, "supervision": self.supervision,
                "stage_schedule": self.stage_schedule, "seed": self.seed, "num_stages": self.num_stages,
                "importance": self.importance, "prune_stem": self.prune_stem}

    # ------------------------------------------------------------------ plain-loop API
    def set_teacher(self, model: nn.Module) -> None:
        """Freeze a copy of ``model`` (the unpruned full net) as the teacher."""
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        self.teacher = Supernet.frozen_copy(model)

    def setup(self, model: nn.Module, total_steps: int, example_inputs=None, orders=None) -> Supernet:
        """Build the supernet on ``model`` (bare or wrapped); ``orders`` restores checkpointed unit orders."""
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise PruningError(f"total_steps={total_steps!r} must be a positive int (optimizer steps)")
        if self.supernet is not None and self.model is model:
            self.total_steps = total_steps
            return self.supernet
        inputs = example_inputs if example_inputs is not None else self.example_inputs
        if inputs is None:
            raise PruningError("StageWiseCallback needs example_inputs to trace the model: pass example_inputs= "
                               "(e.g. {'pixel_values': torch.randn(2, 3, 224, 224)})")
        if self.teacher is None:
            self.set_teacher(model)
        inputs = to_device(inputs, model_device(model))
        with torch.random.fork_rng(devices=[]):
            self.supernet = Supernet(model, inputs, ratios=self.ratios, round_to=self.round_to, stages=self.stages,
                                     num_stages=self.num_stages, teacher=self.teacher, importance=self.importance,
                                     orders=orders, ignored_layers=self.ignored_layers, prune_stem=self.prune_stem)
        self.model, self.total_steps = model, total_steps
        logger.info("hf_prune: SP supernet with %d groups over %d stages (%s)", len(self.supernet.space),
                    len(self.supernet.stages), ", ".join(s.name for s in self.supernet.stages))
        return self.supernet

    def active_stages(self, step: int) -> list:
        n = len(self.supernet.stages)
        if self.stage_schedule == "parallel":
            return list(range(n))
        return [min(n - 1, int(step) * n // max(self.total_steps or 1, 1))]

    def sample(self, step: int) -> list:
        """``[(tag, choice)]`` for ``step``: ``max``, ``min`` and ``num_random`` ``random`` subnets."""
        self._require_setup()
        space = self.supernet.space
        stages = self.active_stages(step)
        groups = None if self.stage_schedule == "parallel" else [
            i for i, s in enumerate(self.supernet.group_stage) if s in stages]
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        smallest = list(space.max_choice())
        for i in (range(len(space)) if groups is None else groups):
            smallest[i] = 0
        draws = [("max", space.max_choice()), ("min", tuple(smallest))]
        draws += [("random", space.sample(gen, groups)) for _ in range(self.num_random)]
        return draws

    def step_begin(self, step: int) -> list:
        self.step = int(step)
        self.current = self.sample(step)
        digest = _digest([c for _, c in self.current])
        self.history = (self.history + [(self.step, digest)])[-256:]
        if _dist() is not None:  # identical draws everywhere, or fail loudly
            _check_same_everywhere(torch.cat([self.supernet.space.removed(c) for _, c in self.current]))
        return self.current

    def record_loss(self, tag: str, value: float) -> None:
        s, n = self._losses.get(tag, (0.0, 0))
        self._losses[tag] = (s + float(value), n + 1)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        self._require_setup()
        return {"format_version": STATE_VERSION, "callback": type(self).__name__, "settings": self.settings,
                "global_step": self.step, "total_steps": self.total_steps,
                "stages": [s.blocks for s in self.supernet.stages], "orders": self.supernet.orders_state(),
                "history": [list(h) for h in self.history[-16:]]}

    def save_state(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / STATE_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def read_state(self, directory) -> dict:
        state = json.loads((Path(directory) / STATE_NAME).read_text())
        if state.get("format_version") != STATE_VERSION or state.get("callback") != type(self).__name__:
            raise PruningError(f"{Path(directory) / STATE_NAME} was not written by {type(self).__name__} "
                               f"v{STATE_VERSION}; resume with the callback that wrote it")
        diff = sorted(k for k in set(state["settings"]) | set(self.settings)
                      if state["settings"].get(k) != self.settings.get(k))
        if diff:
            warnings.warn(f"resuming SP with settings that differ from the checkpoint's in {diff}; the sampled "
                          "subnets will not continue the interrupted run's sequence", stacklevel=3)
        return state

    def load_state_dict(self, state: dict, model: nn.Module, example_inputs=None) -> None:
        """Rebuild the supernet with the checkpoint's unit orders and continue its draw sequence."""
        self.supernet = None
        self.setup(model, int(state.get("total_steps") or self.total_steps or 1), example_inputs,
                   orders=state["orders"])
        if [s.blocks for s in self.supernet.stages] != state["stages"]:
            raise PruningError(f"the checkpoint's stages {state['stages']} differ from this model's "
                               f"{[s.blocks for s in self.supernet.stages]}; resume with the same model and stages=")
        self.step = int(state["global_step"])
        self.history = [tuple(h) for h in state.get("history", [])]

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self.teacher is None and model is not None:
            self.set_teacher(model)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not self._bound:
            raise PruningError("StageWiseCallback changes the training loss, which a callback cannot do: train with "
                               "hf_prune.StageWiseTrainer(..., callbacks=[StageWiseCallback(...)]) instead of Trainer")
        inputs = self.example_inputs
        if inputs is None and self.supernet is None:
            inputs = example_inputs_from_dataloader(train_dataloader, label_names=getattr(args, "label_names", None))
        resumed = state.global_step > 0 and self._resume(args, state, model, inputs)
        if not resumed:
            self.setup(model, int(state.max_steps), inputs)
        self.total_steps = int(state.max_steps)
        self.step = state.global_step

    def _resume(self, args, state, model, inputs) -> bool:
        candidates = []
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        for c in candidates:
            if (c / STATE_NAME).is_file():
                saved = self.read_state(c)
                if saved.get("global_step") != state.global_step:
                    continue
                while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
                    model = model.module
                reload_checkpoint_weights(model, c)
                self.load_state_dict(saved, model, inputs)
                logger.info("hf_prune: resumed the SP sampler from %s", c)
                return True
        warnings.warn(f"resuming at step {state.global_step} without an SP {STATE_NAME} for that step in "
                      f"{[str(c) for c in candidates]}: unit orders are recomputed from the current weights",
                      stacklevel=3)
        return False

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_begin(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._losses:
            return
        entries = {f"stagewise/loss_{tag}": round(s / max(n, 1), 6) for tag, (s, n) in self._losses.items()}
        self._losses = {}
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def on_save(self, args, state, control, **kwargs):
        if self.supernet is None or not getattr(args, "should_save", True):
            return
        self.step = state.global_step
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            self.save_state(ckpt)

    def _require_setup(self) -> None:
        if self.supernet is None:
            raise PruningError("StageWiseCallback is not set up: it builds its supernet in on_train_begin "
                               "(StageWiseTrainer.train()) or in setup(model, total_steps, example_inputs)")


class StageWiseTrainer(Trainer):
    """``transformers.Trainer`` that trains SP's width supernet with stage-wise distillation.

    Pass a :class:`StageWiseCallback` in ``callbacks`` (one with default settings is added otherwise).
    ``teacher``: the unpruned full net (default: a frozen copy of ``model`` as given). In evaluation
    (``trainer.evaluate()``) the model runs at full width with the plain loss.
    """

    def __init__(self, *args, callbacks=None, teacher: nn.Module | None = None, **kwargs):
        callbacks = list(callbacks or [])
        cb = next((c for c in callbacks if isinstance(c, StageWiseCallback)), None)
        if cb is None:
            cb = StageWiseCallback()
            callbacks.insert(0, cb)
        cb._bound = True
        if teacher is not None:
            cb.set_teacher(teacher)
        self.stagewise = cb
        self.search_result = None
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cb = self.stagewise
        if cb.supernet is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        sup = cb.supernet
        if cb.current is None or cb.step != self.state.global_step:
            cb.step_begin(self.state.global_step)
        inputs = dict(inputs)
        labels = next((inputs.pop(k) for k in ("labels", "label", "label_ids") if k in inputs), None)
        device = model_device(sup.model)
        if model_device(sup.teacher) != device:
            sup.teacher.to(device)
        teacher = sup.teacher_features(inputs)
        stages = cb.active_stages(cb.step)
        total, outputs = None, None
        for tag, choice in cb.current:
            loss, logits = sup.subnet_loss(choice, inputs, module=model, teacher=teacher, supervision=cb.supervision,
                                           stages=stages, temperature=cb.temperature, stage_weight=cb.stage_weight,
                                           kd_weight=cb.kd_weight)
            if tag == "max":
                outputs = {"logits": logits}
                if cb.ce_weight and labels is not None:
                    loss = loss + cb.ce_weight * nn.functional.cross_entropy(logits, labels)
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
               calib_dataset=None, calib_batches: int = 8, eval_batches: int | None = None,
               batch_size: int | None = None, population: int = 16, generations: int = 4, seed: int | None = None,
               latency_inputs=None) -> nn.Module:
        """Best subnet under the budget by proxy accuracy on held-out data; returns it extracted and compacted.

        ``target_macs`` (default: the callback's) and/or ``max_latency_ms`` (measured on
        ``latency_inputs`` with the compacted candidate). Proxy accuracy: accuracy on ``eval_dataset``
        (default: the trainer's) inside the supernet, BN statistics recalibrated on ``calib_batches``
        batches of ``calib_dataset`` (default: the training set). :attr:`search_result` keeps the
        choice, widths, MACs, score and the evolution's history. The supernet is left untouched.
        """
        cb = self.stagewise
        if cb.supernet is None:
            raise PruningError("search() needs a trained supernet: call trainer.train() first")
        sup = cb.supernet
        evalset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if evalset is None:
            raise PruningError("search() scores subnets on held-out data: pass eval_dataset= or give the trainer one")
        calibset = calib_dataset if calib_dataset is not None else self.train_dataset
        if target_macs is None and max_latency_ms is None:
            target_macs = cb.target_macs
        seed = cb.seed if seed is None else seed
        bs = batch_size or self.args.per_device_eval_batch_size
        evals = self._batches(evalset, bs, eval_batches, False, seed)
        calib = self._batches(calibset, self.args.per_device_train_batch_size, calib_batches, True, seed)
        result = sup.search(lambda c: sup.proxy_accuracy(c, evals, calib), target_macs=target_macs,
                            max_latency_ms=max_latency_ms, example_inputs=latency_inputs, population=population,
                            generations=generations, seed=seed)
        _check_same_everywhere(sup.space.removed(result.choice))
        self.search_result = result
        logger.info("hf_prune: SP search: proxy accuracy %.4f at %.1f%% MACs, widths %s", result.score,
                    100 * result.macs_ratio, result.widths)
        return sup.extract(result.choice, calib, record={
            "target_macs": target_macs, "max_latency_ms": max_latency_ms, "proxy_accuracy": result.score,
            "supervision": cb.supervision, "widths": result.widths})


def proxy_batches(dataset, batch_size: int = 64, limit: int | None = None) -> list:
    """Labelled batches (dicts) of ``dataset`` for :meth:`Supernet.proxy_accuracy` outside a Trainer."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    out = []
    for batch in loader:
        if limit is not None and len(out) >= limit:
            break
        _split_batch(batch)  # validates that it is labelled
        out.append(batch)
    return out
