"""UPDP stages 1 and 2: the depth supernet, its training, and the subnet search.

This module owns the weight-sharing *depth supernet* of UPDP (Liu et al., AAAI 2024, arXiv 2401.06426)
and the search of the subnet (which blocks to prune) under a budget. Stages 3 and 4 (progressive
training of the chosen subnet, exact merge) are :mod:`hf_prune.methods.updp.depth`; the chosen blocks feed
them unchanged::

    sn = DepthSupernet(model, example_inputs=x)             # 1. every candidate block wrapped
    train_supernet(sn, train_loader, steps=500)              #    one random subnet per step
    result = search(sn, val_batches, num_blocks=3)           # 2. evolutionary search, proxy = accuracy
    print(result.report())
    model = sn.restore()                                     #    plain model (supernet-trained weights)
    Trainer(..., callbacks=[UPDPCallback(blocks=result.blocks)]).train()   # 3. + 4.

What the paper states and what is ours (it publishes no code):

* Supernet: each candidate block is either in its original form or in its pruned form. Here a block's
  pruned form is its :class:`~hf_prune.methods.updp.blocks.AnnealedBlock` at ``lam = 1`` (activations
  identity, LN -> BN, end BN and activation), i.e. exactly the form that merges; ``lam = 0`` is the
  original block, bit for bit. A *choice* is the tuple of pruned candidate positions. Weights are shared:
  the original block's parameters serve both forms, the new BNs serve only the pruned one.
* Sampling (open in the paper): by default each block is pruned with probability 1/2 (uniform over all
  ``2**n`` subnets, as single-path one-shot NAS does); ``num_blocks=k`` samples a uniform ``k``-subset
  and ``target_macs`` repairs samples to the budget. The random generator is seeded from
  ``(seed, step)`` only, so every distributed rank samples the same subnet at the same step without
  communication.
* Supernet training: plain cross-entropy, optionally with knowledge distillation from a frozen
  teacher (e.g. the dense model); ours, the paper gives no recipe. In ``transformers.Trainer``:
  :class:`~hf_prune.methods.updp.callback.UPDPSupernetCallback` samples per step (no KD: a callback
  cannot change the loss).
* Search: evolutionary, as single-path one-shot NAS (Guo et al. 2020) does: a random feasible
  population, then per generation the top ``parents`` make children by mutation (each block flipped
  with ``mutation_prob``) and uniform crossover; children are repaired to the budget and only
  budget-feasible, not yet seen subnets are evaluated. Budgets: ``num_blocks`` (exactly ``k`` pruned),
  ``target_macs`` (fraction of dense MACs to keep; MACs are additive over blocks because merging a
  block never changes another block's input shape, so they are computed from a per-block table) or
  ``target_latency`` (fraction of the dense model's latency, *measured* per subnet: the merged subnet
  and the dense model timed alternately in this process with
  :func:`hf_prune.metrics.profiling.time_model`; noisy on a loaded machine).
* Proxy: top-1 accuracy (ties broken by lower cross-entropy) of the supernet with that choice on
  held-out batches, after re-estimating the running statistics of *every* BatchNorm of the model on
  calibration batches (as one-shot NAS does: the shared BNs saw a mixture of subnets in training).
  The supernet's own statistics are restored afterwards. A ``score_fn(model) -> float`` (higher is
  better) replaces the proxy.

Departures: what the paper's supernet trains (data, length, loss) and how its search is set up are not
public; the choices above are documented defaults, not a reproduction. Whether the chosen subnet then
starts its progressive training from the supernet's weights or from the pretrained ones is the user's
choice (:meth:`DepthSupernet.restore` returns the supernet-trained model; the evidence benchmark starts
from the pretrained weights).

Distributed training: pruned blocks leave the original LN/activation parameters of that block unused in
the step (and unpruned blocks leave the new BNs unused), so DDP needs ``find_unused_parameters=True``.
"""
from __future__ import annotations

import copy
import math
import random
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PruningError
from ...core.inputs import batch_size, call_model, first_tensor, model_device, split_batch, to_device
from ...core.execution import module_modes, recalibrate_batchnorm, restore_modes
from ...core.progress import progress as progress_bar
from .depth import (AnnealedBlock, anneal, calibrate, capture_inputs, macs_of, output_tensor, resolve_blocks, set_module,
                    find_blocks)

__all__ = ["DepthSupernet", "SubnetSampler", "train_supernet", "search", "evaluate_subnet", "SearchResult"]

Choice = tuple  # sorted positions (into DepthSupernet.refs) of the blocks in pruned form


# --------------------------------------------------------------------------- data helpers


def _batches(data, batch_size: int = 256) -> list:
    """A list of batches from a split with ``pixel_values`` / ``labels`` attributes, or any iterable of batches."""
    if data is None:
        return []
    if hasattr(data, "pixel_values") and hasattr(data, "labels"):
        x, y = data.pixel_values, data.labels
        return [{"pixel_values": x[i:i + batch_size], "labels": y[i:i + batch_size]}
                for i in range(0, len(y), batch_size)]
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data]
    return list(data)


def _inputs(batch, device):
    """Model inputs of a batch (labels dropped), on ``device``."""
    return to_device(split_batch(batch)[0], device)


def _call(model: nn.Module, inputs) -> torch.Tensor:
    return output_tensor(call_model(model, inputs))


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


# --------------------------------------------------------------------------- sampler


class SubnetSampler:
    """Random subnets for supernet training, identical on every rank: step ``t`` draws from a generator
    seeded with ``(seed, t)`` only.

    ``num_blocks=k``: a uniform ``k``-subset of the ``num_candidates`` blocks. Otherwise each block is
    pruned with probability ``prob``; ``repair`` (a callable ``(choice, rng) -> choice``, e.g. a MACs
    budget's) then brings the draw into a budget.
    """

    def __init__(self, num_candidates: int, *, seed: int = 0, num_blocks: int | None = None, prob: float = 0.5,
                 repair: Callable | None = None):
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise PruningError(f"num_candidates={num_candidates!r} must be a positive int")
        if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int)
                                       or not 0 <= num_blocks <= num_candidates):
            raise PruningError(f"num_blocks={num_blocks!r} must be an int in [0, {num_candidates}] "
                               f"(the supernet has {num_candidates} candidate blocks)")
        if not 0.0 <= prob <= 1.0:
            raise PruningError(f"prob={prob!r} must be in [0, 1] (chance that a block is sampled pruned)")
        self.n, self.seed, self.num_blocks, self.prob, self.repair = num_candidates, int(seed), num_blocks, prob, repair

    def rng(self, step: int) -> random.Random:
        # an integer seed: Python's Random is then identical across processes and PYTHONHASHSEED values
        return random.Random(self.seed * 1_000_003 + int(step) * 7_919 + 17)

    def __call__(self, step: int) -> Choice:
        rng = self.rng(step)
        if self.num_blocks is not None:
            return tuple(sorted(rng.sample(range(self.n), self.num_blocks)))
        choice = tuple(i for i in range(self.n) if rng.random() < self.prob)
        return self.repair(choice, rng) if self.repair is not None else choice


# --------------------------------------------------------------------------- supernet


class DepthSupernet:
    """Every candidate block of ``model`` wrapped (in place) so it runs original or pruned per choice.

    ``blocks``: the candidates (indices into :func:`~hf_prune.methods.updp.depth.find_blocks`, paths; default
    all). ``example_inputs``: a batch to calibrate the new BNs (do it before training; :meth:`calibrate`
    does it later). ``end_act``: the pruned form ends with an activation after the residual sum (paper).
    Build it before the optimizer so the new BN parameters are trained.
    """

    def __init__(self, model: nn.Module, blocks=None, *, example_inputs=None, end_act: bool = True):
        refs = find_blocks(model) if blocks is None else resolve_blocks(model, blocks)
        if not refs:
            raise PruningError(f"{type(model).__name__} has no block UPDP can merge, so there is no depth supernet "
                               "(supported: ConvNeXt V1, MobileNetV2 inverted residuals, ResNet, ViT/DeiT blocks)")
        self.model = model
        self.refs = refs
        self.wrappers: list[AnnealedBlock] = anneal(model, refs, end_act=end_act)
        self.choice: Choice = ()
        self._table: dict | None = None
        if example_inputs is not None:
            self.calibrate([example_inputs])

    @property
    def num_candidates(self) -> int:
        return len(self.refs)

    def calibrate(self, batches) -> None:
        """Initialise the new BNs from the original blocks' statistics on ``batches`` (inputs only)."""
        calibrate(self.model, [_inputs(b, model_device(self.model)) for b in _batches(batches)], self.wrappers)

    def check(self, choice) -> Choice:
        if not self.wrappers:
            raise PruningError("this supernet was restored (unwrapped); build a new DepthSupernet")
        try:
            c = tuple(sorted({int(i) for i in choice}))
        except (TypeError, ValueError):
            raise PruningError(f"a choice is an iterable of candidate positions, got {choice!r}") from None
        bad = [i for i in c if not 0 <= i < self.num_candidates]
        if bad:
            raise PruningError(f"choice {list(choice)} has positions {bad} outside [0, {self.num_candidates}) "
                               "(positions index DepthSupernet.refs)")
        return c

    def set_choice(self, choice) -> Choice:
        """Blocks in ``choice`` run pruned (``lam = 1``), the others original (``lam = 0``)."""
        c = self.check(choice)
        pruned = set(c)
        for i, w in enumerate(self.wrappers):
            w.set_lambda(1.0 if i in pruned else 0.0)
        self.choice = c
        return c

    def parameters(self) -> list[nn.Parameter]:
        """Parameters the wrappers added (the new BNs): add them to an optimizer built before wrapping."""
        own = {id(p) for w in self.wrappers for p in w.block.parameters()}
        return [p for w in self.wrappers for p in w.parameters() if id(p) not in own]

    def blocks_of(self, choice) -> list[int]:
        """Indices into ``find_blocks`` of the original model (what ``prune_depth(blocks=...)`` takes)."""
        return [self.refs[i].index for i in self.check(choice)]

    # ---- MACs
    def macs_table(self, example_inputs) -> dict:
        """Per-sample MACs: ``{"dense", "saving": [per candidate]}`` (original minus merged block)."""
        inputs = _inputs(_batches(example_inputs)[0], model_device(self.model))
        key = tuple(first_tensor(inputs).shape[1:])  # per-sample MACs depend on the sample shape only
        if self._table is not None and self._table["shape"] == key:
            return self._table
        previous = self.choice
        self.set_choice(())
        try:
            dense = macs_of(self.model, inputs)
            block_in = capture_inputs(self.model, self.wrappers, inputs)
            saving = []
            for w in self.wrappers:
                x = block_in[id(w)]
                w.set_lambda(1.0)
                try:
                    merged = w.merge().eval()
                finally:
                    w.set_lambda(0.0)
                saving.append(macs_of(w.block, (x,)) - macs_of(merged, (x,)))
        finally:
            self.set_choice(previous)
        n = batch_size(inputs)
        self._table = {"dense": dense / n, "saving": [s / n for s in saving], "shape": key}
        return self._table

    def macs(self, choice, example_inputs=None) -> float:
        """Per-sample MACs of the merged subnet (exact: savings are additive over blocks)."""
        t = self._table if example_inputs is None else self.macs_table(example_inputs)
        if t is None:
            raise PruningError("call macs_table(example_inputs) first (or pass example_inputs)")
        return t["dense"] - sum(t["saving"][i] for i in self.check(choice))

    # ---- materialising
    def subnet(self, choice) -> nn.Module:
        """A deep copy merged at ``choice`` (pruned blocks merged exactly, others original); eval mode."""
        c = set(self.check(choice))
        work = copy.deepcopy(self.model)  # the copy's wrappers change, never the supernet's
        for i, r in enumerate(self.refs):
            w = work.get_submodule(r.path)
            if i in c:
                w.set_lambda(1.0)
                set_module(work, r.path, w.merge())
            else:
                set_module(work, r.path, w.block)
        return work.eval()

    def restore(self) -> nn.Module:
        """Put every original block back (unwrap, with the supernet-trained weights); returns the model."""
        for r, w in zip(self.refs, self.wrappers):
            set_module(self.model, r.path, w.block)
        self.wrappers = []
        return self.model


# --------------------------------------------------------------------------- supernet training


def train_supernet(supernet: DepthSupernet, data, steps: int, *, lr: float = 1e-3, weight_decay: float = 0.0,
                   optimizer: torch.optim.Optimizer | None = None, sampler: SubnetSampler | None = None,
                   seed: int = 0, teacher: nn.Module | None = None, kd_alpha: float = 0.5,
                   kd_temperature: float = 1.0, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Train the supernet for ``steps`` optimizer steps, one sampled subnet per step (weights shared).

    ``data``: an iterable of batches (mappings with ``labels`` or ``(inputs, labels)``), cycled; or a split
    with ``pixel_values`` / ``labels`` (shuffled batches of 64). ``sampler``: default
    ``SubnetSampler(n, seed=seed)`` (each block pruned with probability 1/2). ``teacher``: a frozen model
    (e.g. a copy of the dense model) for distillation, ``loss = (1 - kd_alpha) CE + kd_alpha T^2
    KL(teacher_T || student_T)``. Default optimizer: AdamW over all the model's parameters.
    Returns the per-step history ``[{"step", "choice", "loss"}]``; the supernet is left at choice ``()``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PruningError(f"steps={steps!r} must be a positive int (optimizer steps)")
    if not 0.0 <= kd_alpha <= 1.0:
        raise PruningError(f"kd_alpha={kd_alpha!r} must be in [0, 1]")
    model, device = supernet.model, model_device(supernet.model)
    sampler = sampler or SubnetSampler(supernet.num_candidates, seed=seed)
    if sampler.n != supernet.num_candidates:
        raise PruningError(f"the sampler draws over {sampler.n} blocks but the supernet has {supernet.num_candidates}")
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if teacher is not None:
        teacher.eval()
    stream = _cycle(data, seed)
    history = []
    model.train()
    for step in range(steps):
        choice = supernet.set_choice(sampler(step))
        inputs, labels = split_batch(next(stream))
        if labels is None:
            raise PruningError("supernet training needs labelled batches (a 'labels' key or (inputs, labels))")
        inputs, labels = to_device(inputs, device), labels.to(device)
        logits = _call(model, inputs)
        loss = F.cross_entropy(logits, labels)
        if teacher is not None and kd_alpha > 0:
            with torch.no_grad():
                t_logits = _call(teacher, inputs)
            t = kd_temperature
            kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(t_logits / t, -1), log_target=True,
                          reduction="batchmean") * t * t
            loss = (1 - kd_alpha) * loss + kd_alpha * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        entry = {"step": step, "choice": list(choice), "loss": float(loss.detach())}
        history.append(entry)
        if progress is not None:
            progress(entry)
    supernet.set_choice(())
    return history


def _cycle(data, seed: int):
    """Endless batches; a split is reshuffled each epoch (seeded)."""
    epoch = 0
    while True:
        if hasattr(data, "pixel_values") and hasattr(data, "labels"):
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            perm = torch.randperm(len(data.labels), generator=g)
            for i in range(0, len(perm) - 63, 64):
                idx = perm[i:i + 64]
                yield {"pixel_values": data.pixel_values[idx], "labels": data.labels[idx]}
        else:
            got = False
            for b in data:
                got = True
                yield b
            if not got:
                raise PruningError("the training data yielded no batch")
        epoch += 1


# --------------------------------------------------------------------------- proxy evaluation


def _recalibrate_all(model: nn.Module, batches: list) -> None:
    """Running statistics of every BN re-estimated on ``batches`` (cumulative average), rest in eval."""
    recalibrate_batchnorm(model, _bns(model), batches, lambda b: _call(model, b))
    model.eval()


def evaluate_subnet(supernet: DepthSupernet, choice, data, *, calib_data=None, recalibrate: bool = True,
                    score_fn: Callable[[nn.Module], float] | None = None) -> dict:
    """Proxy of one subnet: ``{"accuracy", "loss", "proxy"}`` of the supernet at ``choice`` on ``data``.

    With ``recalibrate`` every BN's running statistics are first re-estimated on ``calib_data`` (default:
    ``data``'s inputs); the supernet's statistics, choice and train mode are restored afterwards.
    ``score_fn(model) -> float`` (higher is better) replaces accuracy as the proxy.
    """
    model, device = supernet.model, model_device(supernet.model)
    previous, modes = supernet.choice, module_modes(model)
    bns = _bns(model)
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns]
    supernet.set_choice(choice)
    try:
        if recalibrate:
            calib = [_inputs(b, device) for b in _batches(calib_data if calib_data is not None else data)]
            _recalibrate_all(model, calib)
        model.eval()
        if score_fn is not None:
            with torch.no_grad():
                score = float(score_fn(model))
            return {"accuracy": None, "loss": None, "proxy": score}
        correct = total = 0
        loss = 0.0
        with torch.no_grad():
            for b in _batches(data):
                inputs, labels = split_batch(b)
                if labels is None:
                    raise PruningError("the accuracy proxy needs labelled held-out batches; or pass score_fn=")
                logits = _call(model, to_device(inputs, device)).float()
                labels = labels.to(device)
                correct += int((logits.argmax(-1) == labels).sum())
                loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                total += int(labels.numel())
        if total == 0:
            raise PruningError("the held-out data is empty")
        return {"accuracy": correct / total, "loss": loss / total, "proxy": correct / total}
    finally:
        with torch.no_grad():
            for bn, (m, v, n) in zip(bns, saved):
                bn.running_mean.copy_(m)
                bn.running_var.copy_(v)
                bn.num_batches_tracked.copy_(n)
        supernet.set_choice(previous)
        restore_modes(modes)


# --------------------------------------------------------------------------- budgets


class _Budget:
    """Feasibility and repair of choices under one budget (count, MACs or measured latency)."""

    def __init__(self, supernet: DepthSupernet, *, num_blocks, target_macs, target_latency, example_inputs,
                 latency_inputs, latency_iters):
        given = {k: v for k, v in (("num_blocks", num_blocks), ("target_macs", target_macs),
                                   ("target_latency", target_latency)) if v is not None}
        if len(given) != 1:
            raise PruningError("give exactly one budget: num_blocks= (blocks to prune), target_macs= (fraction of "
                               "dense MACs to keep) or target_latency= (fraction of dense latency)")
        (self.kind, self.value), = given.items()
        self.sn, self.n = supernet, supernet.num_candidates
        self.latency: dict[Choice, float] = {}
        self.latency_ms: dict[Choice, float] = {}
        self.table = None
        if example_inputs is not None:
            self.table = supernet.macs_table(example_inputs)
        if self.kind == "num_blocks":
            v = num_blocks
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= self.n:
                raise PruningError(f"num_blocks={v!r} is impossible: it must be an int in [1, {self.n}] (the "
                                   f"supernet has {self.n} candidate blocks)")
            return
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or self.value <= 0:
            raise PruningError(f"{self.kind}={self.value!r} must be a positive fraction (of the dense model's "
                               f"{'MACs' if self.kind == 'target_macs' else 'latency'} to keep)")
        if example_inputs is None:
            raise PruningError(f"a {self.kind} budget needs example_inputs= (a batch to count MACs on)")
        everything = tuple(range(self.n))
        if self.kind == "target_macs":
            floor = self.macs_ratio(everything)
            if self.value < floor:
                raise PruningError(f"target_macs={self.value} is not reachable: merging all {self.n} candidate blocks "
                                   f"keeps {floor:.3f} of the dense MACs; use target_macs >= {math.ceil(floor * 1000) / 1000}")
        else:
            lat = latency_inputs if latency_inputs is not None else example_inputs
            self.lat_inputs = _inputs(_batches(lat)[0], model_device(supernet.model))
            self.lat_iters = int(latency_iters)
            self.dense_model = supernet.subnet(())
            floor = self.latency_ratio(everything)
            if self.value < floor:
                raise PruningError(f"target_latency={self.value} is not reachable: with all {self.n} candidate blocks "
                                   f"merged the model ran at {floor:.3f} of the dense latency (measured); use "
                                   f"target_latency >= {math.ceil(floor * 100) / 100} or a MACs budget")

    def macs_ratio(self, choice) -> float | None:
        if self.table is None:
            return None
        return self.sn.macs(choice) / self.table["dense"]

    def latency_ratio(self, choice) -> float:
        """Median latency of the merged subnet / the dense model's, timed alternately (cached per choice)."""
        if choice not in self.latency:
            from ...metrics.profiling import time_model

            sub = self.sn.subnet(choice)
            dense_t, sub_t = [], []
            for _ in range(2):  # warm-up
                time_model(self.dense_model, self.lat_inputs, warmup=0, iters=1)
                time_model(sub, self.lat_inputs, warmup=0, iters=1)
            for _ in range(self.lat_iters):
                dense_t += time_model(self.dense_model, self.lat_inputs, warmup=0, iters=1)
                sub_t += time_model(sub, self.lat_inputs, warmup=0, iters=1)
            self.latency[choice] = statistics.median(sub_t) / statistics.median(dense_t)
            self.latency_ms[choice] = statistics.median(sub_t)
        return self.latency[choice]

    def feasible(self, choice: Choice) -> bool:
        if self.kind == "num_blocks":
            return len(choice) == self.value
        if self.kind == "target_macs":
            return self.macs_ratio(choice) <= self.value + 1e-12
        return self.latency_ratio(choice) <= self.value

    def repair(self, choice: Choice, rng: random.Random) -> Choice | None:
        """Prune random extra blocks (or un-prune, for a block count) until the choice fits; None if it cannot."""
        c = set(choice)
        if self.kind == "num_blocks":
            while len(c) > self.value:
                c.remove(rng.choice(sorted(c)))
            while len(c) < self.value:
                c.add(rng.choice(sorted(set(range(self.n)) - c)))
            return tuple(sorted(c))
        useful = [i for i in range(self.n) if self.table is None or self.table["saving"][i] > 0]
        while not self.feasible(tuple(sorted(c))):
            free = [i for i in useful if i not in c]
            if not free:
                return None
            c.add(rng.choice(free))
        return tuple(sorted(c))


# --------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    """What :func:`search` evaluated. ``subnets``: every feasible subnet evaluated, best proxy first; each
    ``{"rank", "choice", "blocks", "paths", "num_pruned", "proxy", "accuracy", "loss", "macs",
    "macs_ratio", "latency_ratio", "generation"}`` (``blocks`` index ``find_blocks`` of the original model:
    give them to ``prune_depth(blocks=...)`` / ``UPDPCallback(blocks=...)``)."""

    subnets: list[dict]
    budget: dict
    dense: dict
    candidates: list[str]
    settings: dict = field(default_factory=dict)
    rejected: int = 0

    @property
    def best(self) -> dict:
        return self.subnets[0]

    @property
    def blocks(self) -> list[int]:
        return list(self.best["blocks"])

    def report(self, top: int | None = None) -> str:
        """Markdown table of how the subnets rank (the dense supernet choice first, for reference)."""
        cols = ["rank", "pruned blocks", "proxy", "accuracy", "loss", "MACs ratio", "latency ratio", "generation"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

        def row(rank, r):
            cells = [rank, ", ".join(self.candidates[i] for i in r["choice"]) or "(none: dense)",
                     _fmt(r.get("proxy"), 4), _fmt(r.get("accuracy"), 4), _fmt(r.get("loss"), 4),
                     _fmt(r.get("macs_ratio"), 3), _fmt(r.get("latency_ratio"), 3), r.get("generation", "")]
            return "| " + " | ".join(str(c) for c in cells) + " |"

        lines.append(row("dense", self.dense))
        for r in self.subnets[:top]:
            lines.append(row(r["rank"], r))
        return "\n".join(lines) + "\n"


def _fmt(v, digits):
    return "–" if v is None else f"{v:.{digits}f}"


def search(model, eval_data, *, num_blocks: int | None = None, target_macs: float | None = None,
           target_latency: float | None = None, example_inputs=None, calib_data=None, recalibrate: bool = True,
           population: int = 16, generations: int = 5, parents: int | None = None, mutation_prob: float = 0.2,
           crossover: float = 0.5, seed: int = 0, score_fn: Callable[[nn.Module], float] | None = None,
           latency_inputs=None, latency_iters: int = 10, progress: Callable[[str], None] | None = None
           ) -> SearchResult:
    """Evolutionary search of the subnet (blocks to prune) with the best proxy under one budget.

    ``model``: a :class:`DepthSupernet` (trained or not), or a plain model (a supernet is then built on a
    deep copy and calibrated on ``example_inputs``: the proxy is that of the untrained pruned forms).
    ``eval_data``: held-out labelled batches (or a split). Exactly one budget: ``num_blocks`` (exactly
    ``k`` blocks pruned), ``target_macs`` (fraction of dense MACs to keep, at most) or ``target_latency``
    (fraction of the dense latency measured on ``latency_inputs`` / ``example_inputs``, at most). MACs
    are reported whenever ``example_inputs`` is given.

    ``population`` subnets per generation, ``generations`` generations; the ``parents`` best so far
    (default ``population // 2``) breed: a ``crossover`` fraction of the children by uniform crossover of
    two parents, the rest by flipping each block of one parent with ``mutation_prob``; children are
    repaired to the budget; only feasible subnets never evaluated before are evaluated. Stops early when
    no new feasible subnet can be made. Deterministic for a given ``seed`` (latency budgets aside).
    Returns a :class:`SearchResult`; raises :class:`PruningError` for impossible budgets.
    """
    if isinstance(model, DepthSupernet):
        sn = model
    else:
        if example_inputs is None:
            raise PruningError("search on a plain model builds a supernet and needs example_inputs= to calibrate it")
        sn = DepthSupernet(copy.deepcopy(model), example_inputs=example_inputs)
    for name, v, lo in (("population", population, 2), ("generations", generations, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise PruningError(f"{name}={v!r} must be an int >= {lo}")
    parents = parents or max(2, population // 2)
    budget = _Budget(sn, num_blocks=num_blocks, target_macs=target_macs, target_latency=target_latency,
                     example_inputs=example_inputs, latency_inputs=latency_inputs, latency_iters=latency_iters)
    rng = random.Random(seed)
    evaluated: dict[Choice, dict] = {}
    rejected = 0
    # at most population subnets per generation, and the dense net at the end (an early stop ends the bar early)
    bar = progress_bar(total=population * generations + 1, desc="UPDP subnet search", unit="subnet")

    def evaluate(choice, generation):
        r = evaluate_subnet(sn, choice, eval_data, calib_data=calib_data, recalibrate=recalibrate, score_fn=score_fn)
        bar.update(1)
        r.update(choice=choice, blocks=sn.blocks_of(choice), paths=[sn.refs[i].path for i in choice],
                 num_pruned=len(choice), macs=sn.macs(choice) if budget.table else None,
                 macs_ratio=budget.macs_ratio(choice),
                 latency_ratio=budget.latency.get(choice), latency_ms=budget.latency_ms.get(choice),
                 generation=generation)
        return r

    def new_child(make, pending):
        nonlocal rejected
        for _ in range(50):
            c = make()
            c = budget.repair(c, rng) if c is not None else None
            if c is None or c in evaluated or c in pending:
                continue
            if not budget.feasible(c):
                rejected += 1
                continue
            return c
        return None

    pending: list[Choice] = []
    for _ in range(population):  # each block pruned with probability 1/2, then repaired to the budget
        c = new_child(lambda: tuple(i for i in range(sn.num_candidates) if rng.random() < 0.5), pending)
        if c is not None:
            pending.append(c)
    if not pending:
        raise PruningError(f"no subnet satisfies the budget {budget.kind}={budget.value!r}")
    key = _rank_key
    for g in range(generations):
        for c in pending:
            evaluated[c] = evaluate(c, g + 1)
        ranked = sorted(evaluated.values(), key=key)
        bar.set_postfix(generation=f"{g + 1}/{generations}", best=f"{ranked[0]['proxy']:.4f}")
        if progress is not None:
            best = ranked[0]
            progress(f"generation {g + 1}/{generations}: {len(evaluated)} subnets evaluated, best proxy "
                     f"{best['proxy']:.4f} pruning {best['paths']}")
        if g == generations - 1:
            break
        top = [r["choice"] for r in ranked[:parents]]
        pending = []
        for j in range(population):
            if j < round(crossover * population) and len(top) >= 2:
                make = (lambda: _crossover(*rng.sample(top, 2), sn.num_candidates, rng))
            else:
                make = (lambda: _mutate(rng.choice(top), sn.num_candidates, mutation_prob, rng))
            c = new_child(make, pending)
            if c is not None:
                pending.append(c)
        if not pending:
            break
    ranked = sorted(evaluated.values(), key=key)
    for i, r in enumerate(ranked):
        r["rank"] = i + 1
    dense = evaluate_subnet(sn, (), eval_data, calib_data=calib_data, recalibrate=recalibrate, score_fn=score_fn)
    bar.update(bar.total - bar.n)
    bar.close()
    dense.update(choice=(), macs_ratio=1.0 if budget.table else None,
                 latency_ratio=1.0 if budget.kind == "target_latency" else None)
    return SearchResult(ranked, {budget.kind: budget.value}, dense, [r.path for r in sn.refs],
                        settings=dict(population=population, generations=generations, parents=parents,
                                      mutation_prob=mutation_prob, crossover=crossover, seed=seed,
                                      recalibrate=recalibrate, proxy="score_fn" if score_fn else "accuracy"),
                        rejected=rejected)


def _rank_key(r: dict):
    """Best proxy first; ties: lower loss, then fewer MACs, then the choice itself (deterministic)."""
    return (-r["proxy"], r.get("loss") or 0.0, r.get("macs") or 0.0, r["choice"])


def _mutate(choice: Choice, n: int, p: float, rng: random.Random) -> Choice:
    c = set(choice)
    for i in range(n):
        if rng.random() < p:
            c ^= {i}
    return tuple(sorted(c))


def _crossover(a: Choice, b: Choice, n: int, rng: random.Random) -> Choice:
    sa, sb = set(a), set(b)
    return tuple(i for i in range(n) if (i in sa if rng.random() < 0.5 else i in sb))

