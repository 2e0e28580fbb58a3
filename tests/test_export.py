"""ONNX export of pruned models: DepGraph (channels + heads), UPDP-merged and weight-pruned models of
transformers (ViT) and timm (ConvNeXt), run with ONNX Runtime and compared with the model.

The checks here are independent of export_onnx's own check: the file is loaded again and run on a
batch size it was not exported with.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hf_prune
from hf_prune.export import EXPORTERS, ExportError, export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128, num_labels=10)).eval()


def _convnext():
    import timm

    torch.manual_seed(0)
    return timm.create_model("convnext_atto", num_classes=10).eval()


BUILD = {"vit": (_vit, lambda x: {"pixel_values": x}), "convnext": (_convnext, lambda x: x)}
PRUNE = {"depgraph": {"method": "depgraph", "target_macs": 0.5, "round_to": None},
         "updp": {"method": "updp", "num_blocks": 1},
         "magnitude": {"method": "magnitude", "sparsity": 0.5}}
_CACHE: dict = {}


def pruned(family: str, method: str):
    """(pruned model, its inputs wrapper, dense parameter count), built once per session."""
    if (family, method) not in _CACHE:
        build, wrap = BUILD[family]
        model = build()
        dense = sum(p.numel() for p in model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_prune.prune(model, example_inputs=wrap(X), **PRUNE[method])
        _CACHE[family, method] = model, wrap, dense
    return _CACHE[family, method]


def run_onnx(path, inputs: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def reference(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def initializer_count(path) -> int:
    import onnx

    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def assert_same(path, model, wrap, name):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # not the exported batch size
    got = torch.from_numpy(run_onnx(path, {name: x}))
    want = reference(model, wrap(x))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("method", list(PRUNE))
@pytest.mark.parametrize("family", list(BUILD))
def test_pruned_models_export_and_match_onnxruntime(family, method, tmp_path):
    model, wrap, dense = pruned(family, method)
    if (family, method) == ("vit", "depgraph"):
        assert model.vit.layers[0].attention.q_proj.out_features < 64  # heads removed, not only MLP channels
    if method == "updp":
        assert any(type(m).__name__ == "MergedBlock" for m in model.modules())
    if method == "magnitude":
        assert sum((p == 0).sum().item() for p in model.parameters()) > 0.3 * dense
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "model.onnx", example_inputs=wrap(X[:1]), exporter="torchscript")
    assert path == tmp_path / "model.onnx"
    assert_same(path, model, wrap, "pixel_values")
    params = sum(p.numel() for p in model.parameters())
    # the file holds the pruned model (constant folding may fold a little: e.g. a BatchNorm into a conv)
    assert 0.97 * params <= initializer_count(path) <= params
    if method != "magnitude":
        assert params < 0.9 * dense
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.training


def test_dynamo_exporter_on_a_head_pruned_vit(tmp_path):
    model, wrap, _ = pruned("vit", "depgraph")
    path = export_onnx(model, tmp_path / "vit.onnx", example_inputs=wrap(X), exporter="dynamo")
    assert_same(path, model, wrap, "pixel_values")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.onnx"]  # weights inside, no side file


class BatchBakedIn(nn.Module):
    """Uses the batch size as a Python number: a traced export fixes it, so other batches go wrong."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) * int(x.shape[0])


def test_a_file_that_does_not_match_is_refused_and_not_written(tmp_path):
    with pytest.raises(ExportError, match="differs from the model's .* at batch 3; nothing was written"):
        export_onnx(BatchBakedIn(), tmp_path / "bad.onnx", example_inputs=torch.randn(2, 4), exporter="torchscript")
    assert list(tmp_path.iterdir()) == []
    path = export_onnx(BatchBakedIn(), tmp_path / "fixed.onnx", example_inputs=torch.randn(2, 4),
                       exporter="torchscript", dynamic_batch=False)  # a fixed batch is honest about it
    assert run_onnx(path, {"pixel_values": torch.ones(2, 4)}).shape == (2, 2)


def test_masked_model_and_bad_arguments_are_refused(tmp_path):
    model = _vit()
    hf_prune.prune(model, target_macs=0.5, example_inputs={"pixel_values": X}, compact=False)
    with pytest.raises(ExportError, match="still carries pruning masks .* hf_prune.compact"):
        export_onnx(model, tmp_path / "m.onnx", example_inputs={"pixel_values": X})
    with pytest.raises(ValueError, match="exporter='onnx' is not one of"):
        export_onnx(_vit(), tmp_path / "m.onnx", example_inputs={"pixel_values": X}, exporter="onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tmp_path, capsys):
    from hf_prune.cli import export as export_cli
    from hf_prune.cli.main import main
    from hf_prune.hub import AutoPrunedModel, save_pretrained

    assert export_cli.EXPORTERS == EXPORTERS
    model, wrap, _ = pruned("vit", "depgraph")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no image processor for a model built from a config
        save_pretrained(model, tmp_path / "vit", card=False)
    out = tmp_path / "onnx" / "vit.onnx"
    code = main(["export", str(tmp_path / "vit"), "--output", str(out), "--exporter", "torchscript"])
    assert code == 0, capsys.readouterr().err
    assert "outputs match the model (ONNX Runtime)" in capsys.readouterr().out
    assert_same(out, AutoPrunedModel.from_pretrained(tmp_path / "vit"), wrap, "pixel_values")
    assert main(["export", str(tmp_path / "vit"), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
