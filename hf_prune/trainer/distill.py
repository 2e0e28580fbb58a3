"""Distillation inside a ``transformers.Trainer``: :class:`DistillationTrainer`.

A ``TrainerCallback`` sees neither the inputs nor the outputs of a step and cannot change the loss;
in transformers, anything that changes the loss is a ``Trainer`` subclass (a callback that patched
the model's forward to rewrite ``outputs.loss`` would silently stop working with ``compute_loss_func``,
label smoothing or models that return no loss). So distillation is a Trainer subclass whose
``compute_loss`` adds the teacher's term, and it combines with the pruning callbacks as usual::

    trainer = DistillationTrainer(model=model, teacher=hf_prune.dense_teacher(model), args=args, train_dataset=train,
                                  callbacks=[hf_prune.DepGraphCallback(target_macs=0.5)])

Labels are optional: with ``label_weight=0`` (the default) the loss is the distillation term alone and
the dataset needs no labels; ``label_weight`` in (0, 1] mixes in the cross-entropy on the labels. Masks the
model carries (weight masks of one-shot weight pruning, structured masks of ``compact=False``) are
enforced after every optimizer step.
"""
from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from ..core.checks import check_fraction, check_number
from ..core.distributed import unwrap
from ..core.inputs import LABEL_KEYS, logits_of, model_inputs
from ..errors import ConfigError
from ..recovery import _enforce_masks, distillation_loss

__all__ = ["DistillationTrainer"]


class _EnforceMasks(TrainerCallback):
    """Zero pruned weights again after every optimizer step (a no-op for a model without masks)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _enforce_masks(unwrap(model))


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``(1 − label_weight) · T² · KL(teacher ‖ student) + label_weight · CE(labels)``
    (:func:`hf_prune.recovery.distillation_loss`).

    teacher: the dense model (:func:`hf_prune.recovery.dense_teacher` copies it before pruning), run in eval
    mode without gradients on the same inputs (moved to the training device on first use). temperature:
    ``T``. label_weight: weight of the cross-entropy (needs ``labels`` in the batches); 0 distils only.
    Every other argument is ``Trainer``'s. Evaluation (the model in eval mode) computes the task's own
    loss, as a plain ``Trainer`` would.
    """

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it for gradient accumulation

    def __init__(self, *args, teacher: torch.nn.Module, temperature: float = 1.0, label_weight: float = 0.0,
                 **kwargs):
        self.teacher = teacher
        self.temperature = check_number("temperature", temperature, positive=True)
        self.label_weight = check_fraction("label_weight", label_weight, closed_low=True,
                                           meaning="weight of the cross-entropy on labels; 0 distils only")
        super().__init__(*args, **kwargs)
        self.add_callback(_EnforceMasks())
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def _teacher_logits(self, inputs: dict, device) -> torch.Tensor:
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        self.teacher.eval()
        args, kwargs = model_inputs(self.teacher, inputs)
        with torch.no_grad():
            return logits_of(self.teacher(*args, **kwargs))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation reports the task's own loss, comparable with a plain Trainer's
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = next((inputs.pop(k) for k in LABEL_KEYS if k in inputs), None)
        for k in LABEL_KEYS:
            inputs.pop(k, None)
        if self.label_weight > 0 and labels is None:
            raise ConfigError(f"DistillationTrainer: label_weight={self.label_weight} weighs a cross-entropy on "
                              f"labels, but the batch has none (keys {sorted(inputs)}); set label_weight=0 to distil "
                              "without labels")
        args, kwargs = model_inputs(unwrap(model), inputs)
        outputs = model(*args, **kwargs)
        logits = logits_of(outputs)
        loss = distillation_loss(logits, self._teacher_logits(inputs, logits.device), labels,
                                 temperature=self.temperature, label_weight=self.label_weight)
        return (loss, outputs) if return_outputs else loss
