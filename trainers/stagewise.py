#!/usr/bin/env python
"""SP (stage-wise channel pruning): supernet training -> search -> subnet fine-tuning -> save / push.

Runs with ``python`` or ``accelerate launch`` (every rank draws the same subnets and finds the same
subnet; see :mod:`hf_prune.methods.stagewise.callback`)::

    python trainers/stagewise.py --model builtin:tiny-resnet --dataset builtin:digits --dense_steps 300 \\
        --target_macs 0.5 --max_steps 300 --finetune_steps 200 --output_dir out/sp --use_cpu

    accelerate launch --multi_gpu --num_processes 2 trainers/stagewise.py --model ./my-convnext ...

``--model``: a timm architecture name (``TimmWrapperForImageClassification``; ``--pretrained true``
fetches timm weights), a local directory or Hub id, or ``builtin:tiny-resnet`` /
``builtin:tiny-convnext`` (small random-init transformers models for CPU runs; give them
``--dense_steps`` so that the full net that supervises the supernet has learnt something).
``--dataset``: as in ``trainers/prune_finetune.py`` (``builtin:digits``, ``builtin:mnist``, Hub id,
folder). ``--max_steps`` / ``--num_train_epochs`` and the other ``TrainingArguments`` drive the supernet
training; ``--finetune_steps`` the subnet's fine-tuning (same optimizer settings). The subnet is saved
with ``hf_prune.save_pretrained`` to ``--output_dir``; ``--push_to_hub REPO_ID`` uploads it.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_finetune import (DataArguments, ModelArguments, build_datasets, load_data, load_model,  # noqa: E402
                            model_input_spec, split_push_argument)

logger = logging.getLogger("stagewise")

BUILTIN = ("builtin:tiny-resnet", "builtin:tiny-convnext")


@dataclass
class SPArguments:
    target_macs: float = field(default=0.5, metadata={"help": "fraction of dense MACs the subnet may keep"})
    max_latency_ms: float | None = field(default=None, metadata={"help": "also a measured-latency budget (ms)"})
    ratios: str = field(default="0.25,0.375,0.5,0.625,0.75,0.875,1.0", metadata={"help": "candidate width ratios"})
    round_to: int | None = field(default=8, metadata={"help": "channel multiple of every width"})
    num_random: int = field(default=2, metadata={"help": "random subnets per step besides largest and smallest"})
    supervision: str = field(default="stage", metadata={"help": "stage (SP) | logits (plain supernet)"})
    stage_schedule: str = field(default="parallel", metadata={"help": "parallel | sequential"})
    stages: str | None = field(default=None, metadata={"help": "comma-separated stage module paths (default auto)"})
    num_stages: int = field(default=4, metadata={"help": "stages cut from a block list without resolution changes"})
    dense_steps: int = field(default=0, metadata={"help": "train the full net this many steps first (random init)"})
    finetune_steps: int = field(default=200, metadata={"help": "fine-tuning steps of the searched subnet"})
    population: int = field(default=16)
    generations: int = field(default=4)
    calib_batches: int = field(default=8, metadata={"help": "BN recalibration batches per candidate"})
    eval_batches: int | None = field(default=None, metadata={"help": "held-out batches per candidate (default all)"})


def builtin_model(name: str, labels: list, image_size: int):
    import transformers as T

    n = len(labels)
    id2label = dict(enumerate(labels))
    if name == "builtin:tiny-resnet":
        cfg = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                             layer_type="basic", num_labels=n, id2label=id2label,
                             label2id={v: k for k, v in id2label.items()})
        return T.ResNetForImageClassification(cfg)
    cfg = T.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1], num_labels=n, id2label=id2label,
                           label2id={v: k for k, v in id2label.items()}, image_size=image_size)
    return T.ConvNextForImageClassification(cfg)


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

    from hf_prune.methods.stagewise.callback import StageWiseCallback, StageWiseTrainer

    argv, push_repo = split_push_argument(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser((ModelArguments, DataArguments, SPArguments, TrainingArguments))
    model_args, data_args, sp, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    set_seed(training_args.seed)
    training_args.push_to_hub = False  # pushed below, with the structure spec

    raw_train, raw_eval, labels, kind = load_data(data_args, training_args.seed)
    if model_args.model in BUILTIN:
        size = model_args.image_size or (32 if "convnext" in model_args.model else 16)
        model, mean, std = builtin_model(model_args.model, labels, size), (0.5,) * 3, (0.5,) * 3
    elif model_args.model.startswith("builtin:"):
        raise SystemExit(f"--model {model_args.model}: built-in models are {', '.join(BUILTIN)}")
    else:
        model = load_model(model_args, labels)
        size, mean, std = model_input_spec(model, model_args.image_size or None)
    train_ds, eval_ds = build_datasets(kind, raw_train, raw_eval, labels, size, mean, std, data_args, training_args)

    if sp.dense_steps:
        dense_args = replace(training_args, max_steps=sp.dense_steps, output_dir=str(Path(training_args.output_dir)
                                                                                      / "dense"), save_strategy="no")
        Trainer(model=model, args=dense_args, train_dataset=train_ds).train()

    callback = StageWiseCallback(
        target_macs=sp.target_macs, ratios=tuple(float(r) for r in sp.ratios.split(",")), round_to=sp.round_to,
        num_random=sp.num_random, supervision=sp.supervision, stage_schedule=sp.stage_schedule,
        stages=sp.stages.split(",") if sp.stages else "auto", num_stages=sp.num_stages, seed=training_args.seed,
        search_at_end=False)
    trainer = StageWiseTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                               callbacks=[callback])
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    latency_inputs = None
    if sp.max_latency_ms is not None:  # batch of one held-out image, timed on the compacted candidates
        x = torch.as_tensor(eval_ds[0]["pixel_values"])
        latency_inputs = {"pixel_values": x if x.dim() == 4 else x.unsqueeze(0)}
    subnet = trainer.search(target_macs=sp.target_macs, max_latency_ms=sp.max_latency_ms,
                            calib_batches=sp.calib_batches, eval_batches=sp.eval_batches, population=sp.population,
                            generations=sp.generations, latency_inputs=latency_inputs)
    found = trainer.search_result

    ft_args = replace(training_args, max_steps=sp.finetune_steps, output_dir=str(Path(training_args.output_dir)
                                                                                 / "finetune"), save_strategy="no")
    ft = Trainer(model=subnet, args=ft_args, train_dataset=train_ds, eval_dataset=eval_ds,
                 compute_metrics=_accuracy_metric)
    if sp.finetune_steps:
        ft.train()
    metrics = ft.evaluate() if eval_ds is not None else {}
    record = subnet.__dict__.get("hf_prune_record", {})
    results = {"model": model_args.model, "dataset": data_args.dataset, "method": "stagewise",
               "settings": callback.config.to_dict(), "choice": list(found.choice), "widths": found.widths,
               "proxy_accuracy": found.score, "macs_ratio": found.macs_ratio, "latency_ms": found.latency_ms,
               "stats": record.get("stats", {}),
               "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
    if ft.is_world_process_zero():
        from hf_prune.hub import push_to_hub, save_pretrained

        out = Path(training_args.output_dir)
        acc = metrics.get("eval_accuracy")
        card_metrics = {"accuracy": float(acc)} if acc is not None else None
        save_kwargs = dict(method="stagewise", settings=dict(callback.config.to_dict(), widths=found.widths),
                           stats={k: v for k, v in record.get("stats", {}).items() if k.startswith("macs")})
        save_pretrained(subnet, out, metrics=card_metrics, **save_kwargs)
        if push_repo:
            push_to_hub(subnet, push_repo, metrics=card_metrics, private=bool(training_args.hub_private_repo),
                        token=training_args.hub_token, **save_kwargs)
            results["pushed_to"] = push_repo
        (out / "stagewise_results.json").write_text(json.dumps(results, indent=2) + "\n")
        logger.info("SP subnet: %.1f%% MACs, proxy accuracy %.4f, eval accuracy %s; saved to %s",
                    100 * found.macs_ratio, found.score, acc, out)
    return results


def _accuracy_metric(pred):
    import numpy as np

    logits = pred.predictions[0] if isinstance(pred.predictions, (tuple, list)) else pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == pred.label_ids).mean())}


if __name__ == "__main__":
    main()
