"""Group importance (DepGraph): a score per unit, aggregated over every tensor slice it owns.

``l1`` / ``l2`` are magnitude scores; ``taylor`` is first-order Taylor ``|w * dL/dw|`` and needs
gradients on the parameters (run a backward pass first, or pass ``calib`` to :func:`hf_prune.prune`).
``activation`` sees the data: :func:`activation_scores` estimates, from calibration batches, how much
each unit's removal disturbs the outputs of the layers that read it (see there); it needs ``calib=``.
Scores are summed over all coupled slices of a unit, then divided by the mean score of its group
so that global allocation compares groups of different sizes and scales fairly.
"""
from __future__ import annotations

import torch

from ..core.distributed import ShardedSum, local_part, shard_region
from ..core.execution import caller_threads, single_threaded_fn

IMPORTANCES = ("l1", "l2", "taylor", "activation")


def _elementwise_score(param: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element score of this rank's part of ``param`` (all of it unless sharded)."""
    t = local_part(param).float()
    if kind == "l2":
        return t.pow(2)
    if kind == "l1":
        return t.abs()
    if kind == "taylor":
        if param.grad is None:
            raise ValueError("importance='taylor' needs gradients: call loss.backward() before pruning, "
                             "or pass calib=<DataLoader> so hf_prune computes them")
        return (t * local_part(param.grad).float()).abs()
    raise ValueError(f"unknown importance {kind!r}; choose one of {IMPORTANCES}")


def unit_scores(graph, kind: str = "l2", tensors: dict | None = None, *, calib=None, **options) -> torch.Tensor:
    """Raw score per union-find root (0 for roots that are not units).

    ``tensors``: ``{name: tensor}`` to score instead of the traced model's (default), e.g. the parameters of
    the FSDP2-sharded model being trained: each rank scores its shards and the sums are reduced across
    ranks (every score is a sum of per-element terms), so every rank gets the scores of the full tensors.
    ``kind="activation"`` needs ``calib`` (model inputs or batches) and takes the options of
    :func:`activation_scores`; the other kinds read the weights (and gradients) only.
    """
    if kind not in IMPORTANCES:
        raise ValueError(f"unknown importance {kind!r}; choose one of {IMPORTANCES}")
    if kind == "activation":
        if tensors is not None:
            raise TypeError("importance 'activation' runs the traced model on calib; it cannot score tensors=")
        return activation_scores(graph, calib, **options)
    if options or calib is not None:
        raise TypeError(f"importance {kind!r} takes no calib or options (got {sorted(options) or 'calib'})")
    return _weight_scores(graph, kind, tensors)


@single_threaded_fn
def _weight_scores(graph, kind: str, tensors: dict | None = None) -> torch.Tensor:
    tensors = graph._named_tensors() if tensors is None else tensors
    scores = ShardedSum(graph.trace.uf.size)
    cache: dict[str, torch.Tensor] = {}
    for m in graph.members:
        if m.tensor not in graph.param_names:
            continue  # running statistics say nothing about importance
        if bool(graph.pinned[m.units].all()):
            continue  # no prunable unit along this dim (e.g. a kept residual stream): nothing to rank
        t = tensors[m.tensor]
        local = local_part(t)
        dims = [d for d in range(local.dim()) if d != m.dim]
        with caller_threads():  # whole weights: the one heavy step here
            if kind == "taylor":
                if m.tensor not in cache:
                    cache[m.tensor] = _elementwise_score(t, kind)
                per_index = cache[m.tensor].sum(dim=dims) if dims else cache[m.tensor]
            elif not dims:
                per_index = _elementwise_score(local, kind)
            else:  # a fused norm reads the weight once and allocates nothing of its size
                per_index = torch.linalg.vector_norm(local.float(), ord=1 if kind == "l1" else 2, dim=dims)
                per_index = per_index if kind == "l1" else per_index.square()
        scores.add(m.units[shard_region(t)[m.dim]], per_index.double(), t)
    return scores.total()


@single_threaded_fn
def normalized_scores(graph, scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their group's mean, so groups can be ranked together."""
    out = scores.clone()
    for g in graph.groups:
        s = scores[g.units]
        out[g.units] = s / s.mean().clamp_min(1e-30)
    return out


# ----------------------------------------------------------------------------------------- data-aware


def _consumers(graph) -> dict[str, list]:
    """Conv/Linear layers (ungrouped) whose input dim carries prunable units: path -> its members."""
    from .reconstruct import LAYER_TYPES

    out: dict[str, list] = {}
    for m in graph.members:
        path, _, attr = m.tensor.rpartition(".")
        if attr != "weight" or m.dim != 1 or m.tensor not in graph.param_names:
            continue
        module = graph.model.get_submodule(path)
        if not isinstance(module, LAYER_TYPES) or getattr(module, "groups", 1) != 1:
            continue
        if bool(graph.pinned[m.units].all()):
            continue
        out.setdefault(path, []).append(m)
    return out


@torch.no_grad()
def _input_grams(model, layers: list, calib, max_batches: int, max_rows: int) -> dict:
    """Per layer: the channel Gram matrix of its input (channels = the weight's dim 1) and its row count."""
    from ..core.execution import eval_mode
    from ..core.inputs import call_model, model_device, split_batch, to_device

    grams: dict[str, list] = {}
    g = torch.Generator().manual_seed(0)

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]) if isinstance(module, torch.nn.Linear) else \
                x.transpose(0, 1).reshape(x.shape[1], -1).T
            if rows.shape[0] > max_rows:
                rows = rows[torch.randperm(rows.shape[0], generator=g)[:max_rows].to(rows.device)]
            rows = rows.double()
            acc = grams.setdefault(name, [0, 0])
            acc[0] = acc[0] + rows.T @ rows
            acc[1] += rows.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layers]
    batches = list(calib.split(32)) if isinstance(calib, torch.Tensor) else calib
    device = model_device(model)
    try:
        with eval_mode(model), caller_threads():
            for i, batch in enumerate(batches):
                if i >= max_batches:
                    break
                call_model(model, to_device(split_batch(batch)[0], device))
    finally:
        for h in handles:
            h.remove()
    if not grams:
        raise ValueError("importance='activation' needs calibration data: calib= a tensor of model inputs or an "
                         "iterable of batches (tensors, (inputs, labels) or {'pixel_values': x} dicts)")
    return grams


def _channel_costs(weight: torch.Tensor, gram: torch.Tensor, rows: int, form: str, ridge: float) -> torch.Tensor:
    """Output error of dropping each input channel of a layer with input Gram ``gram``.

    ``diag``: ||w_j||² · E[x_j²] (the channel's contribution when the rest stays as it is);
    ``obs``: ||w_j||² / [H⁻¹]_jj with H = E[x xᵀ] + λI (what remains when the other inputs are
    re-fitted to absorb it, as the reconstruction does; Optimal Brain Surgeon for one column).
    For a kxk conv the channel Gram ignores the spatial offsets inside the kernel (an approximation
    that keeps memory at C² instead of (C·k²)²).
    """
    w = weight.detach().double()
    norms = w.transpose(0, 1).reshape(w.shape[1], -1).square().sum(1).to(gram.device)
    H = gram / max(rows, 1)
    if form == "diag":
        return norms * torch.diagonal(H)
    # A channel that is always zero costs nothing; left in, the ridge would price it at λ·||w_j||².
    diag = torch.diagonal(H)
    live = diag > 1e-12 * diag.max().clamp_min(1e-30)
    costs = torch.zeros_like(norms)
    if bool(live.any()):
        H = H[live][:, live]
        lam = ridge * torch.diagonal(H).mean()
        inv = torch.linalg.inv(H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
        costs[live] = norms[live] / torch.diagonal(inv).clamp_min(1e-30)
    return costs


def activation_scores(graph, calib, *, form: str = "obs", ridge: float = 1e-2, max_batches: int = 4,
                      max_rows: int = 8192) -> torch.Tensor:
    """Data-aware unit scores: for every unit, the output error its removal causes in the layers that
    read it, summed over those layers and over the unit's input channels there.

    For each ungrouped Conv/Linear whose input dim carries prunable units, the channel Gram matrix H of
    its input is accumulated over ``max_batches`` calibration batches (``max_rows`` rows sampled per
    batch) and each input channel j costs ``||w_j||² / [(H + λI)⁻¹]_jj`` (``form="obs"``, λ = ridge ·
    mean diag H) or ``||w_j||² · H_jj`` (``form="diag"``). A unit's score is the sum over its input
    slices (a residual channel read by several layers, an attention head's columns). Groups without
    such a reader (none in the common architectures) keep their ``l2`` scores, which the per-group
    normalisation makes comparable. The result plugs into the allocator like any other kind:
    ``StructuredPruner.step(target_macs=..., scores=unit_scores(graph, "activation", calib=x))``.
    """
    if form not in ("obs", "diag"):
        raise ValueError(f"form={form!r}: use 'obs' (re-fitted error, the default) or 'diag' (plain error)")
    if calib is None:
        raise ValueError("importance='activation' needs calib= (a tensor of model inputs or an iterable of batches)")
    consumers = _consumers(graph)
    grams = _input_grams(graph.model, list(consumers), calib, max_batches, max_rows)
    scores = _weight_scores(graph, "l2")
    data = torch.zeros_like(scores)
    seen = torch.zeros(scores.numel(), dtype=torch.bool)
    params = dict(graph.model.named_parameters())
    for path, members in consumers.items():
        if path not in grams:
            continue  # not run on these inputs
        gram, rows = grams[path]
        with caller_threads():
            costs = _channel_costs(params[f"{path}.weight"], gram, rows, form, ridge).cpu()
        for m in members:
            data.index_add_(0, m.units, costs)
            seen[m.units] = True
    for grp in graph.groups:
        if bool(seen[grp.units].all()):
            scores[grp.units] = data[grp.units]
    return scores
