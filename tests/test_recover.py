"""Label-free recovery by distillation: hf_prune.recover and DistillationTrainer, on real digits."""
from __future__ import annotations

import copy

import pytest
import torch

import hf_prune
from hf_prune.data import make_loader
from hf_prune.engine.pruner import StructuredPruner
from hf_prune.errors import ConfigError
from hf_prune.recovery import distillation_loss, random_views
from small_cnn import trained_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _agreement(model, dense, x) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == dense(x).argmax(1)).float().mean())


def _raw(split) -> torch.Tensor:
    """The split's images back in [0, 1] (they are stored normalised)."""
    mean, std = torch.tensor(split.mean).view(1, -1, 1, 1), torch.tensor(split.std).view(1, -1, 1, 1)
    return (split.pixel_values * std + mean).clamp(0, 1)


def _pruned(target=0.6):
    dense, train, val = trained_cnn()
    model = copy.deepcopy(dense)
    StructuredPruner(model, val.pixel_values[:2], round_to=None).step(target_macs=target, compacted=True)
    return model, dense, train, val


def test_distillation_raises_agreement_without_labels():
    model, dense, train, val = _pruned()
    before = _agreement(model, dense, val.pixel_values)
    raw = _raw(train)[:512]  # unlabeled images in [0, 1]; the evaluation digits are held out
    stats = hf_prune.recover(model, dense, raw, steps=30, lr=3e-3, batch_size=32, size=8, mean=train.mean,
                             std=train.std, scale=(0.6, 1.0), progress=False)
    after = _agreement(model, dense, val.pixel_values)
    assert stats["steps"] == 30 and stats["loss_last"] < 0.5 * stats["loss_first"]
    assert after > before + 0.3 and after > 0.75, (before, after)
    assert not model.training  # modes given back


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_recover_from_a_dataloader_of_preprocessed_batches(mixup):
    model, dense, train, val = _pruned()
    before = _agreement(model, dense, val.pixel_values)
    hf_prune.recover(model, dense, make_loader(train, batch_size=64, shuffle=True), steps=30, lr=3e-3,
                     scale=(0.6, 1.0), mixup=mixup, progress=False)
    assert _agreement(model, dense, val.pixel_values) > before + 0.3


@pytest.mark.parametrize("kind", ["weights", "structured_masks"])
def test_masks_stay_enforced(kind):
    dense, train, val = trained_cnn()
    model = copy.deepcopy(dense)
    if kind == "weights":
        hf_prune.prune(model, method="magnitude", sparsity=0.7)
        zero = {n: p == 0 for n, p in model.named_parameters() if p.dim() > 1}
    else:
        StructuredPruner(model, val.pixel_values[:2], round_to=None).step(target_macs=0.5)
        zero = {n: p == 0 for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    hf_prune.recover(model, dense, make_loader(train, batch_size=32), steps=3, lr=1e-2, progress=False)
    params = dict(model.named_parameters())
    assert sum(int(z.sum()) for z in zero.values()) > 1000
    for n, z in zero.items():
        assert not params[n][z].any(), n
    assert any(not torch.equal(params[n], start[n]) for n in params)  # it did train


def test_views_and_loss():
    img = torch.rand(3, 40, 60)
    views = random_views(img, 5, 16, generator=torch.Generator().manual_seed(1))
    assert views.shape == (5, 3, 16, 16) and 0 <= float(views.min()) and float(views.max()) <= 1
    again = random_views(img, 5, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(views, again)
    logits = torch.randn(4, 10)
    assert float(distillation_loss(logits, logits, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, -logits)) > 0.1


def test_mixup_blends_views_of_the_batch_reproducibly():
    from hf_prune.recovery import _mixed

    x = torch.rand(6, 3, 4, 4)
    a = _mixed(x, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(a, _mixed(x, 0.4, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, x) and float(a.min()) >= float(x.min()) and float(a.max()) <= float(x.max())
    same = torch.rand(1, 3, 4, 4).expand(6, -1, -1, -1)
    torch.testing.assert_close(_mixed(same, 0.4, torch.Generator().manual_seed(3)), same)  # blends of one image
    blended = _mixed({"pixel_values": x, "other": 1}, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(blended["pixel_values"], a) and blended["other"] == 1
    assert _mixed(x, 0.0, torch.Generator()) is x


def test_images_from_a_folder(tmp_path):
    from PIL import Image

    model, dense, train, _ = _pruned()
    raw = _raw(train)[:3]
    for i, im in enumerate(raw):
        Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    stats = hf_prune.recover(model, dense, str(tmp_path), steps=2, batch_size=4, size=8, mean=train.mean,
                             std=train.std, progress=False)
    assert stats["steps"] == 2


def test_bad_inputs_are_refused(tmp_path):
    model, dense, train, _ = _pruned()
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        hf_prune.recover(model, dense, train.pixel_values[:8], steps=1, size=8, mean=train.mean, std=train.std)
    with pytest.raises(ConfigError, match="mean="):
        hf_prune.recover(model, dense, _raw(train)[:8], steps=1)
    with pytest.raises(ConfigError, match="no image files"):
        hf_prune.recover(model, dense, str(tmp_path), steps=1, size=8, mean=train.mean, std=train.std)
    with pytest.raises(ConfigError, match="mixup"):
        hf_prune.recover(model, dense, _raw(train)[:8], steps=1, size=8, mean=train.mean, std=train.std, mixup=-1.0)
    with pytest.raises(ConfigError, match="steps"):
        hf_prune.recover(model, dense, _raw(train)[:8], steps=0, size=8, mean=train.mean, std=train.std)


def test_distillation_trainer(tmp_path):
    from transformers import TrainingArguments

    from hf_prune.trainer.distill import DistillationTrainer

    model, dense, train, val = _pruned()
    hf_prune.prune(model, method="magnitude", sparsity=0.5)
    zero = {n: p == 0 for n, p in model.named_parameters() if p.dim() > 1}
    before = _agreement(model, dense, val.pixel_values)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, seed=0, report_to=[], save_strategy="no",
                             max_steps=30, per_device_train_batch_size=64, learning_rate=3e-3, disable_tqdm=True,
                             logging_strategy="no", dataloader_num_workers=0, remove_unused_columns=False)
    DistillationTrainer(model=model, teacher=dense, args=args, train_dataset=train, temperature=2.0).train()
    assert _agreement(model, dense, val.pixel_values) > before + 0.1
    params = dict(model.named_parameters())
    assert all(not params[n][z].any() for n, z in zero.items())
    with pytest.raises(ConfigError, match="label_weight"):
        DistillationTrainer(model=model, teacher=dense, args=args, train_dataset=train, label_weight=1.5)
    trainer = DistillationTrainer(model=model, teacher=dense, args=args, train_dataset=train, label_weight=0.5)
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(model, {"pixel_values": val.pixel_values[:4]})


def test_lr_restarts_callback_restarts_at_every_pruning_step(tmp_path):
    """In a Trainer the learning rate goes back to its peak at each pruning step of the callback's schedule
    and decays in between (the Trainer's own linear scheduler is rewritten); here with distillation, as in
    oViT's recipe."""
    from transformers import TrainerCallback, TrainingArguments

    from hf_prune.trainer.distill import DistillationTrainer
    from hf_prune.trainer.restarts import LRRestartsCallback

    model, dense, train, _ = _pruned()
    pruning = hf_prune.MagnitudeCallback(sparsity=0.5, start=0, end=6, frequency=3)
    seen = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.append(optimizer.param_groups[0]["lr"])

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, seed=0, report_to=[], save_strategy="no",
                             max_steps=12, per_device_train_batch_size=16, learning_rate=1e-2, disable_tqdm=True,
                             logging_strategy="no", dataloader_num_workers=0, remove_unused_columns=False,
                             lr_scheduler_type="linear")
    DistillationTrainer(model=model, teacher=dense, args=args, train_dataset=train,
                        callbacks=[pruning, LRRestartsCallback(pruning, decay="linear"), Record()]).train()
    assert pruning.schedule.pruning_steps(12) == [0, 3, 6]
    assert seen[0] == seen[3] == seen[6] == pytest.approx(1e-2)  # restarts
    assert seen[2] == pytest.approx(1e-2 / 3) and seen[11] == pytest.approx(1e-2 / 6)  # decayed in each cycle
    with pytest.raises(ConfigError, match="sparsity schedule"):
        LRRestartsCallback(hf_prune.UPDPCallback(num_blocks=1))
