"""Per-process memory of one-shot oViT on ViT-B with the calibration split across 1 and 2 ranks.

``hf_prune.prune(model, "ovit", calib=..., distributed=True)`` on timm ``vit_base_patch16_224`` (random
weights, 85 M prunable weights in qkv / proj / fc1 / fc2) with a small calibration set of real digits,
launched with ``torchrun --nproc_per_node 1`` and then ``2`` (gloo, CPU). With 2 ranks each rank
computes gradients, Fisher information and removals for its half of the layers only
(:mod:`hf_prune.sparse.distributed`), so it should hold about half of what one rank holds.

Measured per process: the RSS just before pruning (the baseline: Python, torch, the model, the
calibration data), the peak RSS while pruning (the kernel's high-water mark ``VmHWM``, reset through
``/proc/self/clear_refs`` just before pruning), their difference (what pruning added at its peak), the
lifetime peak (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), and oViT's own count of the Fisher bytes
it held (``info["fisher_bytes"]``). The two runs' masks and
weights are compared (they must be identical). Results: ``benchmarks/results/distributed_ovit.{md,json}``.

Usage (repository root)::

    PYTHONPATH=. .venv/bin/python benchmarks/distributed_ovit.py                 # both launches, write results
    PYTHONPATH=. .venv/bin/python benchmarks/distributed_ovit.py --quick         # a small ViT, seconds
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"sparsity": 0.5, "block_size": 8, "num_grads": 8, "fisher": "gradients"}  # B=8: the sweep is O(d·B²)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(out_dir: str, model_name: str, image: int, batches: int, chunk_mb: int) -> None:
    """One rank: build, calibrate, prune, report."""
    import timm
    import torch

    import hf_prune
    from hf_prune.data import load_digits

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10, img_size=image).eval()
    train, _ = load_digits(source="sklearn", image_size=32, channels=3)  # small, then only the few used are resized
    x = torch.nn.functional.interpolate(train.pixel_values[:batches], size=(image, image), mode="bilinear")
    calib = [{"pixel_values": x[i:i + 1], "labels": train.labels[i:i + 1]} for i in range(batches)]
    del train
    torch.distributed.barrier()
    base_rss, base_peak = _status_mib("VmRSS"), _peak_mib()
    _reset_peak()
    info: dict = {}
    t0 = time.perf_counter()
    hf_prune.prune(model, "ovit", calib=calib, distributed=True, info=info, chunk_bytes=chunk_mb << 20, **SETTINGS)
    seconds = time.perf_counter() - t0
    during = _status_mib("VmHWM")
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    row = {"rank": rank, "world": world, "seconds": round(seconds, 1), "rss_before_mib": round(base_rss),
           "peak_before_mib": round(base_peak), "peak_during_mib": round(during), "peak_rss_mib": round(_peak_mib()),
           "fisher_mib": round(info["fisher_bytes"] / 2 ** 20), "grad_seconds": round(info["grad_seconds"], 1),
           "sweep_seconds": round(info["sweep_seconds"], 1), "num_grads": info["num_grads"],
           "weights_digest": h.hexdigest(), "loadavg_end": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    row["added_mib"] = row["peak_during_mib"] - row["rss_before_mib"]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))
    torch.distributed.destroy_process_group()


def launch(nproc: int, out_dir: Path, args) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rank*.json"):
        old.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, "--worker", str(out_dir), "--model", args.model,
           "--image", str(args.image), "--batches", str(args.batches), "--chunk-mb", str(args.chunk_mb)]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of one image (= gradients)")
    parser.add_argument("--chunk-mb", type=int, default=256, help="oViT's chunk_bytes in MiB (the library default: 256)")
    parser.add_argument("--stem", default="distributed_ovit", help="result file name in benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="vit_tiny_patch16_224 at 64 px; results not written")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "hf_prune_distributed_ovit"),
                        help="folder for the per-rank JSON files")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.image, args.batches, args.chunk_mb)
    if args.quick:
        args.model, args.image = "vit_tiny_patch16_224", 64
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import env_info, header_md, md_table, write_results

    info = env_info()
    rows = launch(1, Path(args.out, "one"), args) + launch(2, Path(args.out, "two"), args)
    one, two = rows[0], rows[1:]
    same = len({r["weights_digest"] for r in rows}) == 1
    ratio_added = max(r["added_mib"] for r in two) / max(one["added_mib"], 1)
    ratio_peak = max(r["peak_during_mib"] for r in two) / max(one["peak_during_mib"], 1)
    ratio_fisher = max(r["fisher_mib"] for r in two) / max(one["fisher_mib"], 1)
    notes = [f"model: timm `{args.model}` at {args.image} px, random weights; calibration: {args.batches} batches of "
             "one real digit (sklearn), labels for the cross-entropy gradients",
             f"oViT settings: {SETTINGS}, chunk_bytes={args.chunk_mb} MiB (gradient-matrix Fisher: m × d fp32 "
             "for the rank's layers)",
             "memory per process: RSS just before pruning (`VmRSS`); peak RSS while pruning (`VmHWM`, reset through "
             "/proc/self/clear_refs just before); added = their difference; lifetime peak = "
             "`resource.getrusage(RUSAGE_SELF).ru_maxrss`; `fisher MiB` is oViT's own count of the Fisher "
             "information held",
             f"identical masks and weights in all three processes: {same}",
             f"2 ranks / 1 rank (largest rank): Fisher {ratio_fisher:.2f}, memory added by pruning {ratio_added:.2f}, "
             f"peak RSS while pruning {ratio_peak:.2f}",
             "times are wall seconds on a shared, loaded machine (see the load averages): not a speed result"]
    columns = ["ranks", "rank", "fisher MiB", "RSS before MiB", "peak while pruning MiB", "added MiB",
               "lifetime peak MiB", "gradients s", "sweep s", "total s"]
    table = md_table(columns, [[r["world"], r["rank"], r["fisher_mib"], r["rss_before_mib"], r["peak_during_mib"],
                                r["added_mib"], r["peak_rss_mib"], r["grad_seconds"], r["sweep_seconds"],
                                r["seconds"]] for r in rows])
    markdown = header_md("Distributed oViT calibration: memory per process, 1 vs 2 ranks", info, notes) + "\n" + table
    data = {"env": info, "settings": {**SETTINGS, "chunk_bytes": args.chunk_mb << 20}, "model": args.model, "image": args.image, "batches": args.batches,
            "rows": rows, "identical": same, "ratio_added": ratio_added, "ratio_peak": ratio_peak,
            "ratio_fisher": ratio_fisher}
    print(markdown)
    if not args.quick:
        write_results(args.stem, markdown, data)


if __name__ == "__main__":
    main()
