"""Reliability and security: what survives bad input, failures and interrupts.

* pushes upload only the model's own files;
* saves are atomic: a failure at any step leaves the previous checkpoint byte for byte intact;
* nothing is unpickled: ``torch.load`` raises for this whole module, and everything still loads;
* specs are validated (unknown keys, attributes outside the allow-list, sizes past the base);
* ``ignored_layers`` and example inputs are checked;
* every transaction (prune, step, apply, compact, UPDP merge, SP extraction, spec application,
  weight pruning) leaves the model bit-identical when an interrupt hits any forward or step.

The fault counts printed with ``-s`` are the numbers quoted in the README's "Guarantees".
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_prune
from hf_prune.errors import ConfigError, PruningError
from hf_prune.hub import AutoPrunedModel, SpecError, apply_spec, push_to_hub, save_pretrained, structure_spec
from hf_prune.hub import io as hub_io

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")]

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """No test of this module may unpickle anything: every loader here works without ``torch.load``."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


# --------------------------------------------------------------------------- models


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=64, num_labels=5))


def _timm_wrapper():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=5))


def _timm():
    import timm

    return timm.create_model("resnet10t", num_classes=5)


BUILDERS = {"vit": _vit, "timm_wrapper": _timm_wrapper, "timm": _timm}


def _pruned(name: str, target: float = 0.6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_prune.prune(model, example_inputs=X, target_macs=target)
    return model


def _logits(model, x=X):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_logits(a), _logits(b))


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` (sub-folders included) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- fault injection


@contextlib.contextmanager
def faults(targets, fail_at: int | None = None, exc=KeyboardInterrupt, when=None):
    """Wrap each ``(owner, name)`` function so that the ``fail_at``-th call over all of them raises ``exc``.

    ``when(args)`` (optional) says which calls count. Yields a list whose first item is the number of
    counted calls.
    """
    count = [0]
    saved = []

    def wrap(original):
        def wrapper(*args, **kwargs):
            if when is None or when(args):
                count[0] += 1
                if count[0] == fail_at:
                    raise exc("injected fault")
            return original(*args, **kwargs)
        return wrapper

    for owner, name in targets:
        own = name in vars(owner)  # False: a method inherited from a base class
        original = vars(owner)[name] if own else getattr(owner, name)
        saved.append((owner, name, original, own))
        setattr(owner, name, wrap(original))
    try:
        yield count
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


# --------------------------------------------------------------------------- push: an allow-list


def test_push_uploads_only_the_models_own_files(hub_server, tmp_path, fast_plot):
    from transformers import ViTImageProcessor

    model = _pruned("vit")
    save_dir = tmp_path / "out"
    (save_dir / "checkpoint-500").mkdir(parents=True)
    (save_dir / "checkpoint-500" / "optimizer.pt").write_bytes(b"optimizer state")
    (save_dir / ".env").write_text("HF_TOKEN=hf_secret_token_that_must_stay_home\n")
    (save_dir / "notes.txt").write_text("private notes\n")
    (save_dir / "pytorch_model.bin").write_bytes(b"stale pickled weights")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(save_dir)  # saved there earlier: uploaded

    push_to_hub(model, "test-user/vit-allow", save_dir=save_dir, standalone=True)
    files = set(hub_server.list_files("test-user/vit-allow")) - {".gitattributes"}
    assert files == {"config.json", "model.safetensors", "README.md", "pruned_layers.png", "modeling_hf_prune.py",
                     "preprocessor_config.json"}
    for name in files:
        assert b"hf_secret_token" not in hub_server.read_file("test-user/vit-allow", name)
    assert {".env", "notes.txt", "checkpoint-500"} <= {p.name for p in save_dir.iterdir()}  # left at home
    assert not (save_dir / "pytorch_model.bin").exists()  # a stale weight file of another format: removed
    _assert_same_weights(model, AutoPrunedModel.from_pretrained("test-user/vit-allow"))

    push_to_hub(model, "test-user/vit-processor", image_processor=ViTImageProcessor())  # a processor given to the push
    assert set(hub_server.list_files("test-user/vit-processor")) - {".gitattributes"} == {
        "config.json", "model.safetensors", "README.md", "pruned_layers.png", "preprocessor_config.json"}


# --------------------------------------------------------------------------- atomic saves


def _fail_step(step: str, library: str):
    """``(functions, filter)`` that fail one writer step of a transformers or timm save."""
    import safetensors.torch
    import transformers.modeling_utils
    from transformers import PretrainedConfig

    def named(filename):
        return lambda args: Path(args[0]).name == filename

    if step == "config":
        if library == "transformers":
            return [(PretrainedConfig, "to_json_file")], None
        return [(Path, "write_text")], named("config.json")
    if step == "weights":
        return [(transformers.modeling_utils, "safe_save_file"), (safetensors.torch, "save_file")], None
    return [(Path, "write_text")], named("README.md")  # the card, after its plot was written


@pytest.fixture
def fast_plot(monkeypatch):
    """The per-layer plot costs ~0.5 s of matplotlib per save; these tests are about files, not pixels."""
    from hf_prune.hub import card

    monkeypatch.setattr(card, "plot_layers", lambda rows, path, title="": path.write_bytes(b"plot"))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_failed_save_leaves_the_previous_checkpoint_intact(name, tmp_path, fast_plot):
    old, new = _pruned(name, 0.7, seed=0), _pruned(name, 0.6, seed=1)
    target = tmp_path / "ckpt"
    save_pretrained(old, target, metrics={"accuracy": 0.5})
    (target / "notes.txt").write_text("mine\n")
    before = _tree(target)
    injected = 0

    def check_intact():
        assert _tree(target) == before
        assert [p.name for p in tmp_path.iterdir() if "hf_prune" in p.name] == []  # no staging folder left

    library = "timm" if name == "timm" else "transformers"
    for step in ("config", "weights", "card"):
        targets, when = _fail_step(step, library)
        for exc in (OSError, KeyboardInterrupt):
            with faults(targets, fail_at=1, exc=exc, when=when):
                with pytest.raises(exc, match="injected fault"):
                    save_pretrained(new, target, metrics={"accuracy": 0.7})
            injected += 1
            check_intact()
    save_pretrained(new, tmp_path / "probe")
    with faults([(hub_io, "_move")]) as count:  # how many moves a re-save over a checkpoint makes
        save_pretrained(new, tmp_path / "probe")
    moves = count[0]
    for k in range(1, moves + 1):  # the final move, failing at each of its renames
        for exc in (OSError, KeyboardInterrupt):
            with faults([(hub_io, "_move")], fail_at=k, exc=exc):
                with pytest.raises(exc, match="injected fault"):
                    save_pretrained(new, target, metrics={"accuracy": 0.7})
            injected += 1
            assert _tree(target) == before
    check_intact()
    _assert_same_weights(old, AutoPrunedModel.from_pretrained(target))
    print(f"\n[reliability] atomic save {name}: {injected} faults injected, previous checkpoint intact after all")
    assert injected >= 6 + 2 * moves

    save_pretrained(new, target)  # and a save that goes through replaces it
    _assert_same_weights(new, AutoPrunedModel.from_pretrained(target))
    assert (target / "notes.txt").read_text() == "mine\n"


def test_stale_weight_files_are_removed_only_after_success(tmp_path):
    model = _pruned("vit")
    target = tmp_path / "ckpt"
    target.mkdir()
    stale = ["pytorch_model.bin", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "modeling_hf_prune.py"]
    for n in stale:
        (target / n).write_bytes(b"old")
    (target / "data").mkdir()
    (target / "data" / "keep.txt").write_text("kept")
    before = _tree(target)
    with faults([(hub_io, "_move")], fail_at=3):
        with pytest.raises(KeyboardInterrupt):
            save_pretrained(model, target, card=False)
    assert _tree(target) == before  # not removed by a failed save
    save_pretrained(model, target, card=False)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "data", "model.safetensors"]
    _assert_same_weights(model, AutoPrunedModel.from_pretrained(target))


# --------------------------------------------------------------------------- no pickle


def test_pickled_weights_are_refused_with_the_fix(tmp_path):
    model = _pruned("vit")
    save_pretrained(model, tmp_path, card=False)
    (tmp_path / "model.safetensors").unlink()
    # only the file's presence matters: the loader refuses it by name and never reads it (no pickle is written)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(SpecError, match=r"only pickled weights \(pytorch_model\.bin\).*re-save it with safetensors"):
        AutoPrunedModel.from_pretrained(tmp_path)
    with pytest.raises(SpecError, match="safetensors weights only"):
        AutoPrunedModel.from_pretrained(tmp_path, use_safetensors=False)


def _edit(path: Path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


def test_timm_model_args_from_a_checkpoint_pass_an_allow_list(tmp_path):
    model = _pruned("timm")
    save_pretrained(model, tmp_path, card=False)
    _assert_same_weights(model, AutoPrunedModel.from_pretrained(tmp_path))
    bad = [
        (lambda c: c["hf_prune"]["base"]["config"]["model_args"].update(checkpoint_path=str(tmp_path / "x.pth")),
         "'checkpoint_path' \\(a loader option"),
        (lambda c: c["hf_prune"]["base"]["config"]["model_args"].update(pretrained_cfg_overlay={"file": "x.pth"}),
         "'pretrained_cfg_overlay' \\(a loader option"),
        (lambda c: c["hf_prune"]["base"]["config"]["model_args"].update(not_an_argument=1),
         "'not_an_argument' \\(not an argument"),
        (lambda c: c["hf_prune"]["base"]["config"]["model_args"].update(global_pool="/etc/passwd"),
         "not plain data"),
        (lambda c: c["hf_prune"]["base"].update(architecture="hf-hub:someone/resnet10t"), "not a timm model name"),
    ]
    original = json.loads((tmp_path / "config.json").read_text())
    for fn, message in bad:
        (tmp_path / "config.json").write_text(json.dumps(original))
        _edit(tmp_path, fn)
        with pytest.raises(SpecError, match=message):
            AutoPrunedModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(original))
    _edit(tmp_path, lambda c: c["hf_prune"]["base"]["config"]["pretrained_cfg"].update(
        file=str(tmp_path / "x.pth"), url="http://example.invalid/x.pth"))  # file keys are dropped from the overlay
    loaded = AutoPrunedModel.from_pretrained(tmp_path)
    assert "file" not in loaded.pretrained_cfg or loaded.pretrained_cfg["file"] is None
    _assert_same_weights(model, loaded)


# --------------------------------------------------------------------------- spec validation


def test_spec_refuses_unknown_keys_foreign_attributes_and_oversized_shapes(monkeypatch):
    from hf_prune.hub.base import base_model_of
    from hf_prune.hub.spec import validate_spec

    vit, timm_model = _pruned("vit"), _pruned("timm")
    spec, tspec = structure_spec(vit), structure_spec(timm_model)
    linear = next(i for i, e in enumerate(spec["layers"]) if e["type"] == "Linear" and e["attrs"])
    attention = next(i for i, e in enumerate(spec["layers"]) if e["role"] == "attention")
    conv = next(i for i, e in enumerate(tspec["layers"]) if e["type"] == "Conv2d" and "weight" in e["tensors"])

    def broken(base, fn):
        bad = json.loads(json.dumps(base))
        fn(bad)
        return bad

    invalid = [  # refused by validate_spec alone
        (spec, lambda s: s.update(extra=1), r"top level has unknown keys \['extra'\]"),
        (spec, lambda s: s["layers"][0].update(note="x"), r"layers\[0\] has unknown keys \['note'\]"),
        (spec, lambda s: s["base"].update(code="x"), r"base has unknown keys"),
        (spec, lambda s: s["method"].update(run="x"), r"method has unknown keys"),
        (spec, lambda s: s["layers"][0]["attrs"].update(_private=1), "invalid attribute name"),
        (spec, lambda s: s["layers"][0]["attrs"].update(__class__=1), "invalid attribute name"),
    ]
    for base, fn, message in invalid:
        with pytest.raises(SpecError, match=message):
            validate_spec(broken(base, fn))

    def no_huge_alloc(*shape, **kwargs):
        dims = shape[0] if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else shape
        assert math.prod(dims) < 10 ** 8, "a huge tensor was allocated"
        return real_empty(*shape, **kwargs)

    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", no_huge_alloc)
    unfit = [  # refused by apply_spec against the base, before anything changes
        (vit, spec, lambda s: s["layers"][linear]["attrs"].update(forward=1), "no such plain attribute"),
        (vit, spec, lambda s: s["layers"][linear]["attrs"].update(bias=1), "names a tensor"),
        (vit, spec, lambda s: s["layers"][linear]["attrs"].update(training=0), "pruning sets only"),
        (vit, spec, lambda s: s["layers"][linear]["attrs"].update(out_features=10 ** 9), "integer in"),
        (vit, spec, lambda s: s["layers"][attention]["attrs"].update(scaling=3.0), r"must be 8 \*\* -0\.5"),
        (vit, spec, lambda s: s["layers"][linear]["tensors"].update(weight=[10 ** 9, 10 ** 9]), "larger than the base"),
        (vit, spec, lambda s: s["layers"][linear]["tensors"].update(weight=[4, 4, 4]), "dimensions"),
        (timm_model, tspec, lambda s: s["layers"][conv]["tensors"].update(
            weight=[s["layers"][conv]["base_tensors"]["weight"][0] + 8] + s["layers"][conv]["tensors"]["weight"][1:]),
         "larger than the base"),
        (timm_model, tspec, lambda s: s["layers"][conv]["attrs"].update(stride=[1, 1]), "pruning sets only"),
    ]
    for model, base, fn, message in unfit:
        fresh = base_model_of(model)
        shapes = {k: v.shape for k, v in fresh.state_dict().items()}
        with pytest.raises(SpecError, match=message):
            apply_spec(fresh, broken(base, fn))
        assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    print(f"\n[reliability] spec: {len(invalid) + len(unfit)} bad specs refused")


def test_merged_block_descriptions_are_bounded_by_the_block_they_replace():
    import timm

    from hf_prune.hub.base import base_model_of
    from hf_prune.methods.updp.depth import prune_depth

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    prune_depth(model, example_inputs=X, blocks=[0])
    spec = structure_spec(model)
    body = spec["merged_blocks"][0]["became"]["body"]
    for edit, message in [(lambda b: b[0].update(out=10 ** 6), "widest dimension"),
                          (lambda b: b[0].update(kernel=[99, 99]), "larger than any kernel"),
                          (lambda b: b.extend(copy.deepcopy(b) * 8), "more than the")]:
        bad = json.loads(json.dumps(spec))
        edit(bad["merged_blocks"][0]["became"]["body"])
        with pytest.raises(SpecError, match=message):
            apply_spec(base_model_of(model), bad)
    assert body  # the untouched spec applies
    apply_spec(base_model_of(model), spec)


# --------------------------------------------------------------------------- model cards


@pytest.mark.parametrize("metrics, speed, named", [
    ({"accuracy": float("nan")}, None, "metric 'accuracy'"),
    ([{"type": "top1", "value": float("inf"), "name": "Top-1"}], None, "metric 'Top-1'"),
    ({"accuracy": torch.tensor(float("nan"))}, None, "metric 'accuracy'"),
    (None, {"speedup": float("nan")}, "speed\\['speedup'\\]"),
])
def test_card_refuses_non_finite_metrics(metrics, speed, named, tmp_path):
    with pytest.raises(ValueError, match=f"{named} has value .*only finite numbers"):
        save_pretrained(_pruned("vit"), tmp_path / "out", metrics=metrics, speed=speed)
    assert not (tmp_path / "out").exists()  # nothing written


# --------------------------------------------------------------------------- ignored_layers and inputs


class _Net(nn.Module):
    """Conv-BN stem, a residual block, a wider conv, a LayerNorm'd linear head: every coupling kind, tiny."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.layer4 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.layer4(x).mean((2, 3))
        return self.head(self.norm(x))


def _net(seed=0):
    torch.manual_seed(seed)
    model = _Net()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_ignored_layers_names_or_modules_and_clear_errors():
    widths = lambda m: [c.out_channels for c in m.layer4.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    for form in ("names", "modules", "one module"):
        model = _net()
        ignored = {"names": ["layer4"], "modules": [model.layer4], "one module": model.layer4}[form]
        hf_prune.prune(model, example_inputs=X, target_macs=0.7, ignored_layers=ignored, round_to=None)
        assert widths(model) == [32]  # its output channels stay
        assert model.block[0].out_channels < 32  # the rest is pruned
    bad = [("layer4", r"ignored_layers='layer4' is a single string; pass a list.*\['layer4'\]"),
           (["layer_4"], r"no module named 'layer_4'; did you mean \['layer4'"),
           (["stem.9"], r"no module named 'stem\.9'; did you mean \['stem\.\d', 'stem\.\d', 'stem\.\d'\]"),
           ([nn.Conv2d(3, 3, 1)], "not a submodule"),
           ([3], "must be module names or modules"),
           ([""], "names the whole model"),
           (5, "must be a list of module names")]
    for value, message in bad:
        model = _net()
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ConfigError, match=message):
            hf_prune.prune(model, example_inputs=X, target_macs=0.7, ignored_layers=value)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    print(f"\n[reliability] ignored_layers: {len(bad)} bad values refused")


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_bad_models_and_inputs_are_clear_errors():
    meta = _Net().to("meta")
    cases = [
        (_net(), X[:0], "example_inputs has an empty tensor of shape \\(0, 3, 32, 32\\) \\(batch size 0\\)"),
        (_vit(), {"pixel_values": X[:0]}, "example_inputs has an empty tensor"),
        (_net(), {"nothing": "here"}, "example_inputs holds no tensor"),
        (_net(), None, "needs example_inputs"),
        (torch.jit.script(_net()), X, "model is a TorchScript module"),
        (torch.jit.trace(_net(), X), X, "model is a TorchScript module"),
        (meta, X, "model has tensors on the meta device \\(e.g. 'stem.0.weight'\\)"),
        (_net(), X.to("meta"), "example_inputs has a meta tensor"),
    ]
    for model, inputs, message in cases:
        with pytest.raises(PruningError, match=message):
            hf_prune.prune(model, example_inputs=inputs, target_macs=0.7)
        with pytest.raises(PruningError, match=message):
            hf_prune.StructuredPruner(model, inputs)
    print(f"\n[reliability] inputs: {2 * len(cases)} bad models/inputs refused")


# --------------------------------------------------------------------------- transactions under interrupts


def _plain(value) -> bool:
    return isinstance(value, (bool, int, float, str, tuple, list, torch.Size)) or value is None


def _fingerprint(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "tensors": [(n, id(t)) for n, t in [*model.named_parameters(), *model.named_buffers()]],
        "modules": [(n, type(m), m.training, {k: v for k, v in vars(m).items() if _plain(v) and k != "_version"},
                     [type(h) for h in m._forward_hooks.values()], [type(h) for h in m._forward_pre_hooks.values()])
                    for n, m in model.named_modules()],
        "mask": model.__dict__.get("hf_prune_mask"), "weight_masks": model.__dict__.get("hf_prune_weight_masks"),
        "config": (config, config.to_dict()) if hasattr(config, "to_dict") else None,
    }


def _assert_unchanged(model, before: dict, out, x):
    after = _fingerprint(model)
    assert after["tensors"] == before["tensors"]  # the very same parameter objects
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert after["state"][k].shape == v.shape and torch.equal(after["state"][k], v), k
    for a, b in zip(after["modules"], before["modules"], strict=True):
        assert a == b, a[0]
    assert after["mask"] is before["mask"] and after["weight_masks"] is before["weight_masks"]
    if before["config"] is not None:
        assert after["config"][0] is before["config"][0] and after["config"][1] == before["config"][1]
    assert torch.equal(_call(model, x), out)


def _call(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


FORWARDS = [(nn.Linear, "forward"), (nn.Conv2d, "forward"), (nn.BatchNorm2d, "forward"), (nn.LayerNorm, "forward")]


def _compaction_steps():
    from hf_prune.engine import masks, pruner, surgery

    return [(surgery, "sliced_tensors"), (surgery, "_fix_module"), (surgery, "_fix_heads"), (surgery, "sync_config"),
            (surgery, "flush_eval_caches"), (surgery, "adapt_attention"), (masks.StructuredMask, "enforce"),
            (masks.StructuredMask, "install_hooks"), (pruner, "compact_units"), (pruner, "_run")]


def _interrupt_everywhere(setup, op, targets, x, what: str) -> int:
    """Run ``op`` with a KeyboardInterrupt at call k of ``targets``, for every k a successful run makes.

    ``setup()`` returns a fresh object for ``op``; after each interrupted run the model must be exactly as
    before and compute the same outputs. Returns the number of faults injected.
    """
    probe = setup()
    with faults(targets) as count:
        op(probe)  # a run without faults: how many calls there are to interrupt
    calls = count[0]
    assert calls > 0
    subject = setup()
    model = subject if isinstance(subject, nn.Module) else subject[0]
    before, out = _fingerprint(model), _call(model, x)
    for k in range(1, calls + 1):
        with faults(targets, fail_at=k) as count:
            with pytest.raises(KeyboardInterrupt):
                op(subject)
        _assert_unchanged(model, before, out, x)
    print(f"\n[reliability] {what}: {calls} interrupts, model unchanged after each")
    return calls


def _vit_x():
    return {"pixel_values": X}


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_structured_pruning_survives_an_interrupt_anywhere(kind):
    from hf_prune.engine.pruner import StructuredPruner

    build = _net if kind == "cnn" else (lambda: (torch.manual_seed(0), _vit().eval())[1])
    x = X if kind == "cnn" else _vit_x()
    targets = FORWARDS + _compaction_steps()
    total = 0
    total += _interrupt_everywhere(build, lambda m: hf_prune.prune(m, example_inputs=x, target_macs=0.6), targets,
                                   x, f"{kind} one-shot prune")
    total += _interrupt_everywhere(build, lambda m: StructuredPruner(m, x).step(target_macs=0.6), targets, x,
                                   f"{kind} StructuredPruner.step (masks)")

    def masked():
        model = build()
        pruner = StructuredPruner(model, x)
        pruner.step(target_macs=0.8)
        return model, pruner

    total += _interrupt_everywhere(masked, lambda s: s[1].step(target_macs=0.6), targets, x,
                                   f"{kind} second step on a masked model")
    total += _interrupt_everywhere(masked, lambda s: s[1].apply(s[1].removed[: len(s[1].removed) // 2]), targets, x,
                                   f"{kind} StructuredPruner.apply")
    total += _interrupt_everywhere(masked, lambda s: hf_prune.compact(s[0]), targets, x, f"{kind} compact")
    print(f"\n[reliability] {kind} structured total: {total} interrupts")


def test_compaction_error_reinstalls_the_mask_hooks(monkeypatch):
    from hf_prune.engine import surgery
    from hf_prune.errors import CompactionError

    model = _net()
    hf_prune.prune(model, example_inputs=X, target_macs=0.6, compact=False)
    before, out = _fingerprint(model), _call(model, X)

    def broken(module, old, undo):
        raise ValueError("cannot resize")

    monkeypatch.setattr(surgery, "_fix_module", broken)
    with pytest.raises(CompactionError, match="cannot resize"):
        hf_prune.compact(model)
    _assert_unchanged(model, before, out, X)  # LayerNorm hook back: the masked model computes as before
    monkeypatch.undo()
    hf_prune.compact(model)
    assert (_call(model, X) - out).abs().max() <= 1e-5 * out.abs().max()


def _tiny_hf_resnet():
    import transformers as T

    torch.manual_seed(0)
    return T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2],
                                                         layer_type="basic", num_labels=5)).eval()


def test_updp_merge_survives_an_interrupt_anywhere():
    from hf_prune.methods.updp import blocks, depth
    from hf_prune.methods.updp.depth import UPDPAnnealer, prune_depth

    x = _vit_x()
    steps = [(depth, "merge_block"), (depth, "calibrate"), (depth, "recalibrate_bn"), (blocks.AnnealedBlock, "merge")]
    total = _interrupt_everywhere(_tiny_hf_resnet, lambda m: prune_depth(m, example_inputs=x, blocks=[0, 1]),
                                  FORWARDS + steps, x, "UPDP prune_depth")

    def annealed():
        model = _tiny_hf_resnet()
        annealer = UPDPAnnealer(model, blocks=[0, 1, 2], example_inputs=x)
        annealer.set_lambda(0.5)
        return model, annealer

    total += _interrupt_everywhere(annealed, lambda s: s[1].merge_all(force=True), steps, x, "UPDP merge_all")
    print(f"\n[reliability] UPDP total: {total} interrupts")


def test_stagewise_extraction_survives_an_interrupt_anywhere():
    from hf_prune.methods.stagewise.supernet import Supernet

    x = _vit_x()

    def supernet():
        model = _tiny_hf_resnet()
        sup = Supernet(model, x, round_to=1, make_teacher=False)
        return model, sup

    _interrupt_everywhere(supernet, lambda s: s[1].extract(s[1].space.min_choice(), [x], inplace=True),
                          FORWARDS + _compaction_steps(), x, "SP Supernet.extract(inplace=True)")


def test_apply_spec_survives_an_interrupt_anywhere():
    from hf_prune.hub import spec as spec_module
    from hf_prune.hub.base import base_model_of

    vit = _pruned("vit")
    spec = structure_spec(vit)
    _interrupt_everywhere(lambda: base_model_of(vit, device="cpu").eval(), lambda m: apply_spec(m, spec),
                          [(spec_module, "_decode"), (spec_module, "adapt_attention"), (torch, "empty")], _vit_x(),
                          "apply_spec")


def test_weight_pruning_survives_an_interrupt_anywhere():
    from hf_prune.methods.magnitude import oneshot
    from hf_prune.sparse import masks

    targets = [(oneshot, "select_magnitude"), (oneshot, "allocate"), (masks.WeightMasks, "enforce"),
               (masks.WeightMasks, "attach"), (masks.WeightMasks, "set")]
    _interrupt_everywhere(_net, lambda m: hf_prune.prune(m, method="magnitude", sparsity=0.5), targets, X,
                          "weight pruning (magnitude)")


def test_save_into_a_folder_whose_parent_is_read_only(tmp_path, monkeypatch):
    model = _pruned("vit")
    target = tmp_path / "ckpt"
    save_pretrained(model, target, card=False)
    (target / "notes.txt").write_text("mine\n")
    mkdir = Path.mkdir

    def read_only_parent(self, *args, **kwargs):  # as root, chmod would not stop the write: refuse it here
        if self.parent == tmp_path and self.name.startswith(".ckpt.hf_prune"):
            raise PermissionError(f"read-only: {tmp_path}")
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_parent)
    save_pretrained(model, target, card=False)  # staged inside the folder instead
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    _assert_same_weights(model, AutoPrunedModel.from_pretrained(target))
