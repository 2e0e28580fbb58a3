"""Pruning callbacks inside the Trainer's own integrations: reporting (TensorBoard) and ``Trainer.push_to_hub``.

* ``prune/*`` scalars reach a ``report_to`` integration: TensorBoard's event files hold exactly the values
  the Trainer logged, for a structured method (DepGraph) and a weight method (magnitude);
* ``Trainer.push_to_hub`` (with ``push_to_hub=True`` in the arguments, through ``trainer.save_model()``, and
  an explicit ``trainer.push_to_hub()``) uploads hf_prune's card (pruning facts, how to load, the metrics of
  the Trainer's last evaluation) instead of the Trainer's generic one, and a checkpoint that
  ``AutoPrunedModel.from_pretrained(repo_id)`` loads exactly.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import hf_prune
from hf_prune.registry import get_method

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = 32
SETTINGS = {"depgraph": {"target_macs": 0.6, "start": 0, "end": 0.5, "frequency": 1},
            "magnitude": {"sparsity": 0.5, "start": 0, "end": 0.5, "frequency": 1}}


def tiny_vit():
    import transformers as T

    torch.manual_seed(0)
    return T.ViTForImageClassification(T.ViTConfig(
        image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


@pytest.fixture(scope="module")
def data():
    from hf_prune.data import load_digits

    train, val = load_digits(source="sklearn", image_size=IMAGE, channels=3)
    return train, torch.utils.data.Subset(val, range(64))


def accuracy(pred):
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((logits.argmax(-1) == pred.label_ids).mean())}


def make_trainer(method, out, data, **kw):
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(out), use_cpu=True, seed=0, report_to=[], save_strategy="no", max_steps=4,
                per_device_train_batch_size=16, per_device_eval_batch_size=32, learning_rate=1e-3, logging_steps=1,
                disable_tqdm=True, dataloader_num_workers=0)
    args.update(kw)
    callback = get_method(method).callback_cls(**SETTINGS[method])
    model = tiny_vit()
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=data[0], eval_dataset=data[1],
                      compute_metrics=accuracy, callbacks=[callback])
    return model, callback, trainer


def train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


# ------------------------------------------------------------------------------------------ reporting


@pytest.mark.parametrize("method,key", [("depgraph", "macs_ratio"), ("magnitude", "sparsity")])
def test_prune_scalars_reach_tensorboard(method, key, tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, callback, trainer = make_trainer(method, tmp_path, data, report_to=["tensorboard"])
    train(trainer)
    logged = {h["step"]: h[f"prune/{key}"] for h in trainer.state.log_history if f"prune/{key}" in h}
    assert len(logged) >= 4, trainer.state.log_history

    events = [p.parent for p in (tmp_path / "runs").rglob("events.out.tfevents.*")]
    assert len(events) == 1, events
    board = EventAccumulator(str(events[0]))
    board.Reload()
    tag = f"train/prune/{key}"  # the Trainer's TensorBoard integration files training logs under train/
    assert tag in board.Tags()["scalars"], board.Tags()["scalars"]
    written = {e.step: e.value for e in board.Scalars(tag)}
    assert written.keys() == logged.keys()
    assert all(written[s] == pytest.approx(logged[s], rel=1e-6) for s in logged)  # TensorBoard keeps float32
    final = callback.record["stats"]
    if method == "depgraph":
        assert written[max(written)] <= 0.6 + 1e-6 and written[min(written)] > written[max(written)]
    else:
        assert written[max(written)] == pytest.approx(final["global_sparsity"], abs=1e-6) and final["global_sparsity"] >= 0.49


# ------------------------------------------------------------------------------------------ Trainer.push_to_hub


def assert_same_model(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(pixel_values=x).logits, b(pixel_values=x).logits)


@pytest.mark.parametrize("how", ["push_to_hub_argument", "explicit_push"])
def test_trainer_push_uploads_the_pruning_card_and_a_loadable_checkpoint(how, hub_server, tmp_path, data):
    from huggingface_hub import ModelCard

    repo = f"{hub_server.user}/trainer-push-{how.replace('_', '-')}"
    if how == "push_to_hub_argument":  # checkpoints are pushed while training; save_model() pushes at the end
        model, callback, trainer = make_trainer("depgraph", tmp_path, data, push_to_hub=True, hub_model_id=repo,
                                                save_strategy="steps", save_steps=2)
    else:
        model, callback, trainer = make_trainer("depgraph", tmp_path, data, hub_model_id=repo)
    train(trainer)
    assert callback.finished
    evaluation = trainer.evaluate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # metrics without a dataset: shown in the card, not in model-index
        if how == "push_to_hub_argument":
            trainer.save_model()
        else:
            trainer.push_to_hub(dataset="scikit-learn digits", dataset_tags="sklearn/digits", tags=["digits"])

    text = hub_server.read_file(repo, "README.md").decode()
    assert "This model is a fine-tuned version" not in text and "Training hyperparameters" not in text  # not the Trainer's
    assert f'AutoPrunedModel.from_pretrained("{repo}")' in text and "using **depgraph**" in text
    assert f"| accuracy | {evaluation['eval_accuracy']} |" in text  # the Trainer's last evaluation
    card = ModelCard(text)
    assert {"hf_prune", "pruning", "depgraph"} <= set(card.data.tags)
    if how == "explicit_push":
        assert "digits" in card.data.tags and card.data.datasets == ["sklearn/digits"]
        (result,) = card.data.eval_results
        assert (result.metric_type, result.metric_value, result.dataset_type) == \
            ("accuracy", evaluation["eval_accuracy"], "sklearn/digits")
    assert {"config.json", "model.safetensors", "pruned_layers.png"} <= set(hub_server.list_files(repo))

    loaded = hf_prune.AutoPrunedModel.from_pretrained(repo)
    assert_same_model(model, loaded, data[1][0]["pixel_values"][None].repeat(4, 1, 1, 1))
    assert hf_prune.PruningConfig.from_pretrained(repo) == callback.config
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in tiny_vit().parameters())


def test_trainer_card_is_the_trainers_own_before_the_model_is_pruned(hub_server, tmp_path, data):
    """Pushing before the callback finished uploads the Trainer's card: there is no pruned structure to describe."""
    repo = f"{hub_server.user}/trainer-push-dense"
    _, callback, trainer = make_trainer("depgraph", tmp_path, data, hub_model_id=repo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.push_to_hub()
    assert not callback.finished
    text = hub_server.read_file(repo, "README.md").decode()
    assert "AutoPrunedModel" not in text and "hf_prune" not in text
