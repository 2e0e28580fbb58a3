"""Helpers shared by the benchmark scripts: environment header, model builders, counting, timing.

Nothing here is part of the library; the scripts import it as ``benchmarks.common`` (run them from
the repository root with ``PYTHONPATH=.``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    import torch

    from hf_prune.engine.latency import device_name

    return device_name(torch.device("cpu"))


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
        return "not installed"


def _git_rev() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_prune"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" + uncommitted changes in hf_prune/" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def env_info() -> dict:
    """Command, date, machine and library versions, for the header of every result file."""
    try:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "command": "PYTHONPATH=. " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable)] + sys.argv),
        "date": date,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": _loadavg(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "hf_prune": _version("hf_prune"),
        "hf_prune_git": _git_rev(),
        "torch_pruning": _version("torch_pruning"),
    }


def header_md(title: str, info: dict, notes: list[str] = ()) -> str:
    lines = [f"# {title}", "", f"- command: `{info['command']}`", f"- date: {info['date']}",
             f"- machine: {info['cpu']}, {info['cores']} cores (torch threads: {info['torch_threads']})"
             + (f", GPU: {info['gpu']}" if info.get("gpu") else ", no GPU"),
             f"- versions: python {info['python']}, torch {info['torch']}, timm {info['timm']}, "
             f"transformers {info['transformers']}, hf_prune {info['hf_prune']} (git {info['hf_prune_git']}), "
             f"torch-pruning {info['torch_pruning']}"]
    lines.append(f"- load average (1/5/15 min) at start: {info.get('loadavg_start')}, at end: {_loadavg()} "
                 "(the machine is shared; latencies taken under load are noisier)")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_results(stem: str, markdown: str, data: Any, directory: Path | None = None) -> tuple[Path, Path]:
    directory = Path(directory or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    md, js = directory / f"{stem}.md", directory / f"{stem}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return md, js


def run_parts(stem: str, parts: Mapping[str, Callable], args, compose: Callable[[dict], str],
              cache: str | None = None) -> dict:
    """Run each named part (``parts[name](args)``, in the order of ``args.parts``) and keep every part's result,
    with its environment and arguments, in a JSON cache, so parts can run in separate processes.

    The default cache is ``results/<stem>.json``: the Markdown is then re-composed from every part recorded so
    far and both files are written; another ``cache`` only prints it. Paths are recorded relative to the
    repository (results must not name the machine they ran on)."""
    default = RESULTS / f"{stem}.json"
    path = Path(cache) if cache else default
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    recorded = json.loads(json.dumps(vars(args), default=str))
    recorded.pop("cache", None)
    for name in args.parts:
        env = env_info()
        result = parts[name](args)
        data["runs"][name] = {"env": env, "args": recorded, "result": result}
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    if path.resolve() == default.resolve():
        write_results(stem, compose(data), data)
    else:
        print(compose(data))
    return data


def mean_std(xs) -> str:
    """``"mean ± std"`` of repeated runs (std 0 for one run), four decimals."""
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def md_table(columns: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# running models
# ------------------------------------------------------------------------------------------------


def forward(model: nn.Module, inputs: Any):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def logits(out) -> torch.Tensor:
    """The main output tensor of a timm / transformers / torchvision model."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if isinstance(out, Mapping):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return logits(out[0])
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


@torch.inference_mode()
def run_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    model.eval()
    return logits(forward(model, inputs)).float().clone()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a| (the equivalence criterion: <= 1e-4 in fp32)."""
    if a.shape != b.shape:
        return float("inf")
    scale = a.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-12)


def count_params(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def engine_macs(model: nn.Module, inputs: Any) -> int:
    """MACs counted by hf_prune's DependencyGraph (counts CPU fused attention, unlike FlopCounterMode)."""
    import hf_prune

    return int(hf_prune.DependencyGraph(model, inputs).macs())


def flop_counter_macs(model: nn.Module, inputs: Any) -> int | None:
    """MACs from hf_prune.metrics.profiling.count_macs (FlopCounterMode + attention formula), as a cross-check."""
    try:
        from hf_prune.metrics.profiling import count_macs
    except Exception:  # noqa: BLE001
        return None
    return int(count_macs(model, inputs))


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0, scale: float = 0.02) -> nn.Module:
    """Add small noise to every parameter and norm statistic.

    Random-init models have structurally zero parts (zero-init last BN gamma in ResNets, layer
    scale 1e-6, zero biases) that make an equivalence check trivially pass and magnitude
    importance degenerate; noise makes every channel carry signal.
    """
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.is_floating_point():
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    for name, b in model.named_buffers():
        if not b.is_floating_point():
            continue
        if name.endswith("running_mean"):
            b.add_(torch.randn(b.shape, generator=g).to(b) * 0.1)
        elif name.endswith("running_var"):
            b.mul_(torch.empty(b.shape).uniform_(0.5, 1.5, generator=g).to(b))
    return model


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(variants: dict[str, tuple[nn.Module, Any]], *, warmup: int, iters: int,
                     device: str = "cpu", autocast_dtype: torch.dtype | None = None,
                     progress: Callable[[str], None] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Latency in ms of each ``name -> (model, inputs)``, timed round-robin in one process.

    Every round runs each variant once, so slow drifts of a shared machine (other jobs, clock
    changes) hit all variants alike; the caller takes the median per variant. Eval mode,
    ``torch.inference_mode``; on CUDA the clock is read after ``torch.cuda.synchronize``.
    ``clock=time.thread_time`` (CPU, one intra-op thread) times the work of the calling thread, which
    waiting for a core on a loaded machine does not inflate.
    """
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _, (m, _) in variants.items():
        m.eval()
    ctx = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
           if autocast_dtype is not None else _null())
    with torch.inference_mode(), ctx:
        for r in range(warmup + iters):
            for name, (m, x) in variants.items():
                _sync(device)
                t0 = clock()
                forward(m, x)
                _sync(device)
                dt = (clock() - t0) * 1000.0
                if r >= warmup:
                    times[name].append(dt)
            if progress:
                progress(f"round {r + 1}/{warmup + iters}" + (" (warm-up)" if r < warmup else ""))
    return times


@contextmanager
def _null():
    yield


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------
# per-model timeout
# ------------------------------------------------------------------------------------------------


class ModelTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise ModelTimeout in the main thread after ``seconds`` (SIGALRM; a running C kernel
    finishes first). No-op when ``seconds`` is falsy or SIGALRM is unavailable."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise ModelTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


def timm_model(name: str, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    """A timm model with random weights and a batch-1 input of its default size."""
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    return model, torch.randn(1, *size)


def _hf_builders() -> dict[str, Callable[[], tuple[nn.Module, dict]]]:
    """Small transformers models built from configs (no Hub access), each with its pixel input."""
    import transformers as T

    def px(size=224, ch=3):
        return {"pixel_values": torch.randn(1, ch, size, size)}

    b: dict[str, Callable[[], tuple[nn.Module, dict]]] = {}
    b["hf:ViTForImageClassification"] = lambda: (T.ViTForImageClassification(T.ViTConfig(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
        image_size=224, patch_size=16, num_labels=10)), px())
    b["hf:DeiTForImageClassification"] = lambda: (T.DeiTForImageClassification(T.DeiTConfig(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
        image_size=224, patch_size=16, num_labels=10)), px())
    b["hf:BeitForImageClassification"] = lambda: (T.BeitForImageClassification(T.BeitConfig(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
        image_size=224, patch_size=16, num_labels=10, use_mean_pooling=True,
        use_relative_position_bias=True)), px())
    b["hf:Dinov2ForImageClassification"] = lambda: (T.Dinov2ForImageClassification(T.Dinov2Config(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=4,
        image_size=224, patch_size=14, num_labels=10)), px())
    b["hf:ConvNextForImageClassification"] = lambda: (T.ConvNextForImageClassification(T.ConvNextConfig(
        hidden_sizes=[40, 80, 160, 320], depths=[2, 2, 6, 2], num_labels=10)), px())
    b["hf:ConvNextV2ForImageClassification"] = lambda: (T.ConvNextV2ForImageClassification(
        T.ConvNextV2Config(hidden_sizes=[40, 80, 160, 320], depths=[2, 2, 6, 2], num_labels=10)), px())
    b["hf:ResNetForImageClassification"] = lambda: (T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
        num_labels=10)), px())
    b["hf:ResNetForImageClassification(bottleneck)"] = lambda: (T.ResNetForImageClassification(
        T.ResNetConfig(embedding_size=32, hidden_sizes=[128, 256, 512, 1024], depths=[1, 2, 2, 1],
                       layer_type="bottleneck", num_labels=10)), px())
    b["hf:RegNetForImageClassification"] = lambda: (T.RegNetForImageClassification(T.RegNetConfig(
        embedding_size=32, hidden_sizes=[24, 56, 152, 368], depths=[1, 1, 4, 7], groups_width=8,
        layer_type="y", num_labels=10)), px())
    b["hf:MobileNetV2ForImageClassification"] = lambda: (T.MobileNetV2ForImageClassification(
        T.MobileNetV2Config(depth_multiplier=0.5, image_size=224, num_labels=10)), px())
    b["hf:EfficientNetForImageClassification"] = lambda: (T.EfficientNetForImageClassification(
        T.EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, image_size=224,
                             hidden_dim=1280, num_labels=10)), px())  # B0; other widths break HF's head
    b["hf:MobileViTForImageClassification"] = lambda: (T.MobileViTForImageClassification(
        T.MobileViTConfig(image_size=256, hidden_sizes=[64, 80, 96],
                          neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], num_labels=10)), px(256))
    b["hf:SwinForImageClassification"] = lambda: (T.SwinForImageClassification(T.SwinConfig(
        image_size=224, patch_size=4, embed_dim=48, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16],
        window_size=7, num_labels=10)), px())
    b["hf:Swinv2ForImageClassification"] = lambda: (T.Swinv2ForImageClassification(T.Swinv2Config(
        image_size=224, patch_size=4, embed_dim=48, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16],
        window_size=7, num_labels=10)), px())
    b["hf:SegformerForImageClassification"] = lambda: (T.SegformerForImageClassification(
        T.SegformerConfig(num_labels=10)), px())
    b["hf:PvtV2ForImageClassification"] = lambda: (T.PvtV2ForImageClassification(T.PvtV2Config(
        num_labels=10)), px())
    b["hf:LevitForImageClassification"] = lambda: (T.LevitForImageClassification(T.LevitConfig(
        num_labels=10)), px())
    b["hf:TimmWrapperForImageClassification(resnet18)"] = lambda: (T.TimmWrapperForImageClassification(
        T.TimmWrapperConfig(architecture="resnet18", num_labels=10)), px())
    b["hf:TimmWrapperForImageClassification(vit_tiny_patch16_224)"] = lambda: (
        T.TimmWrapperForImageClassification(T.TimmWrapperConfig(architecture="vit_tiny_patch16_224",
                                                                 num_labels=10)), px())
    b["hf:TimmWrapperForImageClassification(convnext_atto)"] = lambda: (
        T.TimmWrapperForImageClassification(T.TimmWrapperConfig(architecture="convnext_atto",
                                                                 num_labels=10)), px())
    return b


def build(spec: str) -> tuple[nn.Module, Any]:
    """``"resnet18"`` (timm) or ``"hf:ViTForImageClassification"`` (see ``_hf_builders``)."""
    if spec.startswith("hf:"):
        builders = _hf_builders()
        if spec not in builders:
            raise KeyError(f"unknown transformers model {spec!r}; known: {', '.join(builders)}")
        model, x = builders[spec]()
        return model.eval(), x
    return timm_model(spec)


def hf_model_names() -> list[str]:
    return list(_hf_builders())


# ------------------------------------------------------------------------------------------------
# Torch-Pruning (optional peer)
# ------------------------------------------------------------------------------------------------


def torch_pruning_available() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _classifier(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "classifier") and isinstance(model.classifier, nn.Module):  # transformers
        return [model.classifier]
    if hasattr(model, "get_classifier"):  # timm
        head = model.get_classifier()
        return [head] if isinstance(head, nn.Module) and any(True for _ in head.parameters()) else []
    return []


def tp_prune(model: nn.Module, inputs: Any, pruning_ratio: float = 0.3, round_to: int | None = None,
             timings: dict | None = None) -> nn.Module:
    """Torch-Pruning's default recipe, in place: ``MetaPruner`` + ``GroupMagnitudeImportance(p=2)``,
    uniform (local) ``pruning_ratio``, classifier ignored; for ViTs the ``num_heads`` mapping and the
    head-size fix-up of Torch-Pruning's own examples (``examples/transformers/prune_timm_vit.py``,
    ``prune_hf_vit.py``: ``prune_head_dims=True, prune_num_heads=False``).

    ``timings`` (optional dict) receives ``graph_s`` (pruner construction, which builds the
    DependencyGraph) and ``step_s`` (``pruner.step()`` plus the head fix-up).
    """
    import torch_pruning as tp

    num_heads: dict[nn.Module, int] = {}
    timm_attn, hf_attn = [], []
    try:
        from timm.layers import Attention as TimmAttention
    except Exception:  # noqa: BLE001
        TimmAttention = ()
    for m in model.modules():
        if TimmAttention and isinstance(m, TimmAttention):
            num_heads[m.qkv] = m.num_heads
            timm_attn.append(m)
        elif hasattr(m, "q_proj") and hasattr(m, "num_attention_heads") and hasattr(m, "head_dim"):
            for lin in (m.q_proj, m.k_proj, m.v_proj):  # transformers ViT/DeiT attention
                num_heads[lin] = m.num_attention_heads
            hf_attn.append(m)

    kwargs = {}
    if isinstance(inputs, Mapping):
        kwargs["forward_fn"] = lambda mdl, x: mdl(**x)
    if hasattr(model, "config"):  # transformers: ModelOutput -> tensor for tracing
        kwargs["output_transform"] = lambda out: out.logits.sum()
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=pruning_ratio, ignored_layers=_classifier(model), round_to=round_to,
        num_heads=num_heads, prune_head_dims=True, prune_num_heads=False, **kwargs)
    t1 = time.perf_counter()
    pruner.step()
    for m in timm_attn:
        m.num_heads = pruner.num_heads[m.qkv]
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):  # timm >= 1.0.2x reshapes with attn_dim
            m.attn_dim = m.num_heads * m.head_dim
    for m in hf_attn:
        m.num_attention_heads = pruner.num_heads[m.q_proj]
        m.head_dim = m.q_proj.out_features // m.num_attention_heads
    t2 = time.perf_counter()
    if timings is not None:
        timings["graph_s"] = t1 - t0
        timings["step_s"] = t2 - t1
    return model


# ------------------------------------------------------------------------------------------------
# hf_prune with a latency target
# ------------------------------------------------------------------------------------------------


def latency_prune(model: nn.Module, inputs: Any, target_latency: float, *, batch_size: int = 1, device=None,
                  dtype: torch.dtype | None = None, round_to: int | str | None = 8, **options) -> dict:
    """hf_prune to ``target_latency`` of the dense latency measured on ``device`` at ``batch_size`` and
    ``dtype`` (in the layout of ``inputs``), in place and compacted, through the engine the one-shot
    ``prune`` uses (with its repairs). ``options`` go to :class:`hf_prune.engine.latency.LatencyModel`
    (``grid``, ``timer``, ``verify_seconds``). Returns the plan's latency report (predicted, measured,
    corrected)."""
    from hf_prune.engine.pruner import StructuredPruner, with_repairs

    def build(frozen_modules, frozen_splits):
        return StructuredPruner(model, inputs, round_to=round_to, frozen_modules=frozen_modules,
                                frozen_splits=frozen_splits)

    def attempt(pruner):
        latency = pruner.latency_model(device=device, batch_size=batch_size, dtype=dtype, **options)
        pruner.step(target_latency=target_latency, latency=latency, compacted=True)

    return with_repairs(model, build, attempt).latency_report
