"""Property-based: random small models and random (valid or invalid) settings.

For any draw, ``hf_prune.prune(..., compact=False)`` either succeeds, and then the compacted model
computes what the masked one did (max abs diff <= 1e-4 of the output scale) and a save/load round
trip through ``hf_prune.save_pretrained`` / ``AutoPrunedModel.from_pretrained`` is exact, or it
raises a clean :class:`~hf_prune.errors.PruningError` and leaves the model bit-identical.

Deterministic (``derandomize=True``) and bounded in time (``max_examples``).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_prune
from hf_prune.errors import PruningError

pytestmark = pytest.mark.usefixtures("one_thread")
OUTCOMES = {"pruned": 0, "refused": 0}


@pytest.fixture(scope="module", autouse=True)
def both_outcomes():
    """The property is only worth something if the draws both prune and refuse: checked after the run."""
    yield
    print(f"\n[properties] {OUTCOMES['pruned']} pruned exactly and round-tripped, {OUTCOMES['refused']} refused "
          "cleanly with the model unchanged")
    assert OUTCOMES["pruned"] >= 3 and OUTCOMES["refused"] >= 3, OUTCOMES


@st.composite
def models(draw):
    """(builder, inputs, layer names): a transformers ViT / ConvNeXt / ResNet or a timm ViT / ConvNeXt."""
    kind = draw(st.sampled_from(["hf_vit", "hf_convnext", "hf_resnet", "timm_vit", "timm_convnext"]))
    width = st.sampled_from([8, 16, 24, 32])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
    if kind in ("hf_vit", "timm_vit"):
        heads = draw(st.sampled_from([1, 2, 4]))
        dim = heads * draw(st.sampled_from([4, 8]))
        depth = draw(st.integers(1, 2))
        mlp = draw(st.sampled_from([2, 4]))
    if kind == "hf_vit":
        def build():
            from transformers import ViTConfig, ViTForImageClassification

            return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=dim, num_labels=5,
                                                       num_hidden_layers=depth, num_attention_heads=heads,
                                                       intermediate_size=dim * mlp))
    elif kind == "timm_vit":
        def build():
            import timm

            return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=dim, depth=depth,
                                     num_heads=heads, mlp_ratio=mlp, num_classes=5)
    elif kind == "hf_convnext":
        sizes = [draw(width) for _ in range(2)]

        def build():
            from transformers import ConvNextConfig, ConvNextForImageClassification

            return ConvNextForImageClassification(ConvNextConfig(hidden_sizes=sizes, depths=[1, 1], num_stages=2,
                                                                 num_labels=5))
    elif kind == "timm_convnext":
        dims = tuple(draw(width) for _ in range(4))

        def build():
            import timm

            return timm.create_model("convnext_atto", dims=dims, depths=(1, 1, 1, 1), num_classes=5)
    else:
        sizes = [draw(width) for _ in range(2)]
        layer_type = draw(st.sampled_from(["basic", "bottleneck"]))

        def build():
            from transformers import ResNetConfig, ResNetForImageClassification

            return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=sizes, depths=[1, 1],
                                                             layer_type=layer_type, num_labels=5))
    inputs = {"pixel_values": x} if kind.startswith("hf") else x
    return kind, build, inputs


VALID = {
    "target": st.one_of(st.builds(lambda v: {"target_macs": v}, st.floats(0.4, 1.0)),
                        st.builds(lambda v: {"sparsity": v}, st.floats(0.0, 0.5))),
    "round_to": st.sampled_from([None, 1, 4, 8]),
    "mode": st.sampled_from(["global", "local"]),
    "ignored": st.sampled_from(["none", "a layer", "a module"]),
}
INVALID = {
    "target": st.sampled_from([{"target_macs": 0.0}, {"target_macs": 1.5}, {"target_macs": float("nan")},
                               {"target_macs": "0.5"}, {"sparsity": 1.0}, {"sparsity": -0.2}, {},
                               {"target_macs": 0.5, "sparsity": 0.3}, {"target_macs": 0.01}]),
    "round_to": st.sampled_from([0, -8, 2.5, True]),
    "mode": st.sampled_from(["uniform", "GLOBAL"]),
    "ignored": st.sampled_from(["unknown", "bare string", "whole model"]),
}


@st.composite
def options(draw):
    """Valid settings, or valid settings with one of them replaced by an invalid value."""
    broken = draw(st.sampled_from([None, None, None, "target", "round_to", "mode", "ignored"]))
    return {k: draw(INVALID[k] if k == broken else VALID[k]) for k in VALID}


def _ignored(model, choice):
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    middle = names[len(names) // 2]
    return {"none": [], "a layer": [middle], "a module": [model.get_submodule(middle)], "unknown": [middle + "x"],
            "bare string": middle, "whole model": [""]}[choice]


def _out(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@settings(max_examples=24, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(drawn=models(), opts=options())
def test_prune_is_exact_or_a_clean_error(drawn, opts, tmp_path_factory):
    kind, build, x = drawn
    target, round_to, mode, ignored = opts["target"], opts["round_to"], opts["mode"], opts["ignored"]
    torch.manual_seed(0)
    model = build().eval()
    before, out = _state(model), _out(model, x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_prune.prune(model, example_inputs=x, round_to=round_to, mode=mode,
                           ignored_layers=_ignored(model, ignored), compact=False, **target)
    except PruningError:
        OUTCOMES["refused"] += 1
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        assert torch.equal(_out(model, x), out)
        return
    OUTCOMES["pruned"] += 1
    masked = _out(model, x)
    hf_prune.compact(model)
    compacted = _out(model, x)
    assert (compacted - masked).abs().max() <= 1e-4 * masked.abs().max().clamp_min(1e-12)

    folder = tmp_path_factory.mktemp("round_trip")
    hf_prune.save_pretrained(model, folder, card=False)
    loaded = hf_prune.AutoPrunedModel.from_pretrained(folder)
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    assert torch.equal(_out(loaded, x), compacted)
