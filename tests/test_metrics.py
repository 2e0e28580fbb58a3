"""The evaluate metric script shipped in hf_prune/metrics loads and computes offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_prune.metrics

SCRIPT = """
import json, sys
import evaluate
metric = evaluate.load(sys.argv[1])
out = {
    "simple": metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]),
    "count": metric.compute(predictions=[3, 3, 1], references=[3, 2, 1], normalize=False),
}
metric.add_batch(predictions=[1, 2], references=[1, 2])
metric.add_batch(predictions=[4], references=[5])
out["batched"] = metric.compute()
print(json.dumps(out))
"""


def test_accuracy_metric_loads_offline(tmp_path):
    path = Path(hf_prune.metrics.ACCURACY_METRIC_PATH)
    assert path.is_file()
    # a fresh interpreter, so HF_HUB_OFFLINE and the cache location take effect at import time
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["simple"] == {"accuracy": 0.75}
    assert out["count"] == {"accuracy": 2}
    assert out["batched"]["accuracy"] == 2 / 3
