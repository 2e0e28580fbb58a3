"""Reconstruction after structured pruning and data-aware importance, on small models and real digits."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_prune.engine.importance import unit_scores
from hf_prune.engine.pruner import StructuredPruner
from hf_prune.engine.reconstruct import consumer_layers, kept_indices, reconstruct
from hf_prune.errors import ConfigError, PruningError
from small_cnn import trained_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _prune(model, x, *, target=None, removed=None, **options):
    pruner = StructuredPruner(model, x, round_to=None, **options)
    if removed is None:
        pruner.step(target_macs=target, compacted=True)
    else:
        pruner.apply(removed, compacted=True)
    return pruner, kept_indices(pruner.graph, pruner.removed)


def _logits(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _rel(model, dense, x) -> float:
    d = _logits(dense, x)
    return float((_logits(model, x) - d).norm() / d.norm())


def _agreement(model, dense, x) -> float:
    return float((_logits(model, x).argmax(-1) == _logits(dense, x).argmax(-1)).float().mean())


@pytest.mark.parametrize("bn", [None, "mean", "moments", "recalibrate"])
def test_cnn_reconstruction_lowers_error(bn):
    dense, train, val = trained_cnn()
    model = copy.deepcopy(dense)
    _, keep = _prune(model, val.pixel_values[:2], target=0.6)
    plain, plain_agreement = _rel(model, dense, val.pixel_values), _agreement(model, dense, val.pixel_values)
    stats = reconstruct(model, dense, train.pixel_values[:192], keep=keep, bn=bn, progress=False)
    assert {"blocks.0.pwl", "blocks.1.pwl"} <= set(stats["layers"]) == set(consumer_layers(model, dense))
    assert not any(name.endswith(".dw") for name in stats["layers"])  # lost whole channels: nothing to re-fit
    for name, s in stats["layers"].items():
        assert s["after"] < s["before"], name
    # held-out digits, not the calibration ones
    assert _agreement(model, dense, val.pixel_values) > plain_agreement + 0.4
    if bn != "recalibrate":  # statistics of 192 digits replace the training set's: a worse fit of the logits
        assert _rel(model, dense, val.pixel_values) < 0.45 * plain
    if bn in ("mean", "moments"):  # reads the depthwise conv (no re-fit): corrected from its measured moments
        assert "blocks.1.bn2" in stats["batchnorms"]


def test_vit_reconstruction_lowers_error():
    from transformers import ViTConfig, ViTForImageClassification

    from hf_prune.data import load_digits

    torch.manual_seed(0)
    train, val = load_digits(image_size=16)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96, num_labels=10)
    dense = ViTForImageClassification(cfg).eval()
    model = copy.deepcopy(dense)
    _, keep = _prune(model, {"pixel_values": val.pixel_values[:2]}, target=0.6)
    ev = {"pixel_values": val.pixel_values[:200]}
    plain = _rel(model, dense, ev)
    calib = [{"pixel_values": train.pixel_values[i:i + 64], "labels": train.labels[i:i + 64]} for i in (0, 64)]
    stats = reconstruct(model, dense, calib, keep=keep, progress=False)
    fitted = set(stats["layers"])
    assert {"vit.layers.0.attention.o_proj", "vit.layers.0.mlp.fc2"} <= fitted
    assert all(s["after"] < s["before"] for s in stats["layers"].values())
    assert _rel(model, dense, ev) < 0.7 * plain


def test_nothing_removed_changes_nothing():
    dense, train, _ = trained_cnn()
    model = copy.deepcopy(dense)
    stats = reconstruct(model, dense, train.pixel_values[:64], layers="all", progress=False)
    assert stats["layers"] == {} and stats["batchnorms"] == []
    for (n, a), b in zip(model.state_dict().items(), dense.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("layers", ["consumers", "all"])
def test_removing_exactly_zero_units_changes_nothing(layers):
    dense, train, val = trained_cnn()
    zero = torch.tensor([1, 5, 9, 20, 33])
    with torch.no_grad():  # these expansion channels of blocks.0 now carry exact zeros everywhere
        dense.blocks[0].pw.weight[zero] = 0
        for bn in (dense.blocks[0].bn1, dense.blocks[0].bn2):
            bn.weight[zero] = 0
            bn.bias[zero] = 0
    model = copy.deepcopy(dense)
    probe = StructuredPruner(copy.deepcopy(dense), val.pixel_values[:2], round_to=None)
    member = next(m for m in probe.graph.members if m.tensor == "blocks.0.pw.weight" and m.dim == 0)
    _, keep = _prune(model, val.pixel_values[:2], removed=member.units[zero])
    assert model.blocks[0].pwl.in_channels == 48 - zero.numel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = reconstruct(model, dense, train.pixel_values[:128], keep=keep, layers=layers, progress=False)
    assert "blocks.0.pwl" in stats["layers"] and stats["layers"]["blocks.0.pwl"]["before"] < 1e-6
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(_logits(model, val.pixel_values), _logits(dense, val.pixel_values), rtol=1e-4, atol=1e-5)


class _Chain(torch.nn.Sequential):
    def forward(self, x):  # what nn.Sequential computes, in a forward of its own: no cached inputs
        for module in self:
            x = module(x)
        return x


def test_cached_sequential_inputs_give_the_same_fit_as_full_passes():
    dense, train, val = trained_cnn()
    cached = copy.deepcopy(dense)
    _, keep = _prune(cached, val.pixel_values[:2], target=0.6)
    full, full_dense = copy.deepcopy(cached), copy.deepcopy(dense)
    full.blocks.__class__ = full_dense.blocks.__class__ = _Chain
    calib = train.pixel_values[:96]
    for model, reference in ((cached, dense), (full, full_dense)):  # BN sites run through the cache too
        reconstruct(model, reference, calib, keep=keep, bn="moments", progress=False)
    changed = 0
    for (name, a), b, c in zip(cached.state_dict().items(), full.state_dict().values(), dense.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        changed += a.shape != c.shape or not torch.equal(a, c)
    assert changed > 10


def test_outputs_pruned_without_keep_is_an_error():
    dense, train, val = trained_cnn()
    model = copy.deepcopy(dense)
    _prune(model, val.pixel_values[:2], target=0.5)
    with pytest.raises(PruningError, match="keep="):
        reconstruct(model, dense, train.pixel_values[:32], progress=False)


def test_failure_restores_the_model():
    dense, train, val = trained_cnn()
    model = copy.deepcopy(dense)
    _, keep = _prune(model, val.pixel_values[:2], target=0.6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def explode(module, args):  # the classifier is the last site: every earlier one has been written
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")

    model.fc.register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        reconstruct(model, dense, train.pixel_values[:64], keep=keep, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_settings_are_refused():
    dense, train, _ = trained_cnn()
    with pytest.raises(ConfigError, match="ridge"):
        reconstruct(copy.deepcopy(dense), dense, train.pixel_values[:8], ridge=0)
    with pytest.raises(ConfigError, match="bn"):
        reconstruct(copy.deepcopy(dense), dense, train.pixel_values[:8], bn="sometimes")
    with pytest.raises(PruningError, match="calib"):
        reconstruct(copy.deepcopy(dense), dense, [])
    assert consumer_layers(dense, dense) == []


def test_activation_importance_sees_dead_channels():
    dense, train, val = trained_cnn()
    dead = 7
    with torch.no_grad():  # channel 7 of blocks.0's expansion never fires, yet its weights are the largest
        dense.blocks[0].bn2.weight[dead] = 0.0
        dense.blocks[0].bn2.bias[dead] = -1.0
        dense.blocks[0].pwl.weight[:, dead] *= 50
        dense.blocks[0].pw.weight[dead] *= 50
    pruner = StructuredPruner(dense, val.pixel_values[:2], round_to=None)
    member = next(m for m in pruner.graph.members if m.tensor == "blocks.0.pwl.weight" and m.dim == 1)
    act = unit_scores(pruner.graph, "activation", calib=train.pixel_values[:128])[member.units]
    l2 = unit_scores(pruner.graph, "l2")[member.units]
    assert int(act.argmin()) == dead and float(act[dead]) < 1e-6 * float(act.mean())
    assert int(l2.argmax()) == dead
    # the allocator takes the scores unchanged: the dead channel goes first
    pruner.step(target_macs=0.95, scores=unit_scores(pruner.graph, "activation", calib=train.pixel_values[:128]))
    assert int(member.units[dead]) in pruner.removed.tolist()
    with pytest.raises(ValueError, match="calib"):
        unit_scores(pruner.graph, "activation")


def test_prune_with_calib_reconstructs_by_default_and_records_it():
    """``hf_prune.prune(model, "depgraph", calib=...)`` re-fits by default (held-out digits agree more
    with the dense model than with ``reconstruct=False``); ``importance="activation"`` goes through the
    same call; bad combinations are refused before anything changes."""
    import hf_prune
    from hf_prune.api import oneshot

    dense, train, val = trained_cnn()
    calib, x = train.pixel_values[:192], val.pixel_values[:2]
    plain, refit, data_aware = copy.deepcopy(dense), copy.deepcopy(dense), copy.deepcopy(dense)
    _, s_plain = oneshot(plain, "depgraph", target_macs=0.6, round_to=None, example_inputs=x,
                                      calib=calib, reconstruct=False)
    _, s_refit = oneshot(refit, "depgraph", target_macs=0.6, round_to=None, example_inputs=x,
                                      calib=calib)
    assert "reconstruction" not in s_plain and s_refit["reconstruction"]["layers"] >= 2
    assert s_refit["reconstruction"]["mean_error_after"] < s_refit["reconstruction"]["mean_error_before"]
    assert [p.shape for p in plain.parameters()] == [p.shape for p in refit.parameters()]  # the same units
    assert _agreement(refit, dense, val.pixel_values) > _agreement(plain, dense, val.pixel_values) + 0.3
    hf_prune.prune(data_aware, "depgraph", target_macs=0.6, round_to=None, example_inputs=x, calib=calib,
                   importance="activation")
    assert _agreement(data_aware, dense, val.pixel_values) > 0.5
    untouched = copy.deepcopy(dense)
    for bad in (dict(importance="activation"), dict(reconstruct=True)):
        with pytest.raises(ConfigError, match="calib="):
            hf_prune.prune(untouched, "depgraph", target_macs=0.6, example_inputs=x, **bad)
    assert all(torch.equal(a, b) for a, b in zip(untouched.state_dict().values(), dense.state_dict().values()))
    with pytest.raises(ConfigError, match="one-shot"):
        hf_prune.DepGraphCallback(target_macs=0.5, importance="activation")
    for bad in (dict(reconstruct=True), dict(reconstruct_layers="all")):
        with pytest.raises(ConfigError, match="one-shot"):
            hf_prune.DepGraphCallback(target_macs=0.5, **bad)
    with pytest.raises(ConfigError, match="reconstruct_layers"):
        hf_prune.prune(untouched, "depgraph", target_macs=0.6, example_inputs=x, calib=calib, reconstruct_layers="some")
    # a reconstruction that fails undoes the whole prune: same shapes, same values, same parameter objects
    params = list(untouched.parameters())
    with pytest.raises(RuntimeError):
        hf_prune.prune(untouched, "depgraph", target_macs=0.6, round_to=None, example_inputs=x,
                       calib=torch.randn(8, 5, 8, 8))  # 5 channels: the calibration forward fails
    assert all(a is b for a, b in zip(untouched.parameters(), params))
    assert all(torch.equal(a, b) for a, b in zip(untouched.state_dict().values(), dense.state_dict().values()))


def test_weight_pruned_layers_refit_their_kept_weights_only():
    """After magnitude weight pruning, every masked layer is re-fitted on its kept weights: its output
    error drops, the pruned weights stay exactly zero, the masks do not change, and held-out digits
    agree more with the dense model."""
    import hf_prune
    from hf_prune.sparse.masks import get_weight_masks

    dense, train, val = trained_cnn()
    model = copy.deepcopy(dense)
    hf_prune.prune(model, method="magnitude", sparsity=0.8)
    masks = get_weight_masks(model)
    before = {n: m.clone() for n, m in masks.masks.items()}
    plain = _agreement(model, dense, val.pixel_values)
    stats = reconstruct(model, dense, train.pixel_values[:192], progress=False)
    assert set(stats["layers"]) == {n for n in masks.layers if not bool(before[n].all())}
    for name, s in stats["layers"].items():
        assert s["after"] < s["before"], name
    for n in masks.layers:
        assert torch.equal(masks[n], before[n])
        assert bool((masks.weight(n)[~masks[n]] == 0).all()), n
    assert _agreement(model, dense, val.pixel_values) > plain + 0.2


def test_masked_solve_is_exact_when_the_pruned_columns_come_first():
    """The column-by-column OBS update is exact for a row whose pruned weights are its leading columns
    (every later weight is free to compensate): it matches the row's own constrained least-squares
    solution; rows that keep everything get the unconstrained solution."""
    from hf_prune.engine.reconstruct import _Normal

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(200, 6, generator=g, dtype=torch.float64), torch.randn(200, 4, generator=g, dtype=torch.float64)
    w0 = torch.randn(1, 4, 6, generator=g, dtype=torch.float64)
    normal = _Normal.empty(w0, "cpu")
    normal.add(X, Y, bias=False)
    keep = torch.ones(1, 4, 6, dtype=torch.bool)
    keep[0, 1, 0] = keep[0, 3, 0] = keep[0, 3, 1] = False
    got = normal.solve(w0, 1e-2, keep)
    lam = 1e-2 * torch.diagonal(normal.H[0]).mean()
    for row in range(4):
        k = keep[0, row]
        A = normal.H[0][k][:, k] + lam * torch.eye(int(k.sum()), dtype=torch.float64)
        b = normal.C[0][k, row] + lam * w0[0, row, k]
        want = torch.zeros(6, dtype=torch.float64)
        want[k] = torch.linalg.solve(A, b)
        torch.testing.assert_close(got[0, row], want, rtol=1e-9, atol=1e-10)


def test_reconstruct_layers_all_refits_every_layer_after_the_first_cut():
    """``reconstruct_layers="all"`` re-fits more layers than the default (those that read pruned channels),
    the same units go, and held-out digits still agree with the dense model at least as well as plain."""
    from hf_prune.api import oneshot

    dense, train, val = trained_cnn()
    calib, x = train.pixel_values[:192], val.pixel_values[:2]
    runs = {}
    for layers in ("consumers", "all"):
        model = copy.deepcopy(dense)
        _, stats = oneshot(model, "depgraph", target_macs=0.6, round_to=None, example_inputs=x, calib=calib,
                           reconstruct_layers=layers)
        runs[layers] = (model, stats["reconstruction"])
    (m_c, s_c), (m_a, s_a) = runs["consumers"], runs["all"]
    assert s_a["layers"] > s_c["layers"] >= 2
    assert [p.shape for p in m_c.parameters()] == [p.shape for p in m_a.parameters()]
    plain = copy.deepcopy(dense)
    oneshot(plain, "depgraph", target_macs=0.6, round_to=None, example_inputs=x, calib=calib, reconstruct=False)
    assert _agreement(m_a, dense, val.pixel_values) > _agreement(plain, dense, val.pixel_values) + 0.3
