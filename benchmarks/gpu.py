"""Everything this project measures only on a GPU, in one run of under 8 minutes on one H100/H200.

Parts (each time-boxed; the result files are rewritten after every row, so a run cut short still
leaves what it measured):

* ``depgraph`` — dense vs hf_prune ``target_macs=0.5`` (default ``round_to=8``; ``hf_prune_macs``) vs hf_prune
  ``target_latency=0.5`` (``hf_prune_latency``, ``hf_prune_latency_measured``; latency measured on this GPU at the benchmark's batch, dtype and layout,
  verified and corrected once), with ``round_to=8`` and with ``round_to="measured"`` (widths chosen
  among nearby multiples of 8/16/32/64 by timing them), vs Torch-Pruning's default output (``benchmarks.common.tp_prune``:
  uniform ratio 0.3 ≈ 50 % MACs, ``round_to=None``) when torch_pruning is installed;
* ``updp`` — dense vs 3 / 6 / 9 blocks merged (``hf_prune.prune(model, method="updp", num_blocks=k,
  example_inputs=x)``);
* ``semi24`` — dense vs 2:4 sparse Linear layers (magnitude 2:4 masks from
  ``hf_prune.sparse.masks.select_nm``, then ``hf_prune.sparse.masks.to_semi_structured``);
* ``fsdp2`` — a smoke run: ``torch.distributed.fsdp.fully_shard`` on one device in a single-process
  group, and a few optimizer steps of ``DepGraphCallback``'s plain-loop API (``setup``,
  ``step_begin``, ``pre_optimizer_step``, ``optimizer_step``, ``finish``); it records how far it got.

Models: timm ``convnext_tiny``, ``resnet50``, ``deit_small_patch16_224``, ``vit_base_patch16_224``,
random weights with small noise (``benchmarks.common.perturb_``). Timing: batch 256, bf16 weights and
inputs (the models are cast, not autocast), channels_last for the CNNs, eval, ``torch.inference_mode``,
all variants of a model timed round-robin in one process with CUDA synchronised around each pass,
median of the passes. MACs: ``hf_prune.metrics.profiling.count_macs`` at batch 1 (attention included).
efficiency = speed-up × MACs ratio (1.0 = the speed-up is proportional to the MACs removed).

    PYTHONPATH=. .venv/bin/python benchmarks/gpu.py                 # CUDA only; at most 7 minutes
    PYTHONPATH=. .venv/bin/python benchmarks/gpu.py --dry-run       # CPU, tiny, well under a minute
    PYTHONPATH=. .venv/bin/python benchmarks/gpu.py --parts depgraph,updp

``--dry-run`` runs the same code paths tiny (a CNN and a ViT: ``convnext_atto`` and ``deit_tiny`` at
64×64, batch 2, fp32, CPU, one thread, a few iterations, 1 and 2 blocks merged, a coarse latency table,
``target_latency=0.9``: at that size per-op costs dominate and 0.5 is out of reach);
the 2:4 conversion, which has no CPU kernel, is skipped there and says so. ``--budget-scale`` multiplies
every time box (a loaded machine may need it). Results: ``benchmarks/results/gpu_benchmark.*``
(``gpu_dry_run.*`` for a dry run; ``--out-dir`` elsewhere).
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.common import (RESULTS, ModelTimeout, env_info, first_line, header_md, latency_prune, md_table,
                               median, perturb_, time_interleaved, time_limit, torch_pruning_available, tp_prune,
                               write_results)

PARTS = ("depgraph", "updp", "semi24", "fsdp2")


@dataclass
class Run:
    """What one run does: the GPU benchmark or its tiny CPU dry run."""

    dry: bool
    device: str
    dtype: torch.dtype
    batch: int
    models: list  # (timm name, create_model kwargs, image size, is a CNN)
    iters: int
    warmup: int
    budgets: dict  # part -> seconds
    blocks: tuple = (3, 6, 9)
    fsdp_steps: int = 4
    latency: dict = field(default_factory=lambda: {"verify_seconds": 10.0})  # LatencyModel options
    target_latency: float = 0.5
    notes: list = field(default_factory=list)
    deadline: float = float("inf")  # of the part running now (perf_counter seconds)

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def describe(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d.pop("deadline")
        return d

    def latency_options(self) -> dict:
        from hf_prune.engine.latency import Timer

        opts = dict(self.latency)
        rounds = opts.pop("rounds", None)
        if rounds:
            opts["timer"] = Timer(rounds=rounds, sample_ms=0.2)
        return opts


GPU_MODELS = [("convnext_tiny", {}, 224, True), ("resnet50", {}, 224, True),
              ("deit_small_patch16_224", {}, 224, False), ("vit_base_patch16_224", {}, 224, False)]
DRY_MODELS = [("convnext_atto", {}, 64, True), ("deit_tiny_patch16_224", {"img_size": 64}, 64, False)]


def make_run(dry: bool) -> Run:
    if dry:
        return Run(True, "cpu", torch.float32, 2, DRY_MODELS, iters=3, warmup=1,
                   budgets={"depgraph": 30, "updp": 10, "semi24": 5, "fsdp2": 10}, blocks=(1, 2), fsdp_steps=2,
                   latency={"verify_seconds": 0.3, "grid": 3, "rounds": 3},
                   target_latency=0.9)  # tiny models at 64x64 are mostly fixed costs: 0.5 is out of reach
    return Run(False, "cuda", torch.bfloat16, 256, GPU_MODELS, iters=30, warmup=10,
               budgets={"depgraph": 270, "updp": 75, "semi24": 45, "fsdp2": 20},
               latency={"verify_seconds": 5.0})


# ----------------------------------------------------------------------------------------------- results
class Results:
    """All rows of a run; rewritten to JSON + markdown after every row."""

    def __init__(self, run: Run, parts: tuple, out_dir: Path, stem: str):
        self.run, self.parts, self.out_dir, self.stem = run, parts, out_dir, stem
        self.data = {"info": env_info(), "run": run.describe(), "parts": {p: [] for p in parts}, "seconds": {}}

    def add(self, part: str, row: dict) -> None:
        self.data["parts"][part].append(row)
        print(f"[{part}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "traceback"), flush=True)
        self.save()

    def save(self) -> tuple[Path, Path]:
        return write_results(self.stem, self.markdown(), self.data, self.out_dir)

    def markdown(self) -> str:
        run = self.run
        notes = [f"{'DRY RUN (CPU, tiny models: checks the code paths, not speed)' if run.dry else 'GPU run'}: "
                 f"device {run.device}, batch {run.batch}, {str(run.dtype).replace('torch.', '')} weights and "
                 f"inputs, channels_last for CNNs, median of {run.iters} passes after {run.warmup} warm-up, "
                 "variants of a model timed round-robin in one process",
                 "speed-up = dense latency / variant latency; efficiency = speed-up × MACs ratio (batch-1 MACs)",
                 f"hf_prune_macs: `target_macs=0.5`; hf_prune_latency(_measured): `target_latency={run.target_latency}` "
                 "measured on this device at this batch, dtype and layout (round_to=8 / 'measured'); plan_predicted / "
                 "plan_measured: the plan's own prediction and interleaved verification",
                 f"time boxes (s): {run.budgets}; seconds used: {self.data['seconds']}"] + run.notes
        out = [header_md("GPU benchmark" + (" (dry run)" if run.dry else ""), self.data["info"], notes)]
        for part in self.parts:
            out.append(f"\n## {part}\n\n" + _table(self.data["parts"][part]))
        return "".join(out)


def _fmt(v, digits=3):
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = [c for c in ("model", "variant", "ms", "speedup", "macs_ratio", "efficiency", "plan_predicted",
                        "plan_measured", "corrected", "prune_s", "layers", "steps", "ok", "note", "error")
            if any(c in r for r in rows)]
    return md_table(cols, [[_fmt(r.get(c, "")) for c in cols] for r in rows])


# ----------------------------------------------------------------------------------------------- models
def make_model(name: str, kwargs: dict, size: int) -> tuple[nn.Module, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    perturb_(model)
    return model, torch.randn(1, 3, size, size)


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs at batch 1 (``hf_prune.metrics.profiling.count_macs``: counts CPU fused attention too)."""
    from hf_prune.metrics.profiling import count_macs

    return count_macs(model, x)


def on_device(model: nn.Module, run: Run, cnn: bool) -> nn.Module:
    model = model.to(run.device, dtype=run.dtype)
    return model.to(memory_format=torch.channels_last) if cnn else model


def batch_input(x: torch.Tensor, run: Run, cnn: bool) -> torch.Tensor:
    torch.manual_seed(1)
    xb = x.expand(run.batch, *x.shape[1:]).contiguous() + 0.01 * torch.randn(run.batch, *x.shape[1:])
    xb = xb.to(run.device, dtype=run.dtype)
    return xb.contiguous(memory_format=torch.channels_last) if cnn else xb


def time_variants(models: dict, x: torch.Tensor, run: Run, cnn: bool) -> dict:
    """Median ms of every model (moved to the run's device, dtype and layout), timed round-robin."""
    placed = {k: on_device(m, run, cnn) for k, m in models.items()}
    xb = batch_input(x, run, cnn)
    times = time_interleaved({k: (m, xb) for k, m in placed.items()}, warmup=run.warmup, iters=run.iters,
                             device=run.device)
    return {k: median(v) for k, v in times.items()}


def speed_rows(name: str, ms: dict, info: dict) -> list[dict]:
    rows = []
    for variant, extra in info.items():
        row = {"model": name, "variant": variant, **extra}
        if variant in ms:
            row.update(ms=ms[variant], speedup=ms["dense"] / ms[variant])
            if "macs_ratio" in row:
                row["efficiency"] = row["speedup"] * row["macs_ratio"]
        rows.append(row)
    return rows


def _failed(exc: BaseException) -> dict:
    return {"error": first_line(exc), "traceback": traceback.format_exc(limit=-4)}


# ----------------------------------------------------------------------------------------------- parts
def depgraph_model(name: str, kwargs: dict, size: int, cnn: bool, run: Run) -> list[dict]:
    import hf_prune

    dense, x = make_model(name, kwargs, size)
    dense_macs = macs(dense, x)
    models, info = {"dense": dense}, {"dense": {"macs_ratio": 1.0}}
    layout_x = x.contiguous(memory_format=torch.channels_last) if cnn else x

    def hf_macs(m):
        hf_prune.prune(m, example_inputs=x, target_macs=0.5)

    def hf_latency(m, round_to=8):
        report = latency_prune(m, layout_x, run.target_latency, batch_size=run.batch, device=run.device, dtype=run.dtype,
                               round_to=round_to, **run.latency_options())
        chosen = report["attempts"][report.get("chosen", 0)]
        return {"plan_predicted": chosen.get("predicted_ratio"), "plan_measured": report["measured"]["latency_ratio"],
                "corrected": report["corrected"], "layers": report["layers"], "plan": report}

    makers = {"hf_prune_macs": hf_macs, "hf_prune_latency": hf_latency,
              "hf_prune_latency_measured": lambda m: hf_latency(m, "measured")}
    if torch_pruning_available():
        makers["torch_pruning_default"] = lambda m: tp_prune(m, x, pruning_ratio=0.3)
    else:
        info["torch_pruning_default"] = {"note": "torch_pruning not installed"}
    for variant, make in makers.items():
        if run.out_of_time():
            info[variant] = {"error": "skipped: the part's time box is used up"}
            continue
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        try:
            extra = make(m)
        except ModelTimeout:
            raise
        except Exception as exc:  # noqa: BLE001 - record and go on
            info[variant] = _failed(exc)
            continue
        models[variant] = m.eval()
        info[variant] = {"prune_s": time.perf_counter() - t0, "macs_ratio": macs(m, x) / dense_macs,
                         **(extra if isinstance(extra, dict) else {})}
    return speed_rows(name, time_variants(models, x, run, cnn), info)


def updp_model(name: str, kwargs: dict, size: int, cnn: bool, run: Run) -> list[dict]:
    import hf_prune

    dense, x = make_model(name, kwargs, size)
    dense_macs = macs(dense, x)
    calib = torch.cat([x, torch.randn_like(x)])
    models, info = {"dense": dense}, {"dense": {"macs_ratio": 1.0}}
    for k in run.blocks:
        if run.out_of_time():
            info[f"merged-{k}"] = {"error": "skipped: the part's time box is used up"}
            continue
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        try:
            hf_prune.prune(m, method="updp", num_blocks=k, example_inputs=calib)
        except ModelTimeout:
            raise
        except Exception as exc:  # noqa: BLE001
            info[f"merged-{k}"] = _failed(exc)
            continue
        models[f"merged-{k}"] = m.eval()
        info[f"merged-{k}"] = {"prune_s": time.perf_counter() - t0, "macs_ratio": macs(m, x) / dense_macs}
    return speed_rows(name, time_variants(models, x, run, cnn), info)


def semi24_model(name: str, kwargs: dict, size: int, cnn: bool, run: Run) -> list[dict]:
    from hf_prune.sparse.masks import find_classifier, select_nm, to_semi_structured

    dense, x = make_model(name, kwargs, size)
    sparse = copy.deepcopy(dense)
    skip = set(find_classifier(sparse))
    with torch.no_grad():
        for n, mod in sparse.named_modules():
            if isinstance(mod, nn.Linear) and n not in skip and mod.in_features % 4 == 0:
                mod.weight.mul_(select_nm(mod.weight, 2, 4))
    info = {"dense": {}, "2:4": {}}
    if run.device == "cuda":
        sparse = on_device(sparse, run, cnn)
        layers = to_semi_structured(sparse, dtype=run.dtype)
        info["2:4"] = {"layers": len(layers)}
        if not layers:
            info["2:4"]["note"] = "no Linear layer is eligible (2:4 along inputs, both dims multiples of 64)"
    else:
        info["2:4"] = {"note": "2:4 masks applied, conversion skipped: to_sparse_semi_structured needs CUDA"}
    return speed_rows(name, time_variants({"dense": dense, "2:4": sparse}, x, run, cnn), info)


def part_fsdp2(run: Run) -> list[dict]:
    """fully_shard on one device in a single-process group, then DepGraphCallback's plain loop."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from hf_prune import DepGraphCallback

    row = {"model": "resnet18", "variant": "fsdp2 + DepGraphCallback", "steps": 0, "ok": False}
    dist.init_process_group("nccl" if run.device == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    try:
        model, x = make_model("resnet18", {"num_classes": 10}, 64)
        model = model.to(run.device).train()
        xb = torch.randn(8, 3, 64, 64, device=run.device)
        yb = torch.randint(0, 10, (8,), device=run.device)
        callback = DepGraphCallback(target_macs=0.6, schedule="linear", start=0.0, end=0.5, frequency=1)
        callback.setup(model, total_steps=run.fsdp_steps, example_inputs=xb[:2])
        row["stage"] = "fully_shard"
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for step in range(run.fsdp_steps):
            row["stage"] = f"step {step}"
            callback.step_begin(step)
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            callback.pre_optimizer_step()
            optimizer.step()
            optimizer.zero_grad()
            callback.optimizer_step()
            row["steps"] = step + 1
        row["stage"] = "finish"
        callback.finish()
        row.update(ok=True, macs_ratio=callback.stats()["macs_ratio"], stage="done")
    except Exception as exc:  # noqa: BLE001 - the smoke run reports where it stopped
        row.update(_failed(exc))
    finally:
        dist.destroy_process_group()
    return [row]


PER_MODEL = {"depgraph": depgraph_model, "updp": updp_model, "semi24": semi24_model}


def run_part(part: str, run: Run, results: Results) -> None:
    deadline = run.deadline = time.perf_counter() + run.budgets[part]
    if part == "fsdp2":
        with time_limit(run.budgets[part]):
            for row in part_fsdp2(run):
                results.add(part, row)
        return
    for name, kwargs, size, cnn in run.models:
        left = deadline - time.perf_counter()
        if left <= 1:
            results.add(part, {"model": name, "error": f"skipped: the part's {run.budgets[part]} s time box is used up"})
            continue
        try:
            with time_limit(left):
                rows = PER_MODEL[part](name, kwargs, size, cnn, run)
        except Exception as exc:  # noqa: BLE001 - ModelTimeout included: the next model still runs
            rows = [{"model": name, **_failed(exc)}]
        for row in rows:
            results.add(part, row)
        gc.collect()
        if run.device == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, batch 2, fp32: checks the code paths")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time box")
    args = ap.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/gpu.py measures GPU speed and needs a CUDA device; this machine has none. "
              "Run it with --dry-run to check the code paths on CPU.", file=sys.stderr)
        return 2
    run = make_run(args.dry_run)
    run.budgets = {p: s * args.budget_scale for p, s in run.budgets.items()}
    threads = torch.get_num_threads()
    if run.dry:
        torch.set_num_threads(1)  # tiny ops on a shared CPU: one thread avoids contention
    try:
        return _main(run, parts, args.out_dir)
    finally:
        torch.set_num_threads(threads)


def _main(run: Run, parts: tuple, out_dir: Path) -> int:
    total = sum(run.budgets[p] for p in parts)
    print(f"runtime budget: {' + '.join(f'{p} {run.budgets[p]:.0f} s' for p in parts)} = {total:.0f} s "
          f"({total / 60:.1f} min) on {run.device}", flush=True)
    results = Results(run, parts, out_dir, "gpu_dry_run" if run.dry else "gpu_benchmark")
    print(f"load average at start: {results.data['info'].get('loadavg_start')}", flush=True)
    for part in parts:
        t0 = time.perf_counter()
        run_part(part, run, results)
        results.data["seconds"][part] = round(time.perf_counter() - t0, 1)
    md, js = results.save()
    print(f"written: {md} {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
