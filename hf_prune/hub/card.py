"""Model cards for pruned models: YAML metadata (``model-index``), size/speed tables, a layer plot.

The template is ``templates/pruned_model.md.j2`` inside this package (installed with it); the
repository's ``model_cards/pruned_model.md.j2`` is an identical copy for readers and editors.
Numbers come only from the spec (parameter counts, MACs given at save time) and from the caller
(``metrics``, measured ``speed``; :func:`trainer_metrics` reads a Trainer's last evaluation);
nothing is estimated here.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

from torch import nn

__all__ = ["render_card", "prepare_card", "write_card", "write_model_card", "trainer_metrics", "plot_layers",
           "layer_widths", "hub_metadata", "is_classifier", "TEMPLATE_NAME", "PLOT_NAME"]

TEMPLATE_NAME = "pruned_model.md.j2"
PLOT_NAME = "pruned_layers.png"
PACKAGE_TEMPLATE = Path(__file__).with_name("templates") / TEMPLATE_NAME
REPO_TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / TEMPLATE_NAME


def template_path() -> Path:
    """The card template: the package copy (always installed), else the repository's copy."""
    return PACKAGE_TEMPLATE if PACKAGE_TEMPLATE.is_file() else REPO_TEMPLATE


def _human(n) -> str:
    if n is None:
        return "not measured"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _ratio(after, before) -> str:
    return f"{after / before:.1%}" if after is not None and before else "—"


def layer_widths(model: nn.Module, spec: dict) -> list[dict]:
    """Every Linear/Conv layer of ``model``, in order, with its kept fraction of output channels."""
    changed = {e["path"]: e for e in spec["layers"]}
    nonzero = {e["path"]: e["nonzero"] for e in spec.get("sparsity", {}).get("layers", [])
               if e.get("tensor") == "weight"}
    rows = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or module.weight is None:
            continue
        out = module.weight.shape[0] if not getattr(module, "transposed", False) else module.weight.shape[1]
        base = changed.get(path, {}).get("base_tensors", {}).get("weight")
        base_out = (base[1] if getattr(module, "transposed", False) else base[0]) if base else out
        rows.append({"path": path, "out": out, "base_out": base_out, "kept": out / base_out if base_out else 1.0,
                     "nonzero": nonzero.get(path)})
    return rows


def plot_layers(rows: list[dict], path: Path, title: str = "") -> Path:
    """Bar chart of kept width per layer (and nonzero fraction if any), saved as PNG (Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Object-oriented API on an Agg canvas: no pyplot, no global backend switch.
    fig = Figure(figsize=(max(6.0, min(16.0, 0.12 * len(rows) + 4)), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = list(range(len(rows)))
    ax.bar(xs, [r["kept"] for r in rows], width=0.85, color="#4C78A8", label="kept width")
    sparse = [(x, r["nonzero"]) for x, r in zip(xs, rows) if r["nonzero"] is not None]
    if sparse:
        ax.plot([x for x, _ in sparse], [v for _, v in sparse], "o", ms=3, color="#F58518", label="nonzero weights")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.6, max(len(rows) - 0.4, 0.6))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Linear / Conv layer (model order)")
    ax.set_ylabel("fraction of base")
    ax.set_title(title or "Per-layer width after pruning", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _finite(value, what: str) -> float | int:
    """A metric value for ``model-index``: a finite real number (NaN and infinities are refused)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} has value {value!r}; the model card publishes only finite numbers. "
                         "Fix the evaluation that produced it, or leave the metric out")
    return value


def _eval_results(metrics, card_data: dict, model_name: str):
    """``metrics`` -> (EvalResult list for model-index, rows for the card's table)."""
    from huggingface_hub import EvalResult

    if not metrics:
        return [], []
    dataset = dict(card_data.get("dataset") or {})
    task = card_data.get("task_type", "image-classification")
    items = ([{"type": k, "value": v} for k, v in metrics.items()] if isinstance(metrics, dict) else list(metrics))
    results, rows = [], []
    for item in items:
        if not isinstance(item, dict) or "type" not in item or "value" not in item:
            raise ValueError(f"metrics entries need 'type' and 'value', got {item!r}")
        ds = {**dataset, **(item.get("dataset") or {})}
        name = ds.get("name") or ds.get("type")
        value = _finite(item["value"], f"metric {item.get('name') or item['type']!r}")
        if name:  # model-index needs the dataset: a metric without one stays in the card's table only
            results.append(EvalResult(
                task_type=item.get("task", task), dataset_type=ds.get("type") or name, dataset_name=name,
                dataset_split=ds.get("split"), dataset_config=ds.get("config"), metric_type=item["type"],
                metric_value=value, metric_name=item.get("name")))
        rows.append({"name": item.get("name") or item["type"], "value": value,
                     "dataset": (name + (f" ({ds['split']})" if ds.get("split") else "")) if name else "not given"})
    _warn_no_dataset(items, rows)
    return results, rows


def _warn_no_dataset(items, rows) -> None:
    missing = [r["name"] for r in rows if r["dataset"] == "not given"]
    if missing:
        warnings.warn(f"metrics {missing} name no dataset, so they are shown in the card but left out of its "
                      "model-index (the Hub needs the dataset there); pass card_data={'dataset': {'name': ..., "
                      "'type': <Hub dataset id>, 'split': ...}} or a 'dataset' per metric", UserWarning, stacklevel=6)


def hub_metadata(spec: dict, card_data: dict, metrics=None, overrides: dict | None = None) -> dict:
    """The card's Hub fields: ``library_name``, ``pipeline_tag``, ``datasets`` (caller's values win).

    ``library_name`` is the base library (``transformers`` or ``timm``, names the Hub knows; the
    ``hf_prune`` tag says who pruned it); ``pipeline_tag`` is ``image-classification`` for
    classifiers; ``datasets`` are the Hub ids (``type``) of the datasets the metrics name, if any.
    """
    overrides = overrides or {}
    fields = {"library_name": overrides.get("library_name") or spec["base"]["library"]}
    tag = overrides.get("pipeline_tag") or ("image-classification" if is_classifier(spec) else None)
    if tag:
        fields["pipeline_tag"] = tag
    datasets = overrides.get("datasets") or _dataset_ids(card_data, metrics)
    if datasets:
        fields["datasets"] = datasets
    return fields


def is_classifier(spec: dict) -> bool:
    """Whether the pruned model is an image classifier (transformers ``*ForImageClassification``, timm with classes)."""
    base = spec["base"]
    if base["library"] == "transformers":
        return base["architecture"].endswith("ForImageClassification")
    config = base.get("config") or {}
    classes = (config.get("model_args") or {}).get("num_classes", (config.get("pretrained_cfg") or {}).get("num_classes"))
    return bool(classes)


def _dataset_ids(card_data: dict, metrics) -> list[str]:
    items = metrics if isinstance(metrics, (list, tuple)) else []
    found = [(card_data.get("dataset") or {}).get("type")]
    found += [(item.get("dataset") or {}).get("type") for item in items if isinstance(item, dict)]
    return list(dict.fromkeys(d for d in found if d))


def _speed(speed: dict | None, spec: dict) -> dict | None:
    """The speed line's fields: the caller's ``speed``, else the one measured at pruning time and
    recorded in the spec (``stats["speed"]``, as :func:`hf_prune.engine.latency.measure_speedup` returns it)."""
    speed = speed or (spec.get("stats") or {}).get("speed")
    if not speed:
        return None
    up = speed["speedup"]
    return {"speedup": f"{up:.2f}" if isinstance(up, float) else up, "device": speed.get("device"),
            "batch": speed.get("batch", speed.get("batch_size")), "dtype": speed.get("dtype")}


def _auto_class(spec: dict) -> str:
    arch = spec["base"]["architecture"]
    if arch.endswith("ForImageClassification"):
        return "AutoModelForImageClassification"
    return "AutoModel"


def render_card(spec: dict, *, repo_id: str | None = None, metrics=None, speed: dict | None = None,
                standalone: bool = False, card_data: dict | None = None, base_model: str | None = None,
                plot: str | None = PLOT_NAME, sparsity_note: str | None = None) -> str:
    """The model card (Markdown with YAML front matter) for a pruned model described by ``spec``."""
    import jinja2
    from huggingface_hub import ModelCardData

    if speed is not None and (not isinstance(speed, dict) or "speedup" not in speed):
        raise ValueError("speed must be a dict with a measured 'speedup' (and 'device', 'batch'), got "
                         f"{speed!r}")
    if speed is not None:
        speed = dict(speed, speedup=_finite(speed["speedup"], "speed['speedup']"))
    card_data = dict(card_data or {})
    arch = spec["base"]["architecture"]
    method = spec["method"].get("name")
    model_name = repo_id.split("/")[-1] if repo_id else f"{arch}-pruned"
    results, metric_rows = _eval_results(metrics, card_data, model_name)
    tags = ["hf_prune", "pruning"] + ([method] if method else []) + [spec["base"]["library"]]
    tags += [t for t in card_data.pop("tags", []) if t not in tags]
    extra = {k: v for k, v in card_data.items() if k not in ("dataset", "task_type")}
    extra.update(hub_metadata(spec, card_data, metrics, overrides=extra))
    data = ModelCardData(tags=tags, base_model=base_model, model_name=model_name if results else None,
                         eval_results=results or None, **extra)
    stats = spec.get("stats", {})
    sp = spec.get("sparsity") or {}
    text = jinja2.Template(template_path().read_text(encoding="utf-8"), keep_trailing_newline=True,
                           undefined=jinja2.StrictUndefined).render(
        card_data=data.to_yaml(), model_name=model_name, base_model=base_model, architecture=arch,
        library=spec["base"]["library"], method_name=method, format_version=spec["format_version"],
        repo_id=repo_id or "<path or repo id>", standalone=standalone, auto_class=_auto_class(spec),
        pipeline_task=data.pipeline_tag if spec["base"]["library"] == "transformers" else None,
        params_before=_human(stats.get("params_before")), params_after=_human(stats.get("params_after")),
        params_ratio=_ratio(stats.get("params_after"), stats.get("params_before")),
        macs_before=_human(stats.get("macs_before")), macs_after=_human(stats.get("macs_after")),
        macs_ratio=_ratio(stats.get("macs_after"), stats.get("macs_before")),
        speed=_speed(speed, spec),
        metrics=metric_rows, settings=spec["method"].get("settings") or {},
        n_layers=sum(1 for e in spec["layers"] if e["tensors"]),
        n_attention=sum(1 for e in spec["layers"] if e["role"] == "attention"),
        n_removed=len(spec["removed_blocks"]),
        sparsity=f"{sp['global_nonzero']:.1%}" if sp else sparsity_note, plot=plot,
        versions=spec.get("versions", {}))
    return re.sub(r"\n{3,}", "\n\n", text)


def prepare_card(spec: dict, *, model: nn.Module, metrics=None, speed: dict | None = None,
                 repo_id: str | None = None, standalone: bool = False, card_data: dict | None = None,
                 base_model: str | None = None) -> tuple[str, list[dict]]:
    """(card text, plot rows): everything is checked here, before anything is written."""
    rows = layer_widths(model, spec)
    text = render_card(spec, repo_id=repo_id, metrics=metrics, speed=speed, standalone=standalone,
                       card_data=card_data, base_model=base_model, plot=PLOT_NAME if rows else None)
    return text, rows


def write_card(directory: Path, spec: dict, text: str, rows: list[dict]) -> Path:
    """Write ``README.md`` and ``pruned_layers.png`` (made by :func:`prepare_card`) into ``directory``."""
    directory = Path(directory)
    if rows:
        plot_layers(rows, directory / PLOT_NAME, title=f"{spec['base']['architecture']}: per-layer width")
    path = directory / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


# What a Trainer logs with every evaluation that is not a quality metric of the model.
_NOT_METRICS = ("loss", "runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "epoch", "step")


def trainer_metrics(log_history: list[dict], prefix: str = "eval_") -> dict:
    """The metrics of the last evaluation in a Trainer's ``state.log_history``, without the prefix.

    ``{"eval_accuracy": 0.91, "eval_loss": 0.3, "eval_runtime": 1.2}`` gives ``{"accuracy": 0.91}``:
    loss and timings are left out (they describe the run, not the model). Non-finite values are
    dropped with a warning, since a card publishes only finite numbers.
    """
    last = next((entry for entry in reversed(log_history or [])
                 if any(k.startswith(prefix) for k in entry)), {})
    metrics = {}
    for key, value in last.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or name in _NOT_METRICS or isinstance(value, bool) \
                or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            warnings.warn(f"the last evaluation logged {key}={value}; it is left out of the model card",
                          UserWarning, stacklevel=2)
            continue
        metrics[name] = value
    return metrics


def write_model_card(model: nn.Module, directory, *, metrics=None, repo_id: str | None = None,
                     card_data: dict | None = None, base_model: str | None = None) -> Path | None:
    """Write the card (``README.md`` and ``pruned_layers.png``) of a pruned transformers model into ``directory``.

    The card describes the structure spec on ``model.config.hf_prune`` (what ``model.save_pretrained``
    writes to ``config.json``), so it is for folders saved by the model's own ``save_pretrained`` (e.g.
    by ``Trainer.save_model``); :func:`hf_prune.save_pretrained` writes its card itself. Returns the
    card's path, or None when the model carries no spec (it was not pruned, or not yet compacted).
    """
    spec = getattr(getattr(model, "config", None), "hf_prune", None)
    if not isinstance(spec, dict):
        return None
    text, rows = prepare_card(spec, model=model, metrics=metrics, repo_id=repo_id, card_data=card_data,
                              base_model=base_model or spec["base"].get("source"))
    return write_card(Path(directory), spec, text, rows)
