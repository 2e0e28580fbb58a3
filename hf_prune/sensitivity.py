"""How sensitive each part of a model is to pruning, measured before choosing a target.

This module owns :func:`sensitivity` and its :class:`SensitivityReport`. Each part is pruned
*alone*, to each point of a grid, the calibration data is run, and the result is compared with
the dense model; then the part is restored and the next one is tried:

* ``kind="structured"``: the coupled groups of the dependency graph (an attention layer's heads,
  an MLP's hidden channels, a residual stage's channels): the group's least important units
  (``importance``, as :func:`hf_prune.prune` ranks them) are masked with the engine's structured
  masks, which compute exactly what the compacted model would;
* ``kind="weights"``: every prunable Conv/Linear layer, magnitude-pruned to each sparsity.

``grid`` holds fractions *removed* (of a group's units, or of a layer's weights). ``metric``:
``"agreement"`` (top-1 agreement with the dense model; 1.0 is unchanged), ``"kl"`` (mean KL
divergence from the dense model's predictions) or ``"loss"`` (cross-entropy on the calibration
labels). Rows stay in model order; the report prints as a Markdown table, converts to a dict and
plots a heatmap (PNG). The model is exactly as before afterwards, interrupted or not.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .core.checks import check_choice, check_fraction
from .core.execution import eval_mode
from .core.inputs import call_model, logits_of, model_device
from .core.progress import progress

__all__ = ["sensitivity", "SensitivityReport", "KINDS", "METRICS"]

KINDS = ("structured", "weights")
METRICS = ("agreement", "kl", "loss")
DEFAULT_GRIDS = {"structured": (0.25, 0.5, 0.75), "weights": (0.5, 0.7, 0.9)}
HIGHER_IS_BETTER = {"agreement": True, "kl": False, "loss": False}
FILES = {"json": "sensitivity.json", "table": "sensitivity.md", "plot": "sensitivity.png"}


@dataclass
class SensitivityReport:
    """Per part of the model (``rows``), the metric after pruning that part alone to each grid point.

    Each row: ``{"name", "kind" ("head" / "channel" / "block" / "layer"), "size" (units or
    weights), "modules" (the layers it touches), "values" (one per grid point), "macs_ratio"
    (structured: the model's MACs left by that cut, as a fraction of the dense MACs)}``.
    ``baseline`` is the dense model's value of the metric.
    """

    kind: str
    metric: str
    grid: tuple
    baseline: float
    rows: list = field(default_factory=list)
    samples: int = 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "metric": self.metric, "grid": list(self.grid), "baseline": self.baseline,
                "samples": self.samples, "higher_is_better": HIGHER_IS_BETTER[self.metric], "rows": self.rows}

    @classmethod
    def from_dict(cls, data: dict) -> "SensitivityReport":
        return cls(kind=data["kind"], metric=data["metric"], grid=tuple(data["grid"]), baseline=data["baseline"],
                   rows=list(data["rows"]), samples=data.get("samples", 0))

    def most_sensitive(self, n: int = 5) -> list[str]:
        """The ``n`` rows hurt most at the largest grid point."""
        sign = 1.0 if HIGHER_IS_BETTER[self.metric] else -1.0
        ranked = sorted(self.rows, key=lambda r: sign * r["values"][-1])
        return [r["name"] for r in ranked[:n]]

    def table(self) -> str:
        """A Markdown table: one row per group/layer, one column per grid point."""
        unit = "units" if self.kind == "structured" else "weights"
        head = f"| {'group' if self.kind == 'structured' else 'layer'} | kind | {unit} | " + " | ".join(
            f"{self.metric} @ {g:.0%} removed" for g in self.grid) + " |"
        lines = [f"Dense {self.metric}: {self.baseline:.4g} on {self.samples} samples.", "", head,
                 "|" + "---|" * 3 + "---:|" * len(self.grid)]
        for r in self.rows:
            values = " | ".join(f"{v:.4g}" for v in r["values"])
            lines.append(f"| `{r['name']}` | {r['kind']} | {r['size']} | {values} |")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | os.PathLike) -> Path:
        """A heatmap (rows × grid points) of the metric, saved as PNG (Agg canvas, no pyplot)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        values = [r["values"] for r in self.rows]
        fig = Figure(figsize=(2.2 + 1.1 * len(self.grid), 1.2 + 0.22 * max(len(values), 1)), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        cmap = "viridis" if HIGHER_IS_BETTER[self.metric] else "viridis_r"
        image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(len(self.grid)), [f"{g:.0%}" for g in self.grid])
        ax.set_yticks(range(len(values)), [r["name"] for r in self.rows], fontsize=7)
        if len(values) * len(self.grid) <= 240:  # small enough to print the numbers in the cells
            for i, row in enumerate(values):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xlabel("fraction removed" + (" (units of the group)" if self.kind == "structured" else ""))
        fig.colorbar(image, ax=ax, label=f"{self.metric} (dense: {self.baseline:.3g})")
        ax.set_title(f"Sensitivity ({self.kind}), each part pruned alone", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, format="png")
        return Path(path)

    def save(self, out_dir: str | os.PathLike) -> dict:
        """Write ``sensitivity.json``, ``sensitivity.md`` and ``sensitivity.png`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / FILES["json"]).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        (out_dir / FILES["table"]).write_text(self.table(), encoding="utf-8")
        self.plot(out_dir / FILES["plot"])
        return {k: out_dir / v for k, v in FILES.items()}


def sensitivity(model: nn.Module, calib, *, example_inputs=None, kind: str = "structured", grid=None,
                metric: str = "agreement", importance: str = "l2", max_batches: int | None = None,
                ignored_layers=(), prune_stem: bool = False, exclude=(), out_dir: str | os.PathLike | None = None,
                disable_progress: bool | None = None) -> SensitivityReport:
    """Prune each part of ``model`` alone to each point of ``grid`` and measure ``metric`` on ``calib``.

    ``calib``: an iterable of batches (``{"pixel_values", "labels"}`` dicts or ``(x, y)`` tuples,
    as for :func:`hf_prune.prune`); it is read once and kept (keep it small: a few hundred images).
    ``example_inputs``: for tracing the graph (``kind="structured"``); default: the first batch.
    ``grid``: fractions removed, each in (0, 1) (default: 0.25/0.5/0.75 of a group's units,
    0.5/0.7/0.9 of a layer's weights). ``importance``: how units are ranked inside a group
    (``"l1"`` / ``"l2"``). ``ignored_layers`` / ``prune_stem``: as for :func:`hf_prune.prune`;
    ``exclude``: layers left out of ``kind="weights"``. ``out_dir``: also save the JSON, the
    Markdown table and the heatmap there (e.g. next to the model). The model is left exactly as it
    was: weights, hooks, train/eval modes.
    """
    from .sparse.masks import iter_batches

    check_choice("kind", kind, KINDS)
    check_choice("metric", metric, METRICS)
    if importance not in ("l1", "l2"):
        raise ValueError(f"importance={importance!r} must be 'l1' or 'l2' here (taylor needs gradients per cut)")
    grid = tuple(check_fraction("grid", g, closed_high=False, meaning="a fraction removed") for g in
                 (DEFAULT_GRIDS[kind] if grid is None else grid))
    if not grid:
        raise ValueError("grid is empty: give fractions to remove, e.g. grid=(0.25, 0.5, 0.75)")
    batches = list(iter_batches(calib, max_batches, model_device(model)))
    if not batches:
        raise ValueError("calib yielded no batches")
    if metric == "loss" and any(labels is None for _, labels in batches):
        raise ValueError("metric='loss' needs labels in every calibration batch; use metric='agreement' or 'kl' "
                         "for unlabelled data")
    with eval_mode(model), torch.no_grad():
        dense = [logits_of(call_model(model, inputs)).float() for inputs, _ in batches]
        baseline = _score(model, batches, dense, metric, dense_pass=True)
        samples = sum(d.numel() // d.shape[1] for d in dense)
        sweep = _structured if kind == "structured" else _weights
        rows = sweep(model, batches, dense, metric, grid, example_inputs=example_inputs, importance=importance,
                     ignored_layers=ignored_layers, prune_stem=prune_stem, exclude=exclude,
                     disable=disable_progress)
    report = SensitivityReport(kind=kind, metric=metric, grid=grid, baseline=baseline, rows=rows, samples=samples)
    if out_dir is not None:
        report.save(out_dir)
    return report


def _score(model, batches, dense, metric, dense_pass=False) -> float:
    """The metric over all calibration batches (mean over samples, or over pixels for dense outputs)."""
    total, count = 0.0, 0
    for (inputs, labels), ref in zip(batches, dense):
        logits = ref if dense_pass else logits_of(call_model(model, inputs)).float()
        if metric == "agreement":
            total += (logits.argmax(1) == ref.argmax(1)).sum().item()
        elif metric == "kl":
            total += F.kl_div(logits.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="sum").item()
        else:
            total += F.cross_entropy(logits, labels.to(logits.device), reduction="sum").item()
        count += logits.numel() // logits.shape[1]
    return total / max(count, 1)


def _structured(model, batches, dense, metric, grid, *, example_inputs, importance, ignored_layers, prune_stem,
                disable, **_):
    from .engine.importance import unit_scores
    from .engine.masks import StructuredMask
    from .engine.pruner import StructuredPruner

    pruner = StructuredPruner(model, batches[0][0] if example_inputs is None else example_inputs, round_to=None,
                              ignored_layers=ignored_layers, prune_stem=prune_stem)
    graph = pruner.graph
    scores = unit_scores(graph, importance)
    rows = []
    with progress(total=len(graph.groups) * len(grid), desc="sensitivity (groups)", disable=disable) as bar:
        for group in graph.groups:
            ranked = group.units[torch.argsort(scores[group.units], stable=True)]
            row = _group_row(graph, group)
            for fraction in grid:
                removed = ranked[:_count(fraction, len(group))]
                keep = graph.keep_mask(removed)
                mask = StructuredMask(model, graph, keep)  # zeroes the group's slices; hooks keep norms exact
                try:
                    row["values"].append(_score(model, batches, dense, metric))
                finally:
                    mask.restore(model)
                row["macs_ratio"].append(graph.macs(keep) / max(pruner.dense_macs, 1))
                bar.update(1)
            rows.append(row)
    return rows


def _group_row(graph, group) -> dict:
    modules = list(dict.fromkeys(graph.members[i].tensor.rpartition(".")[0] for i in group.members))
    if group.kind == "head":
        name = f"{group.modules[0]} (heads)" if group.modules else f"{modules[0]} (heads)"
    else:
        producers = [graph.members[i].tensor.rpartition(".")[0] for i in group.members if graph.members[i].dim == 0]
        name = producers[0] if producers else modules[0]
        if len(modules) > 1:
            name += f" (+{len(modules) - 1} coupled)"
    return {"name": name, "kind": group.kind, "size": len(group), "modules": modules, "values": [], "macs_ratio": []}


def _count(fraction: float, n: int) -> int:
    """Units (or weights) to remove: at least one, never all."""
    return min(max(int(round(fraction * n)), 1), n - 1) if n > 1 else 0


def _weights(model, batches, dense, metric, grid, *, example_inputs, exclude, disable, **_):
    from .sparse.masks import prunable_layers, select_magnitude

    layers = prunable_layers(model, exclude=exclude,
                             example_inputs=batches[0][0] if example_inputs is None else example_inputs)
    rows = []
    with progress(total=len(layers) * len(grid), desc="sensitivity (layers)", disable=disable) as bar:
        for name, module in layers.items():
            weight = module.weight
            saved = weight.detach().clone()
            row = {"name": name, "kind": "layer", "size": weight.numel(), "modules": [name], "values": []}
            try:
                for fraction in grid:
                    weight.mul_(select_magnitude(saved, fraction).to(weight.dtype))
                    row["values"].append(_score(model, batches, dense, metric))
                    weight.copy_(saved)
                    bar.update(1)
            finally:
                weight.copy_(saved)
            rows.append(row)
    return rows
