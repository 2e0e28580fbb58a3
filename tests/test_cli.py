"""The ``hf-prune`` command: profile, prune (timm name, local transformers directory, Hub repo id),
error messages and exit codes, and the installed console script."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_prune.cli.main import main

RESNET18_MACS_64 = 148_557_824  # resnet18 at 1x3x64x64 (convolutions + fc)


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _script() -> str:
    """The installed ``hf-prune`` console script next to this interpreter."""
    path = Path(sys.executable).parent / "hf-prune"
    if path.exists():
        return str(path)
    found = shutil.which("hf-prune")
    assert found is not None, "the hf-prune console script is not installed (pip install -e .)"
    return found


def _tiny_vit_dir(path: Path, with_weights: bool = True) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)
    model = ViTForImageClassification(config)
    if with_weights:
        model.save_pretrained(path)
    else:
        config.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------


def test_import_is_cheap():
    code = ("import sys, hf_prune.cli.main; "
            "print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version(capsys):
    import hf_prune

    code, out, _ = _run(capsys, ["--version"])
    assert code == 0
    assert out.strip() == f"hf-prune {hf_prune.__version__}"


def test_profile_timm_json(capsys):
    import torch

    threads = torch.get_num_threads()
    code, out, err = _run(capsys, ["profile", "resnet18", "--image-size", "64", "--json", "--iters", "3",
                                   "--threads", "1"])
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "resnet18" and data["library"] == "timm"
    assert data["input_shape"] == [1, 3, 64, 64]
    assert data["params"] == 11_689_512
    assert data["macs"] == RESNET18_MACS_64
    assert data["batch_size"] == 1 and data["device"] == "cpu"
    assert data["latency_ms"] > 0
    assert data["threads"] == 1
    assert torch.get_num_threads() == threads  # --threads is restored after the command


def test_profile_table_and_batch_size(capsys):
    code, out, err = _run(capsys, ["profile", "resnet18", "--image-size", "64", "--batch-size", "2",
                                   "--iters", "2"])
    assert code == 0, err
    assert "MACs" in out and "297.12 M" in out  # two images
    assert "batch 2" in out


def test_prune_timm_saves_and_reloads(capsys, tmp_path):
    out_dir = tmp_path / "r18"
    argv = ["prune", "resnet18", "--image-size", "64", "--target-macs", "0.6", "--output", str(out_dir),
            "--json", "--iters", "5", "--threads", "1"]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    data = json.loads(out)
    assert data["before"]["macs"] == RESNET18_MACS_64
    assert 0.45 <= data["ratios"]["macs"] <= 0.6 + 0.01
    assert data["after"]["params"] < data["before"]["params"]
    assert data["ratios"]["speedup"] > 0 and data["after"]["latency_ms"] > 0
    assert data["target"] == {"target_macs": 0.6}
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out_dir))
    assert data["output"] == str(out_dir.resolve())

    import torch

    from hf_prune.hub import AutoPrunedModel
    from hf_prune.metrics.profiling import count_macs

    reloaded = AutoPrunedModel.from_pretrained(str(out_dir)).eval()
    assert count_macs(reloaded, torch.randn(1, 3, 64, 64)) == data["after"]["macs"]
    assert sum(p.numel() for p in reloaded.parameters()) == data["after"]["params"]

    # the saved directory is a MODEL for the CLI too (rebuilt from its spec)
    code, out, err = _run(capsys, ["profile", str(out_dir), "--image-size", "64", "--json", "--iters", "1"])
    assert code == 0, err
    profiled = json.loads(out)
    assert profiled["library"] == "timm" and "pruned by hf_prune" in profiled["weights"]
    assert profiled["macs"] == data["after"]["macs"]


def test_prune_table_output(capsys):
    code, out, err = _run(capsys, ["prune", "resnet18", "--image-size", "32", "--sparsity", "0.3",
                                   "--round-to", "0", "--mode", "local", "--iters", "2", "--threads", "1"])
    assert code == 0, err
    assert "before" in out and "after" in out and "speed-up" in out
    assert "sparsity=0.3" in out
    assert "not saved (no --output)" in out


def test_prune_with_every_data_free_method(capsys, tmp_path):
    base = ["prune", "resnet18", "--image-size", "64", "--json", "--iters", "2", "--threads", "1"]
    code, out, err = _run(capsys, base + ["--method", "updp", "--num-blocks", "2", "--output", str(tmp_path / "u")])
    assert code == 0, err
    data = json.loads(out)
    assert data["method"] == "updp" and data["target"] == {"num_blocks": 2} and data["ratios"]["macs"] < 1
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    assert len(config["hf_prune"]["merged_blocks"]) == 2

    code, out, err = _run(capsys, base + ["--method", "magnitude", "--sparsity", "0.5"])
    assert code == 0, err
    data = json.loads(out)
    assert data["sparsity"] == pytest.approx(0.5, abs=0.01) and data["ratios"]["params"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--method", "rd", "--sparsity", "0.5"], "needs calibration data"),
    (["--method", "ovit", "--sparsity", "0.5"], "needs calibration data"),
    (["--method", "stagewise", "--target-macs", "0.6"], "needs calibration data"),
    (["--method", "updp", "--sparsity", "0.5"], "--method updp does not take --sparsity"),
    (["--method", "magnitude", "--target-macs", "0.5"], "--method magnitude does not take --target-macs"),
    (["--num-blocks", "2"], "--method depgraph does not take --num-blocks"),
    (["--method", "hessian", "--sparsity", "0.5"], "unknown method 'hessian'; available: depgraph"),
])
def test_method_and_target_mismatch_is_a_usage_error(capsys, argv, message):
    code, out, err = _run(capsys, ["prune", "resnet18"] + argv)
    assert code == 2 and out == "" and message in err


@pytest.mark.parametrize("flag,value,interval", [("--target-macs", "1.5", "(0, 1]"), ("--target-macs", "0", "(0, 1]"),
                                                 ("--sparsity", "1", "[0, 1)")])
def test_bad_target_is_a_usage_error(capsys, tmp_path, flag, value, interval):
    code, out, err = _run(capsys, ["prune", "resnet18", flag, value, "--output", str(tmp_path / "x")])
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-prune: error: ")
    assert flag in err and interval in err
    assert not (tmp_path / "x").exists()


def test_target_is_required(capsys):
    code, _, err = _run(capsys, ["prune", "resnet18"])
    assert code == 2 and "--target-macs" in err


def test_unknown_model(capsys):
    code, out, err = _run(capsys, ["prune", "resnet81", "--target-macs", "0.5"])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "unknown model 'resnet81'" in err and "did you mean resnet18" in err
    assert "Traceback" not in err
    code, _, err = _run(capsys, ["profile", "no_such_model_at_all"])
    assert code == 2 and "unknown model" in err


def test_directory_without_config(capsys, tmp_path):
    code, _, err = _run(capsys, ["profile", str(tmp_path)])
    assert code == 2 and "config.json" in err


def test_model_that_does_not_run_at_that_size(capsys, tmp_path):
    _tiny_vit_dir(tmp_path / "vit")
    code, _, err = _run(capsys, ["profile", str(tmp_path / "vit"), "--image-size", "48"])
    assert code == 2 and "does not run on inputs of shape 1x3x48x48" in err


def test_pruning_failure_exit_1_and_debug_traceback(capsys, monkeypatch):
    import hf_prune.api

    def fail(*args, **kwargs):
        raise hf_prune.api.PruningError("nothing to prune: every channel is pinned")

    monkeypatch.setattr(hf_prune.api, "prune", fail)
    argv = ["prune", "resnet18", "--image-size", "32", "--target-macs", "0.5"]
    code, _, err = _run(capsys, argv)
    assert code == 1
    assert err.strip().splitlines()[-1] == ("hf-prune: error: pruning failed: nothing to prune: every channel is "
                                            "pinned (run with --debug for the traceback)")
    assert "random weights" in err  # the model was built from its name: the user is told what that means
    code, _, err = _run(capsys, argv + ["--debug"])
    assert code == 1 and "Traceback" in err and "PruningError" in err


def test_local_transformers_directory(capsys, tmp_path):
    model_dir = _tiny_vit_dir(tmp_path / "vit")
    code, out, err = _run(capsys, ["prune", str(model_dir), "--target-macs", "0.5", "--json", "--iters", "2"])
    assert code == 0, err
    data = json.loads(out)
    assert data["library"] == "transformers" and data["weights"].startswith("loaded from")
    assert data["input_shape"] == [1, 3, 32, 32]
    assert data["ratios"]["macs"] <= 0.5 + 0.02

    config_only = _tiny_vit_dir(tmp_path / "cfg", with_weights=False)
    code, out, err = _run(capsys, ["profile", str(config_only), "--num-labels", "3", "--json", "--iters", "1"])
    assert code == 0, err
    assert json.loads(out)["weights"] == "random"
    assert "no weights" in err
    # a trained head cannot be resized
    code, _, err = _run(capsys, ["profile", str(model_dir), "--num-labels", "3"])
    assert code == 2 and "--num-labels" in err


def test_push_to_local_hub_and_load_by_repo_id(capsys, tmp_path, hub_server):
    model_dir = _tiny_vit_dir(tmp_path / "vit")
    code, out, err = _run(capsys, ["prune", str(model_dir), "--target-macs", "0.5",
                                   "--push-to-hub", "test-user/tiny-vit-pruned", "--json", "--iters", "1"])
    assert code == 0, err
    pushed = json.loads(out)
    assert "test-user/tiny-vit-pruned" in pushed["pushed_to"]
    assert "config.json" in hub_server.list_files("test-user/tiny-vit-pruned")

    # MODEL as a Hub repo id: the pruned model is rebuilt from its spec
    code, out, err = _run(capsys, ["profile", "test-user/tiny-vit-pruned", "--json", "--iters", "1"])
    assert code == 0, err
    data = json.loads(out)
    assert data["macs"] == pushed["after"]["macs"]
    assert data["params"] == pushed["after"]["params"]

    code, _, err = _run(capsys, ["profile", "test-user/does-not-exist"])
    assert code == 2 and "could not load Hub repo 'test-user/does-not-exist'" in err


def test_console_script():
    script = _script()
    run = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("hf-prune ")
    run = subprocess.run([script, "prune", "resnet18", "--target-macs", "1.5"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "hf-prune: error: --target-macs: target_macs=1.5 must be in (0, 1]: the fraction of the dense MACs to keep"]
    run = subprocess.run([script, "prune", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "--target-macs" in run.stdout and "--push-to-hub" in run.stdout
