"""Distributed calibration for weight pruning: every process measures a share of the layers.

RD's distortion curves (``layers × grid`` forward passes) and oViT's gradients and Fisher blocks (``B``
or ``m`` floats per weight) cost time and memory per layer. When several processes take part (an
initialised process group of size > 1, as in DDP or FSDP training), :func:`partition_layers` gives each
rank a share of the masked layers, balanced by weight count and the same on every rank; each rank
measures only its own, the per-layer results are exchanged by broadcasts from each layer's owner
(:func:`broadcast_from_owners`, :func:`exchange_ragged`: tensors only, no pickles), the decision that
needs all layers (RD's dynamic program, oViT's global threshold) is then taken identically everywhere,
and :func:`share_layers` gives every rank the owners' masks and (OBS-updated) weights.

Every helper is collective: all ranks call it in the same order, with the same masks and the same
calibration batches (:func:`check_same_batches` checks the latter). Without a process group they are
no-ops (one rank owns every layer).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.distributed import check_same_everywhere, comm_device, process_group
from ..core.inputs import first_tensor
from .masks import WeightMasks

__all__ = ["partition_layers", "owned_layers", "broadcast_from_owners", "exchange_ragged", "share_layers",
           "check_same_batches"]


def partition_layers(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Layers per rank: each layer, largest first, goes to the least-loaded rank (lowest rank on ties);
    each share keeps the model order. Deterministic, so every rank computes the same partition."""
    load = [0] * world
    share: list[set] = [set() for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], list(sizes).index(n))):
        r = min(range(world), key=lambda i: (load[i], i))
        share[r].add(name)
        load[r] += sizes[name]
    return [[n for n in sizes if n in s] for s in share]


def owned_layers(masks: WeightMasks) -> tuple[list[str], dict[str, int]]:
    """``(this rank's layers, {layer: owner rank})`` for ``masks``' layers (all of them without a group)."""
    dist = process_group()
    if dist is None:
        return masks.layers, {n: 0 for n in masks.layers}
    parts = partition_layers({n: masks.weight(n).numel() for n in masks.layers}, dist.get_world_size())
    owner = {n: r for r, part in enumerate(parts) for n in part}
    return parts[dist.get_rank()], owner


def _wire(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(comm_device(), torch.uint8 if t.dtype == torch.bool else t.dtype).reshape(-1)


@torch.no_grad()
def broadcast_from_owners(tensors: dict[str, list[torch.Tensor]], owner: dict[str, int]) -> None:
    """Overwrite, in place, every rank's ``tensors[layer]`` with those of ``owner[layer]``.

    Every rank passes tensors of the same shapes and one dtype; each owner's tensors travel in one
    broadcast."""
    dist = process_group()
    if dist is None:
        return
    for src in range(dist.get_world_size()):
        mine = [t for n, ts in tensors.items() if owner[n] == src for t in ts]
        if not mine:
            continue
        flat = torch.cat([_wire(t) for t in mine])
        dist.broadcast(flat, src=src)
        if dist.get_rank() == src:
            continue
        i = 0
        for t in mine:
            t.copy_(flat[i:i + t.numel()].reshape(t.shape).to(t.device, t.dtype))
            i += t.numel()


def exchange_ragged(local: dict[str, torch.Tensor], owner: dict[str, int]) -> dict[str, torch.Tensor]:
    """``{layer: 1-D tensor}`` for every layer of ``owner``, given this rank's own layers' ``local``
    values (lengths may differ from layer to layer; one dtype)."""
    dist = process_group()
    if dist is None:
        return dict(local)
    dtype = next(iter(local.values())).dtype if local else torch.float64
    out = {}
    for src in range(dist.get_world_size()):
        names = [n for n in owner if owner[n] == src]
        if not names:
            continue
        mine = dist.get_rank() == src
        lengths = torch.tensor([local[n].numel() for n in names] if mine else [0] * len(names), dtype=torch.int64,
                               device=comm_device())
        dist.broadcast(lengths, src=src)
        flat = (torch.cat([local[n].reshape(-1).to(comm_device(), dtype) for n in names]) if mine else
                torch.empty(int(lengths.sum()), dtype=dtype, device=comm_device()))
        dist.broadcast(flat, src=src)
        for n, part in zip(names, torch.split(flat.cpu(), lengths.tolist())):
            out[n] = part
    return out


def share_layers(masks: WeightMasks, owner: dict[str, int]) -> None:
    """Give every rank the masks and weights of each layer as its owner computed them."""
    broadcast_from_owners({n: [masks[n]] for n in masks.layers}, owner)
    broadcast_from_owners({n: [masks.weight(n)] for n in masks.layers}, owner)


def check_same_batches(batches, what: str = "calibration batches") -> None:
    """Raise :class:`~hf_prune.errors.PruningError` unless every rank holds the same ``batches``
    (compared through a digest of each batch's first tensor): a layer measured on one rank's data and
    another measured on another rank's would not add up to one decision. Lists and single batches are
    checked; a loader is not iterated here."""
    if process_group() is None:
        return
    if isinstance(batches, Mapping):
        batches = [batches]
    elif not isinstance(batches, (list, tuple)):
        return  # a loader: iterating it here could consume or reshuffle it
    digest = []
    for batch in batches:
        t = first_tensor(batch)
        if t is None:
            continue
        v = t.detach().float().cpu().reshape(-1)
        digest += [v.numel(), int(torch.round(v.double().sum() * 1e6)), int(torch.round(
            (v.double() * torch.arange(1, v.numel() + 1, dtype=torch.float64)).sum() * 1e3) % 1_000_000_007)]
    check_same_everywhere(torch.tensor(digest, dtype=torch.int64), what)
