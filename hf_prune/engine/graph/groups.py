"""From a :class:`~hf_prune.engine.graph.tracer.Trace` to prunable units and groups (DepGraph).

* A **unit** is one coupled set (a union-find root): one channel of a residual stream, one hidden
  channel of an MLP, one attention head, one group of a grouped convolution. Removing a unit
  removes every slice of every tensor it touches.
* A **member** is one dimension of one tensor, with the unit of each index along it.
* A **group** is all units that touch the same members (for example the 768 channels of a ViT's
  residual stream, or the 12 heads of one attention). Importance is normalised and rounding is
  applied per group.

:class:`DependencyGraph` also predicts parameters and MACs for any choice of kept units, which is
what allocation searches over.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import PruningError
from ...core.execution import single_threaded_fn
from .labels import compress
from .tracer import HEAD_COUNT_ATTRS, Trace, trace


@dataclass
class Member:
    tensor: str
    dim: int
    units: torch.Tensor  # root per index along ``dim``


@dataclass
class Group:
    """Units that touch the same tensor dimensions."""

    index: int
    units: torch.Tensor  # root ids
    members: list  # indices into DependencyGraph.members
    kind: str  # "channel", "head" or "block" (a unit spanning several channels)
    modules: list = field(default_factory=list)  # attention modules owning heads (kind "head")

    def __len__(self) -> int:
        return self.units.numel()


class DependencyGraph:
    """Coupled units of a model, traced from ``example_inputs``."""

    @single_threaded_fn
    def __init__(self, model: nn.Module, example_inputs, *, ignored_layers=(), prune_stem=False,
                 prune_heads=True, frozen_modules=(), frozen_splits=(), watch=()):
        self.model = model
        self.trace: Trace = trace(model, example_inputs, watch)
        uf = self.trace.uf
        self._resolve_elementwise()
        self.roots = uf.find(torch.arange(uf.size))
        self.members = self._members()
        self.example_inputs = example_inputs
        self.pinned = self._pinned(ignored_layers, prune_stem, prune_heads, frozen_modules)
        for module, plane in self.trace.splits:
            if module in frozen_splits:  # sizes stored in the module: the split's input keeps its width
                self.pinned[uf.find(plane.reshape(-1))] = True
        self.groups = self._groups()
        self.tensor_shapes = {n: tuple(t.shape) for n, t in self._named_tensors().items()}
        self.param_names = {n for n, _ in model.named_parameters()}
        self._mac_plan = [self._plan_macs(r) for r in self.trace.macs]

    # ------------------------------------------------------------------ construction
    def _named_tensors(self) -> dict:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(dict(self.model.named_buffers(remove_duplicate=False)))
        return {n: named[n] for n in self.trace.params}

    def _used(self) -> torch.Tensor:
        roots = self.trace.uf.find(torch.arange(self.trace.uf.size))
        counts = torch.bincount(roots, minlength=roots.numel())
        used = counts[roots] > 1
        used[0] = False
        return used

    def _resolve_elementwise(self) -> None:
        """Decide along which dim element-labelled tensors (position embeddings, ...) are cut."""
        uf, used = self.trace.uf, self._used()
        self._used_labels = used
        self._elem_cut: dict[str, int | None] = {}
        for name, lab in self.trace.params.items():
            if lab.elem is None or (lab.dims and lab.elem is lab.dims[0]):
                continue
            if not bool(used[lab.elem].any()):
                continue
            roots = compress(uf.find(lab.elem))
            varying = [d for d, n in enumerate(roots.shape) if n > 1]
            if len(varying) != 1:
                self.trace.pins.add(lab.elem, f"{name} is coupled in a way no slice can follow")
                self._elem_cut[name] = None
                continue
            d = varying[0]
            self._elem_cut[name] = d
            dim_plane = lab.dims[d] if lab.dims else None
            if dim_plane is not None and bool(used[dim_plane].any()):
                uf.union(dim_plane, lab.elem)

    def _members(self) -> list:
        # _resolve_elementwise only unites labels that were both used already: the same mask holds.
        uf, used = self.trace.uf, self._used_labels
        members = []
        for name, lab in self.trace.params.items():
            cut = self._elem_cut.get(name)
            for d, plane in enumerate(lab.dims or []):
                if plane is not None and bool(used[plane].any()):
                    members.append(Member(name, d, uf.find(plane.reshape(-1))))
                elif cut == d:
                    roots = compress(uf.find(lab.elem))
                    members.append(Member(name, d, roots.movedim(d, -1).reshape(-1, roots.shape[d])[0]))
        return members

    def _pinned(self, ignored_layers, prune_stem, prune_heads, frozen_modules) -> torch.Tensor:
        uf = self.trace.uf
        pinned = torch.zeros(uf.size, dtype=torch.bool)
        pinned[0] = True
        for labels in self.trace.pins.labels:
            pinned[uf.find(labels)] = True
        self._signatures = self._member_signatures()
        roots, counts = self._signatures[0], self._signatures[2]
        pinned[roots[counts < 2]] = True  # removing it would change one tensor and nothing that feeds or reads it
        self._pin_unsafe_heads(pinned)
        if not prune_heads:
            for rec in self.trace.lanes:
                pinned[uf.find(rec.lanes)] = True
        ignored = {self._module_name(m) for m in ignored_layers}
        if not prune_stem:
            ignored.update(r.module for r in self.trace.macs if r.reads_input)
        def inside(owner, names):
            return any(owner == n or owner.startswith(n + ".") or not n for n in names)

        for m in self.members:
            owner = m.tensor.rpartition(".")[0]
            if (m.dim == 0 and inside(owner, [n for n in ignored if n])) or inside(owner, frozen_modules):
                pinned[m.units] = True
        return pinned

    def _pin_unsafe_heads(self, pinned: torch.Tensor) -> None:
        """Heads are prunable only where one module owns them and every attention op in it sees
        the same heads (talking-heads attention mixes them; a missing owner means no head count
        could be updated)."""
        uf = self.trace.uf
        by_module: dict = {}
        for rec in self.trace.lanes:
            by_module.setdefault(rec.module, []).append(frozenset(uf.find(rec.lanes).tolist()))
        for module, root_sets in by_module.items():
            owner = self.model.get_submodule(module) if module else None
            counts = [getattr(owner, a) for a in HEAD_COUNT_ATTRS if isinstance(getattr(owner, a, None), int)]
            if module is None or len(set(root_sets)) > 1 or not counts or len(root_sets[0]) not in counts:
                for roots in root_sets:
                    pinned[torch.tensor(sorted(roots))] = True

    def _module_name(self, layer) -> str:
        if isinstance(layer, str):
            return layer
        for name, mod in self.model.named_modules():
            if mod is layer:
                return name
        raise PruningError(f"ignored_layers: {type(layer).__name__} is not a submodule of the model; "
                           "pass modules of the model being pruned (or their names)")

    def _member_signatures(self):
        """Per root that some member touches: the sorted member indices touching it, as
        (roots, flat member indices, count per root, two 64-bit hashes of the member set per root)."""
        pairs = [torch.stack([torch.unique(m.units), torch.full_like(torch.unique(m.units), i)])
                 for i, m in enumerate(self.members)]
        if not pairs:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty, empty, torch.zeros(0, 2, dtype=torch.int64)
        r, mi = torch.cat(pairs, dim=1)
        order = torch.argsort(r * len(self.members) + mi)
        r, mi = r[order], mi[order]
        roots, inverse, counts = torch.unique_consecutive(r, return_inverse=True, return_counts=True)
        # Sums of fixed random 62-bit codes identify a member set (collisions have probability ~2^-100).
        codes = torch.randint(1, 1 << 62, (len(self.members), 2), generator=torch.Generator().manual_seed(0))
        hashes = torch.zeros(roots.numel(), 2, dtype=torch.int64).index_add_(0, inverse, codes[mi])
        return roots, mi, counts, hashes

    def _groups(self) -> list:
        lane_roots = {}
        for rec in self.trace.lanes:
            for r in torch.unique(self.trace.uf.find(rec.lanes)).tolist():
                lane_roots.setdefault(r, set()).add(rec.module)
        roots, members, counts, hashes = self._signatures
        starts = torch.cumsum(counts, 0) - counts
        free = torch.nonzero(~self.pinned[roots]).reshape(-1)
        by_signature: dict[tuple, list] = {}
        if free.numel():
            _, which = torch.unique(hashes[free], dim=0, return_inverse=True)
            for g in torch.unique(which).tolist():
                picked = free[which == g]
                first = int(picked[0])
                sig = tuple(members[starts[first]: starts[first] + counts[first]].tolist())
                by_signature[sig] = roots[picked].tolist()
        groups = []
        for sig, roots in sorted(by_signature.items(), key=lambda kv: min(kv[1])):
            units = torch.tensor(sorted(roots))
            if all(r in lane_roots for r in roots):
                kind = "head"
                modules = sorted({m for r in roots for m in lane_roots[r] if m})
            else:
                widths = [int((self.members[i].units == units[0]).sum()) for i in sig]
                kind = "channel" if min(widths) == 1 else "block"
                modules = []
            groups.append(Group(len(groups), units, list(sig), kind, modules))
        return groups

    # ------------------------------------------------------------------ counting
    def keep_mask(self, removed: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean per root: True if kept. ``removed`` is a tensor of unit roots."""
        keep = torch.ones(self.trace.uf.size, dtype=torch.bool)
        if removed is not None and removed.numel():
            keep[removed] = False
        return keep

    def kept_indices(self, member: Member, keep: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(keep[member.units]).reshape(-1)

    def _plan_macs(self, rec):
        """Precompute one MAC record: scale, scalar roots, tensor operands, einsum equation, dense count."""
        letters = iter(string.ascii_letters)
        axes, scalars, operands, subs = {}, [], [], []
        for f in rec.factors:
            roots = compress(self.trace.uf.find(f))
            if roots.numel() == 1:
                scalars.append(int(roots.reshape(())))
                continue
            sub = ""
            for d, n in enumerate(roots.shape):
                if n > 1:
                    sub += axes.setdefault(d, next(letters))
            operands.append(roots.squeeze())
            subs.append(sub)
        sizes = {axes[d]: n for d, n in enumerate(rec.shape) if d in axes}
        free = math.prod(n for d, n in enumerate(rec.shape) if d not in axes)
        return (rec.const * free, torch.tensor(scalars, dtype=torch.int64), operands,
                ",".join(subs) + "->", math.prod(sizes.values()))

    @single_threaded_fn
    def macs(self, keep: torch.Tensor | None = None) -> int:
        total = 0.0
        kept = None if keep is None else keep.double()  # converted once: this runs in every bisection step
        for scale, scalars, operands, eq, dense in self._mac_plan:
            if kept is None:
                total += scale * dense
            elif not scalars.numel() or bool(kept[scalars].all()):
                total += scale * (float(torch.einsum(eq, *[kept[o] for o in operands])) if operands else 1.0)
        return int(round(total))

    def params(self, keep: torch.Tensor | None = None, *, only_prunable=False) -> int:
        by_tensor: dict[str, list] = {}
        for m in self.members:
            by_tensor.setdefault(m.tensor, []).append(m)
        total = 0
        for name, shape in self.tensor_shapes.items():
            if name not in self.param_names:
                continue
            ms = by_tensor.get(name, [])
            if only_prunable and not any(bool((~self.pinned[m.units]).any()) for m in ms):
                continue
            n = math.prod(shape)
            for m in ms:
                if keep is not None:
                    n = n * int(keep[m.units].sum()) // shape[m.dim]
            total += n
        return total

    def summary(self) -> str:
        kinds = {}
        for g in self.groups:
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
        return (f"{len(self.groups)} prunable groups ({kinds}), {sum(len(g) for g in self.groups)} units, "
                f"{len(self.members)} coupled tensor dims, {len(self.trace.unknown)} ops without a rule")


