"""The contract every registered method passes, on a transformers ViT and a TimmWrapper ConvNeXt.

One table: every method in ``hf_prune.list_methods()`` × every user path it supports. A method gets all
of this by registering (its ``example`` settings, its config class, one-shot function, callback and
Trainer class come from the registry):

* one-shot ``prune`` → ``hf_prune.save_pretrained`` → ``AutoPrunedModel`` gives identical outputs, the
  saved settings rebuild the same config, and plain transformers Auto classes refuse the checkpoint;
* Trainer + callback → ``trainer.save_model`` and ``model.save_pretrained`` → ``AutoPrunedModel`` exact;
* resuming from a mid-run checkpoint ends with exactly the weights of an uninterrupted run;
* two real processes (DDP, gloo) end with identical models (``tests/contract_worker.py``);
* ``push_to_hub`` to a local Hub server → ``AutoPrunedModel`` / ``PruningConfig`` by repo id;
* the config round-trips through dicts, JSON files and the registry;
* an invalid target fails when the callback is built, an unreachable one before the first training step.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hf_prune
from hf_prune.config import PruningConfig
from hf_prune.errors import ConfigError
from hf_prune.registry import get_method, list_methods

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
METHODS = list_methods()
KINDS = ["vit", "cnn"]
IMAGE = 32
STEPS = 6
# Training settings that finish every method's schedule inside STEPS steps.
TRAINING = {"start": 0, "end": 0.5, "frequency": 1, "anneal_start": 0.0, "anneal_end": 0.5}


def build(kind: str, seed: int = 0):
    """A small model with a fresh config (compaction edits the config)."""
    import transformers as T

    torch.manual_seed(seed)
    if kind == "vit":
        return T.ViTForImageClassification(T.ViTConfig(
            image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return T.TimmWrapperForImageClassification(T.TimmWrapperConfig(
        architecture="convnext_atto", num_labels=10, model_args={"dims": [16, 32, 48, 64], "depths": [1, 1, 2, 1]}))


def settings(method: str, training: bool = False) -> dict:
    entry = get_method(method)
    out = dict(entry.example)
    if training:
        out.update({k: v for k, v in TRAINING.items() if k in entry.config_cls.field_names()})
    return out


def load_data():
    """Real digits (train, val) and two labelled calibration batches."""
    from hf_prune.data import load_digits

    train, val = load_digits(source="sklearn", image_size=IMAGE, channels=3)
    calib = [{"pixel_values": train.pixel_values[i:i + 16], "labels": train.labels[i:i + 16]} for i in (0, 16)]
    return train, val, calib


@pytest.fixture(scope="module")
def data():
    return load_data()


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


def assert_same_model(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]
    assert torch.equal(logits(a, x), logits(b, x))


def assert_pruned(method: str, model, dense_params: int):
    kind = get_method(method).kind
    if kind == "weights":
        zeros = sum(int((p == 0).sum()) for p in model.parameters() if p.dim() > 1)
        assert zeros > 0.1 * sum(p.numel() for p in model.parameters() if p.dim() > 1)
    else:
        assert sum(p.numel() for p in model.parameters()) < dense_params


def targs(out, steps=STEPS, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), use_cpu=True, seed=0, data_seed=0, report_to=[], dataloader_num_workers=0,
                save_strategy="no", max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-3,
                logging_steps=2, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def train(method, kind, out, data, *, args=None, callbacks=(), resume=None, seed=0):
    """Train ``build(kind)`` with the method's callback (its Trainer class); returns (model, callback, trainer)."""
    train_set, val, _ = data
    entry = get_method(method)
    model = build(kind, seed)
    cb = entry.callback_cls(**settings(method, training=True))
    trainer = entry.trainer_cls(model=model, args=args or targs(out), train_dataset=train_set,
                                eval_dataset=torch.utils.data.Subset(val, range(64)), callbacks=[cb, *callbacks])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return model, cb, trainer


# ------------------------------------------------------------------------------------------ one-shot


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_oneshot_save_and_reload_exact(method, kind, tmp_path, data):
    from transformers import AutoModelForImageClassification

    _, val, calib = data
    model = build(kind)
    dense_params = sum(p.numel() for p in model.parameters())
    x = val.pixel_values[:8]
    config = get_method(method).config_cls(**settings(method))
    hf_prune.prune(model, config, example_inputs={"pixel_values": x[:4]}, calib=calib)
    assert_pruned(method, model, dense_params)
    path = hf_prune.save_pretrained(model, tmp_path / "pruned", card=False)
    loaded = hf_prune.AutoPrunedModel.from_pretrained(path)
    assert_same_model(model, loaded, x)
    assert PruningConfig.from_pretrained(path) == config  # the published settings reproduce the config
    with pytest.raises(ValueError, match="hf_prune_"):  # plain transformers refuses instead of loading wrong
        AutoModelForImageClassification.from_pretrained(path)


# ------------------------------------------------------------------------------------------ Trainer


_RUNS: dict = {}


def trained(method, kind, tmp_path_factory, data):
    """One uninterrupted Trainer run per (method, model) with checkpoints every 3 steps, shared by the tests."""
    key = (method, kind)
    if key not in _RUNS:
        out = tmp_path_factory.mktemp(f"{method}-{kind}")
        _RUNS[key] = (*train(method, kind, out, data, args=targs(out, save_strategy="steps", save_steps=3)), out)
    return _RUNS[key]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_trainer_save_model_and_save_pretrained_reload_exact(method, kind, tmp_path, tmp_path_factory, data):
    _, val, _ = data
    dense_params = sum(p.numel() for p in build(kind).parameters())
    model, cb, trainer, _ = trained(method, kind, tmp_path_factory, data)
    assert cb.finished and cb.record["method"] == method
    assert_pruned(method, model, dense_params)
    x = val.pixel_values[:8]
    trainer.save_model(str(tmp_path / "save_model"))
    assert_same_model(model, hf_prune.AutoPrunedModel.from_pretrained(tmp_path / "save_model"), x)
    model.save_pretrained(tmp_path / "save_pretrained")
    assert_same_model(model, hf_prune.AutoPrunedModel.from_pretrained(tmp_path / "save_pretrained"), x)
    assert PruningConfig.from_pretrained(tmp_path / "save_model") == cb.config
    logged = [h for h in trainer.state.log_history if any(k.startswith("prune/") for k in h)]
    assert logged, trainer.state.log_history


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted(method, tmp_path, tmp_path_factory, data):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    full, full_cb, _, _ = trained(method, "vit", tmp_path_factory, data)
    args = targs(tmp_path / "part", save_strategy="steps", save_steps=3)
    train(method, "vit", tmp_path / "part", data, args=args, callbacks=[StopAt()])
    ckpt = tmp_path / "part" / "checkpoint-3"
    state = json.loads((ckpt / "hf_prune_state.json").read_text())
    assert state["method"] == method and state["global_step"] == 3
    # the same starting model (SP distils from it); steps 3-5 start from the checkpoint's weights and state
    resumed, resumed_cb, _ = train(method, "vit", tmp_path / "part", data, args=args, resume=str(ckpt))
    assert_same_model(full, resumed, data[1].pixel_values[:8])
    assert resumed_cb.record == full_cb.record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_end_identical(tmp_path):
    """Every method's callback under DDP with 2 real gloo processes: both ranks end with the same model."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                      os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "contract_worker.py"), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(METHODS)
    for method in METHODS:
        assert ranks[0][method] == ranks[1][method], method
        assert ranks[0][method]["record"]["method"] == method


# ------------------------------------------------------------------------------------------ Hub, config


@pytest.mark.parametrize("method", METHODS)
def test_push_and_load_by_repo_id(method, hub_server, data):
    _, val, calib = data
    model = build("vit")
    config = get_method(method).config_cls(**settings(method))
    hf_prune.prune(model, config, example_inputs={"pixel_values": val.pixel_values[:4]}, calib=calib)
    repo = f"test-user/contract-{method}"
    hf_prune.push_to_hub(model, repo)
    assert_same_model(model, hf_prune.AutoPrunedModel.from_pretrained(repo), val.pixel_values[:8])
    assert PruningConfig.from_pretrained(repo) == config


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trip(method, tmp_path):
    entry = get_method(method)
    config = entry.config_cls(**settings(method, training=True))
    assert config.method == method
    data = json.loads(json.dumps(config.to_dict()))
    assert entry.config_cls.from_dict(data) == config
    assert PruningConfig.from_dict(data) == config  # the "method" key picks the class
    config.save_pretrained(tmp_path)
    assert PruningConfig.from_pretrained(tmp_path) == config
    assert PruningConfig.from_pretrained(tmp_path / "hf_prune_config.json") == config
    assert entry.config_cls.build(data) == config and entry.callback_cls(data).config == config
    with pytest.raises(ConfigError, match="no field"):
        entry.config_cls.from_dict({**data, "not_a_field": 1})
    with pytest.raises(ConfigError, match="unknown method"):
        PruningConfig.from_dict({**data, "method": "not_a_method"})


# ------------------------------------------------------------------------------------------ bad targets

INVALID = {"target_macs": 1.5, "sparsity": 1.0, "num_blocks": 0}
UNREACHABLE = {"target_macs": 0.001, "num_blocks": 10_000}


@pytest.mark.parametrize("method", METHODS)
def test_invalid_target_fails_when_the_callback_is_built(method):
    entry = get_method(method)
    key = next(k for k in INVALID if k in entry.example)
    with pytest.raises(ConfigError, match=key):
        entry.callback_cls(**{**settings(method, training=True), key: INVALID[key]})
    with pytest.raises(ConfigError, match=key):
        hf_prune.prune(build("vit"), method, **{**entry.example, key: INVALID[key]})


@pytest.mark.parametrize("method", [m for m in METHODS if any(k in get_method(m).example for k in UNREACHABLE)])
def test_unreachable_target_fails_before_training(method, tmp_path, data):
    entry = get_method(method)
    key = next(k for k in UNREACHABLE if k in entry.example)
    model = build("vit")
    before = copy.deepcopy(model.state_dict())
    cb = entry.callback_cls(**{**settings(method, training=True), key: UNREACHABLE[key]})
    trainer = entry.trainer_cls(model=model, args=targs(tmp_path), train_dataset=data[0], callbacks=[cb])
    with pytest.raises(ConfigError, match=key):
        trainer.train()
    assert trainer.state.global_step == 0
    after = {k: v for k, v in model.state_dict().items() if k in before}
    assert all(torch.equal(before[k], after[k]) for k in before)
