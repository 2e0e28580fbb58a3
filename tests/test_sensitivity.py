"""hf_prune.sensitivity: each entry is what pruning that part for real gives, the model is left exactly
as it was (also when interrupted), and the report prints, converts and plots.

Calibration data are real digits (scikit-learn's, shipped in the package).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.nn import functional as F

from hf_prune.data import load_digits
from hf_prune.errors import ConfigError
from hf_prune.sensitivity import SensitivityReport, sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")


def digits_calib(n=96, batch=48, as_dict=True):
    _, val = load_digits(image_size=32)
    x, y = val.pixel_values[:n], val.labels[:n]
    if as_dict:
        return [{"pixel_values": x[i:i + batch], "labels": y[i:i + batch]} for i in range(0, n, batch)]
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128, num_labels=10)).eval()


def logits(model, calib):
    with torch.no_grad():
        return [model(pixel_values=b["pixel_values"]).logits for b in calib]


def mean_kl(pruned, dense) -> float:
    total = sum(F.kl_div(p.log_softmax(1), d.log_softmax(1), log_target=True, reduction="sum").item()
                for p, d in zip(pruned, dense))
    return total / sum(len(d) for d in dense)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def assert_unchanged(model, before):
    state, modes, hooks = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert modes == before[1] and hooks == before[2]
    assert "hf_prune_mask" not in model.__dict__


def test_structured_entries_equal_pruning_that_group_for_real():
    from hf_prune.engine.importance import unit_scores
    from hf_prune.engine.pruner import StructuredPruner

    model, calib = tiny_vit(), digits_calib()
    report = sensitivity(model, calib, grid=(0.5, 0.75), metric="kl", disable_progress=True)
    assert [r["kind"] for r in report.rows] == ["head", "channel", "head", "channel"]
    assert report.rows[0]["name"] == "vit.layers.0.attention (heads)" and report.rows[0]["size"] == 4
    assert report.baseline == 0.0
    dense = logits(model, calib)
    for index, row in enumerate(report.rows):
        for j, fraction in enumerate(report.grid):
            pruned = copy.deepcopy(model)
            pruner = StructuredPruner(pruned, calib[0]["pixel_values"], round_to=None)
            group = pruner.graph.groups[index]
            scores = unit_scores(pruner.graph, "l2")[group.units]
            removed = group.units[torch.argsort(scores, stable=True)][:round(fraction * len(group))]
            pruner.apply(removed, compacted=True)  # physically smaller: heads / channels gone
            want = mean_kl(logits(pruned, calib), dense)
            assert row["values"][j] == pytest.approx(want, rel=1e-4, abs=1e-7), (row["name"], fraction)
            assert row["macs_ratio"][j] == pytest.approx(pruner.stats()["macs_ratio"])
            assert row["values"][j] > 0


def test_weight_entries_equal_magnitude_pruning_that_layer():
    model, calib = tiny_vit(), digits_calib()
    report = sensitivity(model, calib, kind="weights", grid=(0.7,), metric="loss", disable_progress=True)
    names = [r["name"] for r in report.rows]
    assert "vit.layers.1.mlp.fc1" in names and not any("patch_embeddings" in n or "classifier" in n for n in names)
    pruned = copy.deepcopy(model)
    weight = pruned.get_submodule("vit.layers.1.mlp.fc1").weight
    with torch.no_grad():
        cut = weight.abs().flatten().kthvalue(round(0.7 * weight.numel())).values
        weight[weight.abs() <= cut] = 0.0
    loss = sum(F.cross_entropy(out, b["labels"], reduction="sum").item()
               for out, b in zip(logits(pruned, calib), calib)) / 96
    row = report.rows[names.index("vit.layers.1.mlp.fc1")]
    assert row["values"] == [pytest.approx(loss, rel=1e-6)]
    dense_loss = sum(F.cross_entropy(out, b["labels"], reduction="sum").item()
                     for out, b in zip(logits(model, calib), calib)) / 96
    assert report.baseline == pytest.approx(dense_loss, rel=1e-6)


def test_model_is_exactly_as_before_also_when_interrupted():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    model.train()
    model.fc.eval()  # mixed modes must survive (a model fine-tuning with a frozen part)
    calib = digits_calib(n=32, batch=16, as_dict=False)
    before = snapshot(model)
    report = sensitivity(model, calib, grid=(0.5,), disable_progress=True)
    assert_unchanged(model, before)  # BatchNorm statistics included: the passes ran in eval mode
    assert len(report.rows) > 3 and all(0.0 <= r["values"][0] <= 1.0 for r in report.rows)
    sensitivity(model, calib, kind="weights", grid=(0.9,), disable_progress=True)
    assert_unchanged(model, before)

    calls = []

    def interrupt(module, args, output):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    handle = model.layer2.register_forward_hook(interrupt)
    try:
        for kind in ("structured", "weights"):
            calls.clear()
            with pytest.raises(KeyboardInterrupt):
                sensitivity(model, calib, kind=kind, disable_progress=True)
    finally:
        handle.remove()
    assert_unchanged(model, before)


def test_report_table_dict_plot_and_progress(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("HF_PRUNE_DISABLE_PROGRESS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    model = tiny_vit()
    report = sensitivity(model, digits_calib(), out_dir=tmp_path / "vit-pruned")
    assert "hf_prune: sensitivity (groups)" in capfd.readouterr().err
    lines = report.table().splitlines()
    assert lines[2] == ("| group | kind | units | agreement @ 25% removed | agreement @ 50% removed | "
                        "agreement @ 75% removed |")
    assert len(lines) == 4 + len(report.rows) and lines[4].startswith("| `vit.layers.0.attention (heads)` | head | 4 |")
    saved = json.loads((tmp_path / "vit-pruned" / "sensitivity.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert SensitivityReport.from_dict(saved).table() == report.table()
    assert (tmp_path / "vit-pruned" / "sensitivity.md").read_text() == report.table()
    assert (tmp_path / "vit-pruned" / "sensitivity.png").read_bytes().startswith(b"\x89PNG")
    worst = report.most_sensitive(1)[0]
    assert min(r["values"][-1] for r in report.rows) == next(r for r in report.rows if r["name"] == worst)["values"][-1]


def test_bad_input_is_refused_before_anything_runs():
    model, calib = tiny_vit(), digits_calib(n=8, batch=8)
    with pytest.raises(ConfigError, match="kind='channels' is not one of"):
        sensitivity(model, calib, kind="channels")
    with pytest.raises(ConfigError, match=r"grid=1.0 must be in \(0, 1\): a fraction removed"):
        sensitivity(model, calib, grid=(0.5, 1.0))
    with pytest.raises(ConfigError, match="metric='accuracy' is not one of"):
        sensitivity(model, calib, metric="accuracy")
    with pytest.raises(ValueError, match="metric='loss' needs labels"):
        sensitivity(model, [{"pixel_values": calib[0]["pixel_values"]}], metric="loss")
    with pytest.raises(ValueError, match="calib yielded no batches"):
        sensitivity(model, [])
