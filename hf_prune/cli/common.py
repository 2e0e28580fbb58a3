"""What every ``hf-prune`` command shares: exit codes, the one-line error, and how ``MODEL`` is loaded.

``MODEL`` is a timm model name (``resnet18``; built with random weights unless ``--pretrained``),
a local directory holding a transformers ``config.json`` (weights are loaded when the directory
has them; a pruned model saved by hf_prune is rebuilt from its spec) or a Hub repo id
(``owner/name``, loaded with ``AutoModelForImageClassification.from_pretrained``).

Importing this module is cheap: torch, timm and transformers are imported when a model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

__all__ = ["CLIError", "LoadedModel", "load_model", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]


class CLIError(Exception):
    """An error reported as one line on stderr, with an exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


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


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def hub_api(purpose: str):
    """``(save_pretrained, push_to_hub, AutoPrunedModel)`` or a CLIError saying what is missing."""
    try:
        from ..hub import AutoPrunedModel, push_to_hub, save_pretrained
    except ImportError as exc:
        raise CLIError(f"{purpose} needs hf_prune.hub, which could not be imported ({one_line(exc)})",
                       EXIT_FAILURE) from exc
    return save_pretrained, push_to_hub, AutoPrunedModel


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
            raise CLIError(f"cannot read config.json in {where}: {one_line(exc)}") from exc
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise CLIError(f"could not load {where} from {endpoint}: {one_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise CLIError(f"config.json in {where} is not a JSON object")
    return raw


def _is_transformers_model(model) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _load_pruned(name: str, raw: dict, image_size, num_labels, where: str) -> LoadedModel:
    """A model saved by hf_prune (``hf_prune`` key in config.json): rebuilt from its spec."""
    _, _, auto = hub_api(f"loading the pruned model in {where}")
    trained = raw.get("num_labels", raw.get("num_classes"))
    if trained is None and isinstance(raw.get("id2label"), dict):
        trained = len(raw["id2label"])
    if num_labels is not None and trained is not None and num_labels != trained:
        raise CLIError(f"{where} holds a trained {trained}-class head; --num-labels cannot change it")
    try:
        model = auto.from_pretrained(name)
    except Exception as exc:
        raise CLIError(f"could not load the pruned model in {where}: {one_line(exc)}") from exc
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
        raise CLIError(f"cannot read a transformers config from {where}: {one_line(exc)}") from exc

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
                           f"{one_line(exc)}") from exc
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
                           f"{where}: {one_line(exc)}") from exc
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
                raise CLIError(f"could not build timm model {name!r}: {one_line(exc)}",
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
        raise CLIError(f"{loaded.name} does not run on inputs of shape {shape}: {one_line(exc)} "
                       "(set --image-size to a size the model accepts)") from exc


# argparse types shared by the commands


def _int_at_least(minimum: int, meaning: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {meaning}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {meaning}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# the method's config from the command line


TARGET_FLAGS = {"target_macs": "--target-macs", "sparsity": "--sparsity", "num_blocks": "--num-blocks",
                "target_latency": "--target-latency"}
LATENCY_FLAGS = {"latency_device": "--latency-device", "latency_batch_size": "--latency-batch-size",
                 "latency_dtype": "--latency-dtype"}


def add_target_arguments(p) -> None:
    """The target flags every pruning command takes (fields of the methods' configs)."""
    p.add_argument("--target-macs", type=number, metavar="F", help="fraction of the dense MACs to keep, in (0, 1]")
    p.add_argument("--sparsity", type=number, metavar="F",
                   help="fraction of the prunable parameters (weights) to remove, in [0, 1)")
    p.add_argument("--num-blocks", type=positive_int, metavar="K", help="updp: number of blocks to merge")
    p.add_argument("--target-latency", type=number, metavar="F",
                   help="depgraph: fraction of the dense model's latency to keep, measured on this machine (or "
                        "--latency-device) at --latency-batch-size in --latency-dtype")
    p.add_argument("--latency-device", metavar="DEV", help="where latency is measured (default: the model's device)")
    p.add_argument("--latency-batch-size", type=positive_int, metavar="N", help="batch size latency is measured at (1)")
    p.add_argument("--latency-dtype", choices=["float32", "float16", "bfloat16"], help="dtype latency is measured in")


def method_config(config_path, method, fields: dict, flags: dict):
    """``(registry entry, config)`` from ``--config FILE``, ``--method NAME`` and flag values ``fields``
    (``{field: value}``; ``flags`` names the flag of each field for messages). Errors are ``CLIError``s
    naming the flag, raised before any model is loaded."""
    from ..config import PruningConfig
    from ..errors import ConfigError
    from ..registry import get_method

    try:
        base = PruningConfig.from_pretrained(config_path) if config_path else None
        name = method or (base.method if base is not None else "depgraph")
        if base is not None and base.method != name:
            raise CLIError(f"--method {name} but --config {config_path} is for method {base.method!r}")
        entry = get_method(name)
        takes = entry.config_cls.field_names()
        wrong = [flags[k] for k in fields if k not in takes and k in flags]
        if wrong:
            raise CLIError(f"--method {name} does not take {', '.join(wrong)}; it takes "
                           f"{', '.join(f for k, f in flags.items() if k in takes) or 'no flags'} "
                           "(and any field with --config)")
        return entry, entry.config_cls.build(base, **fields)
    except ConfigError as exc:
        message = one_line(exc)
        flag = next((f for k, f in flags.items() if message.startswith(f"{k}=")), None)
        if flag:
            message = f"{flag}: {message}"
        elif base is None and not any(k in fields for k in TARGET_FLAGS):
            message = f"give the target (--target-macs F, --sparsity F, or --config FILE): {message}"
        raise CLIError(message) from None
