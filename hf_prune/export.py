"""Export a (pruned) model to ONNX, checked against the model with ONNX Runtime.

This module owns :func:`export_onnx`. A compacted model is an ordinary model of smaller shape, so
any exporter sees plain layers; what this adds is the checks a deployment needs: the model must be
compacted (masks would export the full-size model), the batch dimension is dynamic by default, and
the file is only put in place after ONNX Runtime reproduced the model's outputs (max abs
difference ≤ ``rtol`` × the output's scale) on the example inputs and on another batch size.

Exporters: ``"dynamo"`` is ``torch.onnx.export(..., dynamo=True)`` (torch.export, needs
``onnxscript``), ``"torchscript"`` the older tracing exporter (``dynamo=False``, deprecated by
PyTorch but still shipped). ``"auto"`` uses dynamo when onnxscript is installed and falls back to
TorchScript with a warning if dynamo fails.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .core.execution import eval_mode
from .core.inputs import batch_size, model_inputs

__all__ = ["export_onnx", "ExportError", "EXPORTERS"]

EXPORTERS = ("auto", "dynamo", "torchscript")


class ExportError(RuntimeError):
    """The model could not be exported, or the exported file does not compute what the model does."""


def export_onnx(model: nn.Module, path: str | os.PathLike, *, example_inputs, opset: int | None = None,
                dynamic_batch: bool = True, exporter: str = "auto", check: bool = True, rtol: float = 1e-4) -> Path:
    """Write ``model`` (in eval mode) as ONNX to ``path`` and return the path.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs
    (``{"pixel_values": x}`` for transformers models), as for :func:`hf_prune.prune`. Inputs are
    named after the dict's keys (else ``pixel_values`` / ``input_<i>``), outputs after the model's
    output fields (``logits``, ...; else ``output`` / ``output_<i>``). ``opset``: the ONNX opset
    (None: the exporter's default). ``dynamic_batch``: the first dimension of every input and output
    may vary. ``exporter``: ``"auto"``, ``"dynamo"`` or ``"torchscript"`` (see the module docstring).
    ``check``: run the file with ONNX Runtime (``pip install onnxruntime``) and raise
    :class:`ExportError` unless every output matches within ``rtol`` of its scale; nothing is
    written at ``path`` then. The model's weights and train/eval modes are unchanged afterwards.
    """
    from .engine.masks import get_mask

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r} is not one of {EXPORTERS}")
    if get_mask(model) is not None:
        raise ExportError("the model still carries pruning masks (prune(..., compact=False)): it would export at its "
                          "full size. Call hf_prune.compact(model) first")
    if check and importlib.util.find_spec("onnxruntime") is None:
        raise ImportError("export_onnx(check=True) runs the exported file with ONNX Runtime: pip install onnxruntime "
                          "(or pass check=False to skip the check)")
    path = Path(path)
    args, kwargs = model_inputs(model, example_inputs)
    if dynamic_batch and batch_size(example_inputs) == 1:  # a batch of 1 lets exporters bake the size in
        args, kwargs = _repeat_batch(args, 2, vary=True), _repeat_batch(kwargs, 2, vary=True)
    with eval_mode(model), torch.no_grad():
        reference = _flatten(model(*args, **kwargs))
        output_names = [name for name, _ in reference]
        input_names = list(kwargs) if kwargs else (["pixel_values"] if len(args) == 1 else
                                                   [f"input_{i}" for i in range(len(args))])
        with tempfile.TemporaryDirectory(prefix="hf_prune_onnx_", dir=path.parent if path.parent.exists() else None) \
                as tmp:
            staged = Path(tmp) / path.name
            _export(model, staged, args, kwargs, input_names, output_names, opset, dynamic_batch, exporter)
            if check:
                _check(model, staged, args, kwargs, input_names, output_names, dynamic_batch, rtol)
            path.parent.mkdir(parents=True, exist_ok=True)
            for item in Path(tmp).iterdir():  # the .onnx file and any external-data file it names
                shutil.move(str(item), path.parent / item.name)
    return path


def _repeat_batch(x, n: int, vary: bool = False):
    """``x`` with batch size ``n`` (its samples repeated); ``vary`` perturbs float inputs so that
    the samples differ (a file that mixes samples up cannot pass the check then)."""
    if isinstance(x, torch.Tensor):
        if not x.dim():
            return x
        out = x[torch.arange(n) % x.shape[0]].clone()
        if vary and out.is_floating_point():
            noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(n), dtype=out.dtype)
            out += noise.to(out.device) * out.std().clamp_min(1e-3)
        return out
    if isinstance(x, Mapping):
        return {k: _repeat_batch(v, n, vary) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_repeat_batch(v, n, vary) for v in x)
    return x


def _flatten(output) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor the model returns, in the order exporters flatten them."""
    if isinstance(output, torch.Tensor):
        return [("output", output)]
    if isinstance(output, Mapping):  # transformers ModelOutput: only the fields that are set
        items = [(k, v) for k, v in output.items() if isinstance(v, torch.Tensor)]
        if len(items) != len([v for v in output.values() if v is not None]):
            raise ExportError("the model returns nested or non-tensor outputs; export a module that returns tensors "
                              "(e.g. pass output_hidden_states=False, return_dict=True)")
        return items
    if isinstance(output, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in output):
        return [(f"output_{i}", v) for i, v in enumerate(output)]
    raise ExportError(f"cannot name the outputs of a model that returns {type(output).__name__}; export a module "
                      "that returns a tensor, a tuple of tensors or a transformers ModelOutput")


def _export(model, path, args, kwargs, input_names, output_names, opset, dynamic_batch, exporter):
    if exporter == "auto":
        exporter = "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"
        if exporter == "dynamo":
            try:
                return _export(model, path, args, kwargs, input_names, output_names, opset, dynamic_batch, "dynamo")
            except Exception as exc:  # noqa: BLE001  (any dynamo failure: the tracer may still manage)
                warnings.warn(f"the torch.export-based ONNX exporter failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}); exported with the TorchScript exporter instead",
                              UserWarning, stacklevel=3)
                for item in path.parent.iterdir():
                    item.unlink()
                exporter = "torchscript"
    common = {"input_names": input_names, "output_names": output_names, "opset_version": opset}
    if exporter == "dynamo":
        if importlib.util.find_spec("onnxscript") is None:
            raise ImportError("exporter='dynamo' needs onnxscript: pip install onnxscript (or use exporter='torchscript')")
        shapes = _dynamic_shapes(args, kwargs) if dynamic_batch else None
        with _quiet():
            torch.onnx.export(model, args, str(path), kwargs=kwargs or None, dynamo=True, dynamic_shapes=shapes,
                              external_data=False, verbose=False, **common)
        return
    axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    with _quiet():
        torch.onnx.export(model, args, str(path), kwargs=kwargs or None, dynamo=False, dynamic_axes=axes,
                          do_constant_folding=True, **common)


def _dynamic_shapes(args, kwargs):
    batch = torch.export.Dim("batch", min=1)

    def spec(x):
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() else None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


@contextlib.contextmanager
def _quiet():
    """The exporters' own notes (deprecation, tracer warnings) are about their internals, not the user's model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(open(os.devnull, "w")) as sink:  # noqa: SIM115
            try:
                yield
            finally:
                sink.close()


def _check(model, path, args, kwargs, input_names, output_names, dynamic_batch, rtol):
    """Run ``path`` with ONNX Runtime on the inputs (and on another batch size) and compare with the model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    cases = [(args, kwargs)]
    if dynamic_batch:
        n = batch_size(kwargs or args) + 1
        cases.append((_repeat_batch(args, n, vary=True), _repeat_batch(kwargs, n, vary=True)))
    for case_args, case_kwargs in cases:
        tensors = list(case_kwargs.values()) if case_kwargs else list(case_args)
        feed = {name: t.detach().cpu().numpy() for name, t in zip(input_names, tensors)}
        got = session.run(output_names, feed)
        want = _flatten(model(*case_args, **case_kwargs))
        for (name, ref), out in zip(want, got):
            out = torch.from_numpy(out)
            ref = ref.detach().cpu().float()
            if out.shape != ref.shape:
                raise ExportError(f"ONNX output {name!r} has shape {tuple(out.shape)}, the model's {tuple(ref.shape)}; "
                                  "nothing was written")
            scale = max(ref.abs().max().item(), 1e-12)
            err = (out.float() - ref).abs().max().item()
            if err > rtol * scale:
                raise ExportError(f"ONNX Runtime's {name!r} differs from the model's by {err:.3g} (scale {scale:.3g}, "
                                  f"allowed {rtol:g} of it) at batch {ref.shape[0] if ref.dim() else 1}; nothing was "
                                  "written. Try exporter='torchscript' or 'dynamo', or another opset")
