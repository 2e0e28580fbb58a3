"""Unstructured weight pruning: masks, allocators, RD (curves + DP), oViT (OBS), N:M, export helpers."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from hf_prune.errors import PruningError
from hf_prune.methods.ovit import obs as ovit
from hf_prune.methods.rd import curves as rd
from hf_prune import OViTCallback, RDCallback
import hf_prune.api
from hf_prune.sparse.allocation import ALLOCATORS, allocate_erk
from hf_prune.sparse.masks import (WeightMasks, get_weight_masks, is_nm, prunable_layers, safetensors_size,
                                   select_magnitude, select_nm, to_semi_structured)


def oneshot(model, method, calib=None, **kwargs):
    """One-shot pruning with ``method``; returns everything it measured."""
    return hf_prune.api.oneshot(model, method, calib=calib, **kwargs)[1]


def prune_weights(model, method="magnitude", **kwargs):
    return oneshot(model, method, **kwargs)


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    return [{"pixel_values": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 32, 8)]


def _pruned_counts(weights: dict, alloc: dict) -> int:
    return sum(round(alloc[n] * w.numel()) for n, w in weights.items())


# --------------------------------------------------------------------------------------- masks


def test_layer_discovery_excludes_stem_and_classifier():
    m = small_cnn()
    assert list(prunable_layers(m)) == ["2", "4", "8"]
    assert list(prunable_layers(m, example_inputs=torch.randn(1, 3, 8, 8))) == ["2", "4", "8"]
    assert list(prunable_layers(m, exclude_stem=False, exclude_classifier=False)) == ["0", "2", "4", "8", "10"]
    assert list(prunable_layers(m, exclude=["4"])) == ["2", "8"]


def test_layer_discovery_transformers_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, num_labels=10)
    model = ViTForImageClassification(cfg)
    names = list(prunable_layers(model))
    assert "classifier" not in names
    assert not any("patch_embeddings" in n for n in names)
    assert len(names) == 6  # q, k, v, attention output, intermediate, output
    stats = prune_weights(model, method="magnitude", sparsity=0.5)
    assert stats["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    model(torch.randn(2, 3, 16, 16))


def test_masks_enforce_after_optimizer_step(calib):
    m = small_cnn()
    prune_weights(m, method="magnitude", sparsity=0.6)
    wm = get_weight_masks(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for batch in calib[:2]:
        loss = nn.functional.cross_entropy(m(batch["pixel_values"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(bool((wm.weight(n)[~wm[n]] != 0).any()) for n in wm.layers)  # the update revived zeros
    wm.enforce()
    for n in wm.layers:
        assert bool((wm.weight(n)[~wm[n]] == 0).all())
    assert wm.stats()["global_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_stats_are_correct():
    m = small_cnn()
    wm = WeightMasks.for_model(m)
    wm.set("2", torch.zeros_like(wm["2"]))  # 8*3*3*16 = 1152 pruned
    half = torch.ones(16 * 16 * 9, dtype=torch.bool)
    half[:1000] = False
    wm.set("4", half)
    s = wm.stats()
    assert s["layers"] == {"2": 1.0, "4": 1000 / 2304, "8": 0.0}
    assert s["num_weights"] == 1152 + 2304 + 512
    assert s["num_pruned"] == 2152
    assert s["global_sparsity"] == pytest.approx(2152 / 3968)
    json.dumps(s)
    json.dumps(wm.spec_stats())


@pytest.mark.parametrize("encoding", ["rle", "bits", "auto"])
def test_mask_state_roundtrip(encoding, tmp_path):
    m = small_cnn()
    prune_weights(m, method="magnitude", sparsity=0.7, allocation="lamp")
    wm = get_weight_masks(m)
    state = json.loads(json.dumps(wm.state_dict(encoding=encoding)))
    m2 = small_cnn(seed=1)
    wm2 = WeightMasks.from_state_dict(m2, state)
    assert all(torch.equal(wm[n], wm2[n]) for n in wm.layers)
    wm.save_file(tmp_path / "masks.safetensors")
    wm3 = WeightMasks.for_model(small_cnn(seed=2))
    wm3.load_file(tmp_path / "masks.safetensors")
    assert all(torch.equal(wm[n], wm3[n]) for n in wm.layers)
    wm3.enforce()
    assert wm3.stats() == wm.stats()


def test_masks_only_grow():
    w = torch.randn(64, 32)
    keep = torch.rand(64, 32) > 0.3
    new = select_magnitude(w, 0.5, keep=keep)
    assert not bool((new & ~keep).any())
    assert int((~new).sum()) == max(round(0.5 * w.numel()), int((~keep).sum()))


# --------------------------------------------------------------------------------------- allocators


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.5, 0.9, 0.99])
def test_allocators_hit_budget_exactly(name, sparsity):
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(16, 3, 3, 3, generator=g), "b": torch.randn(32, 16, 3, 3, generator=g) * 0.1,
               "c": torch.randn(10, 512, generator=g), "d": torch.randn(7, 5, generator=g) * 3}
    alloc = ALLOCATORS[name](weights, sparsity)
    N = sum(w.numel() for w in weights.values())
    assert _pruned_counts(weights, alloc) == round(sparsity * N)
    assert all(0.0 <= s <= 1.0 for s in alloc.values())
    # with masks already present, counts only grow and the total stays exact
    keep = {n: torch.rand(w.shape, generator=g) > 0.2 for n, w in weights.items()}
    zeroed = {n: w * keep[n] for n, w in weights.items()}
    alloc2 = ALLOCATORS[name](zeroed, sparsity, keep=keep)
    before = sum(int((~k).sum()) for k in keep.values())
    assert _pruned_counts(weights, alloc2) == max(round(sparsity * N), before)
    for n, k in keep.items():
        assert round(alloc2[n] * k.numel()) >= int((~k).sum())


def test_erk_density_follows_shape():
    weights = {"small": torch.randn(8, 8), "big": torch.randn(256, 256)}
    alloc = allocate_erk(weights, 0.8)
    assert alloc["small"] < alloc["big"]


# --------------------------------------------------------------------------------------- RD


def test_rd_dp_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    sizes = [10, 17, 23]
    grid = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    pruned = [[round(s * n) for s in grid] for n in sizes]
    survivors = [[n - k for k in ks] for n, ks in zip(sizes, pruned)]
    for trial in range(5):
        dist = [torch.cumsum(torch.rand(len(grid), generator=g), 0).sub(0.3).clamp_min(0).tolist() for _ in sizes]
        for budget in (5, 12, 20, 31, 50):
            best = min((sum(dist[l][c[l]] for l in range(3)), c) for c in itertools.product(range(len(grid)), repeat=3)
                       if sum(survivors[l][c[l]] for l in range(3)) <= budget)
            picks, total = rd.rd_dp(dist, survivors, budget, unit=1)
            assert total == pytest.approx(best[0])
            assert sum(dist[l][picks[l]] for l in range(3)) == pytest.approx(best[0])
            assert sum(survivors[l][picks[l]] for l in range(3)) <= budget
            picks_q, _ = rd.rd_dp(dist, survivors, budget, unit=3)  # quantised: still within the budget
            assert sum(survivors[l][picks_q[l]] for l in range(3)) <= budget


def test_rd_allocation_end_to_end(calib):
    m = small_cnn()
    dense = {n: p.detach().clone() for n, p in m.state_dict().items()}
    info = {}
    alloc = rd.allocate_rd(m, 0.6, calib, grid=6, max_batches=2, info=info)
    assert all(torch.equal(dense[n], p) for n, p in m.state_dict().items())  # curves restore the weights
    layers = prunable_layers(m)
    weights = {n: mod.weight for n, mod in layers.items()}
    N = sum(w.numel() for w in weights.values())
    assert _pruned_counts(weights, alloc) == round(0.6 * N)
    curves = info["curves"]
    assert all(d[0] == 0.0 for d in curves.distortion)
    assert all(d[-1] > 0 for d in curves.distortion)
    stats = prune_weights(m, method="rd", sparsity=0.6, calib=calib, grid=4, reduction="mean", max_batches=1)
    assert stats["global_sparsity"] == pytest.approx(round(0.6 * N) / N)


def test_prune_weights_is_transactional():
    m = small_cnn()
    before = {n: p.detach().clone() for n, p in m.state_dict().items()}
    with pytest.raises(PruningError):
        prune_weights(m, method="rd", sparsity=0.5, calib=None)
    assert get_weight_masks(m) is None
    assert all(torch.equal(before[n], p) for n, p in m.state_dict().items())


# --------------------------------------------------------------------------------------- oViT / OBS


def _quadratic(F: torch.Tensor, w_star: torch.Tensor, w: torch.Tensor) -> float:
    d = (w - w_star).reshape(-1).double()
    return float(0.5 * d @ F @ d)


@pytest.mark.parametrize("block", [32, 8])
def test_obs_beats_magnitude_on_exact_quadratic(block):
    """Loss ½ (w − w*)ᵀ F (w − w*) with F = λI + GᵀG/m (block-diagonal for blocks of ``block``): the
    OBS removal's recorded loss equals the true loss increase, and is below magnitude pruning's."""
    g = torch.Generator().manual_seed(0)
    d, m, lam = 32, 64, 1e-3
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    G = torch.randn(m, d, generator=g, dtype=torch.float64) @ mix  # correlated gradients
    w_star = torch.randn(4, 8, generator=g, dtype=torch.float64)
    F = torch.zeros(d, d, dtype=torch.float64)
    for b in range(0, d, block):
        Gb = G[:, b:b + block]
        F[b:b + block, b:b + block] = Gb.T @ Gb / m + lam * torch.eye(block, dtype=torch.float64)
    for sparsity in (0.25, 0.5, 0.75):
        new_w, keep, predicted = ovit.obs_prune_layer(w_star, G, sparsity, block_size=block, damping=lam)
        assert int((~keep).sum()) == round(sparsity * d)
        assert bool((new_w[~keep] == 0).all())
        true_loss = _quadratic(F, w_star, new_w)
        assert predicted == pytest.approx(true_loss, rel=1e-6)
        mag = w_star * select_magnitude(w_star, sparsity)
        assert true_loss < _quadratic(F, w_star, mag)


def test_ovit_prune_global_threshold_and_nm(calib):
    m = small_cnn()
    stats = oneshot(m, "ovit", calib, sparsity=0.7, block_size=16, num_grads=4, damping=1e-6)
    wm = get_weight_masks(m)
    N = stats["num_weights"]
    assert stats["num_pruned"] == round(0.7 * N)
    assert stats["allocation"] == "ovit-global"
    assert len({round(v, 3) for v in stats["layers"].values()}) > 1  # non-uniform per layer
    for n in wm.layers:
        assert bool((wm.weight(n)[~wm[n]] == 0).all())
    # N:M with OBS
    m2 = small_cnn()
    s2 = oneshot(m2, "ovit", calib, nm=(2, 4), block_size=16, num_grads=4)
    wm2 = get_weight_masks(m2)
    assert s2["global_sparsity"] == pytest.approx(0.5)
    assert all(is_nm(wm2.weight(n), 2, 4) and is_nm(wm2[n], 2, 4) for n in wm2.layers)


def _sherman_morrison_inverse(G: torch.Tensor, damping: float) -> torch.Tensor:
    """The paper code's recursion: F⁻¹ from I/λ by m rank-1 updates with g/√m."""
    m, B = G.shape
    Finv = torch.eye(B, dtype=torch.float64) / damping
    for g in G.double():
        u = Finv @ g
        Finv = Finv - torch.outer(u, u) / (m + g @ u)
    return Finv


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_block_fisher_inverse_equals_sherman_morrison(rows):
    g = torch.Generator().manual_seed(0)
    m, d, B, lam = 7, 20, 8, 1e-2  # last block shorter (4)
    G = torch.randn(m, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3
    bf = ovit.BlockFisher(d, B, torch.float64)
    for i in range(0, m, rows):  # rank-k updates of any k give the same sum
        bf.add(G[i:i + rows])
    assert bf.count == m
    for si, (start, bs, nb) in enumerate(bf.segments):
        inv = bf.inverse(si, 0, nb, lam)
        for b in range(nb):
            lo = start + b * bs
            ref = _sherman_morrison_inverse(G[:, lo:lo + bs], lam)
            torch.testing.assert_close(inv[b], ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    # float32 blocks: the same matrix to single precision
    bf32 = ovit.BlockFisher(d, B, torch.float32)
    bf32.add(G)
    ref = _sherman_morrison_inverse(G[:, :B], lam)
    torch.testing.assert_close(bf32.inverse(0, 0, 1, lam)[0].double(), ref, rtol=1e-3,
                               atol=1e-3 * float(ref.abs().max()))


def _ovit_result(calib, **opts):
    m = small_cnn()
    info = {}
    stats = oneshot(m, "ovit", calib, sparsity=0.7, block_size=16, damping=1e-6, info=info, **opts)
    wm = get_weight_masks(m)
    return {n: wm[n].clone() for n in wm.layers}, {n: wm.weight(n).detach().clone() for n in wm.layers}, info, stats


def test_fisher_blocks_path_matches_gradient_path(calib):
    m = small_cnn()
    grads = ovit.collect_gradients(m, calib, list(prunable_layers(m)), 6)
    masks_g, w_g, info_g, _ = _ovit_result(calib, grads=grads, fisher="gradients")
    masks_b, w_b, info_b, _ = _ovit_result(calib, grads=grads, fisher="blocks")
    assert info_g["fisher"] == "gradients" and info_b["fisher"] == "blocks"
    assert all(torch.equal(masks_g[n], masks_b[n]) for n in masks_g)
    assert all(torch.allclose(w_g[n], w_b[n], atol=1e-6) for n in w_g)
    assert ovit.choose_fisher("auto", 256, 64, torch.float64, torch.float32) == "blocks"  # m > 2B
    assert ovit.choose_fisher("auto", 64, 64, torch.float64, torch.float32) == "gradients"
    with pytest.raises(ValueError, match="fisher="):
        ovit.choose_fisher("dense", 8, 8, torch.float64, torch.float32)


@pytest.mark.parametrize("allocation", [None, "uniform"])
def test_memory_bounded_fisher_gives_the_same_masks(calib, allocation):
    """A budget that forces one group per layer repeats the gradient passes (twice per group with the
    global threshold, once with a fixed allocation) and gives the unbounded result."""
    opts = dict(num_grads=8, fisher="blocks", allocation=allocation)  # 8 > 4 batches: calib is re-iterated
    masks_a, w_a, info_a, stats_a = _ovit_result(calib, **opts)
    masks_b, w_b, info_b, stats_b = _ovit_result(calib, max_fisher_mb=0.35, **opts)
    assert info_a["groups"] == 1 and info_a["gradient_rounds"] == 1
    assert info_b["groups"] == 3
    assert info_b["gradient_rounds"] == (6 if allocation is None else 3)
    assert info_b["max_group_fisher_bytes"] <= 0.35 * 2 ** 20 < info_a["max_group_fisher_bytes"]
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    assert all(torch.allclose(w_a[n], w_b[n], atol=1e-6) for n in w_a)
    assert stats_a["num_pruned"] == stats_b["num_pruned"] == round(0.7 * stats_a["num_weights"])


def test_memory_bound_errors(calib):
    m = small_cnn()
    with pytest.raises(PruningError, match=r"max_fisher_mb=0.01 .* layer '2' .* at least 0.2"):
        oneshot(m, "ovit", calib, sparsity=0.5, block_size=16, num_grads=8, fisher="blocks", max_fisher_mb=0.01)
    assert get_weight_masks(m) is None  # transactional
    gen = (b for b in calib)  # cannot be re-iterated for the second group
    with pytest.raises(PruningError, match="re-iterable"):
        oneshot(m, "ovit", gen, sparsity=0.5, block_size=16, num_grads=4, fisher="blocks", max_fisher_mb=0.35)


def test_nm_magnitude_pattern():
    w = torch.randn(8, 16)
    keep = select_nm(w, 2, 4)
    assert is_nm(keep, 2, 4)
    assert int(keep.sum()) == w.numel() // 2
    assert not is_nm(torch.ones(8, 16), 2, 4)
    m = small_cnn()
    stats = prune_weights(m, method="magnitude", sparsity=0.5, nm=(2, 4))
    wm = get_weight_masks(m)
    assert stats["global_sparsity"] == 0.5 and all(is_nm(wm.weight(n)) for n in wm.layers)


# --------------------------------------------------------------------------------------- export


def test_safetensors_size_reports_dense_storage():
    dense = small_cnn()
    sparse = small_cnn()
    prune_weights(sparse, method="magnitude", sparsity=0.9, exclude_stem=False, exclude_classifier=False)
    a, b = safetensors_size(dense), safetensors_size(sparse)
    assert a["raw_bytes"] == b["raw_bytes"]  # zeros are stored like any other value
    assert b["gzip_bytes"] < a["gzip_bytes"] and b["zip_bytes"] < a["zip_bytes"]
    assert b["nonzero_fraction"] < 0.2


def test_semi_structured_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same check on a GPU machine
    with pytest.raises(PruningError, match="CUDA"):
        to_semi_structured(small_cnn())


# --------------------------------------------------------------------------------------- callbacks


@pytest.mark.parametrize("which", ["rd", "ovit", "ovit_training_grads"])
def test_weight_callbacks_plain_loop(which, calib, tmp_path):
    m = small_cnn()
    if which == "rd":
        cb = RDCallback(sparsity=0.6, schedule="linear", start=1, end=5, frequency=2, calib=calib[:1], grid=4)
    elif which == "ovit":
        cb = OViTCallback(sparsity=0.6, schedule="cubic", start=1, end=5, frequency=2, calib=calib,
                               block_size=16, num_grads=2)
    else:
        cb = OViTCallback(sparsity=0.6, schedule="cubic", start=3, end=7, frequency=2, block_size=16,
                          num_grads=2, fisher_source="training")
    cb.setup(m, total_steps=8)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    seen = []
    for step in range(8):
        cb.step_begin(step)
        batch = calib[step % len(calib)]
        loss = nn.functional.cross_entropy(m(batch["pixel_values"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        cb.pre_optimizer_step()
        opt.step()
        cb.optimizer_step()
        seen.append(cb.stats()["sparsity"])
        wm = get_weight_masks(m)
        assert all(bool((wm.weight(n)[~wm[n]] == 0).all()) for n in wm.layers)
    assert all(b >= a for a, b in zip(seen, seen[1:]))  # masks only grow
    assert seen[-1] == pytest.approx(0.6, abs=1e-3)
    assert len(cb.events) >= 2
    path = cb.save_state(tmp_path)
    state = json.loads(path.read_text())
    m2 = small_cnn(seed=3)
    cb2 = type(cb)(sparsity=0.6, schedule="linear", start=1, end=5, calib=calib)
    cb2.setup(m2, total_steps=8)
    cb2.load_state(tmp_path)
    wm2 = get_weight_masks(m2)
    assert all(torch.equal(wm[n], wm2[n]) for n in wm.layers)
    assert state["global_step"] == 7
    cb.finish()
    assert "prune/sparsity" in cb.log_entries()


def test_strided_weights_channels_last(calib):
    m = small_cnn().to(memory_format=torch.channels_last)
    assert not m[2].weight.is_contiguous()
    before = m[2].weight.detach().clone()
    rd.distortion_curves(m, calib, grid=3)
    assert torch.equal(before, m[2].weight)  # restored
    stats = oneshot(m, "ovit", calib, sparsity=0.5, block_size=16, num_grads=2)
    wm = get_weight_masks(m)
    assert stats["num_pruned"] == round(0.5 * stats["num_weights"])
    assert all(bool((wm.weight(n)[~wm[n]] == 0).all()) for n in wm.layers)
    assert not torch.equal(before, m[2].weight)


def test_rd_callback_in_trainer(tmp_path):
    """RDCallback inside transformers.Trainer: calibration from the training set, masks enforced after
    every step, state written into checkpoints, final sparsity reached."""
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, num_labels=10)
    model = ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": int(i % 10)} for i in range(32)]
    cb = RDCallback(sparsity=0.5, schedule="linear", start=1, end=3, frequency=2, grid=3, calib_size=8,
                       calib_batch_size=8)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, save_steps=2,
                             logging_steps=2, report_to=[], use_cpu=True, learning_rate=1e-2, save_only_model=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    wm = get_weight_masks(model)
    assert wm.stats()["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(bool((wm.weight(n)[~wm[n]] == 0).all()) for n in wm.layers)
    assert not any("patch_embeddings" in n or n == "classifier" for n in wm.layers)
    state = json.loads((tmp_path / "checkpoint-2" / "hf_prune_state.json").read_text())
    assert state["callback"] == "RDCallback" and "weight_masks" in state["state"]
    assert any("prune/sparsity" in h for h in trainer.state.log_history)


def test_prune_entry_point_dispatches_weight_methods():
    import timm

    import hf_prune
    from hf_prune.errors import PruningError

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    calib = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    with pytest.raises(PruningError, match="sparsity"):
        hf_prune.prune(model, method="rd", target_macs=0.5, calib=calib)
    hf_prune.prune(model, method="magnitude", sparsity=0.5, calib=calib)
    convs = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and n != "conv1"]
    zeros = sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs)
    assert 0.45 <= zeros <= 0.55
    assert model.__dict__["hf_prune_record"]["method"] == "magnitude"


def test_ovit_callback_in_trainer(tmp_path):
    """OViTCallback inside transformers.Trainer with training gradients (captured before the
    optimizer step): cubic schedule reached, masks enforced, spec recorded on the config."""
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, num_labels=10)
    model = ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": int(i % 10)} for i in range(48)]
    cb = OViTCallback(sparsity=0.6, schedule="cubic", start=2, end=5, frequency=1, block_size=16, num_grads=2,
                      fisher_source="training")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, save_strategy="no",
                             logging_steps=3, report_to=[], use_cpu=True, learning_rate=1e-2,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    wm = get_weight_masks(model)
    assert wm.stats()["global_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert all(bool((wm.weight(n)[~wm[n]] == 0).all()) for n in wm.layers)
    amounts = [e["amount"] for e in cb.events]
    assert len(amounts) >= 2 and amounts == sorted(amounts)  # gradual, not one-shot
    spec = model.config.hf_prune
    assert spec["method"]["name"] == "ovit" and spec["sparsity"]["layers"]


def _example(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_rd_oneshot(tmp_path):
    out = _example("rd_oneshot").main(["--steps", "10", "--calib-images", "32", "--output-dir", str(tmp_path)])
    assert out["sparsity"] == pytest.approx(0.7, abs=1e-3)  # the example itself checks the reload is exact
    assert out["spec_sparsity"]["layers"] and out["spec_sparsity"]["global_nonzero"] < 0.6


def test_example_ovit_callback(tmp_path):
    acc, sparsity = _example("ovit_callback").main(["--max-steps", "12", "--num-grads", "2", "--sparsity", "0.6",
                                                    "--output-dir", str(tmp_path)])
    assert sparsity == pytest.approx(0.6, abs=1e-3) and 0.0 <= acc <= 1.0
