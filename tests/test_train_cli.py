"""``hf-prune train``: every registered method trains, prunes, saves and reloads on a tiny ViT and real digits.

* every method in ``hf_prune.list_methods()`` (its registry ``example`` settings, given with ``--set``): the
  saved folder loads with ``AutoPrunedModel``, reproduces the accuracy and loss the command reported on the
  held-out images (with the image processor saved beside it), and its settings equal the config;
* ``--config FILE`` + ``--push-to-hub`` to the local Hub server: the repo loads exactly like the folder;
* two real processes under ``accelerate launch --multi_gpu`` (gloo): one save, by the main process;
* usage errors fail before any training with exit status 2 and a message naming the flag.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_prune
from hf_prune.cli import train as train_cmd
from hf_prune.cli.main import main
from hf_prune.config import PruningConfig
from hf_prune.registry import get_method, list_methods

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
IMAGE = 32
# Schedules that finish inside the 4 training steps.
TRAINING = {"start": 0, "end": 0.5, "frequency": 1, "anneal_start": 0.0, "anneal_end": 0.5}
RUN = ["--dataset", "builtin:digits", "--max-steps", "4", "--per-device-train-batch-size", "16",
       "--per-device-eval-batch-size", "64", "--max-train-samples", "256", "--max-eval-samples", "64",
       "--learning-rate", "1e-3", "--use-cpu", "--save-strategy", "no", "--report-to", "none", "--seed", "0",
       "--disable-tqdm", "true", "--logging-steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A model folder as a user has one: a ViT config and its image processor (no weights: random init)."""
    import transformers as T

    folder = tmp_path_factory.mktemp("tiny-vit")
    T.ViTConfig(image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0).save_pretrained(folder)
    T.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    return str(folder)


def settings(method: str) -> dict:
    entry = get_method(method)
    return {**entry.example, **{k: v for k, v in TRAINING.items() if k in entry.config_cls.field_names()}}


def set_flags(fields: dict) -> list[str]:
    return [a for k, v in fields.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def held_out(tiny: str):
    """The held-out digits exactly as the command saw them, preprocessed by the processor saved with the model."""
    from transformers import AutoImageProcessor

    _, opts = train_cmd.parse([tiny, "--output-dir", "unused", *RUN])
    data = train_cmd.load_data(opts, seed=0)
    processor = AutoImageProcessor.from_pretrained(tiny)
    images = [train_cmd.rgb_image(x) for x in data.eval["image"]]
    return processor(images=images, return_tensors="pt")["pixel_values"], torch.tensor(data.eval["label"])


def assert_reproduces_report(out: Path, x, y):
    result = json.loads((out / "prune_results.json").read_text())
    model = hf_prune.AutoPrunedModel.from_pretrained(out).eval()
    from transformers import AutoImageProcessor

    assert AutoImageProcessor.from_pretrained(out).size == {"height": IMAGE, "width": IMAGE}  # pipeline-ready
    with torch.no_grad():
        output = model(pixel_values=x, labels=y)
    assert (output.logits.argmax(-1) == y).float().mean().item() == result["after"]["accuracy"]
    assert output.loss.item() == pytest.approx(result["after"]["loss"], rel=1e-5)
    return model, result


@pytest.mark.parametrize("method", list_methods())
def test_train_every_method_saves_a_model_that_reloads_and_reproduces_its_report(method, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    finetune = [] if get_method(method).kind == "weights" else ["--finetune-steps", "2"]  # the pruned model trains on
    code = main(["train", tiny, "--method", method, "--output-dir", str(out), *RUN, *finetune,
                 *set_flags(settings(method))])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert f"saved to {out}" in captured.out
    model, result = assert_reproduces_report(out, *held_out(tiny))
    config = get_method(method).config_cls(**settings(method))
    assert PruningConfig.from_pretrained(out) == config and result["config"] == config.to_dict()
    assert result["steps"] == 4 and result["train_items"] == 256 and result["world_size"] == 1
    assert result["finetune_steps"] == (2 if finetune else 0)
    if get_method(method).kind == "weights":
        assert result["stats"]["global_sparsity"] == pytest.approx(settings(method)["sparsity"], abs=0.02)
    else:
        from transformers import AutoConfig, AutoModelForImageClassification

        dense = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(tiny))
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())


def test_train_with_config_file_and_push_to_hub(tiny, tmp_path, hub_server, capsys):
    from huggingface_hub import ModelCard

    config = hf_prune.DepGraphConfig(target_macs=0.7, schedule="linear", start=0, end=0.5)
    config.save_pretrained(tmp_path / "settings")
    out, repo = tmp_path / "out", f"{hub_server.user}/tiny-vit-train"
    code = main(["train", tiny, "--config", str(tmp_path / "settings" / "hf_prune_config.json"), "--output-dir",
                 str(out), "--push-to-hub", repo, "--finetune-steps", "2", "--json", *RUN])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["pushed_to"] and result["finetune_steps"] == 2 and result["config"] == config.to_dict()
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json"} <= set(
        hub_server.list_files(repo))
    local = hf_prune.AutoPrunedModel.from_pretrained(out)
    pushed = hf_prune.AutoPrunedModel.from_pretrained(repo)
    assert all(torch.equal(a, b) for a, b in zip(local.state_dict().values(), pushed.state_dict().values()))
    assert PruningConfig.from_pretrained(repo) == config
    card = ModelCard(hub_server.read_file(repo, "README.md").decode())
    assert card.data.eval_results[0].metric_value == result["after"]["accuracy"]
    assert card.data.eval_results[0].dataset_name == "scikit-learn digits"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_under_accelerate_launch_with_two_processes(tiny, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "hf_prune.cli.main", "--threads", "1", "train", tiny, "--method", "depgraph",
           "--target-macs", "0.6", "--set", "end=0.5", "--output-dir", str(out), *RUN]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("saved to") == 1  # the main process saves and reports; the other one does not
    model, result = assert_reproduces_report(out, *held_out(tiny))
    assert result["world_size"] == 2 and result["stats"]["macs_after"] <= 0.6 * result["stats"]["macs_before"]
    assert PruningConfig.from_pretrained(out) == hf_prune.DepGraphConfig(target_macs=0.6, end=0.5)


# ------------------------------------------------------------------------------------------ before training


@pytest.mark.parametrize("argv,message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "depgraph", "--num-blocks", "2"], "does not take --num-blocks"),
    (["--method", "magnitude", "--sparsity", "0.5", "--finetune-steps", "2"], "grow back"),
    (["--method", "depgraph", "--target-macs", "0.5", "--set", "sparsity"], "FIELD=VALUE"),
    (["--method", "depgraph", "--target-macs", "0.5", "--set", "shedule=linear"], "did you mean"),
    (["--method", "depgraph", "--target-macs", "1.5"], "target_macs"),
    (["--method", "updp", "--num-blocks", "1", "--lr-restarts"], "sparsity schedule"),
    (["--method", "stagewise", "--target-macs", "0.5", "--distill"], "StageWiseTrainer"),
    (["--method", "ovit", "--sparsity", "0.5", "--distill-label-weight", "0.5"], "add --distill"),
])
def test_bad_settings_fail_before_training(argv, message, tiny, tmp_path, capsys):
    assert main(["train", tiny, "--output-dir", str(tmp_path), *RUN, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_usage(tiny, capsys):
    assert main(["train", tiny, *RUN]) == 2 and "--output-dir" in capsys.readouterr().err
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--method", "--set", "--dataset", "--max-steps", "--learning-rate",
                                         "--push-to-hub [REPO]"))
    assert main(["prune", "resnet18", "--max-steps", "4"]) == 2  # other commands still refuse unknown flags
    assert main(["train", tiny, "--output-dir", "o", *RUN, "--push-to-hub"]) == 2
    assert "--hub-model-id" in capsys.readouterr().err
    _, opts = train_cmd.parse([tiny, "--output-dir", "o", *RUN, "--push-to-hub", "--hub-model-id", "me/x"])
    assert opts.push_repo == "me/x"


def test_only_push_to_hub_replaces_a_trainer_flag():
    import argparse

    from transformers import HfArgumentParser, TrainingArguments

    ours = argparse.ArgumentParser(add_help=False)
    train_cmd.add_arguments(ours)
    trainer = HfArgumentParser(TrainingArguments)
    shared = set(ours._option_string_actions) & set(trainer._option_string_actions)
    assert shared == {"--push-to-hub", "--push_to_hub"}


# ------------------------------------------------------------------------------------------ models


def test_new_head_keeps_every_other_weight(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    base = T.ViTForImageClassification(T.ViTConfig(image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=64, num_labels=5))
    base.save_pretrained(tmp_path / "five")
    labels = [str(i) for i in range(10)]
    _, opts = train_cmd.parse([str(tmp_path / "five"), "--output-dir", "unused", "--dataset", "builtin:digits"])
    with pytest.raises(train_cmd.CLIError, match="--new-head"):
        train_cmd.load_training_model(opts, labels)
    opts.new_head = True
    model = train_cmd.load_training_model(opts, labels)
    assert model.config.num_labels == 10 and model.config.id2label[3] == "3"
    new, old = model.state_dict(), base.state_dict()
    assert {k for k in old if not torch.equal(new[k], old[k]) or new[k].shape != old[k].shape} <= \
        {"classifier.weight", "classifier.bias"}
    assert new["classifier.weight"].shape == (10, 32)


def test_timm_name_is_preprocessed_by_timm_at_the_requested_size():
    _, opts = train_cmd.parse(["resnet18", "--output-dir", "unused", "--dataset", "builtin:digits",
                               "--image-size", "48"])
    model = train_cmd.load_training_model(opts, [str(i) for i in range(10)])
    processor, preprocess = train_cmd.preprocessing(model, None)
    from PIL import Image

    x = preprocess([Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (100, 60))])
    assert x.shape == (2, 3, 48, 48)
    mean, std = processor.data_config["mean"], processor.data_config["std"]
    assert torch.allclose(x[0, :, 24, 24], (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(mean)) / torch.tensor(std))
    assert model(pixel_values=x).logits.shape == (2, 10)


# ------------------------------------------------------------------------------------------ data


def test_image_folder_and_saved_dataset(tmp_path):
    """An image folder (one sub-folder per class; held-out items split off) and a ``save_to_disk`` dataset whose
    labels are strings and whose columns have other names (its own test split; labels indexed in sorted order)."""
    import datasets
    import numpy as np
    from PIL import Image

    for cls, colour in (("cat", 40), ("dog", 200)):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((12, 10, 3), colour + i, np.uint8)).save(tmp_path / "photos" / cls / f"{i}.png")
    _, opts = train_cmd.parse(["m", "--output-dir", "o", "--dataset", str(tmp_path / "photos"), "--val-fraction", "0.2"])
    data = train_cmd.load_data(opts, seed=0)
    assert data.labels == ["cat", "dog"] and (len(data.train), len(data.eval)) == (8, 2)
    assert data.card == {"name": "photos", "split": "0.2 of train"}
    batch = train_cmd.with_preprocessing(data.train, lambda images: torch.stack(
        [torch.as_tensor(np.array(im), dtype=torch.float32).mean() for im in images]), None)[:8]
    dark = batch["pixel_values"] < 100  # the images' own colours: cats are dark, dogs bright
    assert torch.equal(batch["labels"], (~dark).long())

    table = {"img": [np.full((4, 4), v, np.uint8) for v in (0, 255, 0, 255)], "kind": ["b", "w", "b", "w"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table), "test": datasets.Dataset.from_dict(
        {"img": table["img"][:2], "kind": ["w", "b"]})}).save_to_disk(tmp_path / "saved")
    _, opts = train_cmd.parse(["m", "--output-dir", "o", "--dataset", str(tmp_path / "saved"), "--label-column",
                               "kind"])
    data = train_cmd.load_data(opts, seed=0)
    assert data.labels == ["b", "w"] and data.label_index == {"b": 0, "w": 1} and data.card["split"] == "test"
    held_out = train_cmd.with_preprocessing(data.eval, lambda images: torch.stack(
        [torch.as_tensor(np.array(im), dtype=torch.float32).mean() for im in images]), data.label_index)[:2]
    assert held_out["labels"].tolist() == [1, 0] and held_out["pixel_values"].tolist() == [0.0, 255.0]
    _, opts = train_cmd.parse(["m", "--output-dir", "o", "--dataset", str(tmp_path / "saved"), "--label-column", "x"])
    with pytest.raises(train_cmd.CLIError, match="--label-column x"):
        train_cmd.load_data(opts, seed=0)


def test_trainers_script_is_hf_prune_train():
    """``trainers/train.py`` (for launchers that take a file) is the same program as ``hf-prune train``."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "trainers" / "train.py"
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: hf-prune train")


def test_ovit_gradual_recipe_end_to_end(tiny, tmp_path, capsys):
    """oViT's recipe through the command: cubic schedule from 40%, learning-rate restarts at every pruning step
    and distillation from the dense model mixed with the labels; the saved model reproduces its report."""
    out = tmp_path / "out"
    code = main(["train", tiny, "--method", "ovit", "--sparsity", "0.6", "--output-dir", str(out), *RUN,
                 *set_flags({"initial": 0.4, "start": 0, "end": 0.5, "num_grads": 4, "block_size": 16}),
                 "--lr-restarts", "cosine", "--distill", "--distill-temperature", "2", "--distill-label-weight", "0.5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    _, result = assert_reproduces_report(out, *held_out(tiny))
    assert result["recipe"] == {"lr_restarts": "cosine", "distill": True, "distill_temperature": 2.0,
                                "distill_label_weight": 0.5}
    assert result["stats"]["global_sparsity"] == pytest.approx(0.6, abs=0.02)
