"""Every example runs, on tiny settings, and does what its docstring says."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_depgraph_oneshot():
    before, after = load("depgraph_oneshot").main(["--model", "resnet18", "--image-size", "64"])
    assert after.macs <= 0.5 * before.macs and after.params < before.params


def test_depgraph_callback(tmp_path):
    acc, ratio = load("depgraph_callback").main(["--max-steps", "40", "--output-dir", str(tmp_path)])
    assert ratio <= 0.5 and 0.0 <= acc <= 1.0  # the example itself checks the reload is exact


def test_updp_oneshot():
    before, after = load("updp_oneshot").main(["--num-blocks", "1"])
    assert after.macs < before.macs and after.params < before.params


def test_push_and_reload(hub_server):
    assert load("push_and_reload").main(["--repo", f"{hub_server.user}/resnet18-pruned"]) is True


def test_accelerate_launch_example(tmp_path):
    env = dict(os.environ, STEPS="3", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(ROOT / "examples" / "accelerate_launch.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (ROOT / "outputs" / "accelerate_example" / "config.json").exists()
