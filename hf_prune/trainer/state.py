"""What pruning callbacks read from a Trainer and write into its checkpoints.

* :func:`example_inputs_from_dataloader` / :func:`calib_from_dataloader`: inputs to trace with and
  calibration batches, taken from the training set without touching the sampler or the RNG.
* ``hf_prune_state.json`` (:func:`write_state` / :func:`read_state`): the callback's state in each
  ``checkpoint-<step>`` folder. The file has a schema: ``format_version``, ``callback``, ``method``,
  ``config`` (the method's settings), ``global_step``, ``total_steps`` and ``state`` (the method's
  own JSON state); ``hf_prune_scores.safetensors`` holds tensors a method accumulates. A file that
  is truncated, of another version, or written by another callback is an error naming the file.
* :func:`reload_checkpoint_weights`: the weights the Trainer did not restore on resume.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..core.inputs import LABEL_KEYS
from ..errors import PruningError

logger = logging.getLogger(__name__)

STATE_NAME = "hf_prune_state.json"
SCORES_NAME = "hf_prune_scores.safetensors"
STATE_VERSION = 2
STATE_KEYS = ("format_version", "callback", "method", "config", "global_step", "total_steps", "state")


def _dataset_items(dataloader, n: int, what: str) -> list:
    if dataloader is None:
        raise PruningError(f"{what} were not given and there is no train_dataloader to take them from; pass "
                           f"{what}= explicitly")
    ds = getattr(dataloader, "dataset", None)
    items = []
    try:
        if ds is not None and hasattr(ds, "__getitem__") and hasattr(ds, "__len__"):
            items = [ds[i] for i in range(min(n, len(ds)))]
        elif ds is not None:
            for item in ds:
                items.append(item)
                if len(items) == n:
                    break
    except Exception as exc:
        raise PruningError(f"could not read items from the training dataset ({exc!r}); pass {what}= to the pruning "
                           "callback") from exc
    if not items:
        raise PruningError(f"the training dataset is empty, so no {what} can be taken from it; pass {what}=")
    return items


def _collate(dataloader, items):
    collate = getattr(dataloader, "collate_fn", None) or torch.utils.data.default_collate
    return collate(items)


def example_inputs_from_dataloader(dataloader, n: int = 2, label_names=()) -> dict | tuple | torch.Tensor:
    """Model inputs made from the first ``n`` items of ``dataloader``'s dataset and its collator.

    The dataset is indexed directly, so the dataloader's sampler and the global RNG are untouched
    (the training order stays exactly what it would have been). Label keys are dropped.
    """
    batch = _collate(dataloader, _dataset_items(dataloader, n, "example_inputs"))
    drop = set(LABEL_KEYS) | set(label_names or ())
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: v for k, v in dict(batch).items() if k not in drop}
    if isinstance(batch, (tuple, list)):
        return batch[0]  # (inputs, labels) convention
    return batch


def calib_from_dataloader(dataloader, n: int, batch_size: int) -> list:
    """Up to ``n`` training items (labels kept) put through the loader's collator in batches of
    ``batch_size``; the dataset is indexed directly, so the sampler and the RNG are untouched."""
    items = _dataset_items(dataloader, n, "calib")
    return [_collate(dataloader, items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def write_state(directory: str | os.PathLike, payload: dict, tensors: dict | None = None) -> Path:
    """Write ``payload`` (see the module docstring) and ``tensors`` into ``directory``, atomically."""
    missing = [k for k in STATE_KEYS if k not in payload]
    if missing:
        raise PruningError(f"internal: a callback state lacks {missing}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors:
        from safetensors.torch import save_file

        tmp = directory / (SCORES_NAME + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, directory / SCORES_NAME)
    path = directory / STATE_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_state(directory: str | os.PathLike, callback: str) -> tuple[dict, dict]:
    """``(payload, tensors)`` of ``directory/hf_prune_state.json``, checked against the schema."""
    path = Path(directory) / STATE_NAME
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PruningError(f"{path} is not valid JSON ({exc}): the checkpoint is truncated or corrupted; resume "
                           "from an earlier checkpoint") from exc
    if not isinstance(payload, dict):
        raise PruningError(f"{path} does not hold a JSON object; it was not written by hf_prune")
    if payload.get("format_version") != STATE_VERSION:
        raise PruningError(f"{path} has format_version {payload.get('format_version')!r}; this hf_prune reads "
                           f"version {STATE_VERSION} (resume with the hf_prune version that wrote it)")
    missing = [k for k in STATE_KEYS if k not in payload]
    if missing:
        raise PruningError(f"{path} lacks the fields {missing}; it is incomplete, resume from another checkpoint")
    if payload["callback"] != callback:
        raise PruningError(f"{path} was written by {payload['callback']}, not {callback}; resume with the callback "
                           "that wrote it")
    if not isinstance(payload["state"], dict) or not isinstance(payload["global_step"], int):
        raise PruningError(f"{path}: 'state' must be an object and 'global_step' an int")
    tensors = {}
    if (Path(directory) / SCORES_NAME).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(Path(directory) / SCORES_NAME))
    return payload, tensors


def reload_checkpoint_weights(model: nn.Module, checkpoint: str | os.PathLike) -> bool:
    """Load ``checkpoint/model.safetensors`` into ``model`` if the Trainer could not (returns True if it did).

    transformers 5 ``save_pretrained`` writes some models (ViT, ...) under legacy parameter names,
    but ``Trainer._load_from_checkpoint`` loads them with a plain non-strict ``load_state_dict`` and
    only warns about the missing keys (huggingface/transformers#48805): the resumed run would silently
    train from the fresh weights. The names are mapped back through transformers' own reverse
    renaming (``revert_weight_conversion``), matching tensors by identity; loading is strict.
    """
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    own = model.state_dict()
    if keys == set(own):
        return False  # names match: the Trainer has loaded them
    mapping = {k: k for k in own}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(own))
        by_tensor = {(t.data_ptr(), tuple(t.shape), t.dtype): n for n, t in own.items()}
        for saved_name, t in reverted.items():
            name = by_tensor.get((t.data_ptr(), tuple(t.shape), t.dtype))
            if name is not None:
                mapping[saved_name] = name
    except Exception as exc:  # older/newer transformers without this helper
        logger.debug("revert_weight_conversion unavailable: %r", exc)
    unknown = sorted(k for k in keys if k not in mapping)
    targets = {mapping[k] for k in keys if k in mapping}
    missing = sorted(k for k in own if k not in targets)
    if unknown or missing:
        raise PruningError(f"cannot resume from {checkpoint}: its weights do not match the model (unknown names "
                           f"{unknown[:4]}, missing {missing[:4]}); resume with the model the checkpoint was made from")
    from safetensors.torch import load_file

    saved = load_file(str(path))
    model.load_state_dict({mapping[k]: v for k, v in saved.items()}, strict=True)
    logger.warning("hf_prune: the Trainer did not load %s (parameter names saved in transformers' legacy format, "
                   "huggingface/transformers#48805); reloaded it with the names mapped", path)
    return True
