"""The ``hf-prune`` command.

::

    hf-prune prune MODEL [--method NAME] (--target-macs F | --sparsity F | --num-blocks K | --config FILE) ...
    hf-prune profile MODEL [--image-size N] [--batch-size N] [--json]
    hf-prune demo [--quick] [--output DIR] [--json]
    hf-prune export MODEL --output model.onnx [--opset N] [--exporter auto|dynamo|torchscript]
    hf-prune train MODEL --dataset DATA --output-dir DIR [--method NAME] [...] [any TrainingArguments flag]

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
from typing import Any

from .common import (EXIT_FAILURE, EXIT_OK, EXIT_USAGE, LATENCY_FLAGS, TARGET_FLAGS, CLIError, add_target_arguments,
                     hub_api, load_model, method_config, non_negative_int, one_line, positive_int)

__all__ = ["main", "build_parser"]

# ------------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------------


def _round_to(text: str):
    return text if text == "measured" else non_negative_int(text)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    # Options every subcommand accepts. SUPPRESS keeps a subcommand from overwriting the value
    # given before the subcommand (``hf-prune --debug prune ...``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    common.add_argument("--threads", type=positive_int, default=argparse.SUPPRESS, metavar="N",
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
    p.add_argument("--method", metavar="NAME",
                   help="a registered method (hf_prune.list_methods()): depgraph (channels and heads), updp "
                        "(whole blocks, merged), magnitude (individual weights); stagewise, rd and ovit need "
                        "calibration data: use `hf-prune train` or the Python API (default: depgraph, or the "
                        "--config's method)")
    p.add_argument("--config", metavar="FILE",
                   help="the method's settings: a JSON file written by PruningConfig.save_pretrained, or a "
                        "folder / Hub repo of a model pruned by hf_prune (its settings are reused); flags "
                        "override its fields")
    add_target_arguments(p)
    p.add_argument("--output", "-o", metavar="DIR",
                   help="save the pruned model here (config.json with the hf_prune spec + safetensors)")
    p.add_argument("--importance", choices=["l1", "l2"], help="channel-group importance (default: l2)")
    p.add_argument("--mode", choices=["global", "local"],
                   help="global: one ranking across layers; local: the same ratio per layer (default: global)")
    p.add_argument("--round-to", type=_round_to, metavar="N",
                   help="keep channel counts multiples of N for speed (0 disables; default: 8); 'measured' (with "
                        "--target-latency) picks the fastest nearby width by timing it")
    p.add_argument("--prune-stem", action="store_true", default=None,
                   help="also prune the first layer's outputs")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights of a model built from a name, and of the example inputs "
                        "(default: 0)")
    _add_model_options(p)
    p.add_argument("--push-to-hub", metavar="REPO", help="also push the pruned model to this Hub repo")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("profile", parents=[common], help="params, MACs and latency of a model",
                       description="Count parameters and MACs (attention included) of MODEL and "
                                   "measure its latency on this machine.")
    p.add_argument("model", metavar="MODEL", help=model_help)
    _add_model_options(p)
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
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

    from . import train as train_cmd  # its own module; its parser (with the Trainer's flags) is built when it runs

    p = sub.add_parser("train", parents=[common], add_help=False, help=train_cmd.HELP,
                       description=train_cmd.DESCRIPTION)
    p.set_defaults(func=train_cmd.run, takes_extra_args=True)
    return parser


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=positive_int, metavar="N",
                   help="input height and width (default: the model's own input size)")
    p.add_argument("--num-labels", type=positive_int, metavar="N",
                   help="number of classes of a model built from a name or a config (timm num_classes)")
    p.add_argument("--pretrained", action="store_true",
                   help="timm names only: download pretrained weights (needs the Hub); "
                        "default: random weights")
    p.add_argument("--iters", type=positive_int, default=20, metavar="N",
                   help="timed forward passes per model after warm-up; the median is reported "
                        "(default: 20)")


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------


def _input_shape(inputs) -> list[int]:
    x = inputs["pixel_values"] if isinstance(inputs, dict) else inputs
    return list(x.shape)


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------


_FLAGS = {**TARGET_FLAGS, **LATENCY_FLAGS, "importance": "--importance", "mode": "--mode", "round_to": "--round-to",
          "prune_stem": "--prune-stem"}


def _method_config(args):
    """The method's config from ``--config`` and the flags, checked before any model is loaded."""
    fields = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if "round_to" in fields:
        fields["round_to"] = fields["round_to"] or None
    entry, config = method_config(args.config, args.method, fields, _FLAGS)
    if entry.needs_calib:
        raise CLIError(f"--method {entry.name} needs calibration data, which `hf-prune prune` does not take: use "
                       f"`hf-prune train --method {entry.name}` (it takes a dataset) or hf_prune.prune(model, "
                       f"{entry.name!r}, ..., calib=batches) in Python")
    return config


def _check_output(args) -> None:
    if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise CLIError(f"--output {args.output!r} exists and is not a directory")


def _cmd_prune(args, out) -> int:
    config = _method_config(args)
    _check_output(args)
    hub = None
    if args.output or args.push_to_hub:
        hub = hub_api("saving or pushing the pruned model")  # fail before the slow part

    import copy

    import torch

    from ..api import prune
    from ..core.record import read_record
    from ..metrics.profiling import ProfileReport, compare, count_macs, count_params, paired_latency, threads_text

    torch.manual_seed(args.seed)
    loaded = load_model(args.model, image_size=args.image_size, num_labels=args.num_labels,
                        pretrained=args.pretrained)
    model = loaded.model
    for note in loaded.notes:
        print(f"hf-prune: note: {note}", file=sys.stderr)
    if loaded.weights == "random":
        print("hf-prune: warning: the model has random weights (built from its name or config): its speed and "
              "size are real, its accuracy is not; pass --pretrained or a checkpoint to prune a trained model",
              file=sys.stderr)
    inputs = loaded.example_inputs(1, seed=args.seed)
    dense = copy.deepcopy(model)
    params_before, _ = count_params(model)
    macs_before = count_macs(model, inputs)

    target = {k: getattr(config, k) for k in ("target_macs", "sparsity", "num_blocks")
              if getattr(config, k, None) is not None}
    start = time.perf_counter()
    prune(model, config, example_inputs=inputs)
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
        "method": config.method,
        "target": target,
        "config": config.to_dict(),
        "input_shape": _input_shape(inputs),
        "before": {"params": params_before, "macs": macs_before, "latency_ms": lat_before},
        "after": {"params": params_after, "macs": macs_after, "latency_ms": lat_after},
        "ratios": {"params": params_after / params_before, "macs": macs_after / macs_before,
                   "speedup": lat_before / lat_after},
        "latency": {"batch_size": 1, "device": device, "threads": torch.get_num_threads()},
        "prune_seconds": prune_s,
        "sparsity": (read_record(model) or {}).get("stats", {}).get("global_sparsity"),
        "output": None,
        "files": [],
        "pushed_to": None,
    }
    # prune() records the method, its settings and the before/after counts on the model; the
    # card also gets the measured speed-up. No accuracy is measured here, so no eval metrics.
    record = dict(speed={"speedup": round(lat_before / lat_after, 2),
                         "device": threads_text(torch.get_num_threads()), "batch": 1})
    if args.output:
        save_pretrained = hub[0]
        save_pretrained(model, args.output, **record)
        result["output"] = os.path.abspath(args.output)
        result["files"] = sorted(os.listdir(args.output))
    if args.push_to_hub:
        push = hub[1]
        commit = push(model, args.push_to_hub, **record)
        result["pushed_to"] = str(getattr(commit, "commit_url", None) or commit or args.push_to_hub)

    if args.json:
        print(json.dumps(result, indent=2), file=out)
    else:
        shape = "x".join(str(d) for d in result["input_shape"])
        what = ", ".join(f"{k.replace('_', '-')}={v:g}" for k, v in target.items())
        print(f"{args.model} ({loaded.library}, {loaded.weights} weights, input {shape}): "
              f"{config.method}, {what}, pruned in {prune_s:.1f} s", file=out)
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
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "takes_extra_args", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, usage errors (argparse prints the message)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.extra_args = extra  # `train` parses its own arguments (and the Trainer's) from these
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
    except BrokenPipeError:  # the reader went away (``hf-prune ... | head``): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if debug:
            import traceback

            traceback.print_exc()
        errors = sys.modules.get("hf_prune.errors")
        if errors is not None and isinstance(exc, errors.ConfigError):
            print(f"hf-prune: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        if errors is not None and isinstance(exc, errors.PruningError):
            message = f"pruning failed: {one_line(exc)}"
        else:
            message = f"{type(exc).__name__}: {one_line(exc)}"
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
