"""DepGraph engine: exact compaction, coupling, heads, rounding, targets and transactional errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hf_prune
from hf_prune.api import PruningError, compact, prune
from hf_prune.engine.graph import DependencyGraph
from hf_prune.metrics.profiling import count_macs

torch.manual_seed(0)


def _timm(name, size=64, **kw):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10, **kw), torch.randn(2, 3, size, size)


def _hf(kind):
    import transformers as T

    x = {"pixel_values": torch.randn(2, 3, 64, 64)}
    if kind == "vit":
        cfg = T.ViTConfig(image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=2,
                          num_attention_heads=6, intermediate_size=192, num_labels=10)
        return T.ViTForImageClassification(cfg), x
    if kind == "deit":
        cfg = T.DeiTConfig(image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=2,
                           num_attention_heads=6, intermediate_size=192, num_labels=10)
        return T.DeiTForImageClassification(cfg), x
    if kind == "convnext":
        cfg = T.ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_labels=10)
        return T.ConvNextForImageClassification(cfg), x
    if kind == "resnet":
        cfg = T.ResNetConfig(hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1], layer_type="bottleneck",
                             embedding_size=32, num_labels=10)
        return T.ResNetForImageClassification(cfg), x
    if kind == "mobilenetv2":
        return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(image_size=64, num_labels=10)), x
    if kind == "swin":
        cfg = T.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                           window_size=4, num_labels=10)
        return T.SwinForImageClassification(cfg), x
    if kind == "segformer":  # its head reads config.hidden_sizes[-1] in forward
        cfg = T.SegformerConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 8],
                                decoder_hidden_size=64, num_labels=10)
        return T.SegformerForImageClassification(cfg), x
    if kind == "timm_wrapper":
        return T.TimmWrapperForImageClassification(T.TimmWrapperConfig(architecture="resnet18", num_labels=10)), x
    raise KeyError(kind)


MODELS = {
    "resnet18": lambda: _timm("resnet18"),
    "regnetx_002 (grouped conv)": lambda: _timm("regnetx_002"),
    "efficientnet_b0 (SE, depthwise)": lambda: _timm("efficientnet_b0"),
    "densenet121 (concat)": lambda: _timm("densenet121"),
    "convnext_atto (LN, layer scale)": lambda: _timm("convnext_atto"),
    "vit (cls token, pos embed, fused qkv)": lambda: _timm("vit_tiny_patch16_224", img_size=64, depth=2),
    "swin (windows, relative bias)": lambda: _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4,
                                                   depths=(1, 1), num_heads=(2, 4), embed_dim=32),
    "hf vit": lambda: _hf("vit"),
    "hf deit": lambda: _hf("deit"),
    "hf convnext": lambda: _hf("convnext"),
    "hf resnet": lambda: _hf("resnet"),
    "hf mobilenetv2": lambda: _hf("mobilenetv2"),
    "hf swin": lambda: _hf("swin"),
    "hf segformer": lambda: _hf("segformer"),
    "hf timm wrapper": lambda: _hf("timm_wrapper"),
}


def _call(model, x):
    model.eval()
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _randomize(model):
    """Random, non-trivial values everywhere (fresh inits leave norms at 1/0 and biases at 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", list(MODELS))
def test_compacted_equals_masked(name):
    model, x = MODELS[name]()
    _randomize(model)
    dense_macs = DependencyGraph(model, x).macs()
    dense_params = sum(p.numel() for p in model.parameters())
    prune(model, example_inputs=x, target_macs=0.6, compact=False)
    masked = _call(model, x)
    compact(model)
    compacted = _call(model, x)
    assert compacted.shape == masked.shape
    scale = masked.abs().max()
    assert ((compacted - masked).abs().max() / scale).item() <= 1e-4
    macs = DependencyGraph(model, x).macs()
    assert macs <= 0.6 * dense_macs * 1.001
    assert sum(p.numel() for p in model.parameters()) < dense_params
    _check_layer_attributes(model)


def _check_layer_attributes(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
        elif isinstance(m, nn.Conv2d):
            assert m.out_channels == m.weight.shape[0], name
            assert m.in_channels == m.weight.shape[1] * m.groups, name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.num_features == m.weight.shape[0], name
        elif isinstance(m, nn.LayerNorm):
            assert tuple(m.normalized_shape) == tuple(m.weight.shape), name


def test_predicted_macs_match_flop_counter_on_cnns():
    model, x = _timm("resnet18")
    graph = DependencyGraph(model, x)
    assert graph.macs() == count_macs(model, x)
    prune(model, example_inputs=x, target_macs=0.5)
    assert DependencyGraph(model, x).macs() == count_macs(model, x)


def test_attention_macs_are_counted():
    model, x = _hf("vit")
    assert DependencyGraph(model, x).macs() == count_macs(model, x)


def test_timm_vit_heads_are_removed_whole_and_attributes_follow():
    model, x = _timm("vit_tiny_patch16_224", img_size=64, depth=2)
    before = _call(model, x)
    prune(model, example_inputs=x, target_macs=0.5, prune_stem=True)
    for block in model.blocks:
        attn = block.attn
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
        assert attn.attn_dim == attn.num_heads * attn.head_dim == attn.proj.in_features
        assert attn.head_dim == 64  # whole heads go, head size stays
    assert model.pos_embed.shape[-1] == model.cls_token.shape[-1] == model.patch_embed.proj.out_channels
    assert _call(model, x).shape == before.shape


def test_hf_vit_head_count_follows():
    model, x = _hf("vit")
    prune(model, example_inputs=x, target_macs=0.5)
    heads = []
    for layer in model.vit.layers:
        attn = layer.attention
        assert attn.q_proj.out_features == attn.num_attention_heads * attn.head_dim
        assert attn.o_proj.in_features == attn.num_attention_heads * attn.head_dim
        assert attn.head_dim == 16  # whole heads go: 96 / 6
        heads.append(attn.num_attention_heads)
    assert min(heads) < 6


def test_round_to_keeps_hardware_friendly_widths():
    model, x = _timm("resnet50")
    original = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    prune(model, example_inputs=x, target_macs=0.5, round_to=8)
    changed = 0
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.out_channels != original[n]:
            changed += 1
            assert m.out_channels % 8 == 0, (n, m.out_channels)
    assert changed > 10


def test_residual_couplings_prune_together():
    model, x = _timm("resnet18")
    prune(model, example_inputs=x, target_macs=0.5, prune_stem=True)
    stage = model.layer1
    width = stage[0].conv2.out_channels
    assert stage[1].conv2.out_channels == width == stage[1].conv1.in_channels == model.conv1.out_channels


def test_sparsity_target_counts_prunable_parameters():
    model, x = _timm("resnet18")
    graph = DependencyGraph(model, x)
    prunable, total = graph.params(only_prunable=True), graph.params()
    prune(model, example_inputs=x, sparsity=0.3)
    removed = total - sum(p.numel() for p in model.parameters())
    assert 0.3 * prunable <= removed <= 0.45 * prunable


def test_local_mode_prunes_every_group_alike():
    model, x = _timm("resnet18")
    graph = DependencyGraph(model, x)
    widths = {len(g) for g in graph.groups}
    prune(model, example_inputs=x, target_macs=0.6, mode="local", round_to=None)
    after = DependencyGraph(model, x, prune_stem=True)
    assert after.macs() <= 0.6 * graph.macs() * 1.001 and widths


def test_taylor_importance_needs_gradients_or_calibration():
    model, x = _timm("resnet18")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match="gradients"):
        prune(model, example_inputs=x, target_macs=0.5, importance="taylor")
    _assert_unchanged(model, state)
    calib = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))]
    prune(model, example_inputs=x, target_macs=0.5, importance="taylor", calib=calib)
    assert sum(p.numel() for p in model.parameters()) < sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)


def _assert_unchanged(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_macs=1.5), "target_macs"),
    (dict(target_macs=0.0), "target_macs"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=0.3, target_macs=0.5), "exactly one"),
    (dict(target_macs=0.01), "cannot be reached"),
    (dict(target_macs=0.5, mode="uniform"), "mode"),
    (dict(target_macs=0.5, importance="entropy"), "importance"),
])
def test_bad_targets_raise_and_leave_model_untouched(kwargs, message):
    model, x = _timm("resnet18")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=message):
        prune(model, example_inputs=x, **kwargs)
    _assert_unchanged(model, state)
    assert hf_prune.engine.masks.get_mask(model) is None


def test_untraceable_model_names_the_module():
    class Picky(nn.Module):
        def forward(self, x):
            if x.shape[-1] != 32:
                raise ValueError("expects 32x32 images")
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.picky = Picky()

        def forward(self, x):
            return self.picky(self.conv(x))

    model = Net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match="picky"):
        prune(model, example_inputs=torch.randn(1, 3, 64, 64), target_macs=0.5)
    _assert_unchanged(model, state)
    with pytest.raises(PruningError, match="example_inputs"):
        prune(model, target_macs=0.5)


class _ChannelFFT(nn.Module):
    """An op with no coupling rule, applied across channels."""

    def forward(self, x):
        return torch.fft.fft(x, dim=1).real


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.fft = _ChannelFFT()
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.fft(self.a(x))
        x = torch.relu(self.c(torch.relu(self.b(x))))
        return self.head(x.mean((2, 3)))


def test_unsupported_op_pins_its_channels_instead_of_guessing():
    model, x = _Mixed(), torch.randn(1, 3, 16, 16)
    graph = DependencyGraph(model, x)
    assert any(op == "_fft_r2c" or "fft" in op for op, _, _ in graph.trace.unknown)
    prune(model, example_inputs=x, target_macs=0.7, round_to=None)
    assert model.a.out_channels == 32  # its output crosses the FFT: left whole
    assert model.b.out_channels < 32
    assert _call(model, x).shape == (1, 10)


class _HiddenWidth(nn.Module):
    """Reads a width from a stored int, which no trace can see."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 16)
        self.width = 64

    def forward(self, x):
        h = self.fc1(x).reshape(x.shape[0], self.width)
        return self.fc2(torch.relu(h))


class _TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.hidden = _HiddenWidth()
        self.mlp = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 16))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.mlp(self.hidden(self.inp(x))))


def test_layers_with_hidden_widths_are_repaired_or_refused_cleanly():
    model, x = _TwoBlocks(), torch.randn(2, 8)
    with pytest.warns(UserWarning, match="hidden"):
        prune(model, example_inputs=x, target_macs=0.75, round_to=None)
    assert model.hidden.fc1.out_features == 64  # kept whole after the failed attempt
    assert model.mlp[0].out_features < 128
    assert _call(model, x).shape == (2, 4)


class _StoredSplit(nn.Module):
    """Res2Net/CSP style: the block splits its input at a width stored in the block."""

    def __init__(self):
        super().__init__()
        self.width = 16
        self.conv1, self.conv_a = nn.Conv2d(8, 32, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        a, b = self.conv1(x).split(self.width, dim=1)
        return x + self.conv3(torch.cat([self.conv_a(a).relu(), b], dim=1))


class _ScaledNet(nn.Module):
    """HGNetV2 style learnable scalar affine between convolutions."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 32, 3), nn.Conv2d(32, 8, 1)
        self.scale, self.bias = nn.Parameter(torch.tensor([1.5])), nn.Parameter(torch.tensor([0.1]))
        self.blocks = nn.Sequential(_StoredSplit(), _StoredSplit())

    def forward(self, x):
        h = self.mid(self.stem(x)) * self.scale + self.bias
        return self.blocks(self.out(h.relu())).mean((2, 3))


def test_stored_split_widths_and_scalar_parameters_are_handled():
    model, x = _ScaledNet(), torch.randn(2, 3, 12, 12)
    _randomize(model)
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="splits around it"):
        prune(model, example_inputs=x, target_macs=0.8, round_to=None)
    assert model.mid.out_channels < 32  # the scalar affine does not couple every channel
    for block in model.blocks:
        assert block.conv1.out_channels == 32  # the split input stays whole ...
    assert any(block.conv_a.out_channels < 16 for block in model.blocks)  # ... its branch is still pruned
    assert _call(model, x).shape == _call(reference, x).shape


class _PaddedResidual(nn.Module):
    """RexNet style: the shortcut is added to the first ``in_channels`` (stored) of a wider output."""

    def __init__(self, cin, cout):
        super().__init__()
        self.in_channels = cin
        self.expand, self.project = nn.Conv2d(cin, 4 * cin, 1), nn.Conv2d(4 * cin, cout, 1)

    def forward(self, x):
        y = self.project(self.expand(x).relu())
        return torch.cat([y[:, : self.in_channels] + x, y[:, self.in_channels :]], dim=1)


def test_slices_at_stored_widths_are_repaired_in_every_block_of_the_type():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _PaddedResidual(8, 12), _PaddedResidual(12, 16),
                          _PaddedResidual(16, 20), nn.Conv2d(20, 4, 1))
    _randomize(model)
    x = torch.randn(2, 3, 10, 10)
    with pytest.warns(UserWarning, match="splits around it"):
        prune(model, example_inputs=x, target_macs=0.7, round_to=None, compact=False)
    masked = _call(model, x)
    compact(model)
    assert all(b.project.out_channels == b.in_channels + 4 for b in model[1:4])  # sliced outputs kept whole
    assert any(b.expand.out_channels < 4 * b.in_channels for b in model[1:4])  # the expansions are pruned
    assert ((_call(model, x) - masked).abs().max() / masked.abs().max()).item() <= 1e-4


class _MHABlock(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.embed = nn.Linear(16, 32)  # the stem (kept whole by default) is not the attention
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x, pad=None):
        x = self.embed(x)
        x = x + self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return self.head((x + self.mlp(x)).mean(1 if self.attn.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_are_pruned_exactly(batch_first):
    from hf_prune.engine.adapters.mha import PrunedMultiheadAttention

    model = _MHABlock(batch_first).eval()
    _randomize(model)
    x = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
    prune(model, example_inputs=x, target_macs=0.6, round_to=None, compact=False)
    masked = _call(model, x)
    compact(model)
    attn = model.attn
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads < 4 and attn.embed_dim == 32
    assert attn.in_proj_weight.shape == (3 * attn.num_heads * 8, 32) and attn.out_proj.in_features == attn.num_heads * 8
    assert ((_call(model, x) - masked).abs().max() / masked.abs().max()).item() <= 1e-4
    # the replacement honours torch's mask convention (True = may not attend) and returns weights
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[:, -2:] = True
    x = model.embed(x)
    out, weights = attn(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    assert weights.shape == (2, attn.num_heads, 7, 7)
    assert torch.all(weights[..., -2:] == 0) and torch.allclose(weights.sum(-1), torch.ones(2, attn.num_heads, 7))
    assert torch.allclose(out, attn(x, x, x, key_padding_mask=pad, need_weights=False)[0], atol=1e-5)


def test_pruned_multihead_attention_saves_and_loads(tmp_path):
    import timm
    from timm.models import register_model

    # a model registered with timm, as a user's own timm architecture would be
    timm_block = type("MHABlock", (_MHABlock,), {"__module__": "timm.models.hf_prune_test"})

    @register_model
    def hf_prune_test_mha_block(pretrained=False, **kwargs):
        model = timm_block()
        model.pretrained_cfg = {"architecture": "hf_prune_test_mha_block", "input_size": (7, 16)}
        return model

    model, x = timm.create_model("hf_prune_test_mha_block").eval(), torch.randn(2, 7, 16)
    _randomize(model)
    prune(model, example_inputs=x, target_macs=0.6, round_to=None)
    hf_prune.save_pretrained(model, tmp_path)
    loaded = hf_prune.AutoPrunedModel.from_pretrained(tmp_path).eval()
    assert type(loaded.attn) is type(model.attn) and loaded.attn.num_heads == model.attn.num_heads < 4
    assert torch.equal(_call(loaded, x), _call(model, x))


def test_masks_enforce_after_updates_and_compact_matches():
    model, x = _timm("convnext_atto")
    _randomize(model)
    prune(model, example_inputs=x, target_macs=0.6, compact=False)
    mask = hf_prune.engine.masks.get_mask(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # an optimizer step would touch masked slices too
    mask.enforce(model)
    masked = _call(model, x)
    compact(model)
    assert torch.allclose(_call(model, x), masked, rtol=0, atol=1e-4 * masked.abs().max().item())
    with pytest.raises(PruningError, match="no masks"):
        compact(model)


def test_pruner_steps_only_grow_masks_and_compact_exactly():
    from hf_prune.engine.pruner import StructuredPruner

    model, x = _timm("resnet18")
    _randomize(model)
    pruner = StructuredPruner(model, x)
    first = set(pruner.step(target_macs=0.8).graph.keep_mask(pruner.removed).logical_not().nonzero().flatten().tolist())
    assert pruner.stats()["macs_ratio"] <= 0.8
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) + 0.5)  # training moves the weights between steps
    pruner.step(target_macs=0.6)
    second = set(pruner.graph.keep_mask(pruner.removed).logical_not().nonzero().flatten().tolist())
    assert first < second and pruner.stats()["macs_ratio"] <= 0.6
    masked = _call(model, x)
    pruner.compact()
    assert torch.allclose(_call(model, x), masked, rtol=0, atol=1e-4 * masked.abs().max().item())


@pytest.mark.parametrize("name", ["resnet18", "hf vit", "hf swin"])
def test_one_shot_compaction_equals_masked_then_compacted(name):
    model, x = MODELS[name]()
    _randomize(model)
    masked_model = copy.deepcopy(model)
    prune(masked_model, example_inputs=x, target_macs=0.6, compact=False)
    masked = _call(masked_model, x)
    prune(model, example_inputs=x, target_macs=0.6)  # one-shot: the check's compaction is kept
    assert hf_prune.engine.masks.get_mask(model) is None
    assert [p.shape for p in model.parameters()] == [p.shape for p in compact(masked_model).parameters()]
    out = _call(model, x)
    assert ((out - masked).abs().max() / masked.abs().max()).item() <= 1e-4


def test_pruner_apply_masks_exactly_the_given_units():
    from hf_prune.engine.pruner import StructuredPruner

    model, x = _timm("resnet18")
    _randomize(model)
    pruner = StructuredPruner(model, x, round_to=None)
    group = max(pruner.graph.groups, key=len)
    chosen = group.units[len(group) // 2:]  # the trailing half of one coupled group
    pruner.apply(chosen)
    assert torch.equal(pruner.removed, torch.unique(chosen))
    kept = pruner.graph.keep_mask(pruner.removed)
    assert int((~kept[group.units]).sum()) == len(chosen)
    masked = _call(model, x)
    pruner.compact()
    assert torch.allclose(_call(model, x), masked, rtol=0, atol=1e-4 * masked.abs().max().item())
    other = StructuredPruner(*_timm("resnet18"))
    pinned = torch.nonzero(other.graph.pinned).flatten()[:2]
    with pytest.raises(PruningError, match="not prunable units"):
        other.apply(pinned)
    assert hf_prune.engine.masks.get_mask(other.model) is None


def test_transformers_config_follows_uniform_widths():
    model, x = _hf("vit")
    prune(model, example_inputs=x, target_macs=0.5, mode="local", round_to=None, prune_stem=True)
    cfg = model.config
    layers = model.vit.layers
    assert cfg.hidden_size == model.classifier.in_features == layers[0].attention.q_proj.in_features
    assert cfg.num_attention_heads == layers[0].attention.num_attention_heads < 6
    assert cfg.intermediate_size == layers[0].mlp.fc1.out_features < 192


def test_traced_labels_of_watched_modules_name_their_channels():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    g = DependencyGraph(model, torch.randn(3, 8), watch=["2"])
    uf, params = g.trace.uf, g.trace.params
    into, out = g.trace.watched["2"]
    hidden = uf.find(params["0.weight"].dims[0].reshape(-1))
    assert torch.equal(uf.find(into).reshape(-1), hidden)
    assert torch.equal(uf.find(params["2.weight"].dims[1].reshape(-1)), hidden)
    assert torch.equal(uf.find(out).reshape(-1), uf.find(params["2.weight"].dims[0].reshape(-1)))


class _CachedBiasAttention(nn.Module):
    """Attention with a per-head bias cached in eval mode and dropped by train(), as LeViT does."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, 1, 1))
        self.cache = {}

    def train(self, mode=True):
        super().train(mode)
        if mode:
            self.cache = {}
        return self

    def head_bias(self):
        if self.training:
            return self.bias * 1.0
        if "bias" not in self.cache:
            self.cache["bias"] = self.bias * 1.0
        return self.cache["bias"]

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) + self.head_bias()).softmax(-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_eval_mode_caches_neither_hide_parameters_nor_go_stale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), _CachedBiasAttention(), _CachedBiasAttention()).eval()  # a stem, kept
    x = torch.randn(2, 5, 32)
    dense = model(x)  # fills the caches with the dense biases
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError):
        prune(model, example_inputs=x, target_macs=0.01)
    _assert_unchanged(model, state)
    assert torch.allclose(model(x), dense)
    prune(model, example_inputs=x, target_macs=0.8, mode="local", compact=False)
    assert [(m.bias == 0).any().item() for m in model[1:]] == [True, True]  # masked heads include their bias
    masked = model(x)
    compact(model)
    assert all(m.num_heads < 4 and m.bias.shape[0] == m.num_heads for m in model[1:])
    assert torch.allclose(model(x), masked, atol=1e-5)


def test_engine_passes_give_every_module_its_own_mode_back():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 8, 3)).train()
    model[3].eval()  # a frozen BatchNorm inside a training model
    prune(model, example_inputs=torch.randn(2, 3, 16, 16), target_macs=0.7)
    assert model[2].out_channels < 32
    assert model.training and model[2].training and not model[3].training
