"""Pruned models as Hub citizens: structure spec, exact save/load round trips, standalone loading
without hf_prune, pushing to a (local, Hub-compatible) server with a model card.

Every model is built from a small config (no weights are downloaded) and pruned once per module.
"""
from __future__ import annotations

import copy

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_prune
from hf_prune.hub import (AutoPrunedModel, PushError, SpecError, apply_spec, push_to_hub, save_pretrained,
                          structure_spec, validate_spec)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
ROOT = Path(__file__).resolve().parents[1]


def _hf(name, **kw):
    import transformers

    config = getattr(transformers, f"{name}Config")(num_labels=5, **kw)
    return getattr(transformers, f"{name}ForImageClassification")(config)


def _timm_wrapper():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet18", num_labels=10))


def _timm(name, **kw):
    import timm

    return timm.create_model(name, num_classes=5, **kw)


BUILDERS = {
    "vit": lambda: _hf("ViT", image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128),
    "deit": lambda: _hf("DeiT", image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128),
    "convnext": lambda: _hf("ConvNext", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1]),
    "resnet": lambda: _hf("ResNet", embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                          layer_type="basic"),
    "mobilenetv2": lambda: _hf("MobileNetV2", image_size=32, depth_multiplier=0.35),
    "swin": lambda: _hf("Swin", image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                        window_size=4),
    "segformer": lambda: _hf("Segformer", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                             num_attention_heads=[1, 2, 4, 8], decoder_hidden_size=64),
    "timm_wrapper": _timm_wrapper,
    "timm_resnet18": lambda: _timm("resnet18"),
    "timm_vit": lambda: _timm("vit_tiny_patch16_224", img_size=32, depth=2),
    "timm_convnext": lambda: _timm("convnext_atto"),
}
_CACHE: dict[str, nn.Module] = {}


def pruned(name: str) -> nn.Module:
    """The model ``name``, pruned to 60% of its MACs (built and pruned once per test session)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        model = BUILDERS[name]().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_prune.prune(model, example_inputs=X, target_macs=0.6)
        _CACHE[name] = model
    return _CACHE[name]


def logits(model, x=X):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def assert_same_model(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].shape == sb[key].shape and sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
    assert (logits(a) - logits(b)).abs().max().item() == 0.0


def edit_config(path: Path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(BUILDERS))
def test_round_trip_is_exact(name, tmp_path):
    model = pruned(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained(model, tmp_path, card=False, method="depgraph", settings={"target_macs": 0.6})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    spec = json.loads((tmp_path / "config.json").read_text())["hf_prune"]
    validate_spec(spec)
    assert spec["layers"], "pruning changed nothing?"
    assert spec["method"] == {"name": "depgraph", "settings": {"target_macs": 0.6}}
    assert spec["stats"]["params_after"] < sum(p.numel() for p in BUILDERS[name]().parameters())
    if spec["base"]["library"] == "timm":  # the base of a timm model is the dense model
        assert spec["stats"]["params_after"] < spec["stats"]["params_before"]

    loaded = AutoPrunedModel.from_pretrained(tmp_path)
    assert type(loaded) is type(model)  # an ordinary model class, not a wrapper
    assert not loaded.training
    assert_same_model(model, loaded)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # saving changed nothing


def test_spec_survives_config_and_is_keyed_by_index(tmp_path):
    from safetensors import safe_open
    from transformers import ViTConfig, ViTForImageClassification

    model = pruned("vit")
    save_pretrained(model, tmp_path, card=False)
    spec = json.loads((tmp_path / "config.json").read_text())["hf_prune"]
    assert ViTConfig.from_pretrained(tmp_path).hf_prune == spec  # unknown config keys survive
    assert model.config.hf_prune == spec  # so model.save_pretrained writes it too
    assert spec["base"]["library"] == "transformers" and spec["base"]["architecture"] == "ViTForImageClassification"
    assert spec["removed_blocks"] == [] and spec["merged_blocks"] == [] and spec["sparsity"] == {}
    assert {"torch", "transformers", "timm", "hf_prune"} <= set(spec["versions"])

    with torch.device("meta"):
        base_modules = list(ViTForImageClassification(ViTConfig.from_pretrained(tmp_path)).named_modules())
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved_names = set(f.keys())
    roles = set()
    for entry in spec["layers"]:
        path, module = base_modules[entry["index"]]
        assert path == entry["path"] and type(module).__name__ == entry["type"]
        roles.add(entry["role"])
        for tensor in entry["tensors"]:
            assert list(getattr(model.get_submodule(path), tensor).shape) == entry["tensors"][tensor]
    assert roles == {"attention", "linear"}
    attention = next(e for e in spec["layers"] if e["role"] == "attention")
    assert attention["attrs"] and not attention["tensors"]  # head count / head size: attributes only
    # the weights file uses transformers' legacy names, which differ from the module paths in the spec
    assert not any(e["path"] + ".weight" in saved_names for e in spec["layers"] if "weight" in e["tensors"])


def test_plain_from_pretrained_fails_loudly(tmp_path):
    from transformers import ViTForImageClassification

    save_pretrained(pruned("vit"), tmp_path, card=False)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        ViTForImageClassification.from_pretrained(tmp_path)


def test_resaving_a_loaded_model_keeps_the_spec(tmp_path):
    model = pruned("vit")
    save_pretrained(model, tmp_path / "a", card=False, method="depgraph", stats={"macs_before": 100, "macs_after": 60})
    loaded = AutoPrunedModel.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")  # the model's own save_pretrained: config.hf_prune is on the config
    again = AutoPrunedModel.from_pretrained(tmp_path / "b")
    assert_same_model(model, again)
    save_pretrained(again, tmp_path / "c", card=False)  # method and MACs carried over: same structure
    spec = json.loads((tmp_path / "c" / "config.json").read_text())["hf_prune"]
    assert spec["method"]["name"] == "depgraph" and spec["stats"]["macs_after"] == 60


def test_removed_blocks_and_sparsity_round_trip(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=5).eval()
    model.blocks[1] = nn.Identity()  # what depth pruning produces
    with torch.no_grad():
        w = model.blocks[0].mlp.fc1.weight
        w[:, : w.shape[1] // 2] = 0  # unstructured sparsity: half the weights of one layer
    save_pretrained(model, tmp_path, metrics={"accuracy": 0.5})
    spec = json.loads((tmp_path / "config.json").read_text())["hf_prune"]
    assert spec["base"]["library"] == "timm"
    assert spec["base"]["config"]["model_args"]["depth"] == 3
    assert spec["layers"] == []
    assert [(e["path"], e["type"]) for e in spec["removed_blocks"]] == [("blocks.1", "Block")]
    assert spec["sparsity"]["layers"] == [{"index": spec["sparsity"]["layers"][0]["index"], "path": "blocks.0.mlp.fc1",
                                           "tensor": "weight", "nonzero": 0.5}]
    assert 0.5 < spec["sparsity"]["global_nonzero"] < 1
    assert spec["stats"]["params_after"] < spec["stats"]["params_before"]
    loaded = AutoPrunedModel.from_pretrained(tmp_path)
    assert_same_model(model, loaded)
    assert "nonzero weights" in (tmp_path / "README.md").read_text()


# --------------------------------------------------------------------------- bad specs


def test_not_an_hf_prune_checkpoint(tmp_path):
    model = BUILDERS["vit"]()
    model.save_pretrained(tmp_path)
    with pytest.raises(SpecError, match="not an hf_prune checkpoint.*own from_pretrained"):
        AutoPrunedModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["vit", "timm_vit"])
def test_unknown_format_version_builds_nothing(name, tmp_path, monkeypatch):
    from hf_prune.hub import io

    save_pretrained(pruned(name), tmp_path, card=False)
    edit_config(tmp_path, lambda c: c["hf_prune"].update(format_version=2))

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(io, "_load_transformers", no_build)
    monkeypatch.setattr(io, "_load_timm", no_build)
    with pytest.raises(SpecError, match="unsupported hf_prune format_version 2.*Upgrade hf_prune"):
        AutoPrunedModel.from_pretrained(tmp_path)


def _shrink_first_linear(config):
    entry = next(e for e in config["hf_prune"]["layers"] if e["role"] == "linear" and "bias" in e["tensors"])
    entry["tensors"]["weight"][0] -= 8
    entry["tensors"]["bias"][0] -= 8


@pytest.mark.parametrize("name", ["vit", "timm_vit"])
def test_wrong_shape_in_spec_raises(name, tmp_path):
    save_pretrained(pruned(name), tmp_path, card=False)
    edit_config(tmp_path, _shrink_first_linear)
    with pytest.raises(SpecError, match="do not match the structure"):
        AutoPrunedModel.from_pretrained(tmp_path)


def test_spec_from_another_configuration_names_the_entry(tmp_path):
    save_pretrained(pruned("vit"), tmp_path, card=False)
    hidden = json.loads((tmp_path / "config.json").read_text())["hidden_size"]
    edit_config(tmp_path, lambda c: c.update(hidden_size=hidden // 2))  # the base no longer matches the spec
    with pytest.raises(SpecError, match=r"layers\[\d+\] \('vit\.layers\.0\.[\w.]+'\): the base has shape"):
        AutoPrunedModel.from_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.update(hidden_size=hidden, num_hidden_layers=1))
    with pytest.raises(SpecError, match=r"expected a .* at 'vit\.layers\.1\.attention'"):
        AutoPrunedModel.from_pretrained(tmp_path)


def test_validate_spec_rejects_malformed_specs():
    spec = structure_spec(pruned("vit"))
    assert validate_spec(spec) is spec

    def broken(fn):
        bad = json.loads(json.dumps(spec))
        fn(bad)
        return bad

    cases = [
        (lambda s: s.pop("layers"), "missing fields"),
        (lambda s: s.update(format_version="1"), "format_version"),
        (lambda s: s["base"].update(library="keras"), "base.library"),
        (lambda s: s.update(layers={}), "layers must be a list"),
        (lambda s: s["layers"][0].update(role="mystery"), "role"),
        (lambda s: s["layers"][1]["tensors"].update(weight=[16, -1]), "non-negative"),
        (lambda s: s["layers"][1]["attrs"].update(__class__=1), "invalid attribute name"),
        (lambda s: s["layers"][1]["attrs"].update(out_features="big"), "number"),
        (lambda s: s["layers"][2].update(index=s["layers"][1]["index"]), "both have index"),
        (lambda s: s.update(merged_blocks=[{"index": 1}]), r"merged_blocks\[0\]\.path"),
        (lambda s: s.update(merged_blocks=[{"index": 1, "path": "a", "type": "Block"}]), "describe the merged block"),
        (lambda s: s.update(removed_blocks=[{"index": 5, "path": "vit.layers.0", "type": "ViTLayer"}]),
         "inside removed block"),
        (lambda s: s["sparsity"].update(global_nonzero=2, layers=[]), "fraction"),
    ]
    for fn, message in cases:
        with pytest.raises(SpecError, match=message):
            validate_spec(broken(fn))


def test_apply_spec_checks_everything_before_changing_anything():
    from hf_prune.hub.base import base_model_of

    model = pruned("vit")
    spec = structure_spec(model)
    spec["layers"][-1]["type"] = "Conv2d"  # the last entry does not fit
    base = base_model_of(model)  # fresh, from the pruned model's config (meta device)
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    with pytest.raises(SpecError, match=rf"layers\[{len(spec['layers']) - 1}\]: expected a Conv2d"):
        apply_spec(base, spec)
    assert {k: v.shape for k, v in base.state_dict().items()} == shapes
    spec["layers"][-1]["type"] = "Linear"
    apply_spec(base, spec)
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_masked_model_must_be_compacted_first(tmp_path):
    torch.manual_seed(0)
    model = BUILDERS["vit"]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_prune.prune(model, example_inputs=X, target_macs=0.6, compact=False)
    with pytest.raises(SpecError, match="compact"):
        save_pretrained(model, tmp_path)


def test_standalone_requires_transformers(tmp_path):
    with pytest.raises(ValueError, match="standalone"):
        save_pretrained(pruned("timm_vit"), tmp_path, standalone=True)


# --------------------------------------------------------------------------- without hf_prune


def test_standalone_loads_with_plain_transformers_without_hf_prune(tmp_path):
    names = ["vit", "convnext"]
    dirs = {}
    for name in names:
        dirs[name] = save_pretrained(pruned(name), tmp_path / name, card=False, standalone=True)
        config = json.loads((dirs[name] / "config.json").read_text())
        cls = type(pruned(name)).__name__
        assert config["auto_map"]["AutoModelForImageClassification"] == f"modeling_hf_prune.{cls}"
        source = (dirs[name] / "modeling_hf_prune.py").read_text()
        assert "hf_prune import" not in source and "import hf_prune" not in source
        torch.save(logits(pruned(name)), dirs[name] / "expected.pt")
    torch.save(X, tmp_path / "x.pt")
    blocker = tmp_path / "blocker" / "hf_prune"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hf_prune is not installed here')\n")
    script = f"""
import json, torch
try:
    import hf_prune
except ImportError:
    pass
else:
    raise SystemExit("hf_prune is importable")
from transformers import AutoModelForImageClassification
x = torch.load({str(tmp_path / 'x.pt')!r})
diffs = {{}}
for name, path in {json.dumps({k: str(v) for k, v in dirs.items()})}.items():
    model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        diffs[name] = (model(x).logits - torch.load(path + '/expected.pt')).abs().max().item()
print("DIFFS", json.dumps(diffs))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))}
    env.update(PYTHONPATH=str(blocker.parent), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    diffs = json.loads(run.stdout.split("DIFFS", 1)[1])
    assert diffs == {name: 0.0 for name in names}


# --------------------------------------------------------------------------- model card and Hub


def test_card_templates_are_identical():
    from hf_prune.hub import card

    assert card.template_path() == card.PACKAGE_TEMPLATE
    assert card.PACKAGE_TEMPLATE.read_text() == (ROOT / "model_cards" / "pruned_model.md.j2").read_text()


def test_model_card(tmp_path):
    from huggingface_hub import ModelCard

    model = pruned("convnext")
    save_pretrained(model, tmp_path, metrics={"accuracy": 0.875, "top5_accuracy": 0.99},
                    card_data={"dataset": {"name": "Digits", "type": "digits", "split": "test"}, "license": "mit"},
                    speed={"speedup": 1.31, "device": "Intel Xeon CPU", "batch": 32},
                    stats={"macs_before": 2_000_000, "macs_after": 1_200_000}, method="depgraph",
                    settings={"target_macs": 0.6, "round_to": 8}, base_model="facebook/convnext-tiny-224",
                    repo_id="test-user/convnext-pruned", standalone=True)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert {"hf_prune", "pruning", "depgraph"} <= set(data["tags"])
    assert data["base_model"] == "facebook/convnext-tiny-224" and data["license"] == "mit"
    results = data["model-index"][0]["results"]
    assert {(m["type"], m["value"]) for r in results for m in r["metrics"]} == {("accuracy", 0.875),
                                                                               ("top5_accuracy", 0.99)}
    assert results[0]["dataset"] == {"name": "Digits", "type": "digits", "split": "test"}
    text = card.text
    assert "1.31×** on Intel Xeon CPU, batch size 32" in text
    assert "| MACs | 2.00 M | 1.20 M | 60.0% |" in text
    assert 'AutoPrunedModel.from_pretrained("test-user/convnext-pruned")' in text
    assert 'from_pretrained("test-user/convnext-pruned", trust_remote_code=True)' in text
    assert "target_macs: `0.6`" in text and "](pruned_layers.png)" in text
    png = (tmp_path / "pruned_layers.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    with pytest.raises(ValueError, match="measured 'speedup'"):  # checked before anything is written
        save_pretrained(model, tmp_path / "bad", speed={"device": "cpu"})
    assert not (tmp_path / "bad").exists()

    plain = copy.deepcopy(pruned("resnet"))
    plain.__dict__.pop("hf_prune_record", None)  # a model pruned elsewhere: no counts known
    plain.config.__dict__.pop("hf_prune", None)  # (and never saved by hf_prune)
    save_pretrained(plain, tmp_path / "plain")  # no numbers given: none invented
    text = (tmp_path / "plain" / "README.md").read_text()
    assert "Speed-up: not measured" in text and "| MACs | not measured | not measured |" in text
    assert "model-index" not in text and "trust_remote_code" not in text

    recorded = pruned("resnet")  # hf_prune.prune recorded the dense and pruned MACs it computed
    save_pretrained(recorded, tmp_path / "recorded")
    stats = recorded.__dict__["hf_prune_record"]["stats"]
    assert f"| MACs | {stats['macs_before'] / 1e6:.2f} M | {stats['macs_after'] / 1e6:.2f} M |" in (
        tmp_path / "recorded" / "README.md").read_text()


def test_push_and_load_from_hub(hub_server, tmp_path):
    from huggingface_hub import ModelCard

    model = pruned("deit")
    info = push_to_hub(model, "test-user/deit-pruned", metrics={"accuracy": 0.75}, standalone=True,
                       method="depgraph", card_data={"dataset": {"name": "Digits", "type": "digits"}})
    assert info.oid == hub_server.head("test-user/deit-pruned")
    files = set(hub_server.list_files("test-user/deit-pruned"))
    assert {"config.json", "model.safetensors", "README.md", "pruned_layers.png", "modeling_hf_prune.py"} <= files
    loaded = AutoPrunedModel.from_pretrained("test-user/deit-pruned")
    assert_same_model(model, loaded)
    card = ModelCard(hub_server.read_file("test-user/deit-pruned", "README.md").decode())
    metrics = card.data.to_dict()["model-index"][0]["results"][0]["metrics"]
    assert metrics == [{"type": "accuracy", "value": 0.75}]

    timm_model = pruned("timm_vit")
    push_to_hub(timm_model, "test-user/vit-timm-pruned")
    assert_same_model(timm_model, AutoPrunedModel.from_pretrained("test-user/vit-timm-pruned"))


def test_push_failure_is_clear_and_harmless(hub_server, tmp_path):
    model = pruned("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_dir = tmp_path / "saved"
    hub_server.fail_next("/commit/", 500)
    with pytest.raises(PushError) as excinfo:
        push_to_hub(model, "test-user/vit-pruned", save_dir=save_dir)
    message = str(excinfo.value)
    assert "test-user/vit-pruned" in message and "uploading the files" in message
    assert str(save_dir) in message and "upload_folder" in message
    assert excinfo.value.repo_id == "test-user/vit-pruned" and excinfo.value.save_dir == str(save_dir)
    assert "model.safetensors" not in hub_server.list_files("test-user/vit-pruned")  # nothing committed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in save_dir.iterdir()}
    assert_same_model(model, AutoPrunedModel.from_pretrained(save_dir))  # the local copy is complete

    hub_server.fail_next("/api/repos/create", 403)
    with pytest.raises(PushError, match="(?s)creating the repository.*retry hf_prune.push_to_hub"):
        push_to_hub(model, "test-user/other")
    push_to_hub(model, "test-user/vit-pruned", save_dir=save_dir)  # the retry goes through
    assert_same_model(model, AutoPrunedModel.from_pretrained("test-user/vit-pruned"))
