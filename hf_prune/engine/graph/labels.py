"""Channel labels and the union-find that couples them.

Every element position of every tensor seen during tracing carries an integer *label*: the identity
of the channel (or head, or group) it belongs to. Label 0 means "no channel identity" (batch,
spatial and token positions, constants). Two labels that must be pruned together are united in a
vectorised union-find, so a label's root names its coupled set.

A tensor's labels are kept as *planes*: int64 tensors broadcastable to the tensor's shape and
compressed to size 1 along every dimension where they do not vary, which keeps tracing cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

_I64 = torch.int64


class UnionFind:
    """Vectorised union-find over non-negative integer labels (0 is a fixed, isolated label).

    Takes and returns torch tensors; the parent array lives in numpy because a trace makes thousands
    of small gathers and scatters, where numpy's per-call overhead is several times lower.
    """

    def __init__(self, capacity: int = 1 << 16):
        self.parent = np.arange(capacity, dtype=np.int64)
        self.size = 1  # label 0 is reserved

    def fresh(self, n: int) -> torch.Tensor:
        """Allocate ``n`` new labels, each in a set of its own."""
        start = self.size
        need = start + n
        if need > self.parent.size:
            grown = np.arange(max(need, 2 * self.parent.size), dtype=np.int64)
            grown[: self.parent.size] = self.parent
            self.parent = grown
        self.size = need
        return torch.arange(start, need, dtype=_I64)

    def find(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._find(_flat(labels))).view(labels.shape)

    def _find(self, roots: np.ndarray) -> np.ndarray:
        parent = self.parent
        while True:
            up = parent[roots]
            if np.array_equal(up, roots):
                return up
            parent[roots] = parent[up]  # path halving keeps later finds short
            roots = up

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Unite labels elementwise after broadcasting; pairs with a 0 on either side are skipped."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = _flat(a), _flat(b)
        keep = (a != 0) & (b != 0) & (a != b)
        if not keep.any():
            return
        a, b = a[keep], b[keep]
        if a.size > 64:
            # unique pairs through a single int64 key (labels stay far below 2**31)
            key = np.sort(a * (1 << 31) + b)
            key = key[np.concatenate(([True], key[1:] != key[:-1]))]
            a, b = key >> 31, key & ((1 << 31) - 1)
        while a.size:
            ra, rb = self._find(a), self._find(b)
            differ = ra != rb
            if not differ.any():
                return
            ra, rb, a, b = ra[differ], rb[differ], a[differ], b[differ]
            # Each root links to the smallest root it meets this round; chains resolve next round.
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))

    def union_all(self, labels: torch.Tensor) -> None:
        """Unite every non-zero label in ``labels`` into one set."""
        flat = labels.reshape(-1)
        flat = flat[flat != 0]
        if flat.numel() > 1:
            self.union(flat[:1].expand_as(flat), flat)


def _flat(labels: torch.Tensor) -> np.ndarray:
    return labels.reshape(-1).numpy()


def compress(plane: torch.Tensor) -> torch.Tensor:
    """Shrink a label plane to size 1 along every dimension where its values do not vary."""
    for d in range(plane.dim()):  # broadcast (stride-0) dims first: they need no comparison
        if plane.shape[d] > 1 and plane.stride(d) == 0:
            plane = plane.narrow(d, 0, 1)
    for d in range(plane.dim()):
        if plane.shape[d] > 1:
            first = plane.narrow(d, 0, 1)
            if bool((plane == first).all()):
                plane = first
    return plane


def reshape_plane(plane: torch.Tensor, in_shape, out_shape) -> torch.Tensor:
    """Reshape a compressed plane without materialising dims it does not vary along.

    Leading and trailing dims that the reshape leaves alone stay broadcast (size 1) where the
    plane does not vary, so a (1, 1, C) plane of a (B, N, C) tensor reshaped to (B, N, 3, H, D)
    costs C elements, not B*N*C.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if in_shape == out_shape:
        return plane
    p = 0
    while p < min(len(in_shape), len(out_shape)) - 1 and in_shape[p] == out_shape[p] and plane.shape[p] == 1:
        p += 1
    q = 0
    while (q < min(len(in_shape), len(out_shape)) - p - 1 and in_shape[-1 - q] == out_shape[-1 - q]
           and plane.shape[-1 - q] == 1):
        q += 1
    mid_in = in_shape[p:len(in_shape) - q]
    mid_out = out_shape[p:len(out_shape) - q]
    core = plane.reshape(plane.shape[p:plane.dim() - q]).expand(mid_in).reshape(mid_out)
    return core.reshape((1,) * p + tuple(mid_out) + (1,) * q)


def varying_dims(plane: torch.Tensor) -> set[int]:
    return {d for d, n in enumerate(plane.shape) if n > 1}


def zeros_plane(ndim: int) -> torch.Tensor:
    return torch.zeros((1,) * ndim, dtype=_I64)


@dataclass
class Labels:
    """Labels of one traced tensor.

    ``elem`` labels each element (activations, and small parameters used element-wise such as
    position embeddings). ``dims`` exists for tensors derived from a parameter: ``dims[i]`` labels
    the parameter's original dimension ``i`` as it has moved through views, so a weight consumed by
    a matmul or convolution still knows which of its dimensions are rows and which are columns.
    """

    elem: torch.Tensor | None
    dims: list[torch.Tensor | None] | None = None
    source: str | None = None  # parameter name this tensor derives from

    @property
    def is_param(self) -> bool:
        return self.dims is not None

    def planes(self) -> list[torch.Tensor | None]:
        return [self.elem] + (list(self.dims) if self.dims is not None else [])

    @staticmethod
    def from_planes(planes: list, like: "Labels") -> "Labels":
        if like.dims is None:
            return Labels(planes[0])
        return Labels(planes[0], list(planes[1:]), like.source)


@dataclass
class Pins:
    """Labels that must never be pruned, with the reason for each batch (for error messages)."""

    labels: list[torch.Tensor] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, labels: torch.Tensor | None, reason: str) -> None:
        if labels is None:
            return
        flat = labels.reshape(-1)
        flat = flat[flat != 0]
        if flat.numel():
            self.labels.append(torch.unique(flat))
            self.reasons.append(reason)
