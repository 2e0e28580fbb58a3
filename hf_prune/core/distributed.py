"""Processes that must agree, and parameters that are sharded across them.

Replicas (DDP): every process runs the same pruning code on its own replica; the helpers of the first
half make the inputs of each decision bitwise identical everywhere (scores, masks, pruned weights) and
check the outcome, so replicas can never silently drift apart. Each is a no-op without an initialised
process group of size > 1.

Shards (FSDP2): the second half addresses parameters that are ``DTensor``s — this rank's part of a full
tensor (:func:`local_part`, :func:`shard_region`), per-index sums reduced over the shards
(:class:`ShardedSum`), in-place edits in full-tensor coordinates (:func:`fill_indices_`,
:func:`multiply_`), and the full-shape copy that planning, compaction and merging work on
(:func:`meta_copy` before ``fully_shard``, :func:`gather_full_` / :func:`scatter_full_` between the two).
Each is the plain operation on an ordinary tensor.
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from ..errors import PruningError


def process_group():
    """``torch.distributed`` when more than one process takes part, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return torch.distributed
    return None


def comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    dist = process_group()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main_process() -> bool:
    dist = process_group()
    return dist is None or dist.get_rank() == 0


def sync_scores(scores: torch.Tensor, how: str = "all_reduce") -> torch.Tensor:
    """Make per-unit ``scores`` identical on every process.

    ``how="all_reduce"``: the mean over processes; ``"broadcast"``: rank 0's scores. The result is
    broadcast from rank 0 in both cases, so it is bitwise identical everywhere.
    """
    dist = process_group()
    if dist is None:
        return scores
    t = scores.detach().to(comm_device(), torch.float64).contiguous()
    if how == "all_reduce":
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    dist.broadcast(t, src=0)
    return t.to(scores.device, scores.dtype)


def broadcast_(tensors) -> None:
    """Overwrite ``tensors`` in place with rank 0's values."""
    dist = process_group()
    if dist is None:
        return
    dev = comm_device()
    for t in tensors:
        buf = t.detach().to(dev, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()
        dist.broadcast(buf, src=0)
        with torch.no_grad():
            t.copy_(buf.to(t.device, t.dtype))


def check_same_everywhere(values: torch.Tensor, what: str = "pruned units") -> None:
    """Raise :class:`PruningError` if the processes hold different ``values`` (an integer tensor)."""
    dist = process_group()
    if dist is None:
        return
    r = values.reshape(-1).to(torch.int64)
    weights = torch.arange(1, r.numel() + 1, dtype=torch.int64)
    digest = torch.tensor([r.numel(), int(r.sum()), int((r * weights).sum() % 1_000_000_007)],
                          dtype=torch.int64, device=comm_device())
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise PruningError(f"processes disagree on the {what} (rank {dist.get_rank()}: {digest.tolist()}, "
                           f"min {lo.tolist()}, max {hi.tolist()}); they must be identical on every rank")


def unwrap(model):
    """The bare model inside DDP / DataParallel wrappers (and accelerate's compiled or FSDP-wrapped
    modules that keep it in ``.module``)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


# ----------------------------------------------------------------------------------------- sharded parameters
# FSDP2 (``torch.distributed.fsdp.fully_shard``) replaces every parameter by a ``DTensor`` whose rank-local
# part (``to_local()``) is one ``torch.chunk`` of the full tensor along a dimension. Planning needs the full
# shapes (a plain copy: :func:`meta_copy` before sharding, filled by :func:`gather_full_`); scores, masks and
# gradient edits work on the local parts, addressed in full-tensor coordinates through :func:`shard_region`.


def is_sharded(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel parameter or gradient)."""
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    return module is not None and isinstance(t, module.DTensor)


def has_sharded_parameters(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def check_shardable(model: nn.Module) -> None:
    """Refuse parameters partitioned in a way hf_prune cannot address: flat slices of flattened
    parameters, which tracing, scores and masks would read as an empty or different model — DeepSpeed
    ZeRO-3 (``ds_tensor`` per parameter, empty ``.data``) and FSDP1 (``FlatParameter`` shards)."""
    fsdp1 = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if fsdp1 is not None and any(isinstance(m, fsdp1.FullyShardedDataParallel) for m in model.modules()):
        kind = "FSDP1 (FullyShardedDataParallel, flat parameters)"
    elif any(hasattr(p, "ds_status") for p in model.parameters()):
        kind = "DeepSpeed ZeRO-3 (flat slices, empty .data)"
    else:
        return
    raise PruningError(f"the model's parameters are partitioned by {kind}, which hf_prune's callbacks cannot "
                       "address; shard with FSDP2 instead (torch's fully_shard, accelerate's --use_fsdp "
                       "--fsdp_version 2, or TrainingArguments(fsdp_config={'version': 2}))")


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (the tensor itself unless sharded), detached; writes reach ``t``."""
    return (t.to_local() if is_sharded(t) else t).detach()


def shard_region(t: torch.Tensor) -> tuple[slice, ...]:
    """Where :func:`local_part` of ``t`` sits in the full tensor: one slice per dimension.

    Handles ``Shard(d)`` (``torch.chunk`` semantics, as FSDP2 and DTensor use) and ``Replicate`` on any
    mesh; other placements (``Partial``, strided shards of combined FSDP + tensor parallelism) are refused.
    """
    if not is_sharded(t):
        return tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor import Shard

    mesh, coord = t.device_mesh, t.device_mesh.get_coordinate()
    bounds = [(0, n) for n in t.shape]
    for mesh_dim, p in enumerate(t.placements):
        if p.is_replicate():
            continue
        if type(p) is not Shard:
            raise PruningError(f"a parameter has placement {p} on its device mesh; hf_prune handles Shard(dim) and "
                               "Replicate (FSDP2's fully_shard, HSDP); shard without tensor parallelism")
        lo, hi = bounds[p.dim]
        chunk = -(-(hi - lo) // mesh.size(mesh_dim))
        start = min(lo + coord[mesh_dim] * chunk, hi)
        bounds[p.dim] = (start, min(start + chunk, hi))
    region = tuple(slice(a, b) for a, b in bounds)
    if tuple(b - a for a, b in bounds) != tuple(t.to_local().shape):
        raise PruningError(f"a sharded parameter's local part has shape {tuple(t.to_local().shape)}, not the "
                           f"{tuple(b - a for a, b in bounds)} of chunk sharding; uneven custom sharding is not "
                           "supported")
    return region


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (a full-shape tensor) that this rank holds of ``like``."""
    return full[shard_region(like)]


def index_range(t: torch.Tensor, dim: int) -> tuple[int, int]:
    """``[start, stop)`` of the full tensor's indices along ``dim`` held by this rank."""
    s = shard_region(t)[dim]
    return s.start, s.stop


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The full tensor, detached (a collective for a sharded one: every rank must call it)."""
    return t.full_tensor().detach() if is_sharded(t) else t.detach()


def _shard_groups(t: torch.Tensor) -> list:
    from torch.distributed.tensor import Shard

    return [t.device_mesh.get_group(d) for d, p in enumerate(t.placements) if type(p) is Shard]


class ShardedSum:
    """Per-index sums (e.g. unit scores) accumulated from local parts, complete after :meth:`total`.

    :meth:`add` takes values read from ``like``: a full (replicated) tensor's contribution is complete
    on every rank; a sharded one's is partial and summed over its shard groups once, in :meth:`total`.
    """

    def __init__(self, size: int, dtype=torch.float64):
        self.full = torch.zeros(size, dtype=dtype)
        self.partial: dict = {}

    def add(self, index: torch.Tensor, values: torch.Tensor, like: torch.Tensor) -> None:
        values = values.detach().to("cpu", self.full.dtype)
        if not is_sharded(like):
            self.full.index_add_(0, index, values)
            return
        key = (id(like.device_mesh), tuple(str(p) for p in like.placements))
        entry = self.partial.get(key)
        if entry is None:
            entry = self.partial[key] = (torch.zeros_like(self.full), _shard_groups(like))
        entry[0].index_add_(0, index, values)

    def total(self) -> torch.Tensor:
        """The complete sums, identical on every rank (collective when anything sharded was added)."""
        out = self.full.clone()
        for key in self.partial:  # insertion order: the same on every rank
            vec, groups = self.partial[key]
            buf = vec.to(comm_device())
            for g in groups:
                torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=g)
            out += buf.cpu()
        return out


@torch.no_grad()
def fill_indices_(t: torch.Tensor, dim: int, index: torch.Tensor, value: float = 0.0) -> None:
    """``t.index_fill_(dim, index, value)`` with ``index`` in full-tensor coordinates, on this rank's part."""
    if not is_sharded(t):
        t.index_fill_(dim, index.to(t.device), value)
        return
    lo, hi = index_range(t, dim)
    keep = (index >= lo) & (index < hi)
    local = local_part(t)
    local.index_fill_(dim, (index[keep] - lo).to(local.device), value)


@torch.no_grad()
def multiply_(t: torch.Tensor, full_factor: torch.Tensor) -> None:
    """``t *= full_factor`` where ``full_factor`` has ``t``'s full shape (e.g. a weight mask)."""
    local = local_part(t)
    local.mul_(local_slice(full_factor, t).to(local.device, local.dtype))


def named_tensors(model: nn.Module) -> dict:
    """Parameters and buffers of ``model`` by name (tied ones under every name)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    return named


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device (no memory): the full-shape
    structure kept before ``fully_shard``, filled later by :func:`gather_full_`. Ties are kept."""
    if has_sharded_parameters(model):
        raise PruningError("the model is already sharded (its parameters are DTensors); take the full-shape copy "
                           "before fully_shard: call callback.before_sharding(model) first")
    memo: dict = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


@torch.no_grad()
def gather_full_(full: nn.Module, sharded: nn.Module, names=None) -> nn.Module:
    """Copy the full values of ``sharded``'s tensors into ``full`` (a plain model of the same structure,
    e.g. from :func:`meta_copy`, materialised on the CPU if still on meta). A collective: every rank calls
    it, in the same order; one full tensor at a time is gathered."""
    if any(t.is_meta for t in list(full.parameters()) + list(full.buffers())):
        full.to_empty(device="cpu")
    dst, src = named_tensors(full), named_tensors(sharded)
    missing = sorted(set(dst) ^ set(src))
    if missing:
        raise PruningError(f"the full-shape copy and the trained model differ in tensors {missing[:4]}: take the "
                           "copy (before_sharding) after every change to the model's structure")
    for name in (src if names is None else names):
        if name not in dst:
            raise PruningError(f"no tensor {name!r} in the model")
        dst[name].copy_(full_value(src[name]).to(dst[name].device))
    return full


@torch.no_grad()
def scatter_full_(sharded: nn.Module, full: nn.Module, names=None) -> None:
    """Write ``full``'s values into ``sharded``: each rank copies the part it holds (no communication)."""
    dst, src = named_tensors(sharded), named_tensors(full)
    for name in (dst if names is None else names):
        t = dst[name]
        local = local_part(t)
        local.copy_(local_slice(src[name], t).to(local.device, local.dtype))


def copy_extra_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy the extra state (``get_extra_state``, e.g. UPDP's annealing coefficient) of every module of
    ``src`` to the module of the same name in ``dst``."""
    modules = dict(dst.named_modules())
    for name, m in src.named_modules():
        if type(m).get_extra_state is not nn.Module.get_extra_state and name in modules:
            modules[name].set_extra_state(m.get_extra_state())
