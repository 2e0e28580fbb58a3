"""Fidelity of the weight-pruning methods to their papers: RD's per-layer cap and iterative schedule, its
fast (prefix-reusing, grid-batched) distortion curves, oViT's damping, eval-mode Fisher and recipe."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import hf_prune
from hf_prune.errors import PruningError
from hf_prune.methods.ovit import obs as ovit
from hf_prune.methods.ovit import recipe
from hf_prune.methods.rd import curves as rd
from hf_prune.core.schedules import Geometric, geometric_amount, geometric_targets
from hf_prune.sparse.masks import WeightMasks, get_weight_masks, prunable_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(x, y=None, size=8):
    return [{"pixel_values": x[i:i + size], **({"labels": y[i:i + size]} if y is not None else {})}
            for i in range(0, len(x), size)]


def _dead_rows(model: nn.Module, names) -> int:
    mods = dict(model.named_modules())
    return sum(int((mods[n].weight.reshape(mods[n].weight.shape[0], -1) != 0).sum(1).eq(0).sum()) for n in names)


# --------------------------------------------------------------------------------------- RD: cap / connectivity


@pytest.fixture(scope="module")
def digits_cnn():
    """A plain CNN (no BatchNorm, no residuals) trained on real handwritten digits, and its data."""
    from hf_prune.data import accuracy, load_digits

    train, val = load_digits(image_size=16, channels=1, seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(train.pixel_values[idx]), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(before)
    model.eval()
    dense_acc = accuracy(model, val)
    assert dense_acc > 0.85
    calib = [(train.pixel_values[i:i + 64], train.labels[i:i + 64]) for i in range(0, 256, 64)]
    return model, {k: v.clone() for k, v in model.state_dict().items()}, calib, val, dense_acc


def test_rd_at_90_percent_keeps_every_output_unit_on_real_digits(digits_cnn):
    from hf_prune.data import accuracy

    model, dense, calib, val, dense_acc = digits_cnn
    names = list(prunable_layers(model))
    results = {}
    for min_per_row in (0, rd.DEFAULT_MIN_PER_ROW):  # the paper's uncapped grid, then the default
        model.load_state_dict(dense)
        alloc = rd.allocate_rd(model, 0.9, calib, grid=11, min_per_row=min_per_row, show_progress=False)
        wm = WeightMasks(model, names)
        rd.apply_rd_allocation(wm, alloc, min_per_row=min_per_row)
        wm.enforce()
        stats = wm.stats()
        assert stats["num_pruned"] == round(0.9 * stats["num_weights"])
        results[min_per_row] = (_dead_rows(model, names), accuracy(model, val), alloc)
    model.load_state_dict(dense)
    dead_uncapped = results[0][0]
    dead, acc, alloc = results[rd.DEFAULT_MIN_PER_ROW]
    assert dead_uncapped > 0  # the paper's order empties output units at 90% on this model ...
    assert dead == 0  # ... the default never does
    assert max(alloc.values()) < 1.0
    mods = dict(model.named_modules())
    for n in names:  # every output unit keeps min_per_row weights
        w = mods[n].weight
        cap = 1 - rd.DEFAULT_MIN_PER_ROW * w.shape[0] / w.numel()
        assert alloc[n] <= cap + 1e-12
    assert acc > 0.6 and acc > results[0][1]  # chance is 0.1; the uncapped allocation loses more


def test_rd_dp_per_layer_cap():
    """A layer whose curve is cheap all the way to 100%: the uncapped DP removes it whole, the capped one
    never goes below the floor."""
    sizes = [100, 100]
    pruned = [[0, 50, 90, 100], [0, 50, 90, 100]]
    dist = [[0.0, 0.1, 0.2, 0.2], [0.0, 1.0, 5.0, 50.0]]
    survivors = [[n - k for k in ks] for n, ks in zip(sizes, pruned)]
    picks, _ = rd.rd_dp(dist, survivors, 50)
    assert survivors[0][picks[0]] == 0  # the whole first layer
    picks, total = rd.rd_dp(dist, survivors, 50, min_survivors=[10, 10])
    assert [survivors[i][g] for i, g in enumerate(picks)] == [10, 10]
    assert total == pytest.approx(0.2 + 5.0)
    with pytest.raises(PruningError, match="min_per_row"):
        rd.rd_dp(dist, survivors, 15, min_survivors=[10, 10])
    with pytest.raises(ValueError, match="min_per_row"):
        rd.allocate_rd(nn.Linear(4, 4), 0.5, None, layers=[""], min_per_row=-1)


def test_select_connected_order_and_refusal():
    w = torch.tensor([[5.0, 0.1, 0.2, 0.3], [0.01, 0.02, 0.03, 0.04]])
    keep = rd.select_connected(w, 0.5, min_per_row=1)
    assert keep.sum(1).tolist() == [3, 1]  # plain magnitude would empty the second row
    assert keep[1, 3] and keep[0, 0]
    scores, protected = rd.connected_scores(w, None, 2)
    assert protected == 4 and set(torch.argsort(scores)[-4:].tolist()) == {0, 3, 6, 7}
    with pytest.raises(PruningError, match="output unit"):
        rd.select_connected(w, 0.9, min_per_row=1)


# --------------------------------------------------------------------------------------- RD: iterative schedule


def test_rd_schedule_values():
    assert geometric_targets(3, 0.875) == pytest.approx([0.5, 0.75, 0.875])
    a = geometric_amount(4, 0.9)
    assert geometric_targets(4, 0.9) == pytest.approx([1 - (1 - a) ** t for t in range(1, 5)])
    assert geometric_targets(4, 0.9)[-1] == 0.9
    assert geometric_targets(1, 0.6) == [0.6]
    assert geometric_targets(2, 0.75, initial=0.5) == pytest.approx([1 - 0.5 * math.sqrt(0.5), 0.75])
    for bad in (dict(rounds=0, final=0.5), dict(rounds=2, final=1.0), dict(rounds=2, final=0.3, initial=0.5)):
        with pytest.raises(ValueError):
            geometric_targets(**bad)
    s = Geometric(final=0.875, kind="sparsity", rounds=3, start=10, end=30)
    assert s.pruning_steps(100) == [10, 20, 30]
    assert [s.target_at(t, 100) for t in (0, 10, 19, 20, 29, 30, 99)] == pytest.approx(
        [0.0, 0.5, 0.5, 0.75, 0.75, 0.875, 0.875])
    assert s.is_pruning_step(20, 100) and not s.is_pruning_step(21, 100)
    assert s.to_dict()["rounds"] == 3 and s.to_dict()["name"] == "geometric"
    from hf_prune.core.schedules import from_dict

    assert from_dict(s.to_dict()) == s


def test_rd_config_carries_the_cap_and_the_iterative_schedule_to_every_path():
    """``RDConfig(schedule="geometric", rounds=k)`` is the paper's schedule for the callback (its pruning
    steps), and ``rounds`` / ``min_per_row`` reach one-shot ``prune``; both survive a JSON round trip."""
    from hf_prune import RDCallback, RDConfig

    cfg = RDConfig(sparsity=0.875, schedule="geometric", rounds=3, start=10, end=30)
    assert RDConfig.from_dict(cfg.to_dict()) == cfg
    cb = RDCallback(cfg)
    assert cb.schedule.pruning_steps(100) == [10, 20, 30]
    assert [cb.schedule.target_at(t, 100) for t in (10, 20, 30)] == pytest.approx([0.5, 0.75, 0.875])
    with pytest.raises(hf_prune.ConfigError, match="min_per_row"):
        RDConfig(sparsity=0.5, min_per_row=-1)
    m = _cnn()
    calib = _batches(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    names = list(prunable_layers(m))
    from hf_prune.api import oneshot

    _, stats = oneshot(m, RDConfig(sparsity=0.9, grid=6, rounds=2), calib=calib)
    assert _dead_rows(m, names) == 0  # the default cap keeps every output unit connected
    assert stats["num_pruned"] == round(0.9 * stats["num_weights"])


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


def test_iterative_allocation_remeasures_curves_on_the_pruned_model():
    m = _cnn()
    calib = _batches(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    info = {}
    alloc = rd.allocate_rd(m, 0.875, calib, rounds=3, grid=6, info=info, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # weights restored
    assert info["targets"] == pytest.approx([0.5, 0.75, 0.875])
    rounds = info["rounds"]
    assert len(rounds) == 3
    sizes = rounds[0]["curves"].sizes
    for prev, cur in zip(rounds, rounds[1:]):
        start = [ks[0] for ks in cur["curves"].pruned]  # each round's curves start where the last one pruned
        assert start == [round(prev["allocation"][n] * s) for n, s in zip(prev["allocation"], sizes)]
        assert cur["curves"].distortion != prev["curves"].distortion
    assert sum(round(alloc[n] * s) for n, s in zip(alloc, sizes)) == round(0.875 * sum(sizes))
    assert all(round(alloc[n] * s) >= k for n, s, k in zip(alloc, sizes, [ks[0] for ks in rounds[-1]["curves"].pruned]))
    with pytest.raises(ValueError, match="rounds"):
        rd.allocate_rd(m, 0.5, calib, rounds=2, curves=rounds[0]["curves"])


# --------------------------------------------------------------------------------------- RD: fast curves


class _Residual(nn.Module):
    """BN, an in-place shared ReLU called twice, a residual add done in place, a tuple-returning child."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.split = _Split()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        a, b = self.split(out)
        out = torch.cat([a, b], 1)
        out += x
        return self.relu(out)


class _Split(nn.Module):
    def forward(self, x):
        return x.chunk(2, dim=1)


class _ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(_Residual(8), _Residual(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x)
        h.mul_(0.5)  # in place on a module output: a cached output must not be handed out twice unchanged
        return self.head(self.blocks(h).mean((2, 3)))


class _Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class _TinyViT(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, 2)
        self.fc1, self.fc2, self.act = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.GELU()
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for _ in range(2):  # the same block twice: every layer is called twice per forward
            x = x + self.attn(self.norm1(x))
            x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x[:, 0])


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, num_labels=10)
    return ViTForImageClassification(cfg)


@pytest.mark.parametrize("build", [_ResNetLike, _TinyViT, _hf_vit], ids=["resnet_like", "tiny_vit_shared", "hf_vit"])
def test_batched_prefix_curves_equal_plain_curves(build):
    torch.manual_seed(0)
    m = build().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    calib = _batches(torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(1)), size=6)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fast = rd.distortion_curves(m, calib, grid=6, min_per_row=1, show_progress=False, max_batch_mb=0.15)
    plain = rd.distortion_curves(m, calib, grid=6, min_per_row=1, reuse_prefix=False, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert fast.extra["fallback_layers"] == {}
    assert fast.extra["max_variants_per_pass"] > 1  # several grid points per forward pass
    # the in-place change of a cached output is caught (cached outputs are copied from then on)
    assert fast.extra["copied_cache"] == (build is _ResNetLike)
    assert fast.pruned == plain.pruned and fast.names == plain.names
    for a, b in zip(fast.distortion, plain.distortion):
        scale = max(b)
        assert scale > 0
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6 * scale)
    assert fast.forwards < plain.forwards


class _Leaky(nn.Module):
    """A module that leaves a batch-shaped tensor for a later one: the replay cannot skip it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)
        self.stash = _Stash()

    def forward(self, x):
        h = self.stash(self.a(x))
        return self.c(self.b(h) + self.stash.last)


class _Stash(nn.Module):
    def forward(self, x):
        self.last = x * 2
        return x


def test_replay_falls_back_to_plain_passes_with_a_warning():
    torch.manual_seed(0)
    m = _Leaky()
    calib = [torch.randn(5, 6)]
    with pytest.warns(UserWarning, match="'b' is measured with plain forward passes"):
        fast = rd.distortion_curves(m, calib, layers=["b"], grid=4, min_per_row=0, show_progress=False)
    plain = rd.distortion_curves(m, calib, layers=["b"], grid=4, min_per_row=0, reuse_prefix=False,
                                 show_progress=False)
    assert "b" in fast.extra["fallback_layers"]
    assert fast.distortion[0] == pytest.approx(plain.distortion[0])


def test_rd_curves_progress_bar(capsys):
    m = _cnn()
    rd.distortion_curves(m, [torch.randn(4, 3, 8, 8)], grid=3, show_progress=True)
    assert "RD distortion curves" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- oViT


def test_damping_raise_warns_with_layer_and_value():
    m = _cnn()
    names = list(prunable_layers(m))
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(1, dict(m.named_modules())[n].weight.numel(), generator=g) * 1e3 for n in names}
    wm = WeightMasks.for_model(m)
    with pytest.warns(UserWarning) as record:
        ovit.ovit_prune(m, 0.5, None, masks=wm, grads=grads, block_size=32, damping=1e-8, dtype=torch.float32)
    messages = [str(w.message) for w in record]
    for n in names:  # one warning per layer (pass 1), naming it and the damping used
        assert sum(f"layer {n!r} failed Cholesky at damping=1e-08" in msg for msg in messages) == 1
    assert all(re.search(r"raised to \d", msg) for msg in messages)
    stats = wm.stats()
    assert stats["num_pruned"] == round(0.5 * stats["num_weights"])
    assert all(bool(torch.isfinite(wm.weight(n)).all()) for n in wm.layers)


def test_damped_inverse_only_raises_failing_blocks():
    g = torch.randn(1, 8, generator=torch.Generator().manual_seed(0)) * 1e3
    F = torch.stack([g.T @ g, torch.eye(8) * 2.0])  # block 0 rank 1 (fails at 1e-8 in fp32), block 1 fine
    with pytest.warns(UserWarning, match="in 1 of 2 block"):
        inv = ovit._damped_inverse(F.clone(), 1e-8, name="x")
    torch.testing.assert_close(inv[1], torch.eye(8) / (2.0 + 1e-8))
    assert bool(torch.isfinite(inv[0]).all())


def test_calibration_fisher_is_eval_mode():
    """The oViT gradients come from the model in eval mode: dropout off (deterministic, equal to a manual
    eval-mode gradient, different from a train-mode one); every module's mode comes back."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.5),
                      nn.Linear(16, 4))
    m.train()
    data = [{"pixel_values": torch.randn(8), "labels": int(i % 4)} for i in range(40)]
    calib = recipe.calibration_batches(data, num_batches=4, batch_size=8, seed=3)
    batches = list(calib)
    assert len(calib) == 4 and all(b["pixel_values"].shape == (8, 8) for b in batches)
    again = list(calib)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(batches, again))  # same each pass
    used = [i for b in calib.indices for i in b]
    assert len(set(used)) == 32  # distinct items
    G = ovit.collect_gradients(m, calib, ["3"], 4)["3"]
    assert m.training and all(mod.training for mod in m.modules())
    m.eval()
    manual = []
    for b in batches:
        m.zero_grad()
        nn.functional.cross_entropy(m(b["pixel_values"]), b["labels"]).backward()
        manual.append(m[3].weight.grad.reshape(-1).clone())
    torch.testing.assert_close(G, torch.stack(manual))
    m.train()
    m.zero_grad()
    torch.manual_seed(1)
    nn.functional.cross_entropy(m(batches[0]["pixel_values"]), batches[0]["labels"]).backward()
    assert not torch.allclose(m[3].weight.grad.reshape(-1), G[0])


def test_list_calib_is_not_repeated_and_fisher_defaults():
    m = _cnn()
    calib = _batches(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)), size=8)
    with pytest.warns(UserWarning, match="only 2 mini-batch gradients of the num_grads=256"):
        G = ovit.collect_gradients(m, calib, ["2"], 256)
    assert G["2"].shape[0] == 2
    import inspect

    params = inspect.signature(ovit.ovit_prune).parameters
    assert params["block_size"].default == 128 and params["num_grads"].default == 256
    assert params["max_fisher_mb"].default == "auto"
    mb = 2 ** 20
    assert ovit.auto_fisher_mb({"a": 10 * mb, "b": 20 * mb}) is None  # fits: one round of gradients
    assert ovit.auto_fisher_mb({n: 1024 * mb for n in "abcdef"}) == ovit.DEFAULT_MAX_FISHER_MB
    assert ovit.auto_fisher_mb({"a": 5000 * mb, "b": 10 * mb}) == pytest.approx(5000)  # a layer is never split


def test_shuffling_loader_refused_when_gradients_repeat():
    m = _cnn()
    data = [{"pixel_values": torch.randn(3, 8, 8), "labels": i % 10} for i in range(16)]
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PruningError, match="shuffling DataLoader"):
        hf_prune.prune(m, "ovit", sparsity=0.5, calib=loader, block_size=16, num_grads=2, max_fisher_mb=0.02)
    assert get_weight_masks(m) is None  # transactional
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_restart_lr_schedule():
    from hf_prune.core.schedules import restart_lr_lambda
    from hf_prune.trainer.restarts import restart_lr_scheduler

    fn = restart_lr_lambda([10, 20, 30], 50, decay="linear")
    assert fn(0) == 1.0 and fn(10) == 1.0 and fn(20) == 1.0 and fn(30) == 1.0  # a restart at every pruning step
    assert fn(9) == pytest.approx(0.1) and fn(19) == pytest.approx(0.1) and fn(49) == pytest.approx(0.05)
    assert all(fn(t) > fn(t + 1) for t in range(30, 49))
    cos = restart_lr_lambda([10], 20, decay="cosine", min_ratio=0.1, warmup_steps=2)
    assert cos(10) == pytest.approx(0.1 + 0.9 / 3) and cos(12) == pytest.approx(1.0)
    assert cos(19) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = restart_lr_scheduler(opt, [2, 4], 6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.25, 0.5, 0.25, 0.5, 0.25])
    with pytest.raises(ValueError, match="decay"):
        restart_lr_lambda([1], 4, decay="step")
    with pytest.raises(ValueError, match="prune_steps"):
        restart_lr_lambda([7], 4)


def test_distillation_loss_and_teacher():
    from hf_prune.recovery import dense_teacher, distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(s, t, y, label_weight=1.0)) == pytest.approx(
        float(nn.functional.cross_entropy(s, y)))
    T = 2.0
    p = torch.softmax(t / T, -1)
    manual = (p * (p.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert float(distillation_loss(s, t, temperature=T)) == pytest.approx(float(manual), rel=1e-5)
    with pytest.raises(ValueError, match="label_weight"):
        distillation_loss(s, t, y, label_weight=1.5)
    m = _cnn()
    WeightMasks.for_model(m).attach(m)
    teacher = dense_teacher(m)
    assert get_weight_masks(teacher) is None and get_weight_masks(m) is not None
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), m.state_dict().values()))
