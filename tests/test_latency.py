"""Latency as a pruning target: the cache, the knapsack under a latency table, plan/verify/correct, errors.

Every test but the last two injects a made-up timer (no clock), so nothing here depends on the load of
the machine: a layer costs ``factor[name] * cin * cout`` milliseconds, and "measuring" a whole model
sums that cost over the model's real (compacted) Conv/Linear shapes. Bilinear interpolation is exact
for such a cost, so the latency model's prediction must equal the made-up measurement exactly.
"""
import copy

import pytest
import torch
from torch import nn

from hf_prune.engine.allocation import LatencyKnapsack
from hf_prune.engine.latency import LatencyModel, LatencyTable, Settings, cache_dir, find_layers, measure_speedup
from hf_prune.engine.pruner import StructuredPruner
from hf_prune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """A stem, two residual blocks (hidden groups ``a`` of 48 and ``c`` of 64 channels), a depthwise conv.
    No two layers share a shape, so the made-up per-layer costs never meet in the table (which is
    keyed by shape, as real times are)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(16, 48, 3, padding=1), nn.Conv2d(48, 16, 1)
        self.c, self.dw = nn.Conv2d(16, 64, 1, bias=False), nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.d = nn.Conv2d(64, 16, 3, padding=1, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b(torch.relu(self.a(x)))
        x = x + self.d(torch.relu(self.dw(self.c(x))))
        return self.head(x.mean((2, 3)))


def net():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(1, 3, 8, 8)


class FakeTimer:
    """Made-up times. ``cost(name, cin, cout)`` per layer call; ``slower`` scales every model but the
    first in :meth:`interleaved` (a measurement that disagrees with the prediction)."""

    def __init__(self, factors, penalty=None, slower=1.0, fixed=0.0, share=0.0):
        self.factors, self.penalty, self.slower = factors, penalty or (lambda name, cin, cout: 1.0), slower
        self.fixed, self.share = fixed, share  # ms every model pays outside its layers; its share reported
        self.load = 1.0  # every layer time is multiplied by it (other work on the machine)
        self.residual_ratio = 1.0
        self.shrinking = 0.0  # a residual of this fraction of each model's own layer time
        self.layer_calls = 0

    def cost(self, name, cin, cout):
        return self.factors.get(name, 1e-3) * cin * cout * self.penalty(name, cin, cout)

    def layers(self, jobs, settings):
        self.layer_calls += len(jobs)
        shapes = [layer.shape(cin, cout) for layer, cin, cout in jobs]
        return [self.load * self.cost(layer.name, cin // g, cout) for (layer, _, _), (cin, cout, g) in zip(jobs, shapes)]

    def residual(self, models, inputs, settings):
        """The share of ``fixed`` in the first model's time; ``fixed`` is the same in every model, so
        the residual ratio reported is 1 unless ``residual_ratio`` says otherwise."""
        return self.share, [self.residual_ratio] * (len(models) - 1)

    def model_ms(self, model):
        total = 0.0
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                total += self.cost(name, m.in_features, m.out_features)
            elif isinstance(m, nn.Conv2d):
                total += self.cost(name, m.in_channels // m.groups, m.out_channels)
        return total

    def interleaved(self, models, inputs, settings, *, iters=None, warmup=2, max_seconds=20.0):
        return [[(self.model_ms(m) * (1 + self.shrinking) + self.fixed) * (1.0 if i == 0 else self.slower)] * 3
                for i, m in enumerate(models)]


FACTORS = {"stem": 1e-3, "a": 1e-3, "b": 1e-3, "c": 1e-3, "dw": 1e-3, "d": 1e-3, "head": 1e-3}


def latency_model(model, x, timer, **kw):
    pruner = StructuredPruner(model, x, **kw)
    lm = LatencyModel(model, pruner.graph, x, Settings.of(model, x), timer=timer, cache=False)
    return pruner, lm


def kept(pruner, removed, name):
    """Kept output channels of layer ``name`` for the plan ``removed``."""
    keep = pruner.graph.keep_mask(removed)
    lm_layers = {m.tensor: m for m in pruner.graph.members if m.dim == 0}
    return int(keep[lm_layers[f"{name}.weight"].units].sum())


# ----------------------------------------------------------------------------------------------- cache
def test_cache_round_trip_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "hf_prune" / "latency"
    model, x = net()
    settings = Settings.of(model, x)
    ctx = settings.context()
    assert {"device", "torch", "dtype", "batch_size", "memory_format", "threads"} <= set(ctx)
    assert ctx["torch"] == torch.__version__ and ctx["dtype"] == "float32" and ctx["batch_size"] == 1

    timer = FakeTimer(FACTORS)
    first = LatencyModel(model, StructuredPruner(model, x).graph, x, settings, timer=timer).build()
    timed = timer.layer_calls
    assert timed > 0 and first.table.path.parent == cache_dir() and first.table.path.is_file()
    # keyed by concrete shapes: the 3x3 conv `a` at its dense widths, batch 1, 8x8 input
    assert "conv2d|x=1x16x8x8|w=48x16x3x3|s=1x1|p=1x1|d=1x1|g=1|b=1" in first.table.entries

    again = LatencyModel(model, first.graph, x, settings, timer=timer).build()  # a later run: all cached
    assert timer.layer_calls == timed and again.measured == 0
    assert again.predict() == pytest.approx(first.predict())

    other = Settings.of(model, x, batch_size=4)  # another batch size is another file, measured afresh
    assert LatencyTable.file_for(other.context()) != first.table.path
    LatencyModel(model, first.graph, x, other, timer=timer).build()
    assert timer.layer_calls > timed
    assert "conv2d|x=4x16x8x8|w=48x16x3x3|s=1x1|p=1x1|d=1x1|g=1|b=1" in LatencyTable.load(other.context()).entries

    # a file that holds another context (another torch) under this context's name is not used
    first.table.path.write_text(first.table.path.read_text().replace(torch.__version__, "0.0"))
    assert LatencyTable.load(ctx).entries == {}


def test_layers_are_mapped_to_members():
    model, x = net()
    pruner = StructuredPruner(model, x)
    layers = {l.name: l for l in find_layers(model, pruner.graph, x, batch_size=3)}
    assert set(layers) == {"stem", "a", "b", "c", "dw", "d", "head"}
    assert layers["dw"].in_follows_out and layers["dw"].groups == 64 and layers["dw"].rows == 3
    assert layers["head"].rows == 3 and layers["a"].out_tokens == 3 * 8 * 8
    members = pruner.graph.members
    assert members[layers["a"].out_member].tensor == "a.weight" and members[layers["b"].in_member].tensor == "b.weight"
    # the hidden channels of block a are one coupled set: a's outputs are b's inputs
    assert torch.equal(members[layers["a"].out_member].units, members[layers["b"].in_member].units)
    assert layers["dw"].shape(32, 32) == (32, 32, 32)  # a depthwise conv keeps one group per channel


def test_later_measurements_are_rescaled_to_the_table():
    model, x = net()
    timer = FakeTimer(FACTORS)
    _, lm = latency_model(model, x, timer)
    lm.build()
    c = next(i for i, l in enumerate(lm.layers) if l.name == "c")
    timer.load = 2.5  # the machine got busier since the grid was timed
    assert lm.ensure([(c, 16, 40), (c, 16, 56)]) == 2
    assert lm.exact(c, 16, 40) == pytest.approx(timer.cost("c", 16, 40))  # as if timed with the grid
    assert lm.exact(c, 16, 56) == pytest.approx(timer.cost("c", 16, 56))


def test_grid_outliers_are_tamed():
    # 1-d grid over output widths 8, 16, 32, 64: a slow sample at 64 (would make the first cut look like
    # a large saving) is capped at 1.25 x proportional growth (so is the one at 16)
    assert LatencyModel._monotone([[1.0, 5.0, 3.0, 40.0]], [16], [8, 16, 32, 64]) == [[1.0, 2.5, 3.0, 7.5]]
    # plausible times are kept as they are, in both dimensions
    grid = [[1.0, 2.0], [2.0, 3.5]]
    assert LatencyModel._monotone(grid, [8, 16], [8, 16]) == grid


# ----------------------------------------------------------------------------------------------- allocator
def test_knapsack_respects_the_table_exactly():
    model, x = net()
    timer = FakeTimer(FACTORS)
    pruner, lm = latency_model(model, x, timer)
    removed = pruner.plan(target_latency=0.6, latency=lm, verify=True)
    report = pruner.latency_report
    predicted = report["attempts"][0]["predicted_ratio"]
    measured = report["measured"]["latency_ratio"]  # the compacted model's real shapes, costed
    assert predicted == pytest.approx(measured, abs=1e-12)
    assert measured <= 0.6 and not report["corrected"] and report["within_tolerance"]
    # not over-pruned: one more step of 8 channels (or none) separates it from the budget
    dense = timer.model_ms(model)
    step = max(8 * 16 * timer.factors[n] * 2 for n in ("a", "c"))
    assert measured * dense > 0.6 * dense - step - 8 * 1e-3 * 64
    assert torch.equal(pruner.removed, torch.zeros(0, dtype=torch.int64))  # plan() changes nothing
    assert len(removed) > 0


def test_knapsack_prefers_cheap_time_and_low_importance():
    model, x = net()
    # block a's layers cost 20x more per MAC: with equal scores, its channels go first
    timer = FakeTimer(dict(FACTORS, a=2e-2, b=2e-2))
    pruner, lm = latency_model(model, x, timer)
    ones = torch.ones(pruner.graph.trace.uf.size, dtype=torch.float64)
    removed = pruner.plan(target_latency=0.5, latency=lm, scores=ones, verify=False)
    assert kept(pruner, removed, "a") <= 16 and kept(pruner, removed, "c") == 64

    # equal cost per MAC: the low-scored half of block c's channels goes before anything of block a
    timer = FakeTimer(FACTORS)
    pruner, lm = latency_model(model, x, timer)
    scores = ones.clone()
    c_units = next(m.units for m in pruner.graph.members if m.tensor == "c.weight" and m.dim == 0)
    scores[c_units[:32]] = 1e-3
    removed = pruner.plan(target_latency=0.8, latency=lm, scores=scores, verify=False)
    from_c = removed[torch.isin(removed, c_units)]
    assert kept(pruner, removed, "a") == 48 and len(from_c) and torch.isin(from_c, c_units[:32]).all()


def test_a_step_that_saves_nothing_does_not_stop_the_search():
    model, x = net()
    pruner, lm = latency_model(model, x, FakeTimer(FACTORS))
    lm.build()
    c = next(i for i, l in enumerate(lm.layers) if l.name == "c")
    # block c one step below its full width measured far slower than at full width (say, a worse kernel)
    lm.table.put(lm.layers[c].signature(16, 56), 10 * lm.layer_ms(c, 16, 64))
    removed = pruner.plan(target_latency=0.5, latency=lm, verify=False)  # unreachable without block c
    assert pruner.latency_report["attempts"][0]["predicted_ratio"] <= 0.5
    assert kept(pruner, removed, "c") < 56


def test_measured_rounding_picks_the_faster_width():
    model, x = net()

    def misaligned(name, cin, cout):  # widths off a multiple of 16 run 3x slower in block c
        width = cout if name in ("c", "dw") else cin if name == "d" else 16
        return 1.0 if width % 16 == 0 else 3.0

    timer = FakeTimer(dict(FACTORS, c=4e-3, dw=4e-3, d=4e-3), penalty=misaligned)
    for target in (0.55, 0.65, 0.75):
        pruner, lm = latency_model(model, x, timer, round_to="measured")
        removed = pruner.plan(target_latency=target, latency=lm, verify=True)
        assert kept(pruner, removed, "c") % 16 == 0, target
        assert pruner.latency_report["measured"]["latency_ratio"] <= target + 1e-12
        assert lm.measured > len(lm.layers)  # candidate widths were timed beyond the grid


# ----------------------------------------------------------------------------------------------- plan / verify
def test_plan_end_to_end_compacts_to_the_target():
    model, x = net()
    before = copy.deepcopy(model.state_dict())
    timer = FakeTimer(FACTORS)
    pruner, lm = latency_model(model, x, timer)
    dense_ms = timer.model_ms(model)
    pruner.plan(target_latency=0.5, latency=lm)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # verification restored it
    pruner.step(target_latency=0.5, latency=lm, compacted=True)
    assert timer.model_ms(model) <= 0.5 * dense_ms
    assert model.c.out_channels < 64 and model(x).shape == (1, 10)


def test_correction_when_the_measurement_misses():
    model, x = net()
    timer = FakeTimer(FACTORS, slower=1.3)  # the pruned model measures 30 % slower than predicted
    pruner, lm = latency_model(model, x, timer)
    pruner.plan(target_latency=0.5, latency=lm)
    report = pruner.latency_report
    first, second = report["attempts"]
    assert report["corrected"] and first["measured"]["latency_ratio"] > 0.55
    assert second["budget"] == pytest.approx(0.5 * first["predicted_ratio"] / first["measured"]["latency_ratio"])
    assert second["predicted_ratio"] <= second["budget"]
    assert report["chosen"] == 1 and report["measured"] == second["measured"]

    timer.slower = 1.05  # within 10 %: no correction
    pruner.plan(target_latency=0.5, latency=lm)
    assert not pruner.latency_report["corrected"] and len(pruner.latency_report["attempts"]) == 1


def test_a_residual_that_does_not_shrink_is_measured_up_front():
    model, x = net()
    timer = FakeTimer(FACTORS)
    # outside the layers, a third of the time, which pruning does not reduce
    timer.fixed, timer.share = timer.model_ms(model) / 2, 1 / 3
    pruner, lm = latency_model(model, x, timer)
    lm.build()
    assert lm.fixed_share == 1.0 and lm.residual_share == pytest.approx(1 / 3)
    pruner.plan(target_latency=0.6, latency=lm)
    report = pruner.latency_report
    assert not report["corrected"] and report["within_tolerance"]
    assert report["measured"]["latency_ratio"] == pytest.approx(report["attempts"][0]["predicted_ratio"])


def test_correction_refits_a_residual_that_does_not_shrink():
    model, x = net()
    timer = FakeTimer(FACTORS)
    layers = timer.model_ms(model)
    # as above, but the half-width model seemed to lose all of it: the model first assumes it shrinks
    timer.fixed, timer.share, timer.residual_ratio = layers / 2, 1 / 3, 0.0
    pruner, lm = latency_model(model, x, timer)
    pruner.plan(target_latency=0.6, latency=lm)
    report = pruner.latency_report
    first, second = report["attempts"]
    assert first["measured"]["latency_ratio"] > 0.66  # the first plan, made with a shrinking residual, is too slow
    assert lm.fixed_share == pytest.approx(1.0) and second["budget"] == pytest.approx(0.6)
    assert second["measured"]["latency_ratio"] == pytest.approx(second["predicted_ratio"])  # the refit explains it
    assert second["measured"]["latency_ratio"] <= 0.6 and report["within_tolerance"] and report["chosen"] == 1


def test_a_target_out_of_reach_only_by_the_fixed_share_is_still_tried():
    model, x = net()
    timer = FakeTimer(FACTORS)
    # the residual really shrinks with the layers, but the half-width model seemed to keep all of it
    timer.shrinking, timer.share, timer.residual_ratio = 0.5, 1 / 3, 1.0
    pruner, lm = latency_model(model, x, timer)
    lm.build()
    assert lm.fixed_share == 1.0
    pruner.plan(target_latency=0.35, latency=lm)  # below the floor the fixed share implies
    report = pruner.latency_report
    assert "planned with a shrinking residual" in report["note"] and "cannot be reached" in report["note"]
    assert report["within_tolerance"] and report["measured"]["latency_ratio"] <= 0.35


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"target_latency": 0}, r"target_latency=0 must be in \(0, 1\]"),
    ({"target_latency": 1.5}, r"target_latency=1.5 must be in \(0, 1\]: the fraction of the dense model's measured"),
    ({"target_latency": "0.5"}, r"target_latency='0.5' must be in"),
    ({"target_latency": 0.5, "target_macs": 0.5}, "give exactly one target"),
    ({}, "give exactly one target"),
])
def test_bad_targets_are_config_errors(kwargs, match):
    model, x = net()
    pruner = StructuredPruner(model, x)
    with pytest.raises(ConfigError, match=match):
        pruner.plan(**kwargs)


def test_bad_latency_settings_are_config_errors():
    model, x = net()
    with pytest.raises(ConfigError, match="round_to='measured' picks widths by timing"):
        StructuredPruner(model, x, round_to="measured").plan(target_macs=0.5)
    with pytest.raises(ConfigError, match="latency dtype=torch.int32"):
        Settings.of(model, x, dtype=torch.int32)
    with pytest.raises(ConfigError, match="batch_size=0"):
        Settings.of(model, x, batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            Settings.of(model, x, device="cuda")


def test_unreachable_latency_target_names_the_floor():
    model, x = net()
    timer = FakeTimer(dict(FACTORS, stem=1.0))  # the pinned stem dominates: 1 % is out of reach
    pruner, lm = latency_model(model, x, timer)
    with pytest.raises(Exception, match=r"target_latency=0.01 cannot be reached.*of the dense latency"):
        pruner.plan(target_latency=0.01, latency=lm, verify=False)


# ----------------------------------------------------------------------------------------------- real timing
def test_measure_speedup_reports_and_leaves_models_alone():
    model, x = net()
    pruned = copy.deepcopy(model)
    StructuredPruner(pruned, x).step(target_macs=0.5, compacted=True)
    out = measure_speedup(model, pruned, x, batch_size=3, dtype=torch.float64, iters=3)
    assert {"latency_ratio", "speedup", "device", "batch_size", "dtype", "dense_ms", "pruned_ms", "load"} <= set(out)
    assert out["batch_size"] == 3 and out["dtype"] == "float64" and out["iterations"] == 3
    assert out["speedup"] == pytest.approx(1 / out["latency_ratio"]) and out["dense_ms"] > 0
    assert model.a.weight.dtype == torch.float32 and pruned.a.weight.dtype == torch.float32  # copies were timed


def test_card_renders_the_recorded_speed():
    from hf_prune.hub.card import render_card

    spec = {"format_version": 1, "base": {"library": "timm", "architecture": "resnet18", "config": {}},
            "layers": [], "removed_blocks": [], "merged_blocks": [], "sparsity": {},
            "method": {"name": "depgraph", "settings": {}},
            "stats": {"params_before": 10, "params_after": 5,
                      "speed": {"speedup": 1.874, "latency_ratio": 0.534, "device": "NVIDIA H200",
                                "batch_size": 256, "dtype": "bfloat16"}}}
    text = render_card(spec, plot=None)
    assert "**1.87×** on NVIDIA H200, batch size 256, bfloat16" in text
    assert "**1.50×** on cpu" in render_card(spec, speed={"speedup": 1.5, "device": "cpu"}, plot=None)


def test_prune_and_callback_with_target_latency_record_what_was_measured(tmp_path):
    """The whole path with real timing: one-shot prune() records the measured speed of the plan (and the card
    shows it); the callback measures the latency model once, prunes towards the latency target on its
    schedule and records the predicted latency ratio of the final widths. No timing threshold is asserted."""
    import timm

    import hf_prune
    from hf_prune.hub.card import render_card
    from hf_prune.hub.spec import structure_spec

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    hf_prune.prune(model, target_latency=0.7, example_inputs=x)
    stats = model.hf_prune_record["stats"]
    speed = stats["speed"]
    assert {"latency_ratio", "speedup", "device", "batch_size", "dtype"} <= set(speed)
    assert speed["batch_size"] == 1 and speed["dtype"] == "float32" and stats["macs_after"] < stats["macs_before"]
    assert model.hf_prune_record["settings"]["target_latency"] == 0.7
    spec = structure_spec(model, method="depgraph", settings=model.hf_prune_record["settings"], stats=stats)
    assert f"{speed['speedup']:.2f}" in render_card(spec)

    model = timm.create_model("resnet18", num_classes=10)
    cb = hf_prune.DepGraphCallback(target_latency=0.7, schedule="linear", start=0, end=2, frequency=1)
    cb.setup(model, total_steps=4, example_inputs=x)
    for step in range(4):
        cb.step_begin(step)
        cb.optimizer_step()
    assert [e["step"] for e in cb.events] == [1, 2] and cb.events[-1]["target"] == pytest.approx(0.7)
    cb.finish()
    assert 0 < cb.record["stats"]["predicted_latency_ratio"] <= 0.7 + 1e-6
    assert cb.record["stats"]["macs_after"] < cb.record["stats"]["macs_before"]
