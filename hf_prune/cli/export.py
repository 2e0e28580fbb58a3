"""``hf-prune export MODEL --output model.onnx``: a (pruned) model as ONNX, checked with ONNX Runtime.

``MODEL`` is what ``hf-prune prune`` takes (a saved pruned model's directory, a transformers
directory or Hub id, a timm name). The file is written only after ONNX Runtime reproduced the
model's outputs (see :func:`hf_prune.export.export_onnx`); exit status 1 otherwise.
"""
from __future__ import annotations

import argparse
import json

from .common import positive_int

HELP = "export a (pruned) model to ONNX, checked with ONNX Runtime"
DESCRIPTION = ("Export MODEL (a directory saved by hf-prune prune / hf_prune.save_pretrained, a transformers "
               "directory or Hub id, or a timm name) to ONNX with a dynamic batch dimension, and check the file "
               "against the model with ONNX Runtime before writing it.")


# hf_prune.export.EXPORTERS, spelled out: building the parser must not import torch.
EXPORTERS = ("auto", "dynamo", "torchscript")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` subcommand's arguments."""
    parser.add_argument("model", metavar="MODEL", help="a saved (pruned) model directory, a Hub id or a timm name")
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--opset", type=positive_int, metavar="N", help="ONNX opset (default: the exporter's)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto",
                        help="dynamo (torch.export), torchscript, or auto: dynamo when onnxscript is installed, "
                             "falling back to torchscript (default: auto)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch-size")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                        help="batch size of the example input (default: 1)")
    parser.add_argument("--image-size", type=positive_int, metavar="N",
                        help="input height and width (default: the model's own input size)")
    parser.add_argument("--no-check", action="store_true", help="do not run the file with ONNX Runtime")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a line")


def run(args, out) -> int:
    """Export ``args.model`` to ``args.output``; 0 on success (errors are raised as ``CLIError``)."""
    from pathlib import Path

    from ..export import ExportError, export_onnx
    from .common import EXIT_FAILURE, EXIT_OK, CLIError, load_model

    output = Path(args.output)
    if output.is_dir():
        raise CLIError(f"--output {args.output!r} is a directory; give the .onnx file to write")
    loaded = load_model(args.model, image_size=args.image_size)
    inputs = loaded.example_inputs(args.batch_size)
    try:
        export_onnx(loaded.model, output, example_inputs=inputs, opset=args.opset,
                    dynamic_batch=not args.static_batch, exporter=args.exporter, check=not args.no_check)
    except (ExportError, ImportError) as exc:
        raise CLIError(f"export failed: {exc}", EXIT_FAILURE) from exc
    result = {"model": args.model, "output": str(output), "bytes": output.stat().st_size,
              "input_shape": [None if not args.static_batch and i == 0 else d
                              for i, d in enumerate((args.batch_size, *loaded.input_size))],
              "checked_with_onnxruntime": not args.no_check}
    if args.json:
        print(json.dumps(result, indent=2), file=out)
    else:
        checked = "outputs match the model (ONNX Runtime)" if not args.no_check else "not checked"
        print(f"wrote {output} ({result['bytes'] / 1e6:.2f} MB); {checked}", file=out)
    return EXIT_OK
