"""Pruned checkpoints in transformers' ``pipeline``: the base model's image processor travels with
them, the Auto classes resolve ``hf_prune_<type>`` (``hf_prune.enable_pipeline``), standalone repos
work with ``trust_remote_code=True`` and no hf_prune, and the card carries the Hub's metadata.

Predictions are compared with the model itself on real digit images (scikit-learn's digits).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_prune
from hf_prune.hub import AutoPrunedModel, push_to_hub, save_pretrained
from hf_prune.hub.auto import enable_pipeline

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")]

LABELS = {i: f"digit {i}" for i in range(10)}


@pytest.fixture(autouse=True)
def own_auto_registry():
    """enable_pipeline() changes transformers' Auto registries for the whole process: give them back
    after each test, so that other tests still see a plain transformers that refuses pruned types."""
    from transformers.models.auto import configuration_auto, modeling_auto

    from hf_prune.hub import auto

    mappings = [configuration_auto.CONFIG_MAPPING] + [getattr(modeling_auto, name[:-len("_NAMES")])
                                                      for _, name in auto.VISION_AUTO_CLASSES]
    saved = [dict(m._extra_content) for m in mappings]
    registered = set(auto._REGISTERED)
    yield
    for mapping, extra in zip(mappings, saved):
        mapping._extra_content.clear()
        mapping._extra_content.update(extra)
    auto._REGISTERED.clear()
    auto._REGISTERED.update(registered)
TIMM_CFG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25], "crop_pct": 1.0, "crop_mode": "center"}


def digit_images(n=6):
    """Real handwritten digits as RGB PIL images (what a pipeline user passes)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images[:n]
    return [Image.fromarray((im * 15).astype(np.uint8)).convert("RGB").resize((32, 32)) for im in images]


def vit_source(path: Path) -> Path:
    """A folder holding a small ViT and its image processor, as a downloaded checkpoint would."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10, id2label=LABELS,
                       label2id={v: k for k, v in LABELS.items()})
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        path)
    return path


def pruned_vit(source) -> torch.nn.Module:
    """The ViT of ``source`` with heads and channels removed (DepGraph, 50% of the MACs)."""
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(source).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_prune.prune(model, method="depgraph", target_macs=0.5, round_to=None,
                       example_inputs={"pixel_values": torch.randn(1, 3, 32, 32)})
    return model


def pruned_timm_wrapper() -> torch.nn.Module:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(0)
    config = TimmWrapperConfig(architecture="resnet18", num_labels=10, id2label=LABELS,
                               label2id={v: k for k, v in LABELS.items()}, pretrained_cfg=dict(TIMM_CFG))
    model = TimmWrapperForImageClassification(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_prune.prune(model, method="depgraph", target_macs=0.6,
                       example_inputs={"pixel_values": torch.randn(1, 3, 32, 32)})
    return model


def probabilities(model, processor, images) -> torch.Tensor:
    with torch.no_grad():
        return model(**processor(images, return_tensors="pt")).logits.softmax(-1)


def assert_pipeline_agrees(pipe, model, processor, images):
    """Every label's score from the pipeline equals the model's own softmax on the processed images."""
    want = probabilities(model, processor, images)
    got = pipe(images, top_k=len(LABELS))
    for scores, probs in zip(got, want):
        assert {r["label"] for r in scores} == set(LABELS.values())
        by_label = {r["label"]: r["score"] for r in scores}
        diff = max(abs(by_label[LABELS[i]] - probs[i].item()) for i in range(len(LABELS)))
        assert diff < 1e-6, diff
    assert [s[0]["label"] for s in got] == [LABELS[i] for i in want.argmax(-1).tolist()]


def test_vit_pipeline_from_a_saved_folder(tmp_path):
    from transformers import AutoModel, AutoModelForImageClassification, ViTImageProcessor, pipeline

    source = vit_source(tmp_path / "base")
    model = pruned_vit(source)
    assert model.vit.layers[0].attention.q_proj.out_features < 64  # heads were removed
    out = save_pretrained(model, tmp_path / "pruned", metrics={"accuracy": 0.5},
                          card_data={"dataset": {"name": "Digits", "type": "digits", "split": "test"}})
    assert json.loads((out / "preprocessor_config.json").read_text()) == json.loads(
        (source / "preprocessor_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["model_type"] == "hf_prune_vit"

    with pytest.raises(ValueError, match="hf_prune_vit"):  # plain transformers refuses the pruned type
        pipeline("image-classification", model=str(out))
    assert "hf_prune_vit" in enable_pipeline() and enable_pipeline("vit") == []  # idempotent
    pipe = pipeline("image-classification", model=str(out))
    assert type(pipe.model).__name__ == "ViTForImageClassification"
    assert_pipeline_agrees(pipe, model, ViTImageProcessor.from_pretrained(source), digit_images())

    # the Auto classes go through AutoPrunedModel: exact weights, and no other architecture
    loaded = AutoModelForImageClassification.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    fresh = AutoModelForImageClassification.from_config(loaded.config)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="pruned ViTForImageClassification; AutoModel would need ViTModel"):
        AutoModel.from_pretrained(out)

    resaved = save_pretrained(AutoPrunedModel.from_pretrained(out), tmp_path / "again", card=False)
    assert (resaved / "preprocessor_config.json").read_text() == (out / "preprocessor_config.json").read_text()


def test_vit_pipeline_from_the_hub(hub_server, tmp_path):
    from transformers import ViTForImageClassification, ViTImageProcessor, pipeline

    source = vit_source(tmp_path / "base")
    ViTForImageClassification.from_pretrained(source).push_to_hub("test-user/vit-base")
    ViTImageProcessor.from_pretrained(source).push_to_hub("test-user/vit-base")
    model = pruned_vit("test-user/vit-base")  # its processor is found on the Hub (cache first)
    push_to_hub(model, "test-user/vit-pruned")
    assert "preprocessor_config.json" in hub_server.list_files("test-user/vit-pruned")
    enable_pipeline()
    pipe = pipeline("image-classification", model="test-user/vit-pruned")
    assert_pipeline_agrees(pipe, model, ViTImageProcessor.from_pretrained(source), digit_images())
    card = hub_server.read_file("test-user/vit-pruned", "README.md").decode()
    assert "base_model: test-user/vit-base" in card and "pipeline_tag: image-classification" in card


def test_timm_wrapper_pipeline_from_a_folder_and_the_hub(hub_server, tmp_path):
    from transformers import TimmWrapperImageProcessor, pipeline

    model = pruned_timm_wrapper()
    out = save_pretrained(model, tmp_path / "pruned")
    saved_cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert {k: saved_cfg[k] for k in TIMM_CFG} == TIMM_CFG  # the checkpoint's own data config, not timm's default
    push_to_hub(model, "test-user/resnet-pruned")
    processor = TimmWrapperImageProcessor(pretrained_cfg=TIMM_CFG)
    enable_pipeline()
    images = digit_images()
    for where in (str(out), "test-user/resnet-pruned"):
        pipe = pipeline("image-classification", model=where)
        assert json.loads(json.dumps(pipe.image_processor.data_config)) == TIMM_CFG
        assert_pipeline_agrees(pipe, model, processor, images)


def test_plain_timm_checkpoint_carries_timm_data_config(tmp_path):
    import timm
    from transformers import AutoImageProcessor

    model = timm.create_model("resnet18", num_classes=5).eval()
    hf_prune.prune(model, method="depgraph", target_macs=0.6, example_inputs=torch.randn(1, 3, 32, 32))
    out = save_pretrained(model, tmp_path / "pruned")
    processor = AutoImageProcessor.from_pretrained(out)  # transformers reads timm's layout
    assert processor.data_config == timm.data.resolve_model_data_config(model)
    card = (out / "README.md").read_text()
    assert "library_name: timm" in card and "pipeline_tag: image-classification" in card


def test_standalone_pipeline_works_without_hf_prune(tmp_path):
    from transformers import TimmWrapperImageProcessor, ViTImageProcessor

    source = vit_source(tmp_path / "base")
    images = digit_images(4)
    dirs, expected = {}, {}
    for name, model, processor in (("vit", pruned_vit(source), ViTImageProcessor.from_pretrained(source)),
                                   ("timm_wrapper", pruned_timm_wrapper(), TimmWrapperImageProcessor(
                                       pretrained_cfg=TIMM_CFG))):
        dirs[name] = str(save_pretrained(model, tmp_path / name, standalone=True, card=False))
        expected[name] = probabilities(model, processor, images).tolist()
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    blocker = tmp_path / "blocker" / "hf_prune"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hf_prune is not installed here')\n")
    script = f"""
import json
try:
    import hf_prune
except ImportError:
    pass
else:
    raise SystemExit("hf_prune is importable")
from PIL import Image
from transformers import pipeline
images = [Image.open({str(tmp_path)!r} + f"/{{i}}.png") for i in range({len(images)})]
out = {{}}
for name, path in {json.dumps(dirs)}.items():
    pipe = pipeline("image-classification", model=path, trust_remote_code=True)
    out[name] = [{{r["label"]: r["score"] for r in scores}} for scores in pipe(images, top_k=10)]
print("SCORES", json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))}
    env.update(PYTHONPATH=str(blocker.parent), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    scores = json.loads(run.stdout.split("SCORES", 1)[1])
    for name, per_image in scores.items():
        for got, want in zip(per_image, expected[name]):
            assert max(abs(got[LABELS[i]] - p) for i, p in enumerate(want)) < 1e-6, name


def test_missing_processor_warns_and_the_save_completes(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=3))
    with pytest.warns(UserWarning, match="no image processor found for this ViTForImageClassification anywhere"):
        out = save_pretrained(model, tmp_path / "none", card=False)
    assert (out / "model.safetensors").is_file() and not (out / "preprocessor_config.json").exists()

    given = ViTImageProcessor(size={"height": 32, "width": 32})
    out = save_pretrained(model, tmp_path / "given", card=False, image_processor=given)
    assert ViTImageProcessor.from_pretrained(out).to_dict() == given.to_dict()
    with pytest.raises(TypeError, match="image_processor must be a transformers image processor"):
        save_pretrained(model, tmp_path / "bad", image_processor=object())
    assert not (tmp_path / "bad").exists()


def test_card_metadata_for_the_hub(tmp_path):
    from huggingface_hub import ModelCard

    model = pruned_timm_wrapper()
    save_pretrained(model, tmp_path / "known", metrics=[{"type": "accuracy", "value": 0.9}],
                    card_data={"dataset": {"name": "MNIST", "type": "ylecun/mnist", "split": "test"}},
                    base_model="timm/resnet18.a1_in1k")
    data = ModelCard.load(tmp_path / "known" / "README.md").data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-classification"
    assert data["datasets"] == ["ylecun/mnist"] and data["base_model"] == "timm/resnet18.a1_in1k"
    assert "hf_prune" in data["tags"]
    assert data["model-index"][0]["results"][0]["metrics"] == [{"type": "accuracy", "value": 0.9}]

    with pytest.warns(UserWarning, match="name no dataset"):
        save_pretrained(model, tmp_path / "unknown", metrics={"accuracy": 0.9})
    text = (tmp_path / "unknown" / "README.md").read_text()
    data = ModelCard.load(tmp_path / "unknown" / "README.md").data.to_dict()
    assert "evaluation data" not in text and "datasets" not in data and "model-index" not in data
    assert "| accuracy | 0.9 | not given |" in text
