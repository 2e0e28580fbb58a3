"""UPDP: lambda = 0 exactness, exact merging per family (timm and transformers), MACs, one-shot API,
annealer schedule and the Trainer callback's plain-loop API. Small configs, random non-trivial weights
and BN statistics, eval mode, fp32."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hf_prune.errors import PruningError
from hf_prune.methods.updp.depth import (AnnealedBlock, MergedBlock, UPDPAnnealer, anneal, anneal_lambda, calibrate,
                                         find_blocks, merge_block, prune_depth, set_lambda)
from hf_prune.methods.updp.merge import ConvSpec, add_shortcut, compose, fold_after, fold_before
from hf_prune.metrics.profiling import count_macs

TOL = 1e-4  # max abs diff relative to the output scale


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norms / BN statistics / layer scales (fresh timm models zero-init the last BN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.endswith("layer_scale_parameter"):
                p.normal_(0.5, 0.2, generator=g)
    return model.eval()


def call(model, x):
    out = model(x) if not getattr(model, "main_input_name", None) else model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out


# --------------------------------------------------------------------------- models


def _timm(name, **kw):
    import timm

    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _hf(kind):
    def build():
        import transformers as T

        if kind == "convnext":
            cfg = T.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=10)
            return T.ConvNextForImageClassification(cfg)
        if kind == "mobilenet_v2":
            return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(depth_multiplier=0.35, num_labels=10))
        if kind == "resnet_basic":
            cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1],
                                 layer_type="basic", num_labels=10)
            return T.ResNetForImageClassification(cfg)
        if kind == "resnet_bottleneck":
            return T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 48, 64],
                                                                 depths=[1, 2, 1, 1], layer_type="bottleneck",
                                                                 downsample_in_bottleneck=True, num_labels=10))
        cfg = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, num_labels=10)
        if kind == "vit":
            return T.ViTForImageClassification(T.ViTConfig(**cfg))
        return T.DeiTForImageClassification(T.DeiTConfig(**cfg))
    return build


MODELS = {
    "timm-convnext_atto": (_timm("convnext_atto", depths=(1, 1, 2, 1)), "convnext", 5),
    "timm-convnext-linear": (_timm("convnext_atto", conv_mlp=False, depths=(1, 1, 2, 1)), "convnext", 5),
    "timm-mobilenetv2_050": (_timm("mobilenetv2_050"), "inverted_residual", 16),
    "timm-resnet18": (_timm("resnet18"), "resnet_basic", 8),
    "timm-resnet26": (_timm("resnet26"), "resnet_bottleneck", 8),
    "timm-vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, init_values=0.1), "vit", 2),
    "hf-convnext": (_hf("convnext"), "convnext", 5),
    "hf-mobilenet_v2": (_hf("mobilenet_v2"), "inverted_residual", 16),
    "hf-resnet-basic": (_hf("resnet_basic"), "resnet_basic", 5),
    "hf-resnet-bottleneck": (_hf("resnet_bottleneck"), "resnet_bottleneck", 5),
    "hf-vit": (_hf("vit"), "vit", 2),
    "hf-deit": (_hf("deit"), "vit", 2),
}
MERGE_ERRORS: dict[str, float] = {}


# --------------------------------------------------------------------------- merge arithmetic


def _conv_spec(cin, cout, k, s=1, p=0, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ConvSpec(torch.randn(cout, cin // groups, k, k, generator=g, dtype=torch.float64),
                    torch.randn(cout, generator=g, dtype=torch.float64), (s, s), (p, p), (1, 1), groups)


def _apply(spec: ConvSpec, x):
    return F.conv2d(x, spec.weight, spec.bias, spec.stride, spec.padding, spec.dilation, spec.groups)


@pytest.mark.parametrize("k1,s1,p1,k2,s2,p2,g1,g2", [
    (3, 2, 1, 3, 1, 0, 1, 1),   # spatial . spatial (second unpadded): kernel 3 + 2*2 = 7, stride 2
    (3, 1, 0, 5, 2, 0, 1, 1),
    (1, 1, 0, 3, 2, 1, 1, 6),   # pointwise . padded depthwise (padding moved to the input)
    (3, 1, 1, 1, 1, 0, 6, 1),   # depthwise . pointwise
    (3, 1, 1, 3, 1, 0, 6, 6),   # depthwise . depthwise stays depthwise
])
def test_compose_matches_sequential_convs(k1, s1, p1, k2, s2, p2, g1, g2):
    c1, c2 = _conv_spec(6, 6, k1, s1, p1, g1, seed=1), _conv_spec(6, 6, k2, s2, p2, g2, seed=2)
    x = torch.randn(2, 6, 17, 17, dtype=torch.float64)
    h = _apply(c1, x)
    if p2 and c1.pointwise:  # moved padding: the intermediate is padded with c1's zero-input response
        h = F.pad(h - c1.bias.view(1, -1, 1, 1), [p2] * 4) + c1.bias.view(1, -1, 1, 1)
        ref = F.conv2d(h, c2.weight, c2.bias, c2.stride, 0, 1, c2.groups)
    else:
        ref = _apply(c2, h)
    comp = compose(c1, c2)
    assert comp.kernel_size[0] == k1 + (k2 - 1) * s1 or c1.kernel_size == (1, 1)
    assert comp.stride == (s1 * s2, s1 * s2)
    if g1 == g2 == 6:
        assert comp.groups == 6
    torch.testing.assert_close(_apply(comp, x), ref, rtol=1e-10, atol=1e-10)


def test_folds_and_shortcuts():
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    a, c = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    conv = _conv_spec(4, 4, 3, 1, 1)
    av, cv = a.view(1, -1, 1, 1), c.view(1, -1, 1, 1)
    torch.testing.assert_close(_apply(fold_after(conv, a, c), x), _apply(conv, x) * av + cv)
    pw = _conv_spec(4, 4, 1)
    torch.testing.assert_close(_apply(fold_before(a, c, pw), x), _apply(pw, x * av + cv))
    with pytest.raises(ValueError):
        fold_before(a, c, conv)  # before a padded conv: not exact at borders
    torch.testing.assert_close(_apply(add_shortcut(conv, "identity"), x), _apply(conv, x) + x)
    down, proj = _conv_spec(4, 8, 3, 2, 1, seed=3), _conv_spec(4, 8, 1, 2, 0, seed=4)
    torch.testing.assert_close(_apply(add_shortcut(down, proj), x), _apply(down, x) + _apply(proj, x))
    dw = _conv_spec(4, 4, 3, 1, 1, groups=4)
    torch.testing.assert_close(_apply(add_shortcut(dw, "identity"), x), _apply(dw, x) + x)


def test_merged_block_description_round_trip():
    layers = [nn.Conv2d(4, 4, 7, padding=3, groups=4), nn.Conv2d(4, 4, 1)]
    mb = MergedBlock(layers, nn.Identity(), "gelu", family="convnext", source_type="ConvNeXtBlock")
    d = mb.describe()
    rebuilt = MergedBlock.from_description(d)
    assert rebuilt.describe() == d
    rebuilt.load_state_dict(mb.state_dict())
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(rebuilt(x), mb(x))


# --------------------------------------------------------------------------- per family


@pytest.mark.parametrize("key", list(MODELS))
def test_family_exactness_and_macs(key):
    build, family, n_blocks = MODELS[key]
    torch.manual_seed(0)
    model = randomize(build())
    x = torch.randn(2, 3, 32, 32)
    refs = find_blocks(model)
    assert len(refs) == n_blocks and {r.family for r in refs} == {family}
    assert [r.index for r in refs] == list(range(n_blocks))
    with torch.no_grad():
        y0 = call(model, x)
        wrappers = anneal(model, refs, end_act=True)
        assert torch.equal(call(model, x), y0)  # lambda = 0: bit-exact original
        calibrate(model, [x])
        set_lambda(model, 0.5)
        y_half = call(model, x)
        assert torch.isfinite(y_half).all() and not torch.equal(y_half, y0)
        set_lambda(model, 1.0)
        inputs = {}
        hooks = [w.register_forward_pre_hook(lambda m, a, _w=w: inputs.__setitem__(id(_w), a[0])) for w in wrappers]
        y1 = call(model, x)
        for h in hooks:
            h.remove()
        worst = 0.0
        for w in wrappers:
            xin = inputs[id(w)]
            ref = w(xin)
            merged = w.merge().eval()
            err = float((merged(xin) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            worst = max(worst, err)
            assert err <= TOL, f"{w.source_type}: merged vs annealed relative error {err:.2e}"
            macs_block, macs_merged = count_macs(w.block, (xin,)), count_macs(merged, (xin,))
            assert macs_merged < macs_block, f"{w.source_type}: {macs_merged} >= {macs_block} MACs"
        for w in list(wrappers):
            merge_block(model, w)
        assert not any(isinstance(m, AnnealedBlock) for m in model.modules())
        y2 = call(model, x)
    whole = float((y2 - y1).abs().max() / y1.abs().max())
    assert whole <= TOL
    MERGE_ERRORS[key] = max(worst, whole)
    print(f"{key}: max relative merge error {MERGE_ERRORS[key]:.2e}")


def test_gradients_reach_everything_mid_annealing():
    model = randomize(MODELS["timm-convnext-linear"][0]())
    x = torch.randn(2, 3, 32, 32)
    wrappers = anneal(model, [0, 3])
    calibrate(model, [x])
    set_lambda(wrappers, 0.3)
    model.train()
    call(model, x).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    state = model.state_dict()
    assert any(k.endswith("_extra_state") for k in state)  # lambda travels with the checkpoint
    lam_key = next(k for k in state if k.endswith("_extra_state"))
    assert float(state[lam_key]) == pytest.approx(0.3)


# --------------------------------------------------------------------------- one-shot


def test_prune_depth_one_shot_and_transactional():
    build = MODELS["hf-resnet-basic"][0]
    torch.manual_seed(0)
    model = randomize(build())
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="out of range"):
        prune_depth(model, example_inputs=x, blocks=[0, 99])
    with pytest.raises(PruningError, match="example_inputs"):
        prune_depth(model, num_blocks=2)  # choosing needs a batch
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    pruned, record = prune_depth(model, example_inputs=x, num_blocks=2)
    assert pruned is model
    entries = record["merged_blocks"]
    assert len(entries) == 2 and record["selection"] == "num_blocks"
    assert record["macs_after"] < record["macs_before"]
    names = dict(model.named_modules())
    for e in entries:
        assert isinstance(names[e["path"]], MergedBlock)
        assert e["family"] == "resnet_basic" and e["type"] == "ResNetBasicLayer" and e["became"]["body"]
        assert isinstance(e["index"], int) and e["score"] is not None
    # the proxy picked the two blocks with the smallest output change
    assert len(record["scores"]) == 5
    assert {e["path"] for e in entries} == set(sorted(record["scores"], key=record["scores"].get)[:2])
    with torch.no_grad():
        assert torch.isfinite(call(model, x["pixel_values"])).all()

    model2 = randomize(build())
    _, rec2 = prune_depth(model2, example_inputs=x, target_macs=0.8)
    assert rec2["macs_after"] <= 0.8 * rec2["macs_before"] and rec2["selection"] == "target_macs"


def test_prune_depth_vit_blocks_by_index():
    model = randomize(MODELS["timm-vit_tiny"][0]())
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(PruningError, match="not reachable"):
        prune_depth(model, example_inputs=x, target_macs=0.01)
    assert not any(isinstance(m, (AnnealedBlock, MergedBlock)) for m in model.modules())
    _, rec = prune_depth(model, example_inputs=x, blocks=[1])
    assert [e["path"] for e in rec["merged_blocks"]] == ["blocks.1"]
    assert isinstance(model.blocks[1], MergedBlock) and isinstance(model.blocks[1].body[0], nn.Linear)
    assert rec["macs_after"] < rec["macs_before"]


# --------------------------------------------------------------------------- progressive training


def test_anneal_lambda_schedule():
    assert anneal_lambda(0.0, 0.0, 0.8) == 0.0
    assert anneal_lambda(0.4, 0.0, 0.8) == pytest.approx(0.5)
    assert anneal_lambda(0.8, 0.0, 0.8) == 1.0 and anneal_lambda(1.0, 0.0, 0.8) == 1.0
    assert anneal_lambda(0.1, 0.2, 0.6) == 0.0
    assert anneal_lambda(0.4, 0.2, 0.6, "cosine") == pytest.approx(0.5)
    assert anneal_lambda(0.3, 0.2, 0.6, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.25)))


def test_annealer_steps_and_merges():
    model = randomize(MODELS["hf-vit"][0]())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = call(model, x)
    ann = UPDPAnnealer(model, [1], start=0.0, end=0.5, total_steps=10, example_inputs={"pixel_values": x})
    assert len(ann.parameters()) == 4  # weight + bias of the LN-replacing BN and of the end BN
    with torch.no_grad():
        assert torch.equal(call(model, x), y0)
    lams = [ann.step() for _ in range(6)]
    assert lams == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ann.set_lambda(0.9)
    with pytest.raises(PruningError):
        ann.merge_all()
    ann.step(9)
    model.eval()
    with torch.no_grad():
        y1 = call(model, x)
    entries = ann.merge_all()
    assert [e["path"] for e in entries] == ["vit.layers.1"] and isinstance(model.vit.layers[1], MergedBlock)
    with torch.no_grad():
        y2 = call(model, x)
    assert float((y2 - y1).abs().max() / y1.abs().max()) <= TOL


def test_callback_plain_loop():
    from hf_prune.methods.updp.callback import UPDPCallback

    model = randomize(MODELS["timm-convnext-linear"][0]())
    x = torch.randn(2, 3, 32, 32)
    cb = UPDPCallback()  # defaults: a quarter of the blocks, lambda 0 -> 1 over the first 80% of training
    cb.on_init_end(None, None, None, model=model)
    assert sum(isinstance(m, AnnealedBlock) for m in model.modules()) == 5  # wrapped before the optimizer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # sees the new BN parameters
    cb.setup(model, total_steps=5, example_inputs=x)
    assert len(cb.annealer.blocks) == 1 and cb.annealer.selection == "default"
    lams = []
    for step in range(5):
        cb.step_begin(step)
        lams.append(cb.annealer.lam)
        model.train()
        call(model, x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert lams == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert cb.log_entries() == {"prune/lambda": 1.0, "prune/blocks": 1}
    state = cb.state_dict()
    model.eval()
    with torch.no_grad():
        y1 = call(model, x)
    cb.finish()
    assert not any(isinstance(m, AnnealedBlock) for m in model.modules())
    assert sum(isinstance(m, MergedBlock) for m in model.modules()) == 1
    assert [e["path"] for e in cb.annealer.merged] == state["blocks"]
    assert cb.record["method"] == "updp" and cb.record["stats"]["merged_blocks"] == 1
    with torch.no_grad():
        y2 = call(model, x)
    assert float((y2 - y1).abs().max() / y1.abs().max()) <= TOL


@pytest.mark.parametrize("kind", ["timm convnext", "hf vit"])
def test_merged_models_save_and_load_exactly(kind, tmp_path):
    import hf_prune
    import transformers as T

    if kind == "timm convnext":
        model, x = timm.create_model("convnext_atto", num_classes=10).eval(), torch.randn(2, 3, 64, 64)
    else:
        cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=128, num_labels=10)
        model, x = T.ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    hf_prune.prune(model, method="updp", num_blocks=2, example_inputs=x)
    hf_prune.save_pretrained(model, tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text())["hf_prune"]
    assert len(spec["merged_blocks"]) == 2 and spec["method"]["name"] == "updp"
    loaded = hf_prune.AutoPrunedModel.from_pretrained(tmp_path).eval()
    run = (lambda m: m(**x).logits) if isinstance(x, dict) else (lambda m: m(x))
    with torch.no_grad():
        assert torch.equal(run(model), run(loaded))


def test_one_value_per_channel_batchnorm_is_a_clear_error():
    import copy

    import hf_prune

    model = timm.create_model("resnet18", num_classes=10).eval()
    reference = copy.deepcopy(model)
    with pytest.raises(PruningError, match="at least 2 images"):
        hf_prune.prune(model, method="updp", num_blocks=2, example_inputs=torch.randn(1, 3, 32, 32))
    assert str(model) == str(reference)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
