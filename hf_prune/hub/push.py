"""Publishing a pruned model: save (config + safetensors + card + plot) and upload in one commit.

Only the model's own files are uploaded: those the save wrote (config, weights, card, plot, remote
code, processor files) plus processor files already in ``save_dir``. Anything else in that folder
(a ``.env``, notes, stale weights, sub-folders) stays local.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

__all__ = ["PushError", "push_to_hub", "upload_list"]


class PushError(RuntimeError):
    """Uploading a pruned model to the Hub failed; nothing was committed and the model is unchanged."""

    def __init__(self, message: str, *, repo_id: str, step: str, save_dir: str | None):
        super().__init__(message)
        self.repo_id = repo_id
        self.step = step
        self.save_dir = save_dir


def push_to_hub(model: nn.Module, repo_id: str, *, metrics=None, private: bool = False, token: str | None = None,
                commit_message: str | None = None, standalone: bool = False, card_data: dict | None = None,
                speed: dict | None = None, save_dir: str | os.PathLike | None = None, revision: str | None = None,
                create_pr: bool = False, image_processor=None, **save_kwargs):
    """Save ``model`` with :func:`~hf_prune.hub.save_pretrained` and upload it to ``repo_id``.

    The repository gets ``config.json`` (with the structure spec), ``model.safetensors``, the
    model card ``README.md`` (``metrics`` in ``model-index``, the measured ``speed`` if given,
    how to load it) and ``pruned_layers.png``; with ``standalone=True`` also
    ``modeling_hf_prune.py`` for loading with plain transformers (``trust_remote_code=True``).
    ``image_processor``: saved and uploaded with the model (default: the processor of the model's source,
    see :mod:`hf_prune.hub.processor`), so ``pipeline(...)`` works with the repo. Everything is uploaded in
    one commit, and only these files: whatever else ``save_dir`` holds is never uploaded, except
    processor files (``preprocessor_config.json``, ...) saved there earlier. ``save_dir``: keep
    the saved files there (else a temporary directory is used). Other keyword arguments go to
    ``save_pretrained`` (``method``, ``settings``, ``stats``, ``model_args``, ``base_model``, ...).

    Returns the ``huggingface_hub.CommitInfo`` of the commit. A failure while creating the
    repository or uploading raises :class:`PushError` naming the repository and what to retry;
    the model and the files in ``save_dir`` are left as they are.
    """
    save_kwargs = dict(save_kwargs, metrics=metrics, standalone=standalone, card_data=card_data, speed=speed,
                       image_processor=image_processor)
    if save_dir is not None:
        return _push(model, repo_id, Path(save_dir), True, private, token, commit_message, revision, create_pr,
                     save_kwargs)
    with tempfile.TemporaryDirectory(prefix="hf_prune_push_") as tmp:
        return _push(model, repo_id, Path(tmp) / "model", False, private, token, commit_message, revision,
                     create_pr, save_kwargs)


def upload_list(folder: Path, written: list[str]) -> list[str]:
    """The files of ``folder`` a push uploads: ``written`` (by this save) and processor files found there."""
    from .io import PROCESSOR_FILES

    found = [n for n in PROCESSOR_FILES if (folder / n).is_file() and not (folder / n).is_symlink()]
    return sorted(set(written) | set(found))


def _push(model, repo_id, folder, keep, private, token, commit_message, revision, create_pr, save_kwargs):
    from huggingface_hub import CommitOperationAdd, HfApi

    from .io import save_checkpoint

    files = upload_list(folder, save_checkpoint(model, folder, repo_id=repo_id, **save_kwargs))
    api = HfApi(token=token)
    step = "creating the repository"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        full_id = getattr(url, "repo_id", None) or repo_id
        step = "uploading the files"
        spec_method = (getattr(getattr(model, "config", None), "hf_prune", None) or {}).get("method", {})
        message = commit_message or f"Upload pruned model ({spec_method.get('name') or 'hf_prune'}) with hf_prune"
        operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(folder / n)) for n in files]
        return api.create_commit(repo_id=full_id, repo_type="model", operations=operations,
                                 commit_message=message, revision=revision, create_pr=create_pr)
    except Exception as exc:  # network errors, HTTP errors, timeouts: all mean "not published"
        where = (f"the saved files are in {folder}; retry with hf_prune.push_to_hub(..., save_dir='{folder}') or "
                 f"HfApi().upload_folder(folder_path='{folder}', repo_id='{repo_id}', allow_patterns={files!r})"
                 if keep else
                 "retry hf_prune.push_to_hub (pass save_dir= to keep a local copy to upload later)")
        raise PushError(f"pushing the pruned model to '{repo_id}' failed while {step}: {type(exc).__name__}: {exc}. "
                        f"Nothing was committed and the model is unchanged; {where}.",
                        repo_id=repo_id, step=step, save_dir=str(folder) if keep else None) from exc
