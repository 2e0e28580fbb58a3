"""Label-free recovery of a pruned model by distillation from its dense original: :func:`recover`.

The student (the pruned model) learns to match the teacher's (the dense model's) temperature-scaled
output distribution on random views of unlabeled images, so any folder of photos from the target
domain is enough; no labels and no Trainer are needed. Structured (compacted or masked) and
weight-pruned models both work: masks are enforced again after every optimizer step, so pruned
weights stay zero.

Images come as a tensor ``(N, 3, H, W)``, a list of ``(3, H, W)`` tensors (sizes may differ) or a
folder of image files, all with values in [0, 1]; views are random resized crops and flips at the
model's input size, normalised with ``mean`` / ``std``. A DataLoader (or any iterable of batches)
instead yields model inputs that are already preprocessed; views of those are crops and flips of the
given tensors. :func:`distillation_loss`, :func:`dense_teacher` and :func:`random_views` are shared with
:class:`hf_prune.trainer.distill.DistillationTrainer` and the benchmarks.
"""
from __future__ import annotations

import math
import os
import copy
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .core.checks import check_choice, check_fraction, check_int, check_number
from .core.inputs import call_model, logits_of, model_device, split_batch
from .errors import ConfigError

__all__ = ["recover", "distillation_loss", "dense_teacher", "random_views", "load_images"]

OPTIMIZERS = ("adamw", "sgd")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      *, temperature: float = 1.0, label_weight: float = 0.0) -> torch.Tensor:
    """``(1 − label_weight) · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + label_weight · CE(student,
    labels)``, averaged over the batch (Hinton et al.; the ``T²`` keeps gradient sizes comparable across
    temperatures). ``label_weight=0`` (or no labels) distils only. The teacher's logits are detached."""
    t = check_number("temperature", temperature, positive=True)
    label_weight = check_fraction("label_weight", label_weight, closed_low=True,
                                  meaning="weight of the cross-entropy on labels; 0 distils only")
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} differ in shape: distil from the dense model the "
                          "student was pruned from")
    s = F.log_softmax(student_logits.float().reshape(-1, student_logits.shape[-1]) / t, dim=-1)
    q = F.log_softmax(teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]) / t, dim=-1)
    kd = F.kl_div(s, q, log_target=True, reduction="batchmean") * (t * t)
    if labels is None or label_weight == 0.0:
        return kd
    ce = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]),
                         labels.reshape(-1).to(student_logits.device))
    return (1.0 - label_weight) * kd + label_weight * ce


def dense_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (eval mode, no gradients) to distil from, taken before pruning. Weight masks
    live in the model's ``__dict__``; the copy does not take them, so it stays dense."""
    from .sparse.masks import ATTR

    masks = model.__dict__.pop(ATTR, None)
    try:
        teacher = copy.deepcopy(model)
    finally:
        if masks is not None:
            model.__dict__[ATTR] = masks
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _crop_box(h: int, w: int, scale, ratio, g: torch.Generator) -> tuple[int, int, int, int]:
    """A random box covering ``scale`` of the area with aspect ``ratio`` (torchvision's sampling)."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=g))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_r, generator=g)))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            j = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return i, j, ch, cw
    side = min(h, w)  # fallback: the central square
    return (h - side) // 2, (w - side) // 2, side, side


def random_views(image: torch.Tensor, n: int, size: int | tuple, *, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3),
                 flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random resized crops (and horizontal flips) of a ``(C, H, W)`` image, as ``(n, C, *size)``."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    h, w = image.shape[-2:]
    out = []
    for _ in range(n):
        i, j, ch, cw = _crop_box(h, w, scale, ratio, g)
        crop = image[None, :, i:i + ch, j:j + cw].float()
        view = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        if flip and bool(torch.rand(1, generator=g) < 0.5):
            view = view.flip(-1)
        out.append(view)
    return torch.stack(out)


def _resize(image: torch.Tensor, size: tuple) -> torch.Tensor:
    return F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def load_images(folder: str | os.PathLike) -> list[torch.Tensor]:
    """Every image file in ``folder`` (sorted by name) as a ``(3, H, W)`` float tensor in [0, 1]."""
    import numpy as np
    from PIL import Image

    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ConfigError(f"images={os.fspath(folder)!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) in that folder")
    out = []
    for f in files:
        with Image.open(os.path.join(folder, f)) as img:
            out.append(torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0)
    return out


def _image_list(images) -> list[torch.Tensor] | None:
    """Raw images as a list of (3, H, W) tensors in [0, 1], or None when ``images`` is a batch iterable."""
    if isinstance(images, (str, os.PathLike)):
        return load_images(images)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ConfigError(f"images: a tensor must be (N, C, H, W), got shape {tuple(images.shape)}")
        items = list(images)
    elif isinstance(images, (list, tuple)) and images and all(isinstance(t, torch.Tensor) for t in images):
        items = list(images)
    else:
        return None
    for k, t in enumerate(items):
        if t.dim() != 3:
            raise ConfigError(f"images[{k}] has shape {tuple(t.shape)}; each image must be (C, H, W)")
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ConfigError(f"images[{k}] has values in [{lo:.3g}, {hi:.3g}]; images must be in [0, 1] (they are "
                              "normalised with mean/std here). Pass already-normalised batches through a DataLoader.")
    return items


def _model_preprocessing(model: nn.Module, size, mean, std):
    """Input size and normalisation: the arguments, else timm's ``pretrained_cfg``; transformers models
    carry no normalisation (it lives in their image processor), so they must say it."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if size is None:
        if "input_size" in cfg:
            size = tuple(cfg["input_size"][-2:])
        elif isinstance(getattr(getattr(model, "config", None), "image_size", None), (int, tuple, list)):
            size = model.config.image_size
    if mean is None and std is None and "mean" in cfg and "std" in cfg:
        mean, std = cfg["mean"], cfg["std"]
    if size is None or mean is None or std is None:
        raise ConfigError(f"recover: give size= (input resolution) and mean=/std= (the normalisation the model was "
                          f"trained with, e.g. an image processor's image_mean/image_std) for {type(model).__name__}; "
                          f"got size={size!r}, mean={mean!r}, std={std!r}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size, torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)


class _ImageViews:
    """Endless batches of normalised random views of raw images."""

    def __init__(self, images, size, mean, std, batch_size, augment, scale, g):
        self.size, self.mean, self.std, self.batch_size = size, mean, std, batch_size
        self.augment, self.scale, self.g = augment, scale, g
        # Big photos are shrunk once so that every crop costs about the same: the smallest crop side
        # still has at least the input resolution.
        limit = max(size) * 2 / math.sqrt(scale[0])
        self.images = [im if max(im.shape[-2:]) <= limit else
                       _resize(im, tuple(max(1, round(s * limit / max(im.shape[-2:]))) for s in im.shape[-2:]))
                       for im in images]

    def __iter__(self):
        while True:
            picks = torch.randint(0, len(self.images), (self.batch_size,), generator=self.g).tolist()
            if self.augment:
                views = [random_views(self.images[k], 1, self.size, scale=self.scale, generator=self.g)[0] for k in picks]
            else:
                views = [_resize(self.images[k], self.size) for k in picks]
            yield (torch.stack(views) - self.mean) / self.std


def _pixel_key(inputs: Mapping) -> str:
    """The image entry of a dict of model inputs: ``pixel_values``, else the first one."""
    return "pixel_values" if "pixel_values" in inputs else next(iter(inputs))


class _BatchViews:
    """Endless passes over an iterable of preprocessed batches, with crops and flips of the pixel tensor."""

    def __init__(self, batches, augment, scale, g):
        self.batches, self.augment, self.scale, self.g = batches, augment, scale, g

    def _views(self, x: torch.Tensor) -> torch.Tensor:
        if not self.augment or x.dim() != 4:
            return x
        return torch.cat([random_views(im, 1, tuple(x.shape[-2:]), scale=self.scale, generator=self.g).to(x.dtype)
                          for im in x])

    def __iter__(self):
        empty = True
        while True:
            for batch in self.batches:
                empty = False
                inputs, _ = split_batch(batch)
                if isinstance(inputs, Mapping):
                    key = _pixel_key(inputs)
                    yield dict(inputs, **{key: self._views(inputs[key])})
                else:
                    yield self._views(inputs)
            if empty:
                raise ConfigError("recover: images= is an empty iterable")


def _mixed(inputs, alpha: float, g: torch.Generator):
    """Mixup of the pixel tensor: each view blended with another view of the batch, weight ~ Beta(α, α).

    Teacher and student see the same blend, so the student matches the teacher's function between
    images too, which a few photos alone do not cover."""
    if alpha <= 0:
        return inputs
    key = _pixel_key(inputs) if isinstance(inputs, Mapping) else None
    x = inputs if key is None else inputs[key]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] < 2:
        return inputs
    import numpy as np

    # torch's Beta sampler takes no generator; numpy's, seeded from ours, keeps runs reproducible
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=x.shape[0])).to(x.device, x.dtype).view(-1, 1, 1, 1)
    partner = torch.randperm(x.shape[0], generator=g)
    mixed = lam * x + (1 - lam) * x[partner.to(x.device)]
    return mixed if key is None else dict(inputs, **{key: mixed})


def _enforce_masks(model: nn.Module) -> None:
    from .engine.masks import get_mask
    from .sparse.masks import get_weight_masks

    weight_masks, mask = get_weight_masks(model), get_mask(model)
    if weight_masks is not None:
        weight_masks.enforce()
    if mask is not None:
        mask.enforce(model)


def recover(model: nn.Module, teacher: nn.Module, images, *, steps: int = 300, lr: float = 2e-5,
            batch_size: int = 32, augment: bool = True, temperature: float = 1.0, size=None, mean=None, std=None,
            scale=(0.25, 1.0), weight_decay: float = 0.0, warmup: float = 0.05, optimizer: str = "adamw",
            train_batchnorm: bool = False, mixup: float = 0.0, seed: int = 0, progress: bool = True) -> dict:
    """Distil ``teacher`` into ``model`` (in place) on unlabeled ``images``; returns stats.

    images: a ``(N, 3, H, W)`` tensor, a list of ``(3, H, W)`` tensors or a folder of image files
    (values in [0, 1]; views are cropped to ``size`` and normalised with ``mean`` / ``std``, by
    default the model's timm ``pretrained_cfg``), or a DataLoader / iterable of preprocessed batches.
    augment: random resized crops (area fraction in ``scale``) and horizontal flips; False resizes
    whole images. AdamW with ``lr``, ``weight_decay``, linear warm-up over ``warmup`` of the steps and
    cosine decay. The default ``lr`` is low on purpose: on a pretrained EfficientNet-Lite, AdamW at 1e-4
    on a few off-domain photos moved even the dense model away from itself within 30 steps, while 2e-5
    kept it; raise it when the images are many and from the target domain. The model runs in eval mode
    (dropout off, BatchNorm statistics frozen: a few hundred batches of a few photos would otherwise
    overwrite statistics estimated on the training set) unless ``train_batchnorm=True``, which lets
    BatchNorms update their statistics. ``mixup=α > 0`` blends each view with another one of its batch
    (weight ~ Beta(α, α)) before both models see it. Weight and structured masks are enforced after
    every step.

    Returns ``{"steps", "loss_first", "loss_last" (mean of the last 10 steps), "seconds"}``.
    """
    steps = check_int("steps", steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_number("lr", lr, positive=True)
    temperature = check_number("temperature", temperature, positive=True)
    weight_decay = check_number("weight_decay", weight_decay, minimum=0.0)
    warmup = check_fraction("warmup", warmup, closed_low=True, meaning="fraction of the steps spent warming up")
    mixup = check_number("mixup", mixup, minimum=0.0, meaning="the Beta(α, α) parameter of mixup; 0 turns it off")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"scale={scale!r} must be (low, high) area fractions with 0 < low <= high <= 1")
    g = torch.Generator().manual_seed(seed)
    raw = _image_list(images)
    if raw is not None:
        size_, mean_, std_ = _model_preprocessing(model, size, mean, std)
        views = _ImageViews(raw, size_, mean_, std_, batch_size, augment, scale, g)
    else:
        views = _BatchViews(images, augment, scale, g)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("recover: the model has no parameters that require grad")
    device = model_device(model)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if optimizer == "adamw" else
           torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay))
    warm = max(1, int(round(warmup * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    from .core.execution import module_modes, restore_modes
    from .core.inputs import to_device
    from .core.progress import progress as bar

    modes, teacher_modes = module_modes(model), module_modes(teacher)
    model.eval()
    teacher.eval()
    if train_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    losses, started = [], time.perf_counter()
    try:
        for _, inputs in zip(bar(range(steps), desc="recover", disable=None if progress else True), views):
            inputs = to_device(_mixed(inputs, mixup, g), device)
            with torch.no_grad():
                target = logits_of(call_model(teacher, inputs))
            loss = distillation_loss(logits_of(call_model(model, inputs)), target, temperature=temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            _enforce_masks(model)
            losses.append(float(loss.detach()))
    finally:
        restore_modes(modes)
        restore_modes(teacher_modes)
        opt.zero_grad(set_to_none=True)
    return {"steps": len(losses), "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": time.perf_counter() - started}
