"""DepGraphCallback: structured pruning on a schedule during training, with the paper's sparse learning.

Masks grow on the schedule (:class:`~hf_prune.trainer.callback.ScheduledPruningCallback`); scores are
made identical on every process before each allocation and the removed units are compared across
ranks afterwards; the model is compacted when training ends (``compact_at_end``).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ...core.distributed import (ShardedSum, check_same_everywhere, local_part, named_tensors, shard_region,
                                 sync_scores)
from ...engine.importance import unit_scores
from ...engine.pruner import StructuredPruner, compact
from ...errors import ConfigError, PruningError
from ...trainer.callback import ScheduledPruningCallback
from .config import DepGraphConfig

__all__ = ["DepGraphCallback"]

REFERENCE_KEYS = ("macs", "params", "prunable_params")


class DepGraphCallback(ScheduledPruningCallback):
    """DepGraph (Fang et al., CVPR 2023): iterative group pruning on a schedule, optional sparse learning.

    ``DepGraphCallback(config=None, *, example_inputs=None, reference=None, **fields)`` with a
    :class:`DepGraphConfig` or its fields (``target_macs=0.5, schedule="cubic", end=0.5, ...``).

    Coupled units (a channel with every slice of every tensor it touches, an attention head, ...) are
    removed together; importance is aggregated over the whole unit: ``"l2"`` / ``"l1"`` group magnitude
    (the paper's baseline "w/o SL" with l2) or ``"taylor"`` (``|w · ∂L/∂w|``, accumulated after every
    backward since the previous pruning step; a due step waits one step if no gradient was seen yet).

    ``group_sparsity=λ`` is the paper's sparse learning (Sec. 3.3 of arXiv 2301.12093). For every group
    ``g`` of coupled units, the paper adds ``R(g) = Σ_k γ_k · I_{g,k}`` to the loss, where
    ``I_{g,k} = Σ_{w ∈ g} ||w[k]||²`` is unit ``k``'s squared L2 norm summed over *every* parameter slice
    the unit couples (both sides of each layer, norms, biases, ...) and
    ``γ_k = 2^{α (I_g^max − I_{g,k}) / (I_g^max − I_g^min)}`` (``α = sparse_alpha``, 4 in the paper: γ
    from 1 for the most important unit to 16 for the least), held constant within a step, so that the
    less important units of each group shrink faster, together. Three forms (``sparse_penalty``), each
    applied after clipping and DDP averaging, before ``optimizer.step()``, on every step before the
    schedule's last pruning step; γ uses the units not yet removed:

    * ``"squared"`` (default): the paper's ``λ Σ_k γ_k I_{g,k}``, its gradient ``2 λ γ_k w`` **added to
      ``.grad``**. Right for SGD (the paper's optimizer; measured in ``benchmarks/results/sparse_learning.md``).
    * ``"squared_decoupled"``: the same penalty applied like AdamW's decoupled weight decay: every slice
      of unit ``k`` is scaled by ``1 − lr · 2 λ γ_k`` (``lr``: the current learning rate of the
      parameter's group in the optimizer; a slice shared by two units, e.g. output channel ``i`` and
      input channel ``j`` of one weight, by ``1 − lr · (2λγ_i + 2λγ_j)``), before the optimizer's own
      update. Under plain SGD (no momentum, no weight decay) this is the same update as ``"squared"``
      (``w − lr·(∇L + 2λγw)``); under momentum or Adam-type optimizers it is not. Use it with
      **Adam / AdamW** (the transformers Trainer's default): there the gradient form is divided by
      Adam's running gradient scale, so on a pretrained model, whose task gradient is tiny, every
      penalised weight moves by about ``lr`` per step whatever λ is; decoupled, the shrink per step is
      ``lr · 2λγ_k`` as with SGD, so λ keeps its meaning (pretrained EfficientNet-Lite1 with AdamW:
      ``benchmarks/results/sparse_learning_pretrained.md``). The callback reads the learning rates from the optimizer the Trainer
      passes, or from ``cb.pre_optimizer_step(optimizer)`` in a plain loop (without one it raises).
      With a gradient form and an Adam-type optimizer it warns once.
    * ``"lasso"``: a weighted group lasso ``λ Σ_k γ_k ||w_k||₂`` (gradient ``λ γ_k w / ||w_k||``, added
      to ``.grad``), which is not in the paper and drives units to exactly zero at a constant rate.

    What the paper's reference code does (Torch-Pruning's ``GroupNormPruner.regularize``, called
    between ``backward()`` and ``optimizer.step()``): for each group, ``γ = α^{(n_max − n)/(n_max − n_min)}``
    with ``α = 2^4`` from the group's per-unit L2 norms ``n`` (the square root of its group importance,
    not the squared norm the paper writes), and ``.grad += reg · γ · w`` on the output slices of
    convolutions / linears, their input slices and BatchNorm weights (biases only with ``bias=True``;
    default ``reg`` 1e-4). That is the squared penalty with ``reg = 2λ``, on fewer tensors than here:
    hf_prune follows the paper's formula (γ from squared norms, every coupled parameter slice).

    ``reference``: ``{"macs", "params", "prunable_params"}`` of the model the targets refer to (staged
    fine-tuning passes the original dense model's counts, so that each stage's target is relative to it
    rather than to the already-pruned input of the stage).
    """

    config_class = DepGraphConfig

    def __init__(self, config=None, *, example_inputs=None, reference: dict | None = None, **fields):
        super().__init__(config, example_inputs=example_inputs, **fields)
        if self.config.importance == "activation":
            raise ConfigError("importance='activation' scores units on calibration data in one-shot "
                              "hf_prune.prune(..., calib=); during training use 'l2', 'l1' or 'taylor'")
        if self.config.reconstruct or self.config.reconstruct_layers != "consumers":
            raise ConfigError(f"reconstruct={self.config.reconstruct!r}, reconstruct_layers="
                              f"{self.config.reconstruct_layers!r}: the re-fit belongs to one-shot hf_prune.prune(..., "
                              "calib=); during training the fine-tuning itself repairs the model")
        if reference is not None and not set(REFERENCE_KEYS) <= set(reference):
            raise ConfigError(f"reference={reference!r} must have the keys {REFERENCE_KEYS}")
        self.reference = dict(reference) if reference is not None else None

    @property
    def target_kind(self) -> str:
        return self.config.target_kind

    def _reset(self) -> None:
        super()._reset()
        self.pruner: StructuredPruner | None = None
        self.final_removed: list | None = None
        self._taylor: torch.Tensor | None = None
        self._taylor_count = 0
        self._latency = None
        self._warned_adaptive = False

    # ------------------------------------------------------------------ protocol
    def prepare(self, model: nn.Module, example_inputs) -> None:
        c = self.config
        self.pruner = StructuredPruner(model, example_inputs, importance="l2" if c.importance == "taylor"
                                       else c.importance, mode=c.mode, round_to=c.round_to,
                                       ignored_layers=c.ignored_layers, prune_stem=c.prune_stem)
        if c.target_latency is not None:  # measured once, on the dense model, before training
            o = c.latency_options()
            self._latency = self.pruner.latency_model(device=o["latency_device"], batch_size=o["latency_batch_size"],
                                                      dtype=o["latency_dtype"])
        final = self.schedule.final_target
        if final is not None and self.schedule.final > 0:
            try:  # an unreachable target fails now, before any training step
                self.pruner.plan(**{self.schedule.kind: final}, **self._latency_args())
            except PruningError as exc:
                raise ConfigError(f"{self.target_kind}={getattr(c, self.target_kind)} cannot be reached on "
                                  f"{type(model).__name__} with round_to={c.round_to}: {exc}") from None

    def resolve_schedule(self):
        """The config's schedule, with targets converted from ``reference`` to this model."""
        t = self.schedule_template()
        if self.reference is None:
            return t
        cur, ref = self.current_counts(), self.reference
        if t.kind == "target_macs":
            rel = t.final_target * ref["macs"] / max(cur["macs"], 1)
            final = max(0.0, 1.0 - min(rel, 1.0))
        else:
            want_removed = t.final_target * ref["prunable_params"] - (ref["params"] - cur["params"])
            final = min(max(0.0, want_removed / max(cur["prunable_params"], 1)), 0.999)
        if final == 0.0:
            warnings.warn(f"the model already meets the target ({t.kind}={t.final_target} of the reference): "
                          "this stage prunes nothing", stacklevel=3)
        return type(t)(final=final, kind=t.kind, initial=min(t.initial, final), start=t.start, end=t.end,
                       frequency=t.frequency)

    def _latency_args(self) -> dict:
        """With ``target_latency``: the latency model measured in :meth:`prepare`. Plans made while masks are
        installed are not re-timed (that needs a compacted copy of the model)."""
        return {} if self._latency is None else {"latency": self._latency, "verify": False}

    def current_counts(self) -> dict:
        g = self.pruner.graph
        return {"macs": self.pruner.dense_macs, "params": self.pruner.dense_params,
                "prunable_params": g.params(only_prunable=True)}

    def ready_to_prune(self) -> bool:
        return self.config.importance != "taylor" or self._taylor_count > 0

    def compute_scores(self) -> torch.Tensor:
        """Raw importance per union-find root, on this process."""
        if self.config.importance == "taylor":
            return self._taylor / max(self._taylor_count, 1)
        return unit_scores(self.pruner.graph, self.config.importance, tensors=named_tensors(self.trained_model))

    def prune_to(self, step: int, target: dict) -> bool:
        scores = sync_scores(self.compute_scores().double(), self.config.sync)
        before = self.pruner.removed
        try:
            planned = self.pruner.plan(scores=scores, **target, **self._latency_args())
            changed = not torch.equal(planned, before)
            if changed:
                self.pruner.apply(planned)
        except PruningError as exc:
            raise PruningError(f"{type(self).__name__}: pruning at step {step} to {target} failed: {exc}") from exc
        check_same_everywhere(self.pruner.removed)
        if changed:
            self._mask_trained()
        self._taylor, self._taylor_count = None, 0
        return changed

    def gradients(self) -> None:
        last = self.schedule.steps(self.total_steps)[1]
        if self.config.importance == "taylor" and (self.step < last or self.pending):
            self._accumulate_taylor()
        if self.config.group_sparsity > 0 and self.step < last:
            self._regularize()

    def enforce(self) -> None:
        mask = self.pruner.mask
        if mask is not None:
            mask.enforce(self.trained_model)

    def _mask_trained(self) -> None:
        """Sharded training: the pruner masked the full-shape copy; mask the trained model's shards too, and
        give its normalisations the same hooks (they are removed with the copy's when the mask changes)."""
        mask = self.pruner.mask
        if self.sharded and mask is not None:
            mask.install_hooks(self.trained_model)
            mask.enforce(self.trained_model)

    def counts(self) -> dict:
        s = dict(self.pruner.stats())
        if self.reference is not None:
            s["macs_ratio"] = s["macs"] / max(self.reference["macs"], 1)
            s["params_ratio"] = s["params"] / max(self.reference["params"], 1)
        s["dense_macs"] = self.reference["macs"] if self.reference else self.pruner.dense_macs
        s["dense_params"] = self.reference["params"] if self.reference else self.pruner.dense_params
        return s

    def finalize(self) -> dict | None:
        self.final_removed = self.removed_slices()
        self.final_stats = self.counts()
        if not self.config.compact_at_end:
            return None  # masks stay (staged fine-tuning compacts between stages)
        if self.total_steps is not None:
            self.warn_if_early()
        if self.pruner.mask is not None:
            compact(self.model)
        s = self.final_stats
        out = {"params_before": int(s["dense_params"]), "params_after": int(s["params"]),
               "macs_before": int(s["dense_macs"]), "macs_after": int(s["macs"])}
        if self._latency is not None:  # what the latency model predicts for the final widths (not re-timed)
            out["predicted_latency_ratio"] = float(self._latency.ratio(self.pruner.graph.keep_mask(
                self.pruner.removed)))
        return out

    # ------------------------------------------------------------------ checkpoints
    def removed_slices(self) -> list:
        """``[(tensor name, dim, removed indices)]`` for every tensor dim that lost something."""
        g = self.pruner.graph
        keep = g.keep_mask(self.pruner.removed)
        out = []
        for m in g.members:
            gone = torch.nonzero(~keep[m.units]).reshape(-1)
            if gone.numel():
                out.append((m.tensor, int(m.dim), gone.tolist()))
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "taylor_count": self._taylor_count,
                "removed": [{"tensor": t, "dim": d, "indices": i} for t, d, i in self.removed_slices()]}

    def extra_tensors(self) -> dict:
        return {"taylor": self._taylor} if self._taylor is not None else {}

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        super().load_state_dict(state, tensors)
        removed = self._roots_from_slices(state["removed"])
        if removed.numel() or self.pruner.mask is not None:
            self.pruner.apply(removed)
            self._mask_trained()
        check_same_everywhere(self.pruner.removed)
        self._taylor_count = int(state["taylor_count"])
        tensors = tensors or {}
        self._taylor = tensors["taylor"].to(torch.float64) if "taylor" in tensors else None

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

    # ------------------------------------------------------------------ Taylor and sparse learning
    def _prunable_params(self):
        """The graph and ``(member, parameter of the trained model)`` pairs (its shards when sharded)."""
        g = self.pruner.graph
        tensors = named_tensors(self.trained_model)
        return g, [(m, tensors[m.tensor]) for m in g.members if m.tensor in g.param_names]

    @torch.no_grad()
    def _accumulate_taylor(self) -> None:
        g, members = self._prunable_params()
        scores = ShardedSum(g.trace.uf.size)
        cache = {}
        for m, p in members:
            if p.grad is None:
                continue
            if m.tensor not in cache:
                cache[m.tensor] = (local_part(p).float() * local_part(p.grad).float()).abs()
            s = cache[m.tensor]
            dims = [d for d in range(s.dim()) if d != m.dim]
            per_index = s.sum(dim=dims) if dims else s
            scores.add(m.units[shard_region(p)[m.dim]], per_index.double(), p)
        scores = scores.total()
        self._taylor = scores if self._taylor is None else self._taylor + scores
        self._taylor_count += 1

    def _penalty_coefficients(self, g) -> torch.Tensor:
        """Per union-find root: ``2λγ_k`` (squared forms) or ``λγ_k / ||w_k||`` (lasso), 0 for removed units."""
        c = self.config
        sq = unit_scores(g, "l2", tensors=named_tensors(self.trained_model))  # ||w_u||² over every slice of unit u
        keep = g.keep_mask(self.pruner.removed)
        coef = torch.zeros_like(sq)
        for grp in g.groups:
            units = grp.units[keep[grp.units]]
            if units.numel() == 0:
                continue
            imp = sq[units]
            span = float(imp.max() - imp.min())
            rel = (imp.max() - imp) / span if span > 0 else torch.zeros_like(imp)
            gamma = torch.pow(2.0, c.sparse_alpha * rel)
            if c.sparse_penalty == "lasso":
                coef[units] = c.group_sparsity * gamma / imp.sqrt().clamp_min(1e-12)
            else:
                coef[units] = 2.0 * c.group_sparsity * gamma
        return coef

    def _learning_rates(self) -> dict:
        """``{id(parameter): lr}`` of the optimizer's parameter groups, as they are for the coming step."""
        opt = self.optimizer
        if opt is None or not hasattr(opt, "param_groups"):
            raise PruningError(
                f"{type(self).__name__}: sparse_penalty='squared_decoupled' shrinks the weights by the optimizer's "
                "learning rate, but no optimizer was passed: in a plain loop call cb.pre_optimizer_step(optimizer) "
                "(a transformers Trainer passes its own), or use sparse_penalty='squared' (added to the gradients)")
        return {id(q): float(group["lr"]) for group in opt.param_groups for q in group["params"]}

    def _warn_if_adaptive(self) -> None:
        """The gradient forms under Adam-type optimizers: the penalty is divided by the running gradient scale, so
        on a converged model (tiny task gradients) every penalised weight moves by about lr per step whatever λ."""
        opt = self.optimizer
        if self._warned_adaptive or opt is None or not any("betas" in grp for grp in getattr(opt, "param_groups", ())):
            return
        self._warned_adaptive = True
        warnings.warn(f"sparse_penalty={self.config.sparse_penalty!r} adds the sparse-learning penalty to the gradients, "
                      f"which {type(opt).__name__} normalises per weight, so λ stops setting its size; with Adam-type "
                      "optimizers use sparse_penalty='squared_decoupled' (the paper's penalty applied like AdamW's "
                      "weight decay)", stacklevel=4)

    @torch.no_grad()
    def _regularize(self) -> None:
        c = self.config
        decoupled = c.sparse_penalty == "squared_decoupled"
        lrs = self._learning_rates() if decoupled else None
        if not decoupled:
            self._warn_if_adaptive()
        g, members = self._prunable_params()
        coef = self._penalty_coefficients(g)
        # The decoupled shrink of a tensor is lr times the sum of its members' terms (a weight in output channel i
        # and input channel j gets 1 − lr·(2λγ_i + 2λγ_j)), so that under plain SGD it is the gradient form's update.
        shrink = {}
        for m, p in members:
            if p.grad is None or not p.requires_grad:
                continue  # optimizers skip parameters without a gradient; so does the penalty
            if decoupled and id(p) not in lrs:
                continue  # not trained by this optimizer
            cm = coef[m.units[shard_region(p)[m.dim]]]
            if not bool(cm.any()):
                continue
            shape = [1] * p.dim()
            shape[m.dim] = -1
            w = local_part(p)
            if decoupled:
                term = w * cm.to(w.device, w.dtype).view(shape)
                if id(p) in shrink:
                    shrink[id(p)][1].add_(term)
                else:
                    shrink[id(p)] = (p, term)
            else:
                grad = local_part(p.grad)
                grad.add_(w * cm.to(grad.device, grad.dtype).view(shape))
        for key, (p, term) in shrink.items():
            local_part(p).sub_(term, alpha=lrs[key])
