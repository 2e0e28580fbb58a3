"""UPDP: progressive depth pruning with exact block merging (Liu et al., AAAI 2024, arXiv 2401.06426).

The paper has four stages: (1) supernet training, (2) subnet search, (3) progressive training of the
chosen subnet, in which every block chosen for pruning moves gradually from its original form to a
*mergeable* one (activations -> identity, LayerNorm -> BatchNorm, a BN and one activation kept at the
end), and (4) exact re-parameterisation that merges each pruned block into fewer, linear layers.
There is no public code; this module implements (3) and (4), a cheap proxy for (2), and the one-shot
form; (1) and (2), the depth supernet and the evolutionary subnet search under a block-count, MACs or
measured-latency budget, are :mod:`hf_prune.methods.updp.search`, whose chosen blocks feed
``prune_depth(blocks=...)`` / ``UPDPCallback(blocks=...)``.

Public API
----------
* :func:`find_blocks` ``(model) -> list[BlockRef]``: candidate blocks in forward order.
* :func:`anneal` ``(model, blocks, *, end_act=True) -> list[AnnealedBlock]``: wrap blocks in place
  (``lam = 0``: the model is bit-for-bit the original); :func:`set_lambda`; :func:`calibrate`;
  :func:`recalibrate_bn`.
* :func:`merge_block` ``(model, block) -> dict``: replace one annealed block (at ``lam = 1``) by its
  exact :class:`~hf_prune.methods.updp.merge.MergedBlock`; returns its record entry.
* :func:`prune_depth` ``(model, *, example_inputs=None, blocks=None, num_blocks=None, target_macs=None)
  -> (model, record)``: one-shot UPDP (choose, anneal to 1 abruptly, recalibrate BN, merge);
  :func:`updp_prune` is the same returning only the model.
* :class:`UPDPAnnealer` ``(model, blocks, start, end)``: per-step lambda schedule for any training
  loop, :meth:`UPDPAnnealer.merge_all` at the end.
* ``UPDPCallback`` (``hf_prune.methods.updp.callback``, imported lazily: it needs transformers): the
  same inside ``transformers.Trainer``.

Per-family choices (what is kept, how it merges)
------------------------------------------------
Every family keeps *one BN and one activation at the end of the merged block* (the paper's rule),
folded where possible:

* **ConvNeXt V1** (timm ``ConvNeXtBlock``, HF ``ConvNextLayer``): ``dw7x7 -> LN -> fc1 -> GELU -> fc2
  -> layer scale, + x``. Mergeable form: ``LN -> BN`` (annealed), ``GELU -> identity`` (annealed), a new
  BN at the end of the residual branch, a GELU after the residual sum (appears with lambda). Merged:
  ``dw7x7 (BN folded; stays depthwise) -> 1x1 C->C (fc2.fc1, layer scale and end BN folded), + x ->
  GELU``: ``49C + C^2`` instead of ``49C + 8C^2`` MACs per pixel. A dense 7x7 would cost ``49C^2``, so
  the depthwise conv is never merged into the 1x1 (decided by MACs, :func:`~.updp_merge.plan_partition`).
* **Inverted residual** (MobileNetV2; timm ``InvertedResidual``, HF ``MobileNetV2InvertedResidual``):
  ``pw -> BN -> ReLU6 -> dw3x3 -> BN -> ReLU6 -> pw -> BN (+ x)``. Mergeable form: both ReLU6 ->
  identity; the projection BN is the kept BN; a ReLU6 after the residual sum appears with lambda.
  Merged (for expansion 6, always cheaper): one dense ``3x3 Cin->Cout`` conv, stride s, identity folded
  as a Dirac kernel, ``-> ReLU6``. Padding: the depthwise conv's zero padding is annealed to padding
  with the expansion's zero-input response (``lam * c``); at ``lam = 1`` that is the padding moved to
  the block input, so the dense conv is exact at the borders (TF "SAME" padding of transformers'
  ``tf_padding=True`` included). If merging would not save MACs the three convs stay separate.
* **ResNet** (timm ``BasicBlock`` / ``Bottleneck``, HF ``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``):
  inner ReLUs -> identity, and — a choice of ours, the paper gives no detail — the middle 3x3 conv is
  *kernel-annealed* to its centre tap (off-centre taps scaled by ``1 - lam``). Without it an exact
  merge cannot save MACs (two 3x3 compose into a 5x5, ``25 C^2`` > ``18 C^2``). The block's own output
  ReLU is the kept activation; the BNs fold. Merged basic block: one ``3x3 Cin->Cout`` conv (stride s)
  with the shortcut folded in (Dirac, or the 1x1 projection + BN at the centre tap) ``-> ReLU`` (about
  half the MACs). Bottleneck: the cheapest exact split by MACs: ``1x1 Cin->w -> 1x1 w->Cout, + x ->
  ReLU`` for identity blocks, one ``1x1 Cin->Cout`` with the projection folded for downsampling blocks.
* **ViT / DeiT** (timm ``vision_transformer.Block``, HF ``ViTLayer`` / ``DeiTLayer``): attention cannot
  be merged into a linear map, so the pruned block's attention branch is scaled by ``1 - lam`` and is
  gone at ``lam = 1``. In the MLP branch ``LN -> BN`` (BatchNorm over tokens: statistics over batch x
  tokens), ``GELU -> identity``, a BN ends the branch and a GELU after the residual sum appears with
  lambda. Merged: one ``Linear D->D`` (the BN before fc1 folds exactly into fc1 — a linear layer reads
  no padding; fc2.fc1, layer scale, end BN and the identity residual all fold) ``-> GELU``.

Open choices (documented here, as METHODS.md asks)
---------------------------------------------------
* Annealing formula: ``act_lam = (1 - lam) act + lam id``, ``norm_lam = (1 - lam) LN + lam BN``; new
  end-of-branch BN: ``(1 - lam) h + lam BN(h)``; new end activation: ``(1 - lam) y + lam act(y)``.
  ``lam`` is one python float per block (saved as extra state), set by the schedule (linear or cosine,
  :class:`hf_prune.core.schedules.Annealing`); at ``lam == 0`` the wrapper calls the original module.
* BN replacing LN: affine copied from the LN, ``eps`` from the LN, running statistics calibrated as
  the per-channel mean/variance of the LN's input (:func:`calibrate`), then learned (BN in train mode
  uses batch statistics, as usual).
* New end BN: calibrated to be the identity on the calibration data (``weight = sqrt(var + eps)``,
  ``bias = mean``, running stats = ``(mean, var)``), so it enters the branch smoothly.
* End activation: the block's own activation type. ``end_act=True`` (paper) for progressive training;
  the one-shot :func:`prune_depth` defaults to ``end_act=False`` because a new non-linearity inserted
  without any training only hurts (ResNet keeps its own output ReLU either way).
* One-shot: after setting ``lam = 1``, the running statistics of every BN inside the chosen blocks
  are re-estimated on ``example_inputs`` (affine parameters kept): the new end BN then maps the
  linearised branch back to the original branch's per-channel mean and variance.
* Block choice when only ``num_blocks`` / ``target_macs`` is given (a cheap stand-in for the paper's
  supernet search, which is :func:`hf_prune.methods.updp.search.search`): every candidate is annealed alone to ``lam = 1`` (with BN recalibration, without
  an added end activation, whatever ``end_act`` says) on a copy of the model and scored by the
  relative change of the output on ``example_inputs``
  (``||f' - f||^2 / ||f||^2``); ``num_blocks``: the ``k`` smallest; ``target_macs``: greedily by
  score per MAC saved until the model is at or below ``target_macs`` of its MACs. With no target at
  all, a quarter of the candidates (at least one) are chosen that way.
* Merging is done in float64 and cast back; ties between equally cheap splits go to fewer layers.

Exactness: the merged block equals the annealed block at ``lam = 1`` in eval mode (BN running stats),
to float rounding (``tests/test_updp.py`` measures it per family). ``AnnealedBlock`` forwards at
``lam = 0`` are the original modules' forwards.

Caveats
-------
* Wrap blocks *before* building the optimizer and before DDP (new BN parameters must be in both);
  :meth:`UPDPAnnealer.parameters` lists them. Blocks at ``lam = 0`` leave those parameters unused in
  the step, so DDP needs ``find_unused_parameters=True`` (the Trainer's default for models without
  gradient checkpointing).
* A merged HF ViT/DeiT layer is not a ``ViTLayer``: ``output_hidden_states`` no longer lists it.

Evidence and speed
------------------
``benchmarks/updp_evidence.py`` (progressive vs abrupt on real MNIST digits, search ranking) and
``benchmarks/updp_speed.py`` (merged vs dense latency); results in ``benchmarks/results/``.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...errors import PruningError
from ...core.execution import module_modes, recalibrate_batchnorm, restore_modes
from ...core.inputs import call_model
from .blocks import AnnealedBlock, UnsupportedBlock, block_family, check_block, make_annealed
from .merge import MergedBlock, MergeError

__all__ = ["BlockRef", "find_blocks", "anneal", "set_lambda", "annealed_blocks", "calibrate", "recalibrate_bn",
           "merge_block", "unwrap_block", "score_blocks", "stripped_copy", "prune_depth", "updp_prune", "anneal_lambda",
           "UPDPAnnealer", "AnnealedBlock", "MergedBlock", "UnsupportedBlock", "MergeError", "DEFAULT_FRACTION"]

DEFAULT_FRACTION = 0.25  # blocks pruned when no target is given: a quarter of the candidates (at least 1)


# --------------------------------------------------------------------------- finding blocks


@dataclass(frozen=True)
class BlockRef:
    """A candidate block. ``index``: its position among the candidates (what ``blocks=[...]`` takes);
    ``module_index``: its position in ``list(model.named_modules())`` (the structure spec's key)."""

    index: int
    path: str
    family: str
    library: str
    type: str
    module_index: int

    def to_dict(self) -> dict:
        return asdict(self)


def find_blocks(model: nn.Module) -> list[BlockRef]:
    """Blocks of ``model`` that UPDP can anneal and merge, in forward (definition) order.

    Blocks of a known family in an unsupported configuration (squeeze-excitation, ConvNeXt V2's GRN,
    avg-pool shortcuts, ...) are skipped; blocks already annealed or merged are not listed.
    """
    refs = []
    skip: list[str] = []
    for i, (path, module) in enumerate(model.named_modules()):
        if any(path.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (AnnealedBlock, MergedBlock)):
            skip.append(path)
            continue
        fam = block_family(module)
        if fam is None or path == "":
            continue
        try:
            check_block(module)
        except UnsupportedBlock:
            continue
        refs.append(BlockRef(len(refs), path, fam[0], fam[1], type(module).__name__, i))
        skip.append(path)
    return refs


def resolve_blocks(model: nn.Module, blocks) -> list[BlockRef]:
    """BlockRefs from indices (into :func:`find_blocks`), paths or BlockRefs; checked, in forward order."""
    cands = find_blocks(model)
    by_path = {r.path: r for r in cands}
    out = []
    for b in blocks:
        if isinstance(b, BlockRef):
            b = b.path
        if isinstance(b, bool) or not isinstance(b, (int, str)):
            raise PruningError(f"blocks entries must be candidate indices, module paths or BlockRefs, got {b!r}")
        if isinstance(b, int):
            if not 0 <= b < len(cands):
                raise PruningError(f"block index {b} is out of range: the model has {len(cands)} candidate blocks "
                                   f"(see hf_prune.methods.updp.depth.find_blocks)")
            out.append(cands[b])
        else:
            if b not in by_path:
                try:
                    module = model.get_submodule(b)
                except AttributeError:
                    raise PruningError(f"no module named {b!r}") from None
                try:
                    check_block(module)
                except UnsupportedBlock as exc:
                    raise PruningError(f"'{b}' cannot be merged: {exc}") from None
                raise PruningError(f"'{b}' is not a candidate block (nested in another block?)")
            out.append(by_path[b])
    if len({r.path for r in out}) != len(out):
        raise PruningError(f"blocks lists a block twice: {[r.path for r in out]}")
    return sorted(out, key=lambda r: r.index)


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    if path == "":
        raise PruningError("the model itself is a block; wrap its parent instead")
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


# --------------------------------------------------------------------------- annealing


def anneal(model: nn.Module, blocks, *, end_act: bool = True) -> list[AnnealedBlock]:
    """Wrap ``blocks`` (indices / paths / BlockRefs) in :class:`AnnealedBlock` in place, at ``lam = 0``.

    All wrappers are built before any is installed, so a failure leaves the model untouched.
    """
    refs = resolve_blocks(model, blocks)
    wrappers = []
    for r in refs:
        try:
            wrappers.append(make_annealed(model.get_submodule(r.path), end_act=end_act))
        except (UnsupportedBlock, MergeError) as exc:
            raise PruningError(f"cannot anneal '{r.path}' ({r.type}): {exc}") from exc
    for r, w in zip(refs, wrappers):
        w.ref = r
        w.train(model.get_submodule(r.path).training)  # the wrapper takes the mode of the block it wraps
        set_module(model, r.path, w)
    return wrappers


def annealed_blocks(model: nn.Module) -> list[tuple[str, AnnealedBlock]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AnnealedBlock)]


def set_lambda(target, lam: float) -> None:
    """Set ``lam`` on every annealed block of a model, or on a list of blocks."""
    blocks = [m for _, m in annealed_blocks(target)] if isinstance(target, nn.Module) else list(target)
    for b in blocks:
        b.set_lambda(lam)


def anneal_lambda(progress: float, start: float = 0.0, end: float = 0.8, schedule: str = "linear") -> float:
    """Lambda at ``progress`` (fraction of training): 0 before ``start``, 1 from ``end``, linear or
    cosine in between (same as :class:`hf_prune.core.schedules.Annealing` with fractional bounds)."""
    from ...core.schedules import Annealing

    return Annealing(float(start), float(end), schedule).value(float(progress), 1)


# --------------------------------------------------------------------------- calibration


def output_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise PruningError(f"cannot find an output tensor in a {type(out).__name__}")


def _batches(example_inputs):
    return [] if example_inputs is None else [example_inputs]


def calibrate(model: nn.Module, batches, blocks=None) -> None:
    """Initialise the new BNs of annealed blocks from the statistics of the original model (``lam = 0``).

    LN-replacing BNs get the LN input's per-channel mean/variance as running statistics; end-of-branch
    BNs become the identity on this data. Runs in eval mode without gradients; ``lam`` of every block
    is restored afterwards.
    """
    blocks = [m for _, m in annealed_blocks(model)] if blocks is None else list(blocks)
    batches = list(batches)
    if not blocks or not batches:
        return
    all_blocks = [m for _, m in annealed_blocks(model)]
    saved = [(b, b.lam) for b in all_blocks]
    modes = module_modes(model)
    try:
        model.eval()
        for b in all_blocks:
            b.lam = 0.0
        for b in blocks:
            b._calib = {}
        with torch.no_grad():
            for x in batches:
                call_model(model, x)
        for b in blocks:
            b.apply_calibration()
    finally:
        for b in blocks:
            b._calib = None
        for b, lam in saved:
            b.lam = lam
        restore_modes(modes)


def recalibrate_bn(model: nn.Module, batches, blocks=None) -> None:
    """Re-estimate the running statistics of every BatchNorm inside ``blocks`` at their current ``lam``
    (cumulative average over ``batches``; affine parameters unchanged; the rest of the model in eval)."""
    blocks = [m for _, m in annealed_blocks(model)] if blocks is None else list(blocks)
    bns = [m for b in blocks for m in b.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    recalibrate_batchnorm(model, bns, batches, lambda x: call_model(model, x))


# --------------------------------------------------------------------------- merging


def _find_wrapper(model: nn.Module, block) -> tuple[str, AnnealedBlock]:
    if isinstance(block, AnnealedBlock):
        for p, m in annealed_blocks(model):
            if m is block:
                return p, m
        raise PruningError("this annealed block is not part of the model")
    if isinstance(block, BlockRef):
        block = block.path
    if isinstance(block, str):
        m = model.get_submodule(block)
        if not isinstance(m, AnnealedBlock):
            raise PruningError(f"'{block}' is a {type(m).__name__}, not an annealed block (call anneal first)")
        return block, m
    raise PruningError(f"cannot find annealed block {block!r}")


def _entry(path: str, w: AnnealedBlock, merged: MergedBlock) -> dict:
    ref = getattr(w, "ref", None)
    return {"block": ref.index if ref else None, "index": ref.module_index if ref else None, "path": path,
            "type": w.source_type, "family": w.family, "library": w.library, "became": merged.describe()}


def merge_block(model: nn.Module, block) -> dict:
    """Replace an annealed block (at ``lam = 1``) by its exact merged form; returns its record entry."""
    path, w = _find_wrapper(model, block)
    merged = w.merge()
    merged.train(w.training)
    set_module(model, path, merged)
    return _entry(path, w, merged)


def unwrap_block(model: nn.Module, block) -> None:
    """Put the original block back in place of its annealed wrapper (undo :func:`anneal`)."""
    path, w = _find_wrapper(model, block)
    set_module(model, path, w.block)


# --------------------------------------------------------------------------- block selection


def macs_of(module: nn.Module, args) -> int:
    from ...metrics.profiling import count_macs

    return count_macs(module, args)


def capture_inputs(model, wrappers, batch) -> dict:
    """First positional input of each wrapper on ``batch`` (for per-block MACs)."""
    got, handles = {}, []
    for w in wrappers:
        def hook(mod, args, _w=w):
            got.setdefault(id(_w), args[0].detach())
        handles.append(w.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return got


def _state(module: nn.Module) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in module.state_dict().items()}


def stripped_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every annealed block replaced by its original block."""
    work = copy.deepcopy(model)
    for path, w in annealed_blocks(work):
        if path:
            set_module(work, path, w.block)
    return work


def score_blocks(model: nn.Module, example_inputs, blocks=None, *, end_act: bool = False,
                 copy_model: bool = True, with_macs: bool = True) -> list[dict]:
    """Score candidate blocks by the output change when each alone is annealed to ``lam = 1``.

    Works on a deep copy (the model is not modified; ``copy_model=False`` works on ``model`` itself,
    which must be a throw-away copy). Returns one dict per block, in forward order:
    ``{"ref", "score", "macs_block", "macs_merged"}`` (MACs of the block / its merged form on the
    block's input for ``example_inputs``, whole batch; ``None`` with ``with_macs=False``).
    """
    if example_inputs is None:
        raise PruningError("choosing blocks needs example_inputs (a batch to measure the output change on)")
    refs = find_blocks(model) if blocks is None else resolve_blocks(model, blocks)
    if not refs:
        return []
    work = (copy.deepcopy(model) if copy_model else model).eval()
    with torch.no_grad():
        ref_out = output_tensor(call_model(work, example_inputs)).double()
    denom = ref_out.pow(2).sum().clamp_min(1e-30)
    wrappers = anneal(work, [r.path for r in refs], end_act=end_act)
    calibrate(work, [example_inputs], wrappers)
    inputs = capture_inputs(work, wrappers, example_inputs) if with_macs else {}
    out = []
    for r, w in zip(refs, wrappers):
        snap = _state(w)
        try:
            w.set_lambda(1.0)
            recalibrate_bn(work, [example_inputs], [w])
            with torch.no_grad():
                y = output_tensor(call_model(work, example_inputs)).double()
            score = float((y - ref_out).pow(2).sum() / denom)
            x = inputs.get(id(w))
            macs_block = macs_merged = None
            if x is not None:
                macs_block = macs_of(w.block, (x,))
                macs_merged = macs_of(w.merge().eval(), (x,))
        finally:
            w.set_lambda(0.0)
            w.load_state_dict(snap)
        out.append({"ref": r, "score": score, "macs_block": macs_block,
                    "macs_merged": macs_merged})
    return out


def _default_count(n: int) -> int:
    return max(1, int(round(DEFAULT_FRACTION * n)))


def select_blocks(model, example_inputs, blocks, num_blocks, target_macs,
            copy_model=True) -> tuple[list[BlockRef], str, dict]:
    """Resolve the blocks to prune; returns ``(refs, how, info)``; raises before touching the model."""
    given = [a is not None for a in (blocks, num_blocks, target_macs)]
    if sum(given) > 1:
        raise PruningError("give at most one of blocks=, num_blocks= and target_macs=")
    if blocks is not None:
        refs = resolve_blocks(model, blocks)
        if not refs:
            raise PruningError("blocks is empty")
        return refs, "blocks", {}
    cands = find_blocks(model)
    if not cands:
        raise PruningError(f"{type(model).__name__} has no block UPDP can merge (supported: ConvNeXt V1, "
                           "MobileNetV2 inverted residuals, ResNet basic/bottleneck, ViT/DeiT blocks)")
    _check_targets(num_blocks, target_macs, len(cands))
    how = "target_macs" if target_macs is not None else "num_blocks" if num_blocks is not None else "default"
    if example_inputs is None:
        raise PruningError(f"choosing blocks by {how} needs example_inputs; or pass blocks=[...] "
                           f"(indices into find_blocks(model): {len(cands)} candidates)")
    scores = score_blocks(model, example_inputs, end_act=False, copy_model=copy_model,
                          with_macs=how == "target_macs")
    return _choose(scores, model, example_inputs, how, num_blocks, target_macs, len(cands))


def _check_targets(num_blocks, target_macs, n):
    if target_macs is not None:
        if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not 0 < target_macs <= 1:
            raise PruningError(f"target_macs={target_macs!r} must be in (0, 1]: the fraction of dense MACs to keep")
    if num_blocks is not None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 1 <= num_blocks <= n:
            raise PruningError(f"num_blocks={num_blocks!r} must be an int in [1, {n}] (candidate blocks)")


def _choose(scores, model, example_inputs, how, num_blocks, target_macs, n_cands):
    info = {"scores": {s["ref"].path: s["score"] for s in scores}}
    if how == "target_macs":
        dense = macs_of(model, example_inputs)
        budget = target_macs * dense
        saving = {s["ref"].path: (s["macs_block"] or 0) - (s["macs_merged"] or 0) for s in scores}
        order = sorted(scores, key=lambda s: s["score"] / max(saving[s["ref"].path], 1))
        chosen, macs = [], dense
        for s in order:
            if macs <= budget:
                break
            if saving[s["ref"].path] <= 0:
                continue
            chosen.append(s["ref"])
            macs -= saving[s["ref"].path]
        if macs > budget:
            raise PruningError(f"target_macs={target_macs} is not reachable by merging blocks: merging all "
                               f"{n_cands} candidates keeps {macs / dense:.1%} of the MACs")
        info.update(dense_macs=dense, expected_macs=macs)
        return sorted(chosen, key=lambda r: r.index), how, info
    k = num_blocks if num_blocks is not None else _default_count(n_cands)
    chosen = [s["ref"] for s in sorted(scores, key=lambda s: s["score"])[:k]]
    return sorted(chosen, key=lambda r: r.index), how, info


# --------------------------------------------------------------------------- one-shot


def prune_depth(model: nn.Module, *, example_inputs=None, blocks=None, num_blocks=None, target_macs=None,
                end_act: bool = False, recalibrate: bool = True) -> tuple[nn.Module, dict]:
    """One-shot UPDP: choose blocks, anneal them to ``lam = 1`` at once, recalibrate BN, merge.

    Args:
        example_inputs: a batch (tensor, tuple or mapping of keyword arguments). Needed to choose blocks
            and to calibrate BNs; with ``blocks=`` and no inputs the new BNs keep their defaults (a warning
            says so: LN-replacing BNs then know no statistics).
        blocks: indices into :func:`find_blocks`, module paths or BlockRefs.
        num_blocks: merge the ``k`` blocks whose removal changes the output least (see module docstring).
        target_macs: fraction of dense MACs to keep; blocks are chosen greedily by output change per MAC.
        end_act: insert a new activation after the residual sum (the paper's progressive form does; one
            shot without training does not by default). ResNet keeps its own output ReLU either way.
        recalibrate: re-estimate the BN running statistics inside merged blocks at ``lam = 1``.

    Returns ``(model, record)``: the same model object, modified in place, with the merged blocks, and
    ``record = {"method": "updp", "merged_blocks": [...], "removed_blocks": [], "selection": ...,
    "settings": {...}, "macs_before": ..., "macs_after": ..., "scores": {path: proxy score}}``; each
    ``merged_blocks`` entry is
    ``{"block", "index" (position in named_modules, the spec key), "path", "type", "family", "library",
    "became" (MergedBlock.describe()), "score"}``. On any error the model is restored and a
    :class:`~hf_prune.errors.PruningError` raised.
    """
    try:
        refs, how, info = select_blocks(model, example_inputs, blocks, num_blocks, target_macs)
    except ValueError as exc:
        if "value per channel" not in str(exc):
            raise
        raise PruningError("UPDP estimates BatchNorm statistics on example_inputs, and a BatchNorm saw one value "
                           f"per channel ({exc}): pass a batch of at least 2 images, or larger images") from exc
    batches = _batches(example_inputs)
    if not batches:
        needs_stats = [r.path for r in refs if r.family in ("convnext", "vit")]
        if needs_stats:
            warnings.warn(f"prune_depth without example_inputs: the BNs replacing LayerNorms in {needs_stats} are "
                          "not calibrated, so the merged blocks are poor until fine-tuned", stacklevel=2)
    macs_before = macs_of(model, example_inputs) if example_inputs is not None else None
    originals = {r.path: model.get_submodule(r.path) for r in refs}
    snapshots = {p: _state(m) for p, m in originals.items()}
    was_training = model.training
    modes = module_modes(model)
    entries = []
    try:
        wrappers = anneal(model, refs, end_act=end_act)
        calibrate(model, batches, wrappers)
        set_lambda(wrappers, 1.0)
        if recalibrate:
            recalibrate_bn(model, batches, wrappers)
        model.eval()
        for r, w in zip(refs, wrappers):
            e = merge_block(model, w)
            e["score"] = info.get("scores", {}).get(r.path)
            entries.append(e)
        macs_after = macs_of(model, example_inputs) if example_inputs is not None else None
        if example_inputs is not None:
            with torch.no_grad():
                output_tensor(call_model(model, example_inputs))
    except BaseException as exc:  # interrupts too: the model is restored, then the exception goes on
        for p, m in originals.items():
            m.load_state_dict(snapshots[p])
            set_module(model, p, m)
        restore_modes(modes)
        if isinstance(exc, PruningError) or not isinstance(exc, Exception):
            raise
        raise PruningError(f"UPDP merge failed and the model was restored: {exc!r}") from exc
    model.train(was_training)
    record = {"method": "updp", "merged_blocks": entries, "removed_blocks": [], "selection": how,
              "settings": {"blocks": [r.index for r in refs], "num_blocks": num_blocks, "target_macs": target_macs,
                           "end_act": end_act, "recalibrate": recalibrate, "calibrated": bool(batches)},
              "macs_before": macs_before, "macs_after": macs_after, "scores": info.get("scores", {})}
    return model, record


def updp_prune(model: nn.Module, *, blocks=None, num_blocks=None, target_macs=None, example_inputs=None,
               **kwargs) -> nn.Module:
    """:func:`prune_depth` returning only the model (use :func:`prune_depth` to get the record)."""
    model, _ = prune_depth(model, example_inputs=example_inputs, blocks=blocks, num_blocks=num_blocks,
                           target_macs=target_macs, **kwargs)
    return model


# --------------------------------------------------------------------------- progressive training


class UPDPAnnealer:
    """Progressive UPDP for any training loop: wraps the chosen blocks now, sets lambda per step.

    ``UPDPAnnealer(model, blocks, start=0.0, end=0.8, total_steps=N)``; ``start`` / ``end`` are fractions
    of training (float) or optimizer steps (int), as in :class:`hf_prune.core.schedules.Annealing`;
    ``schedule`` is ``"linear"`` or ``"cosine"``. ``blocks``: indices / paths / BlockRefs, or ``None`` to
    choose ``num_blocks`` / ``target_macs`` (default: a quarter) with the proxy on ``example_inputs``.
    With ``example_inputs`` the new BNs are calibrated at once (:meth:`calibrate` does it later).

    Build it *before* the optimizer (or add :meth:`parameters` to it), then call :meth:`step` once per
    optimizer step (or :meth:`set_progress`), and :meth:`merge_all` at the end::

        annealer = UPDPAnnealer(model, num_blocks=4, example_inputs=x, total_steps=1000)
        opt = torch.optim.AdamW(model.parameters())
        for step, batch in enumerate(loader):
            annealer.step(step)
            ...
        record = annealer.merge_all()
    """

    def __init__(self, model: nn.Module, blocks=None, start: float | int = 0.0, end: float | int = 0.8, *,
                 total_steps: int | None = None, schedule: str = "linear", num_blocks=None, target_macs=None,
                 example_inputs=None, end_act: bool = True):
        from ...core.schedules import Annealing

        self.schedule = Annealing(start, end, schedule)  # validates start/end/shape
        self.model = model
        self.total_steps = total_steps
        refs, self.selection, self.info = select_blocks(model, example_inputs, blocks, num_blocks, target_macs)
        self.refs = refs
        self.end_act = end_act
        self.blocks = anneal(model, refs, end_act=end_act)
        self.merged: list[dict] | None = None
        self._step = 0
        if example_inputs is not None:
            self.calibrate([example_inputs])

    @classmethod
    def from_blocks(cls, model: nn.Module, blocks: list[AnnealedBlock], start: float | int = 0.0,
                    end: float | int = 0.8, *, total_steps: int | None = None, schedule: str = "linear",
                    selection: str = "blocks", info: dict | None = None) -> UPDPAnnealer:
        """An annealer driving blocks that are already wrapped (e.g. by :func:`anneal`)."""
        from ...core.schedules import Annealing

        self = cls.__new__(cls)
        self.schedule = Annealing(start, end, schedule)
        self.model, self.total_steps = model, total_steps
        self.refs = [getattr(w, "ref", None) for w in blocks]
        self.selection, self.info = selection, dict(info or {})
        self.end_act = all(w.use_end_act for w in blocks)
        self.blocks = list(blocks)
        self.merged = None
        self._step = 0
        return self

    @property
    def lam(self) -> float:
        return self.blocks[0].lam if self.blocks else 0.0

    def parameters(self) -> list[nn.Parameter]:
        """Parameters the wrappers added (new BNs) — not in an optimizer built before wrapping."""
        own = {id(p) for w in self.blocks for p in w.block.parameters()}
        return [p for w in self.blocks for p in w.parameters() if id(p) not in own]

    def calibrate(self, batches) -> None:
        calibrate(self.model, batches, self.blocks)

    def lam_at(self, step: int, total_steps: int | None = None) -> float:
        total = total_steps or self.total_steps
        if total is None:
            raise PruningError("UPDPAnnealer needs total_steps (constructor or argument) to place start/end")
        return self.schedule.value(step, total)

    def set_lambda(self, lam: float) -> float:
        set_lambda(self.blocks, lam)
        return self.lam

    def set_progress(self, progress: float) -> float:
        """Set lambda from the fraction of training done (fractional start/end only)."""
        if not isinstance(self.schedule.start, float) or not isinstance(self.schedule.end, float):
            raise PruningError("set_progress needs fractional start/end; use step() with total_steps for steps")
        return self.set_lambda(self.schedule.value(float(progress), 1))

    def step(self, step: int | None = None) -> float:
        """Set lambda for optimizer step ``step`` (default: the internal counter, then incremented)."""
        if step is None:
            step = self._step
            self._step += 1
        else:
            self._step = step + 1
        return self.set_lambda(self.lam_at(step))

    def merge_all(self, *, force: bool = False) -> list[dict]:
        """Merge every annealed block; lambda must be 1 (``force=True`` sets it). Returns the entries."""
        if self.merged is not None:
            return self.merged
        low = [w for w in self.blocks if w.lam < 1.0]
        if low and not force:
            raise PruningError(f"{len(low)} blocks are at lambda={low[0].lam:.3f} < 1; train until the annealing "
                               "ends or call merge_all(force=True) (not exact w.r.t. the trained model)")
        lams = [(w, w.lam) for w in self.blocks]
        set_lambda(self.blocks, 1.0)
        entries, done = [], []
        try:  # all or nothing, interrupts included: a half-merged model is neither the trained nor the merged one
            for w in self.blocks:
                path, _ = _find_wrapper(self.model, w)
                entries.append(merge_block(self.model, w))
                done.append((path, w))
        except BaseException:
            for path, w in reversed(done):
                set_module(self.model, path, w)
            for w, lam in lams:
                w.lam = lam
            raise
        self.merged = entries
        return entries

    def restore(self) -> None:
        """Undo: put every original block back (before merging)."""
        if self.merged is not None:
            raise PruningError("the blocks are already merged")
        for w in self.blocks:
            unwrap_block(self.model, w)
        self.blocks = []
