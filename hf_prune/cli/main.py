"""The ``hf-prune`` command.

::

    hf-prune prune MODEL --method depgraph (--target-macs F | --sparsity F) [--output DIR] ...
    hf-prune profile MODEL [--image-size N] [--batch-size N] [--json]
    hf-prune demo [--quick] [--output DIR] [--json]
    hf-prune export MODEL --output model.onnx [--opset N] [--exporter auto|dynamo|torchscript]

``MODEL`` is a timm model name (``resnet18``; built with random weights unless ``--pretrained``),
a local directory holding a transformers ``config.json`` (weights are loaded when the directory
has them; a pruned model saved by hf_prune is rebuilt from its spec) or a Hub repo id
(``owner/name``, loaded with ``AutoModelForImageClassification.from_pretrained``).

Exit status: 0 on success, 2 for usage and input errors (bad arguments, unknown model, a model
that does not run on the requested input size), 1 for failures while pruning, measuring or
saving. Errors are one line on stderr; ``--debug`` adds the traceback.

Importing this module is cheap: torch, timm and transformers are imported by the commands.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

__all__ = ["main", "build_parser", "load_model", "CLIError"]


class CLIError(Exception):
    """An error reported as one line on stderr, with an exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    # Options every subcommand accepts. SUPPRESS keeps a subcommand from overwriting the value
    # given before the subcommand (``hf-prune --debug prune ...``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    common.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                        help="torch CPU threads (default: torch's default; 1 is much faster on a "
                             "machine whose cores are busy with other work)")

    parser = argparse.ArgumentParser(
        prog="hf-prune",
        description="Prune timm / transformers vision models, measure them, publish them on the Hub.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"hf-prune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    model_help = ("a timm model name (e.g. resnet18), a local directory with a transformers "
                  "config.json, or a Hub repo id (owner/name)")

    p = sub.add_parser("prune", parents=[common], help="prune a model and save it",
                       description="Prune MODEL, print a before/after table (params, MACs, measured "
                                   "latency at batch 1) and save the pruned model.")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--method", default="depgraph", choices=CLI_METHODS,
                   help="depgraph (channels and heads), updp (whole blocks, merged; --num-blocks or "
                        "--target-macs), stagewise (searched widths, one-shot), magnitude (individual "
                        "weights; --sparsity); rd and ovit need calibration data: use the Python API "
                        "(default: depgraph)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", type=_fraction, metavar="F",
                        help="fraction of the dense MACs to keep, in (0, 1)")
    target.add_argument("--sparsity", type=_fraction, metavar="F",
                        help="fraction of prunable parameters to remove, in (0, 1)")
    target.add_argument("--num-blocks", type=_positive_int, metavar="K",
                        help="updp: number of blocks to merge")
    p.add_argument("--output", "-o", metavar="DIR",
                   help="save the pruned model here (config.json with the hf_prune spec + safetensors)")
    p.add_argument("--importance", default="l2", choices=["l1", "l2"],
                   help="channel-group importance (default: l2)")
    p.add_argument("--mode", default="global", choices=["global", "local"],
                   help="global: one ranking across layers; local: the same ratio per layer "
                        "(default: global)")
    p.add_argument("--round-to", type=_non_negative_int, default=8, metavar="N",
                   help="keep channel counts multiples of N for speed (0 disables; default: 8)")
    p.add_argument("--prune-stem", action="store_true", help="also prune the first layer's outputs")
    _add_model_options(p)
    p.add_argument("--push-to-hub", metavar="REPO", help="also push the pruned model to this Hub repo")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("profile", parents=[common], help="params, MACs and latency of a model",
                       description="Count parameters and MACs (attention included) of MODEL and "
                                   "measure its latency on this machine.")
    p.add_argument("model", metavar="MODEL", help=model_help)
    _add_model_options(p)
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="batch size of the timed inputs (default: 1)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("demo", parents=[common], help="train, prune and fine-tune two small models on MNIST",
                       description="Train a small ViT and a small ConvNeXt (transformers) on real MNIST "
                                   "digits, prune each to half its MACs with DepGraph, fine-tune, and "
                                   "report params, MACs, CPU latency and accuracy; then save and reload. "
                                   "Runs on 1 CPU thread unless --threads is given.")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test, < 1 minute)")
    p.add_argument("--output", "-o", metavar="DIR", default="outputs/demo",
                   help="where to save the pruned models (default: outputs/demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON on stdout (the log goes to stderr)")
    p.set_defaults(func=_cmd_demo)

    from . import export as export_cmd  # its own module: arguments and run()

    p = sub.add_parser("export", parents=[common], help=export_cmd.HELP, description=export_cmd.DESCRIPTION)
    export_cmd.add_arguments(p)
    p.set_defaults(func=export_cmd.run)
    return parser


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=_positive_int, metavar="N",
                   help="input height and width (default: the model's own input size)")
    p.add_argument("--num-labels", type=_positive_int, metavar="N",
                   help="number of classes of a model built from a name or a config (timm num_classes)")
    p.add_argument("--pretrained", action="store_true",
                   help="timm names only: download pretrained weights (needs the Hub); "
                        "default: random weights")
    p.add_argument("--iters", type=_positive_int, default=20, metavar="N",
                   help="timed forward passes per model after warm-up; the median is reported "
                        "(default: 20)")


# ------------------------------------------------------------------------------------------------
# models and inputs
# ------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to run: how it was found, and the input it expects (C, H, W)."""

    model: Any
    name: str
    library: str  # "timm" | "transformers"
    input_size: tuple[int, int, int]
    weights: str  # "random" | "pretrained" | "loaded from ..."
    notes: list[str] = field(default_factory=list)

    def example_inputs(self, batch_size: int = 1, seed: int = 0):
        """Random inputs of the expected shape: a tensor for timm, ``{"pixel_values": x}`` else."""
        import torch

        g = torch.Generator().manual_seed(seed)
        x = torch.randn((batch_size, *self.input_size), generator=g)
        return x if self.library == "timm" else {"pixel_values": x}


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _has_weights(path: str) -> bool:
    names = set(os.listdir(path))
    return any(n in names for n in _WEIGHT_FILES) or any(n.endswith(".safetensors") for n in names)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _hub_api(purpose: str):
    """``(save_pretrained, push_to_hub, AutoPrunedModel)`` or a CLIError saying what is missing."""
    try:
        from ..hub import AutoPrunedModel, push_to_hub, save_pretrained
    except ImportError as exc:
        raise CLIError(f"{purpose} needs hf_prune.hub, which could not be imported ({_one_line(exc)})",
                       EXIT_FAILURE) from exc
    return save_pretrained, push_to_hub, AutoPrunedModel


def call_hub(fn, *args, **kwargs):
    """Call a hub function with the keyword arguments it names (``metrics`` always; ``speed`` and
    others only where the installed hf_prune.hub takes them, never into ``**save_kwargs``)."""
    import inspect

    named = {n for n, p in inspect.signature(fn).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return fn(*args, **{k: v for k, v in kwargs.items() if k in named or k == "metrics"})


def _transformers_input_size(config, image_size: int | None) -> tuple[int, int, int]:
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = getattr(config, "image_size", None)
    if size is None:  # TimmWrapperConfig keeps timm's pretrained_cfg
        cfg = getattr(config, "pretrained_cfg", None) or {}
        if cfg.get("input_size"):
            channels, *hw = cfg["input_size"]
            size = tuple(hw)
    if isinstance(size, (list, tuple)):
        h, w = (int(size[0]), int(size[-1]))
    elif size is not None:
        h = w = int(size)
    else:
        h = w = 224
    if image_size is not None:
        h = w = image_size
    return int(channels), h, w


def _load_timm(name: str, image_size, num_labels, pretrained) -> LoadedModel:
    import timm

    kwargs = {}
    if num_labels is not None:
        kwargs["num_classes"] = num_labels
    model = None
    if image_size is not None:
        # Models with position embeddings (ViT, Swin, ...) must be built for the size; CNNs take
        # any size and reject the argument.
        try:
            model = timm.create_model(name, pretrained=pretrained, img_size=image_size, **kwargs)
        except TypeError:
            model = None
    if model is None:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, h, w = tuple(cfg.get("input_size") or (3, 224, 224))
    if image_size is not None:
        h = w = image_size
    return LoadedModel(model, name, "timm", (int(channels), int(h), int(w)),
                       "pretrained" if pretrained else "random")


def _raw_config(name: str, *, local: bool, where: str) -> dict:
    """``config.json`` of a local directory or a Hub repo, as a dict."""
    try:
        if local:
            path = os.path.join(name, "config.json")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(name, "config.json")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except Exception as exc:  # OSError, JSONDecodeError, huggingface_hub errors
        if local:
            raise CLIError(f"cannot read config.json in {where}: {_one_line(exc)}") from exc
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise CLIError(f"could not load {where} from {endpoint}: {_one_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise CLIError(f"config.json in {where} is not a JSON object")
    return raw


def _is_transformers_model(model) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _load_pruned(name: str, raw: dict, image_size, num_labels, where: str) -> LoadedModel:
    """A model saved by hf_prune (``hf_prune`` key in config.json): rebuilt from its spec."""
    _, _, auto = _hub_api(f"loading the pruned model in {where}")
    trained = raw.get("num_labels", raw.get("num_classes"))
    if trained is None and isinstance(raw.get("id2label"), dict):
        trained = len(raw["id2label"])
    if num_labels is not None and trained is not None and num_labels != trained:
        raise CLIError(f"{where} holds a trained {trained}-class head; --num-labels cannot change it")
    try:
        model = auto.from_pretrained(name)
    except Exception as exc:
        raise CLIError(f"could not load the pruned model in {where}: {_one_line(exc)}") from exc
    weights = f"loaded from {name} (pruned by hf_prune)"
    if _is_transformers_model(model):
        return LoadedModel(model, name, "transformers", _transformers_input_size(model.config, image_size),
                           weights)
    cfg = getattr(model, "pretrained_cfg", None) or raw.get("pretrained_cfg") or {}
    channels, h, w = tuple(cfg.get("input_size") or (3, 224, 224))
    if image_size is not None:
        h = w = image_size
    return LoadedModel(model, name, "timm", (int(channels), int(h), int(w)), weights)


def _load_transformers(name: str, image_size, num_labels, *, local: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForImageClassification

    where = f"directory {name!r}" if local else f"Hub repo {name!r}"
    raw = _raw_config(name, local=local, where=where)
    if raw.get("hf_prune") is not None:
        return _load_pruned(name, raw, image_size, num_labels, where)
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as exc:  # OSError, ValueError, huggingface_hub errors
        raise CLIError(f"cannot read a transformers config from {where}: {_one_line(exc)}") from exc

    notes: list[str] = []
    if not local or _has_weights(name):
        if num_labels is not None and num_labels != config.num_labels:
            raise CLIError(f"{where} holds a trained {config.num_labels}-class head; --num-labels "
                           f"{num_labels} would need new head weights (hf_prune never loads with "
                           "ignore_mismatched_sizes)")
        try:
            model = AutoModelForImageClassification.from_pretrained(name)
        except Exception as exc:
            raise CLIError(f"could not load an image-classification model from {where}: "
                           f"{_one_line(exc)}") from exc
        weights = f"loaded from {name}"
    else:
        if num_labels is not None:
            config.num_labels = num_labels
        if image_size is not None and hasattr(config, "image_size"):
            config.image_size = image_size  # no trained position embeddings to keep
        try:
            model = AutoModelForImageClassification.from_config(config)
        except Exception as exc:
            raise CLIError(f"could not build an image-classification model from the config in "
                           f"{where}: {_one_line(exc)}") from exc
        weights = "random"
        notes.append(f"{name} has no weights: built from its config with random weights")
    return LoadedModel(model, name, "transformers", _transformers_input_size(model.config, image_size),
                       weights, notes)


def _unknown_model(name: str) -> CLIError:
    import difflib

    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return CLIError(f"unknown model {name!r}: not a timm model name, not a local directory, and not a "
                    f"Hub repo id of the form owner/name{hint}")


def load_model(name: str, *, image_size: int | None = None, num_labels: int | None = None,
               pretrained: bool = False) -> LoadedModel:
    """Find MODEL (directory, timm name or Hub repo id), build it in eval mode and check it runs."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise CLIError(f"directory {name!r} has no config.json (expected a transformers model "
                           "directory)")
        loaded = _load_transformers(name, image_size, num_labels, local=True)
    else:
        import timm

        if timm.is_model(name):
            try:
                loaded = _load_timm(name, image_size, num_labels, pretrained)
            except Exception as exc:
                raise CLIError(f"could not build timm model {name!r}: {_one_line(exc)}",
                               EXIT_FAILURE if pretrained else EXIT_USAGE) from exc
        elif name.count("/") == 1 and all(name.split("/")):
            loaded = _load_transformers(name, image_size, num_labels, local=False)
        else:
            raise _unknown_model(name)
    if pretrained and loaded.library != "timm":
        loaded.notes.append("--pretrained only applies to timm names; ignored")
    loaded.model.eval()
    _check_runs(loaded)
    return loaded


def _check_runs(loaded: LoadedModel) -> None:
    import torch

    inputs = loaded.example_inputs(1)
    try:
        with torch.inference_mode():
            if isinstance(inputs, dict):
                loaded.model(**inputs)
            else:
                loaded.model(inputs)
    except Exception as exc:
        shape = "x".join(str(d) for d in (1, *loaded.input_size))
        raise CLIError(f"{loaded.name} does not run on inputs of shape {shape}: {_one_line(exc)} "
                       "(set --image-size to a size the model accepts)") from exc


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------


def paired_latency(models: list, inputs, *, rounds: int = 5, iters: int = 10, warmup: int = 3) -> list[float]:
    """Median latency (ms) of each model, timed in alternating rounds in this process.

    Alternating the models round by round spreads load changes on a shared machine over all of
    them, so the ratio between them is fairer than timing one model after the other.
    """
    import statistics

    from ..metrics.profiling import time_model

    times: list[list[float]] = [[] for _ in models]
    for m in models:
        time_model(m, inputs, warmup=max(0, warmup - 1), iters=1)  # warm-up (first call not kept)
    for _ in range(rounds):
        for i, m in enumerate(models):
            times[i].extend(time_model(m, inputs, warmup=1, iters=iters))
    return [statistics.median(t) for t in times]


def _threads_text(n: int) -> str:
    return f"CPU, {n} thread{'' if n == 1 else 's'}"


def _input_shape(inputs) -> list[int]:
    x = inputs["pixel_values"] if isinstance(inputs, dict) else inputs
    return list(x.shape)


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------


CLI_METHODS = ["depgraph", "updp", "stagewise", "magnitude", "rd", "ovit"]
_TARGETS = {"depgraph": ("target_macs", "sparsity"), "updp": ("num_blocks", "target_macs"),
            "stagewise": ("target_macs",), "magnitude": ("sparsity",)}


def _check_targets(args) -> None:
    if args.method in ("rd", "ovit"):
        raise CLIError(f"--method {args.method} needs calibration data, which the command line does not "
                       f"take: use hf_prune.prune(model, method={args.method!r}, sparsity=..., calib=loader) "
                       "in Python, or trainers/prune_finetune.py")
    given = next(k for k in ("target_macs", "sparsity", "num_blocks") if getattr(args, k) is not None)
    if given not in _TARGETS[args.method]:
        allowed = " or ".join("--" + k.replace("_", "-") for k in _TARGETS[args.method])
        raise CLIError(f"--method {args.method} takes {allowed}, not --{given.replace('_', '-')}")
    if args.target_macs is not None and not 0.0 < args.target_macs < 1.0:
        raise CLIError(f"--target-macs is the fraction of the dense MACs to keep and must be in (0, 1), "
                       f"got {args.target_macs:g}")
    if args.sparsity is not None and not 0.0 < args.sparsity < 1.0:
        raise CLIError(f"--sparsity is the fraction of prunable parameters to remove and must be in "
                       f"(0, 1), got {args.sparsity:g}")
    if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise CLIError(f"--output {args.output!r} exists and is not a directory")


def _cmd_prune(args, out) -> int:
    _check_targets(args)
    hub = None
    if args.output or args.push_to_hub:
        hub = _hub_api("saving or pushing the pruned model")  # fail before the slow part

    import copy

    import torch

    from ..api import PRUNE_RECORD, prune
    from ..metrics.profiling import ProfileReport, compare, count_macs, count_params

    loaded = load_model(args.model, image_size=args.image_size, num_labels=args.num_labels,
                        pretrained=args.pretrained)
    model = loaded.model
    for note in loaded.notes:
        print(f"hf-prune: note: {note}", file=sys.stderr)
    inputs = loaded.example_inputs(1)
    dense = copy.deepcopy(model)
    params_before, _ = count_params(model)
    macs_before = count_macs(model, inputs)

    target = {k: getattr(args, k) for k in ("target_macs", "sparsity", "num_blocks") if getattr(args, k) is not None}
    options = {}
    if args.method == "depgraph":
        options = dict(importance=args.importance, mode=args.mode, round_to=args.round_to or None,
                       prune_stem=args.prune_stem)
    elif args.method == "stagewise":
        options = dict(round_to=args.round_to or None, prune_stem=args.prune_stem)
    start = time.perf_counter()
    prune(model, args.method, example_inputs=inputs, **target, **options)
    prune_s = time.perf_counter() - start
    model.eval()

    params_after, _ = count_params(model)
    macs_after = count_macs(model, inputs)
    rounds = min(5, args.iters)
    lat_before, lat_after = paired_latency([dense, model], inputs, rounds=rounds,
                                           iters=-(-args.iters // rounds), warmup=2)
    del dense
    device = "cpu"
    reports = [ProfileReport(p, p, m, lat, 1, device) for p, m, lat in
               ((params_before, macs_before, lat_before), (params_after, macs_after, lat_after))]

    result: dict[str, Any] = {
        "model": args.model,
        "library": loaded.library,
        "weights": loaded.weights,
        "method": args.method,
        "target": target,
        "options": options,
        "input_shape": _input_shape(inputs),
        "before": {"params": params_before, "macs": macs_before, "latency_ms": lat_before},
        "after": {"params": params_after, "macs": macs_after, "latency_ms": lat_after},
        "ratios": {"params": params_after / params_before, "macs": macs_after / macs_before,
                   "speedup": lat_before / lat_after},
        "latency": {"batch_size": 1, "device": device, "threads": torch.get_num_threads()},
        "prune_seconds": prune_s,
        "sparsity": model.__dict__.get(PRUNE_RECORD, {}).get("stats", {}).get("global_sparsity"),
        "output": None,
        "files": [],
        "pushed_to": None,
    }
    # prune() records the method, its settings and the before/after counts on the model; the
    # card also gets the measured speed-up. No accuracy is measured here, so no eval metrics.
    record = dict(speed={"speedup": round(lat_before / lat_after, 2),
                         "device": _threads_text(torch.get_num_threads()), "batch": 1})
    if args.output:
        save_pretrained = hub[0]
        call_hub(save_pretrained, model, args.output, metrics=None, **record)
        result["output"] = os.path.abspath(args.output)
        result["files"] = sorted(os.listdir(args.output))
    if args.push_to_hub:
        push = hub[1]
        commit = call_hub(push, model, args.push_to_hub, metrics=None, **record)
        result["pushed_to"] = str(getattr(commit, "commit_url", None) or commit or args.push_to_hub)

    if args.json:
        print(json.dumps(result, indent=2), file=out)
    else:
        shape = "x".join(str(d) for d in result["input_shape"])
        what = ", ".join(f"{k.replace('_', '-')}={v:g}" for k, v in target.items())
        print(f"{args.model} ({loaded.library}, {loaded.weights} weights, input {shape}): "
              f"{args.method}, {what}, pruned in {prune_s:.1f} s", file=out)
        print(compare(*reports), file=out)
        if result["sparsity"] is not None:  # zeros do not change dense params, MACs or speed
            print(f"zeroed weights: {result['sparsity']:.1%} of the prunable weights", file=out)
        if args.output:
            print(f"saved to {result['output']} ({', '.join(result['files'])})", file=out)
        else:
            print("not saved (no --output)", file=out)
        if args.push_to_hub:
            print(f"pushed to {result['pushed_to']}", file=out)
    return EXIT_OK


def _cmd_profile(args, out) -> int:
    import torch

    from ..metrics.profiling import profile

    loaded = load_model(args.model, image_size=args.image_size, num_labels=args.num_labels,
                        pretrained=args.pretrained)
    for note in loaded.notes:
        print(f"hf-prune: note: {note}", file=sys.stderr)
    inputs = loaded.example_inputs(args.batch_size)
    report = profile(loaded.model, inputs, warmup=2, iters=args.iters)
    if args.json:
        data = {"model": args.model, "library": loaded.library, "weights": loaded.weights,
                "input_shape": _input_shape(inputs), **report.to_dict(),
                "macs_per_sample": report.macs_per_sample, "threads": torch.get_num_threads()}
        print(json.dumps(data, indent=2), file=out)
    else:
        shape = "x".join(str(d) for d in _input_shape(inputs))
        print(f"{args.model} ({loaded.library}, {loaded.weights} weights, input {shape})", file=out)
        print(report, file=out)
    return EXIT_OK


def _cmd_demo(args, out) -> int:
    from .demo import run_demo

    # With --json, stdout carries only the JSON object; the demo's log goes to stderr.
    # The demo runs on one thread unless --threads says otherwise (see run_demo).
    result = run_demo(quick=args.quick, out_dir=args.output, seed=args.seed,
                      stream=sys.stderr if args.json else out, threads=getattr(args, "threads", 1))
    if args.json:
        print(json.dumps(result, indent=2, default=str), file=out)
    failed = {name: r["error"] for name, r in result["models"].items() if r.get("error")}
    if failed:
        raise CLIError("demo: " + "; ".join(f"{n}: {e}" for n, e in failed.items()), EXIT_FAILURE)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------


def _short_warnings():
    """Show warnings as one ``hf-prune: warning: ...`` line each (no source line)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"hf-prune: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    return lambda: setattr(warnings, "showwarning", previous)


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-prune`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (argparse prints the message)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    debug = getattr(args, "debug", False)
    restore = None if debug else _short_warnings()
    threads = getattr(args, "threads", None)
    previous_threads = None
    try:
        if threads is not None:
            import torch

            previous_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        return args.func(args, sys.stdout)
    except CLIError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"hf-prune: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("hf-prune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if debug:
            import traceback

            traceback.print_exc()
        api = sys.modules.get("hf_prune.api")
        if api is not None and isinstance(exc, api.PruningError):
            message = f"pruning failed: {_one_line(exc)}"
        else:
            message = f"{type(exc).__name__}: {_one_line(exc)}"
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"hf-prune: error: {message}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if restore is not None:
            restore()
        if previous_threads is not None:
            import torch

            torch.set_num_threads(previous_threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
