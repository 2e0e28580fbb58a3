"""Layer allocation for unstructured weight pruning, and the one-shot entry point :func:`prune_weights`.

An *allocator* decides how sparse each layer is; it returns ``{layer name: sparsity}`` whose
pruned counts ``sparsity_l · n_l`` are integers summing **exactly** to ``round(sparsity · N)``
(``N`` = weights in the given layers). Selection inside a layer (magnitude, OBS) is separate
(:func:`hf_prune.sparse.masks.select_magnitude`, :func:`hf_prune.methods.ovit.obs.obs_prune_layer`).

* :func:`allocate_uniform` — every layer at the same sparsity (largest-remainder rounding).
* :func:`allocate_global` — global magnitude: one ``|w|`` threshold over all layers.
* :func:`allocate_lamp` — LAMP (Lee et al., ICLR 2021): score ``w_u² / Σ_{|w_v| ≥ |w_u|} w_v²``
  (sums inside the layer), one global threshold on the scores.
* :func:`allocate_erk` — Erdős–Rényi-Kernel (Evci et al., RigL 2020): density ∝
  ``Σ dims / Π dims`` of the weight shape, layers that would exceed density 1 are kept dense and the
  factor is re-solved.
* :func:`allocate_rd` — rate-distortion DP (:mod:`hf_prune.methods.rd.curves`), needs ``model`` and ``calib``.

Allocators take ``weights: {name: weight tensor}``; weights already zero (masked) are counted by
the magnitude-based ones as the first to go, so repeated calls only grow masks.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import PruningError
from .masks import WeightMasks, exact_counts, get_weight_masks, prunable_layers, select_magnitude, select_nm

__all__ = ["allocate_uniform", "allocate_global", "allocate_lamp", "allocate_erk", "allocate_rd", "ALLOCATORS",
           "allocate", "counts_to_sparsity", "prune_weights", "METHODS"]

METHODS = ("magnitude", "rd", "ovit")


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1): the fraction of prunable weights to remove")
    return float(sparsity)


def _sizes(weights: Mapping[str, torch.Tensor]) -> tuple[list[str], list[int]]:
    names = list(weights)
    if not names:
        raise PruningError("no layers to allocate sparsity to")
    return names, [int(weights[n].numel()) for n in names]


def _already(weights: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor] | None) -> list[int]:
    if not keep:
        return [0] * len(weights)
    return [int(keep[n].numel() - int(keep[n].sum())) if n in keep else 0 for n in weights]


def counts_to_sparsity(names: list[str], sizes: list[int], counts: list[int]) -> dict[str, float]:
    return {n: c / s if s else 0.0 for n, s, c in zip(names, sizes, counts)}


def _target(sizes: list[int], sparsity: float, lower: list[int]) -> int:
    total = int(round(sparsity * sum(sizes)))
    return max(total, sum(lower))


def allocate_uniform(weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None) -> dict[str, float]:
    """The same sparsity in every layer (counts rounded so that the total is exact)."""
    sparsity = _check_sparsity(sparsity)
    names, sizes = _sizes(weights)
    lower = _already(weights, keep)
    counts = exact_counts(sizes, [sparsity * n for n in sizes], _target(sizes, sparsity, lower), lower=lower)
    return counts_to_sparsity(names, sizes, counts)


def _threshold_counts(scores: list[torch.Tensor], k: int) -> list[int]:
    """Per-tensor counts of the ``k`` globally smallest scores (ties at the threshold go to the
    tensors in order), without sorting all scores."""
    if k <= 0:
        return [0] * len(scores)
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    if k >= flat.numel():
        return [s.numel() for s in scores]
    tau = torch.kthvalue(flat, k).values
    below = [int((s < tau).sum()) for s in scores]
    ties = [int((s == tau).sum()) for s in scores]
    rest = k - sum(below)
    out = []
    for b, t in zip(below, ties):
        take = min(t, rest)
        out.append(b + take)
        rest -= take
    return out


def _masked_scores(weights, keep, fn) -> list[torch.Tensor]:
    out = []
    for n, w in weights.items():
        s = fn(w.detach().float().reshape(-1))
        if keep is not None and n in keep:
            s = s.masked_fill(~keep[n].reshape(-1).to(s.device), -1.0)
        out.append(s.cpu())
    return out


def allocate_global(weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None) -> dict[str, float]:
    """Global magnitude: the ``round(sparsity · N)`` smallest ``|w|`` over all layers."""
    sparsity = _check_sparsity(sparsity)
    names, sizes = _sizes(weights)
    lower = _already(weights, keep)
    counts = _threshold_counts(_masked_scores(weights, keep, torch.abs), _target(sizes, sparsity, lower))
    return counts_to_sparsity(names, sizes, counts)


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score of every weight of one layer (flat, same order as ``w.reshape(-1)``)."""
    sq = w.detach().float().reshape(-1) ** 2
    vals, order = torch.sort(sq)
    suffix = torch.flip(torch.cumsum(torch.flip(vals.double(), [0]), 0), [0])
    sc = torch.where(suffix > 0, vals.double() / suffix.clamp_min(1e-300), torch.zeros_like(suffix))
    out = torch.empty_like(sq)
    out[order] = sc.float()
    return out


def allocate_lamp(weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None) -> dict[str, float]:
    """LAMP (Lee et al. 2021): global threshold on layer-adaptive magnitude scores."""
    sparsity = _check_sparsity(sparsity)
    names, sizes = _sizes(weights)
    lower = _already(weights, keep)
    counts = _threshold_counts(_masked_scores(weights, keep, lamp_scores), _target(sizes, sparsity, lower))
    return counts_to_sparsity(names, sizes, counts)


def erk_raw(shape) -> float:
    """Erdős–Rényi(-Kernel) density factor ``Σ dims / Π dims`` of a weight shape."""
    return sum(shape) / max(math.prod(shape), 1)


def allocate_erk(weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None,
                 power_scale: float = 1.0) -> dict[str, float]:
    """ERK (Evci et al. 2020): density_l = ε · (Σ dims / Π dims)^power_scale, capped at 1 (dense
    layers are fixed and ε re-solved until none exceeds 1); counts rounded to the exact total.
    Layers already sparser than ERK asks (masks only grow) keep their current count and the rest
    is re-distributed."""
    sparsity = _check_sparsity(sparsity)
    names, sizes = _sizes(weights)
    lower = _already(weights, keep)
    total_pruned = _target(sizes, sparsity, lower)
    keep_budget = sum(sizes) - total_pruned
    raw = [erk_raw(tuple(weights[n].shape)) ** power_scale for n in names]
    cap = [1.0 - lo / n if n else 1.0 for lo, n in zip(lower, sizes)]  # most density a layer can have
    fixed: dict[int, float] = {}  # layers held at their cap (dense, or as dense as earlier masks allow)
    eps = 0.0
    for _ in range(len(names) + 1):
        free = [i for i in range(len(names)) if i not in fixed]
        rest = keep_budget - sum(fixed[i] * sizes[i] for i in fixed)
        denom = sum(raw[i] * sizes[i] for i in free)
        eps = rest / denom if denom > 0 else 0.0
        over = [i for i in free if eps * raw[i] > cap[i]]
        if not over:
            break
        for i in over:
            fixed[i] = cap[i]
    wanted = []
    for i in range(len(names)):
        dens = fixed[i] if i in fixed else eps * raw[i]
        wanted.append((1.0 - min(max(dens, 0.0), 1.0)) * sizes[i])
    counts = exact_counts(sizes, wanted, total_pruned, lower=lower)
    return counts_to_sparsity(names, sizes, counts)


def allocate_rd(model: nn.Module, sparsity: float, calib, *, layers=None, **opts) -> dict[str, float]:
    """Rate-distortion allocation; see :func:`hf_prune.methods.rd.curves.allocate_rd`."""
    from ..methods.rd.curves import allocate_rd as _rd

    return _rd(model, sparsity, calib, layers=layers, **opts)


ALLOCATORS = {"uniform": allocate_uniform, "global": allocate_global, "lamp": allocate_lamp, "erk": allocate_erk}


def allocate(name: str, weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None) -> dict[str, float]:
    """Dispatch to a data-free allocator by name (``uniform``, ``global``, ``lamp``, ``erk``)."""
    if name not in ALLOCATORS:
        raise PruningError(f"allocation={name!r} is not one of {sorted(ALLOCATORS) + ['rd']}")
    return ALLOCATORS[name](weights, sparsity, keep=keep)


# ----------------------------------------------------------------------------------------- one-shot


def _masks_for(model: nn.Module, layers, discovery: dict) -> tuple[WeightMasks, bool]:
    existing = get_weight_masks(model)
    if existing is not None:
        if layers is not None and list(layers) != existing.layers:
            raise PruningError("the model already carries weight masks on other layers; call "
                               "WeightMasks.detach(model) first or pass the same layers")
        return existing, False
    return WeightMasks.for_model(model, layers=list(layers) if layers is not None else None, **discovery), True


def prune_weights(model: nn.Module, *, method: str = "magnitude", sparsity: float, calib=None,
                  allocation: str | Mapping[str, float] | None = None, layers=None, nm: tuple[int, int] | None = None,
                  exclude_stem: bool = True, exclude_classifier: bool = True, exclude=(), example_inputs=None,
                  **opts) -> dict:
    """One-shot unstructured weight pruning, in place; returns :meth:`WeightMasks.stats` plus
    ``method``, ``allocation`` and ``settings``.

    * ``method="magnitude"``: magnitude selection; ``allocation`` ``"global"`` (default),
      ``"uniform"``, ``"lamp"``, ``"erk"``, ``"rd"`` or an explicit ``{layer: sparsity}``.
    * ``method="rd"``: magnitude selection with the RD allocation (``calib`` needed; ``opts`` go
      to :func:`hf_prune.methods.rd.curves.allocate_rd`: ``grid``, ``reduction``, ``max_batches``, ...).
    * ``method="ovit"``: OBS selection with block-wise empirical Fisher (``calib`` with labels
      needed); ``allocation=None`` = the paper's global threshold on OBS losses, or any of the
      above; ``opts`` go to :func:`hf_prune.methods.ovit.obs.ovit_prune`.
    * ``nm=(2, 4)``: N:M sparsity inside every layer instead of a sparsity allocation
      (``sparsity`` must then be ``1 − n/m`` or omitted via ``sparsity=None``).

    ``calib``: an iterable of ``{"pixel_values", "labels"}`` dicts or ``(x, y)`` tuples. Layers:
    ``layers`` (names) or every Conv/Linear except stem and classifier (``exclude_stem``,
    ``exclude_classifier``, ``exclude``). The mask object is attached to the model
    (:func:`hf_prune.sparse.masks.get_weight_masks`) so training can :meth:`~WeightMasks.enforce`
    it; calling again only grows the masks. Transactional: on any error the weights and masks are
    restored and the error re-raised.
    """
    if method not in METHODS:
        raise PruningError(f"unknown weight-pruning method {method!r}; available: {', '.join(METHODS)}")
    if nm is not None:
        n_, m_ = nm
        if sparsity is None:
            sparsity = 1.0 - n_ / m_
        elif abs(sparsity - (1.0 - n_ / m_)) > 1e-9:
            raise ValueError(f"nm={nm} means sparsity {1 - n_ / m_}, but sparsity={sparsity} was given")
    sparsity = _check_sparsity(sparsity)
    discovery = dict(exclude_stem=exclude_stem, exclude_classifier=exclude_classifier, exclude=exclude,
                     example_inputs=example_inputs)
    wm, fresh = _masks_for(model, layers, discovery)
    saved_w = {n: wm.weight(n).detach().clone() for n in wm.layers}
    saved_m = {n: m.clone() for n, m in wm.masks.items()}
    try:
        if method == "ovit":
            from ..methods.ovit.obs import ovit_prune

            result = ovit_prune(model, sparsity, calib, masks=wm, allocation=allocation, nm=nm, **opts)
            alloc_name = result["allocation"]
        else:
            alloc = "rd" if method == "rd" else (allocation if allocation is not None else "global")
            if method == "rd" and allocation not in (None, "rd"):
                raise PruningError(f"method='rd' is the RD allocation; allocation={allocation!r} conflicts "
                                   "(use method='magnitude', allocation=... for the others)")
            weights = {n: wm.weight(n) for n in wm.layers}
            if nm is not None:
                for n in wm.layers:
                    wm.set(n, select_nm(wm.weight(n), nm[0], nm[1], keep=wm[n]))
                alloc_name = f"{nm[0]}:{nm[1]}"
            else:
                if isinstance(alloc, Mapping):
                    targets, alloc_name = dict(alloc), "explicit"
                elif alloc == "rd":
                    from ..methods.rd.curves import allocate_rd as _rd

                    targets = _rd(model, sparsity, calib, masks=wm, **opts)
                    alloc_name = "rd"
                else:
                    if opts:
                        raise TypeError(f"unexpected options {sorted(opts)} for allocation={alloc!r}")
                    targets = allocate(alloc, weights, sparsity, keep=wm.masks)
                    alloc_name = alloc
                for n in wm.layers:
                    wm.set(n, select_magnitude(wm.weight(n), targets.get(n, 0.0), keep=wm[n]))
            wm.enforce()
        wm.attach(model)
    except BaseException:
        with torch.no_grad():
            for n, w in saved_w.items():
                wm.weight(n).copy_(w)
        wm.masks = saved_m
        if fresh:
            WeightMasks.detach(model)
        raise
    stats = wm.stats()
    stats.update(method=method, allocation=alloc_name,
                 settings={"sparsity": sparsity, "nm": list(nm) if nm else None,
                           **{k: v for k, v in opts.items() if isinstance(v, (int, float, str, bool, type(None)))}})
    return stats


# ----------------------------------------------------------------------------------------- callbacks
#
# The callback classes subclass hf_prune.trainer.callback.PruningCallback, whose import pulls in
# transformers (~5 s); they are therefore built on first access (PEP 562 module __getattr__ here
# and in rd.py / ovit.py), so that one-shot pruning stays cheap to import.

_CALLBACK_CACHE: dict = {}


def _calib_from_dataloader(dataloader, n: int, batch_size: int) -> list:
    """Up to ``n`` training items (labels kept) put through the loader's collator in batches of
    ``batch_size``; the dataset is indexed directly, so the sampler and the RNG are untouched."""
    ds = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None) or torch.utils.data.default_collate
    if ds is None or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise PruningError("no calib= was given and the training dataloader's dataset cannot be indexed; pass "
                           "calib= (a list of {'pixel_values', 'labels'} batches)")
    items = [ds[i] for i in range(min(n, len(ds)))]
    if not items:
        raise PruningError("the training dataset is empty; pass calib=")
    return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def _broadcast_(tensors) -> None:
    """Make tensors identical on every process (rank 0's values); no-op without torch.distributed."""
    from ..trainer.callback import _comm_device, _dist

    dist = _dist()
    if dist is None:
        return
    dev = _comm_device()
    for t in tensors:
        buf = t.detach().to(dev, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()
        dist.broadcast(buf, src=0)
        with torch.no_grad():
            t.copy_(buf.to(t.device, t.dtype))


def weight_pruning_callback_base():
    """The class :class:`WeightPruningCallback` (built on first use; see the note above)."""
    if "base" in _CALLBACK_CACHE:
        return _CALLBACK_CACHE["base"]
    from ..trainer.callback import STATE_VERSION, PruningCallback
    from ..core.schedules import target_from_amount

    class WeightPruningCallback(PruningCallback):
        """Unstructured weight pruning on a sparsity schedule during ``Trainer.train()``.

        Base of :class:`~hf_prune.methods.rd.curves.RDCallback` and :class:`~hf_prune.methods.ovit.obs.OViTCallback`
        (and, as ``method="magnitude"``, global-magnitude pruning itself). Masks are
        :class:`~hf_prune.sparse.masks.WeightMasks` on the prunable Conv/Linear weights: they only
        grow, are re-applied (weights zeroed) in ``on_optimizer_step``, and are checkpointed in
        ``hf_prune_state.json`` (JSON run-length/bitmap form). Nothing is compacted at the end
        (shapes do not change with unstructured sparsity); the zeros stay in the weights.

        Args: ``sparsity`` (final fraction of the prunable weights removed), ``schedule``
        (``"cubic"`` default, ``"linear"``, ``"oneshot"`` or a ``SparsitySchedule`` of kind
        ``"sparsity"``), ``start``, ``end``, ``frequency``, ``initial`` as in
        :class:`~hf_prune.trainer.callback.PruningCallback`; ``calib``: calibration batches (default: the
        first ``calib_size`` training items through the dataloader's collator, in batches of
        ``calib_batch_size``); ``allocation``: see :func:`prune_weights`; ``layers`` /
        ``exclude_stem`` / ``exclude_classifier`` / ``exclude``: which layers; ``method_options``:
        passed to the method at each pruning step. ``stats()`` reports ``macs_ratio`` 1.0: dense
        kernels do the same work on zeros.

        In distributed runs the masks *and the pruned layers' weights* (oViT updates them) are
        broadcast from rank 0 after every pruning step.
        """

        method = "magnitude"

        def __init__(self, *, sparsity: float | None = None, schedule="cubic", start=0.0, end=0.7, frequency: int = 1,
                     initial: float = 0.0, calib=None, calib_size: int = 64, calib_batch_size: int = 16,
                     allocation=None, layers=None, exclude_stem: bool = True, exclude_classifier: bool = True,
                     exclude=(), example_inputs=None, target_macs=None, method_options: dict | None = None):
            if target_macs is not None:
                raise ValueError(f"{type(self).__name__} prunes individual weights, which does not reduce dense "
                                 "MACs; give sparsity= (fraction of prunable weights to remove) instead of "
                                 "target_macs=")
            kind = getattr(schedule, "kind", "sparsity")
            if kind != "sparsity":
                raise ValueError(f"{type(self).__name__} needs a schedule of kind 'sparsity', got {kind!r}")
            super().__init__(sparsity=sparsity, schedule=schedule, start=start, end=end, frequency=frequency,
                             initial=initial, compact_at_end=False, example_inputs=example_inputs, round_to=None,
                             sync="broadcast")
            self.calib = calib
            self.calib_size, self.calib_batch_size = int(calib_size), int(calib_batch_size)
            self.allocation = allocation
            self.layer_names = list(layers) if layers is not None else None
            self.discovery = dict(exclude_stem=exclude_stem, exclude_classifier=exclude_classifier,
                                  exclude=tuple(exclude))
            self.method_options = dict(method_options or {})
            self._train_dataloader = None

        def _reset(self) -> None:
            super()._reset()
            self.masks: WeightMasks | None = None

        @property
        def settings(self) -> dict:
            t = self._schedule_template
            alloc = self.allocation if self.allocation is None or isinstance(self.allocation, str) else "explicit"
            opts = {k: v for k, v in self.method_options.items() if isinstance(v, (int, float, str, bool, type(None)))}
            return {"method": self.method, "allocation": alloc, "schedule": t.to_dict(), "sparsity": t.final_target,
                    **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.discovery.items()}, **opts}

        # -------------------------------------------------------------- setup
        def setup(self, model: nn.Module, total_steps: int, example_inputs=None) -> None:
            if not isinstance(model, nn.Module):
                raise PruningError(f"model is a {type(model).__name__}, not a torch.nn.Module")
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(f"total_steps={total_steps!r} must be a positive int (the number of optimizer "
                                 "steps)")
            if self.masks is not None and self.model is model and not self.finished:
                self.total_steps = total_steps
                self._resolve_schedule()
                return
            self._reset()
            existing = get_weight_masks(model)
            if existing is not None:
                masks = existing
            else:
                inputs = example_inputs if example_inputs is not None else self.example_inputs
                masks = WeightMasks.for_model(model, layers=self.layer_names, example_inputs=inputs, **self.discovery)
            masks.attach(model)
            self.model, self.total_steps, self.masks = model, total_steps, masks
            self.pruner = masks  # marks "set up" for the base class
            self._resolve_schedule()

        def _resolve_schedule(self) -> None:
            self.schedule = self._schedule_template

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            from ..trainer.callback import example_inputs_from_dataloader

            self._train_dataloader = train_dataloader
            inputs = self.example_inputs
            if inputs is None and train_dataloader is not None and get_weight_masks(model) is None:
                try:  # only to find the stem exactly; the name-based fallback is used otherwise
                    inputs = example_inputs_from_dataloader(train_dataloader, n=1,
                                                            label_names=getattr(args, "label_names", None))
                    p = next(model.parameters(), None)
                    if p is not None:
                        inputs = {k: v.to(p.device) for k, v in inputs.items()} if isinstance(inputs, dict) \
                            else inputs.to(p.device)
                except Exception:  # noqa: BLE001
                    inputs = None
            self.setup(model, int(state.max_steps), inputs)
            if state.global_step > 0:
                self._resume(args, state)
            self.step = state.global_step

        def calibration(self):
            if self.calib is not None:
                return self.calib
            if self._train_dataloader is None:
                raise PruningError(f"{type(self).__name__} needs calibration data: pass calib= (plain loops) or "
                                   "train with a Trainer (the first training items are used)")
            self.calib = _calib_from_dataloader(self._train_dataloader, self.calib_size, self.calib_batch_size)
            return self.calib

        # -------------------------------------------------------------- pruning
        def prune_masks(self, sparsity: float) -> None:
            """Grow ``self.masks`` to ``sparsity`` (method-specific; weights may be updated)."""
            prune_weights(self.model, method=self.method, sparsity=sparsity, allocation=self.allocation,
                          **({"calib": self.calibration()} if self.method != "magnitude" or self.allocation == "rd"
                             else {}), **self.method_options)

        def prune_to(self, step: int, target: dict) -> bool:
            sparsity = float(target["sparsity"])
            before = self.masks.stats()["num_pruned"]
            try:
                with torch.random.fork_rng(devices=[]):
                    self.prune_masks(sparsity)
            except PruningError as exc:
                raise PruningError(f"{type(self).__name__}: pruning at step {step} to sparsity={sparsity:.4f} "
                                   f"failed: {exc}") from exc
            _broadcast_([self.masks[n] for n in self.masks.layers] + [self.masks.weight(n) for n in self.masks.layers])
            self.masks.enforce()
            self._stats = None
            self.after_prune()
            return self.masks.stats()["num_pruned"] != before

        def optimizer_step(self) -> None:
            if self.masks is None or self.finished:
                return
            self.masks.enforce()

        def finish(self):
            if self.masks is None or self.finished:
                return self.model
            self.masks.enforce()
            self.final_stats = self.stats()
            self._attach_spec()
            self.finished = True
            return self.model

        def on_train_end(self, args, state, control, **kwargs):
            self.finish()

        # -------------------------------------------------------------- stats
        def stats(self) -> dict:
            if self._stats is None:
                s = self.masks.stats()
                total = sum(p.numel() for p in self.model.parameters())
                self._stats = {"sparsity": s["global_sparsity"], "macs_ratio": 1.0,
                               "params_ratio": (total - s["num_pruned"]) / max(total, 1),
                               "num_pruned": s["num_pruned"], "num_weights": s["num_weights"]}
            return self._stats

        def log_entries(self) -> dict:
            if self.masks is None:
                return {}
            out = super().log_entries()
            s = self.final_stats if self.finished else self.stats()
            out["prune/sparsity"] = round(float(s["sparsity"]), 6)
            return out

        # -------------------------------------------------------------- checkpoints
        def removed_slices(self) -> list:
            return []

        def state_dict(self) -> dict:
            self._require_setup()
            return {"format_version": STATE_VERSION, "callback": type(self).__name__, "settings": self.settings,
                    "schedule": self.schedule.to_dict(), "total_steps": self.total_steps, "global_step": self.step,
                    "pending": self.pending, "events": self.events, "weight_masks": self.masks.state_dict(),
                    "stats": {k: float(v) for k, v in self.stats().items()}}

        def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
            self._require_setup()
            if state.get("format_version") != STATE_VERSION or "weight_masks" not in state:
                raise PruningError(f"not a {type(self).__name__} state (format_version "
                                   f"{state.get('format_version')!r}, keys {sorted(state)[:8]})")
            self.masks.load_state_dict(state["weight_masks"])
            self.masks.enforce()
            self.events = list(state.get("events", []))
            self.pending = bool(state.get("pending", False))
            self.step = int(state.get("global_step", 0))
            self.load_extra_tensors(tensors or {})
            self._stats = None

        def _attach_spec(self) -> None:
            config = getattr(self.model, "config", None)
            if config is None:
                return
            try:
                from ..hub import structure_spec

                config.hf_prune = structure_spec(self.model, method=self.method, settings=self.settings,
                                                 stats=self.masks.spec_stats())
            except Exception as exc:  # noqa: BLE001 - saving still works without the spec
                warnings.warn(f"could not record the pruning spec on model.config ({exc})", stacklevel=3)

    WeightPruningCallback.__module__ = __name__
    _CALLBACK_CACHE["base"] = WeightPruningCallback
    return WeightPruningCallback


def __getattr__(name: str):
    if name == "WeightPruningCallback":
        cls = weight_pruning_callback_base()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
