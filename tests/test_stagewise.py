"""SP (stage-wise channel pruning): supernet exactness, sampling, search, Trainer, checkpoints, errors, DDP."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hf_prune.errors import PruningError
from hf_prune import StageWiseConfig
from hf_prune.methods.stagewise.oneshot import prune_stagewise
from hf_prune.methods.stagewise.supernet import Supernet, evolutionary_search, find_stages, kendall_tau

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    if kind == "resnet":
        return T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32],
                                                             depths=[1, 2, 1, 1], layer_type="basic", num_labels=10))
    if kind == "convnext":
        return T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1],
                                                                 num_labels=10))
    return T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=4,
                                                   num_attention_heads=4, intermediate_size=64, num_labels=10))


def _size(kind):
    return 16 if kind == "vit" else 32


def _noisy_bn_stats(model, size):
    """Give BN running statistics non-trivial values (a fresh model has mean 0 / var 1)."""
    model.train()
    with torch.no_grad():
        model(pixel_values=torch.randn(8, 3, size, size) * 2 + 0.5)
    model.eval()


# ------------------------------------------------------------------------------------------ supernet


@pytest.mark.parametrize("kind", ["resnet", "convnext", "vit"])
def test_masked_subnet_equals_compacted_subnet(kind):
    model = tiny(kind)
    size = _size(kind)
    _noisy_bn_stats(model, size)
    x = {"pixel_values": torch.randn(4, 3, size, size)}
    sup = Supernet(model, {"pixel_values": x["pixel_values"][:2]}, round_to=1, make_teacher=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    choices = [sup.space.min_choice(), sup.space.sample(gen), sup.space.sample(gen)]
    for choice in choices:
        with torch.no_grad():
            masked = sup.forward(sup.space.keep(choice), x).logits
            full = model(**x).logits
        sub = sup.extract(choice)
        with torch.no_grad():
            compacted = sub(**x).logits
        err = (masked - compacted).abs().max() / compacted.abs().max()
        assert err <= 1e-4, f"{kind}: masked subnet != compacted subnet (rel err {err:.2e})"
        assert (masked - full).abs().max() > 1e-3  # a real subnet, not the full net
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
        # the compacted widths are the sampled ones (leading units of each group)
        assert sup.macs_ratio(choice) < 1.0
    # masking is non-destructive: the shared weights and statistics are untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_reach_only_active_channels():
    model = tiny("convnext")
    sup = Supernet(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=1)
    choice = sup.space.min_choice()
    loss, _ = sup.subnet_loss(choice, {"pixel_values": torch.randn(4, 3, 32, 32)})
    loss.backward()
    keep = sup.space.keep(choice)
    params = dict(model.named_parameters())
    checked = 0
    for name, dims in sup._param_members.items():
        for dim, units in dims:
            gone = torch.nonzero(~keep[units]).reshape(-1)
            if gone.numel() and params[name].grad is not None:
                assert params[name].grad.index_select(dim, gone).abs().max() == 0, name
                checked += 1
    assert checked > 5
    assert loss.item() > 0


def test_stages_found_where_resolution_changes_and_vit_chunks():
    sup = Supernet(tiny("resnet"), {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=1, make_teacher=False)
    assert [s.name for s in sup.stages] == [f"resnet.encoder.stages.{i}" for i in range(4)]
    assert sorted(set(sup.group_stage)) == [0, 1, 2, 3]
    vit = tiny("vit")
    stages = find_stages(vit, {"pixel_values": torch.randn(2, 3, 16, 16)}, num_stages=2)
    assert [len(s.blocks) for s in stages] == [2, 2]  # no resolution change: equal chunks


def test_widths_respect_coupling_and_rounding():
    model = tiny("resnet")
    sup = Supernet(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=4, make_teacher=False)
    for counts, g in zip(sup.space.counts, sup.graph.groups):
        assert counts[-1] == len(g)
        assert all(c % 4 == 0 or c == len(g) for c in counts) and counts == sorted(set(counts))
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        choice = sup.space.sample(gen)
        sub = sup.extract(choice)
        out = sub(pixel_values=torch.randn(2, 3, 32, 32)).logits  # coupled dims were cut together: it runs
        assert out.shape == (2, 10)
        from hf_prune.engine.graph import DependencyGraph

        assert DependencyGraph(sub, {"pixel_values": torch.randn(2, 3, 32, 32)}).macs() == sup.space.macs(choice)


def test_bn_recalibration_is_per_subnet_and_restored():
    model = tiny("resnet")
    _noisy_bn_stats(model, 32)
    sup = Supernet(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=1, make_teacher=False)
    data = [{"pixel_values": torch.randn(16, 3, 32, 32), "labels": torch.randint(10, (16,))} for _ in range(2)]
    bn = sup._batchnorms()[-1]
    saved = bn.running_mean.clone()
    with sup.recalibrated(sup.space.min_choice(), data):
        small = bn.running_mean.clone()
    with sup.recalibrated(sup.space.max_choice(), data):
        large = bn.running_mean.clone()
    assert not torch.equal(small, large) and not torch.equal(small, saved)
    assert torch.equal(bn.running_mean, saved)


# ------------------------------------------------------------------------------------------ sampling


def _callback(**kw):
    from hf_prune.methods.stagewise.callback import StageWiseCallback

    return StageWiseCallback(**{"target_macs": 0.8, "round_to": 1, **kw})


def test_sandwich_sampling_covers_max_and_min_every_step_and_is_seeded_by_step():
    cb = _callback(num_random=3, seed=5)
    cb.setup(tiny("resnet"), total_steps=10, example_inputs={"pixel_values": torch.randn(2, 3, 32, 32)})
    space = cb.supernet.space
    draws = [cb.sample(t) for t in range(6)]
    for d in draws:
        assert [tag for tag, _ in d] == ["max", "min", "random", "random", "random"]
        assert d[0][1] == space.max_choice() and d[1][1] == space.min_choice()
    randoms = {c for d in draws for tag, c in d if tag == "random"}
    assert len(randoms) >= 10  # random subnets really vary
    other = _callback(num_random=3, seed=5)
    other.setup(tiny("resnet"), total_steps=10, example_inputs={"pixel_values": torch.randn(2, 3, 32, 32)})
    torch.manual_seed(999)  # global RNG state must not matter
    assert [other.sample(t) for t in reversed(range(6))] == list(reversed(draws))
    third = _callback(num_random=3, seed=6)
    third.setup(tiny("resnet"), 10, {"pixel_values": torch.randn(2, 3, 32, 32)})
    assert [third.sample(t) for t in range(6)] != draws  # another seed, another sequence


def test_sequential_schedule_varies_only_the_current_stage():
    cb = _callback(num_random=2, stage_schedule="sequential")
    cb.setup(tiny("resnet"), total_steps=8, example_inputs={"pixel_values": torch.randn(2, 3, 32, 32)})
    space, stage_of = cb.supernet.space, cb.supernet.group_stage
    for t in range(8):
        (k,) = cb.active_stages(t)
        assert k == t * 4 // 8
        for tag, choice in cb.sample(t):
            for i, (c, m) in enumerate(zip(choice, space.max_choice())):
                if stage_of[i] != k:
                    assert c == m, (t, tag, i)
            if tag == "min":
                assert all(c == 0 for i, c in enumerate(choice) if stage_of[i] == k)


# ------------------------------------------------------------------------------------------ search


def test_search_respects_budget_and_prefers_higher_proxy():
    model = tiny("resnet")
    sup = Supernet(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=1, make_teacher=False)
    widest = sup.space.max_choice()

    def fitness(c):  # prefers wide late stages, penalises the first group
        return sum(c[i] * (1 + sup.group_stage[i]) for i in range(len(c))) - 3 * c[0]

    result = sup.search(fitness, target_macs=0.6, population=10, generations=4, seed=0)
    assert result.macs <= 0.6 * sup.dense_macs and result.macs_ratio <= 0.6
    sub = sup.extract(result.choice)
    from hf_prune.engine.graph import DependencyGraph

    assert DependencyGraph(sub, {"pixel_values": torch.randn(2, 3, 32, 32)}).macs() <= 0.6 * sup.dense_macs
    # the evolution improves on its initial population and beats random feasible subnets
    assert result.history[-1][1] >= result.history[0][1]
    gen = torch.Generator().manual_seed(1)
    from hf_prune.methods.stagewise.supernet import _shrink_to_fit

    randoms = [_shrink_to_fit(sup.space, sup.space.sample(gen), lambda c: sup.macs_ratio(c) <= 0.6, gen)
               for _ in range(20)]
    assert result.score >= max(fitness(c) for c in randoms)
    assert result.choice != widest


def test_evolutionary_search_finds_the_best_feasible_in_a_small_space():
    model = tiny("resnet")
    sup = Supernet(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=8, make_teacher=False)
    space = sup.space
    limit = (1 + sup.macs_ratio(space.min_choice())) / 2
    feasible = lambda c: sup.macs_ratio(c) <= limit  # noqa: E731
    fitness = lambda c: sup.macs_ratio(c)  # noqa: E731  (best = the largest subnet that fits)
    best, score, _ = evolutionary_search(space, fitness, feasible, population=12, generations=5, seed=0)
    import itertools

    every = [c for c in itertools.product(*[range(len(c)) for c in space.counts]) if feasible(c)]
    assert len(every) < 5000
    assert feasible(best) and score == pytest.approx(max(fitness(c) for c in every), abs=0.03)


# ------------------------------------------------------------------------------------------ stage-wise search


def test_dp_over_stages_returns_the_brute_force_optimum_within_budget():
    import itertools
    import random

    from hf_prune.methods.stagewise.stage_search import StageOption, best_combinations

    rng = random.Random(0)
    for trial in range(30):
        n = rng.randint(1, 4)
        options = []
        for k in range(n):
            opts = []
            for _ in range(rng.randint(1, 6)):
                inp = None if k == 0 else rng.randint(0, 2)
                out = None if k == n - 1 else rng.randint(0, 2)
                opts.append(StageOption(inp, out, round(rng.uniform(0, 5), 3), rng.randint(0, 9)))
            options.append(opts)
        budget = rng.randint(0, 9 * n)
        chains = [c for c in itertools.product(*[range(len(o)) for o in options])
                  if all(options[k][c[k]].inp == (options[k - 1][c[k - 1]].out if k else None) for k in range(n))
                  and sum(options[k][j].macs for k, j in enumerate(c)) <= budget]
        want = sorted(sum(options[k][j].cost for k, j in enumerate(c)) for c in chains)[:3]
        got = best_combinations(options, budget, top_k=3)
        assert [c for c, _ in got] == pytest.approx(want), trial
        for cost, picks in got:  # each returned chain is valid, fits, and costs what it says
            assert tuple(picks) in chains
            assert sum(options[k][j].cost for k, j in enumerate(picks)) == pytest.approx(cost)
        # quantised MACs: never over budget, and optimal among chains that fit with one unit per stage to spare
        found = best_combinations(options, budget, top_k=2, bins=4)
        assert all(sum(options[k][j].macs for k, j in enumerate(picks)) <= budget for _, picks in found)
        unit = -(-budget // 4) if budget > 4 else 1
        slack = [c for c in chains if sum(options[k][j].macs for k, j in enumerate(c)) <= budget - n * unit]
        if slack:
            assert found[0][0] <= min(sum(options[k][j].cost for k, j in enumerate(c)) for c in slack) + 1e-9


@pytest.mark.parametrize("kind,kw", [("resnet", {}), ("convnext", {}), ("vit", {"prune_stem": True, "num_stages": 3})])
def test_macs_split_over_stages_is_exact(kind, kw):
    from hf_prune.methods.stagewise.stage_search import stage_charges, stage_layout

    size = _size(kind)
    sup = Supernet(tiny(kind), {"pixel_values": torch.randn(2, 3, size, size)}, round_to=1, make_teacher=False, **kw)
    layout, space = stage_layout(sup), sup.space
    if kind == "vit":  # the embedding width acts in every stage: searched in the outer loop
        assert layout.spanning == [0] and all(0 not in v for v in layout.variables)
    else:  # a residual stream is the interface between its stage and the next one
        assert all(len(f) == 1 for f in layout.interfaces[1:]) and not layout.spanning
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        choice = space.sample(gen)
        ref = list(space.max_choice())
        for g in layout.spanning:
            ref[g] = choice[g]
        total = space.macs(tuple(ref))
        for k, groups in enumerate(layout.variables):
            inp = layout.interfaces[k - 1] if k else []
            total += stage_charges(space, tuple(ref), groups, inp, [tuple(choice[g] for g in groups)])[0]
        assert total == space.macs(choice)


@pytest.mark.parametrize("kind", ["convnext", "resnet"])
def test_stage_score_is_the_stage_loss_of_training(kind):
    model = tiny(kind)
    _noisy_bn_stats(model, 32)
    sup = Supernet(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=1)
    model.eval()
    batch = {"pixel_values": torch.randn(8, 3, 32, 32), "labels": torch.randint(10, (8,))}
    choice = sup.space.sample(torch.Generator().manual_seed(1))
    weights = {"temperature": 2.0, "stage_weight": 0.7, "kd_weight": 1.3}
    scores = sup.stage_scores(choice, [batch], **weights)
    with torch.no_grad():
        for k, score in enumerate(scores):
            loss, _ = sup.subnet_loss(choice, {"pixel_values": batch["pixel_values"]}, stages=[k], **weights)
            assert score == pytest.approx(float(loss), rel=1e-5, abs=1e-7), k
        total, _ = sup.subnet_loss(choice, {"pixel_values": batch["pixel_values"]}, **weights)
    assert sum(scores) == pytest.approx(float(total), rel=1e-5)
    assert min(scores) > 0 and sup.stage_scores(sup.space.max_choice(), [batch], **weights)[0] == pytest.approx(0)
    if kind == "resnet":  # BN recalibrated per candidate on the full net's stage inputs, then put back
        before = {k: v.clone() for k, v in model.state_dict().items()}
        recal = sup.stage_scores(choice, [batch], [batch], **weights)
        assert recal != pytest.approx(scores) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stagewise_search_is_the_dp_optimum_of_the_stage_scores():
    import itertools

    from hf_prune.methods.stagewise.stage_search import stage_layout, stagewise_search

    model = tiny("resnet")
    _noisy_bn_stats(model, 32)
    sup = Supernet(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=8, ratios=(0.5, 0.75, 1.0))
    data = [{"pixel_values": torch.randn(16, 3, 32, 32), "labels": torch.randint(10, (16,))} for _ in range(2)]
    evals, calib = data[:1], data[1:]
    bins = 4096
    result = stagewise_search(sup, evals, calib, target_macs=0.8, candidates=64, top_k=1, bins=bins)
    budget = 0.8 * sup.dense_macs
    assert result.method == "stagewise" and result.macs <= budget and result.macs == sup.space.macs(result.choice)
    assert result.objective == pytest.approx(sum(sup.stage_scores(result.choice, evals, calib)), rel=1e-6)
    # brute force over every subnet (every stage's assignments were enumerated: candidates=64 covers them)
    layout = stage_layout(sup)
    scores = [{} for _ in sup.stages]
    for k, groups in enumerate(layout.variables):
        assignments = list(itertools.product(*[range(len(sup.space.counts[g])) for g in groups]))
        assert len(assignments) <= 64
        choices = []
        for a in assignments:
            c = list(sup.space.max_choice())
            for g, v in zip(groups, a):
                c[g] = v
            choices.append(tuple(c))
        scores[k] = dict(zip(assignments, sup.score_stage(k, choices, evals, calib)))
    every = list(itertools.product(*[range(len(c)) for c in sup.space.counts]))
    assert len(every) < 1000

    def objective(c):
        return sum(scores[k][tuple(c[g] for g in groups)] for k, groups in enumerate(layout.variables))

    unit = -(-int(budget) // bins)  # one quantisation unit per stage of slack, as the DP promises
    fits = [c for c in every if sup.space.macs(c) <= budget - len(sup.stages) * unit]
    assert result.objective <= min(objective(c) for c in fits) + 1e-9
    assert result.objective == pytest.approx(min(objective(c) for c in every if sup.space.macs(c) <= budget), rel=1e-3)


def test_search_option_and_latency_budget():
    from hf_prune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"search='evolution' is not one of"):
        StageWiseConfig(search="evolution")
    model = tiny("resnet")
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    calib = [{"pixel_values": torch.randn(8, 3, 32, 32), "labels": torch.randint(10, (8,))}]
    stats = prune_stagewise(model, StageWiseConfig(target_macs=0.8, round_to=4, search="chained", population=4,
                                                   generations=1), example_inputs=x, calib=calib)
    assert "stage_objective" not in stats and stats["macs_after"] <= 0.8 * stats["macs_before"]
    from hf_prune.methods.stagewise.stage_search import stagewise_search

    sup = Supernet(tiny("resnet"), x, round_to=8)
    full = stagewise_search(sup, calib, None, max_latency_ms=1e6, example_inputs=x, candidates=8, top_k=2)
    assert full.macs_ratio == 1.0 and full.objective == pytest.approx(0.0) and full.latency_ms is not None


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_oneshot_prune_stagewise_meets_budget_and_is_transactional():
    model = tiny("resnet")
    _noisy_bn_stats(model, 32)
    x = torch.randn(2, 3, 32, 32)
    calib = [{"pixel_values": torch.randn(8, 3, 32, 32), "labels": torch.randint(10, (8,))}]
    with pytest.raises(PruningError, match=r"target_macs=0\.01 is below the smallest subnet"):
        prune_stagewise(model, StageWiseConfig(target_macs=0.01, round_to=1), example_inputs={"pixel_values": x},
                        calib=calib)
    with pytest.raises(PruningError, match="searches widths by accuracy: pass calib="):
        prune_stagewise(model, StageWiseConfig(target_macs=0.7), example_inputs={"pixel_values": x})
    fresh = tiny("resnet")
    _noisy_bn_stats(fresh, 32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    from hf_prune.engine.graph import DependencyGraph

    dense = DependencyGraph(model, {"pixel_values": x}).macs()
    stats = prune_stagewise(model, StageWiseConfig(target_macs=0.7, round_to=1, population=4, generations=2),
                            example_inputs={"pixel_values": x}, calib=calib)
    assert DependencyGraph(model, {"pixel_values": x}).macs() <= 0.7 * dense
    assert stats["macs_after"] <= 0.7 * stats["macs_before"] and 0.0 <= stats["proxy_accuracy"] <= 1.0
    recon = stats["reconstruction"]  # the extracted subnet is re-fitted towards the full net by default
    assert recon["layers"] > 0 and recon["mean_error_after"] < recon["mean_error_before"]
    plain = prune_stagewise(fresh, StageWiseConfig(target_macs=0.7, round_to=1, population=4, generations=2,
                                                   reconstruct=False), example_inputs={"pixel_values": x}, calib=calib)
    assert "reconstruction" not in plain
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]  # the same subnet


# ------------------------------------------------------------------------------------------ errors


def test_errors_name_the_value_and_the_fix():
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    with pytest.raises(PruningError, match=r"target_macs=1\.5 must be in \(0, 1\]"):
        _callback(target_macs=1.5)
    with pytest.raises(PruningError, match=r"stages: 'encoder\.nope' is not a submodule.*named_modules"):
        Supernet(tiny("resnet"), x, stages=["encoder.nope"], make_teacher=False)
    with pytest.raises(PruningError, match=r"stages='stage1' is not understood"):
        _callback(stages="stage1")
    with pytest.raises(PruningError, match=r"supervision='both' is not one of"):
        _callback(supervision="both")
    with pytest.raises(PruningError, match=r"ratios=.*must be numbers in \(0, 1\]"):
        Supernet(tiny("resnet"), x, ratios=(0.0, 1.0), make_teacher=False)
    sup = Supernet(tiny("resnet"), x, round_to=1, make_teacher=False)
    with pytest.raises(PruningError, match="search needs a budget"):
        sup.search(lambda c: 0.0)
    with pytest.raises(PruningError, match="does not fit this width space"):
        sup.extract((0,))


def test_callback_without_stagewise_trainer_says_which_trainer_to_use(tmp_path):
    from transformers import Trainer

    from hf_prune.data import load_digits

    train, _ = load_digits(image_size=32, channels=3)
    trainer = Trainer(model=tiny("resnet"), args=_args(tmp_path, 1), train_dataset=train, callbacks=[_callback()])
    with pytest.raises(PruningError, match="StageWiseTrainer"):
        trainer.train()


# ------------------------------------------------------------------------------------------ Trainer


def _args(tmp_path, steps, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), use_cpu=True, seed=0, data_seed=0, report_to=[], dataloader_num_workers=0,
                save_strategy="no", max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-3,
                logging_steps=2, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_end_to_end_on_digits(tmp_path):
    import hf_prune
    from hf_prune.data import accuracy, load_digits
    from hf_prune.methods.stagewise.callback import StageWiseTrainer

    train, val = load_digits(source="sklearn", image_size=32, channels=3)
    model = tiny("resnet")
    cb = _callback(target_macs=0.8, round_to=4, search_at_end=False)
    trainer = StageWiseTrainer(model=model, args=_args(tmp_path, 6), train_dataset=train, eval_dataset=val,
                               callbacks=[cb])
    teacher_state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert any("prune/loss_min" in h for h in trainer.state.log_history)
    assert not all(torch.equal(teacher_state[k], v) for k, v in model.state_dict().items())  # weights trained
    assert all(torch.equal(teacher_state[k], v) for k, v in cb.teacher.state_dict().items())  # teacher frozen
    subnet = trainer.search(population=4, generations=2, eval_batches=2, calib_batches=2)
    r = trainer.search_result
    assert r.macs_ratio <= 0.8 and 0.0 <= r.score <= 1.0
    assert sum(p.numel() for p in subnet.parameters()) < sum(p.numel() for p in model.parameters())
    # the proxy of the chosen subnet is what the extracted subnet scores (BN recalibrated identically)
    evals = trainer._batches(val, trainer.args.per_device_eval_batch_size, 2, False, cb.config.seed)
    correct = sum(int((subnet(pixel_values=b["pixel_values"]).logits.argmax(-1) == b["labels"]).sum()) for b in evals)
    assert correct / sum(len(b["labels"]) for b in evals) == pytest.approx(r.score)
    hf_prune.save_pretrained(subnet, tmp_path / "subnet")
    reloaded = hf_prune.AutoPrunedModel.from_pretrained(tmp_path / "subnet")
    assert accuracy(reloaded, val) == pytest.approx(accuracy(subnet, val))


def test_checkpoint_resume_restores_sampler_state(tmp_path):
    from hf_prune.data import load_digits
    from hf_prune.methods.stagewise.callback import StageWiseTrainer

    train, _ = load_digits(source="sklearn", image_size=32, channels=3)
    cb = _callback(num_random=1, seed=3, search_at_end=False)
    args = _args(tmp_path, 4, save_strategy="steps", save_steps=2)
    trainer = StageWiseTrainer(model=tiny("resnet"), args=args, train_dataset=train, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    saved = json.loads((tmp_path / "checkpoint-2" / "hf_prune_state.json").read_text())
    assert saved["global_step"] == 2 and saved["state"]["orders"] == cb.supernet.orders_state()
    assert [h[0] for h in saved["state"]["history"]] == [0, 1]

    # resume in a "new process": a fresh model whose own l2 order differs; the saved order must win
    resumed_cb = _callback(num_random=1, seed=3, search_at_end=False)
    fresh = tiny("resnet", seed=1)
    trainer2 = StageWiseTrainer(model=fresh, args=args, train_dataset=train, callbacks=[resumed_cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed_cb.supernet.orders_state() == saved["state"]["orders"]
    assert Supernet(tiny("resnet", seed=1), {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=1,
                    make_teacher=False).orders_state() != saved["state"]["orders"]
    assert resumed_cb.history == cb.history  # steps 2 and 3 drew exactly what the uninterrupted run drew


# ------------------------------------------------------------------------------------------ example, DDP


def test_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("stagewise_callback", ROOT / "examples" / "stagewise_callback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc, ratio = module.main(["--dense-steps", "10", "--max-steps", "3", "--finetune-steps", "3",
                                  "--output-dir", str(tmp_path)])
    assert ratio <= 0.5 and 0.0 <= acc <= 1.0  # the example itself checks the reload is exact


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_draw_identical_subnets(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(ROOT / "tests" / "stagewise_worker.py"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert (a["rank"], b["rank"], a["world_size"], a["backend"]) == (0, 1, 2, "gloo")
    assert a["wrapped"] == "DistributedDataParallel"
    assert a["first_labels"] != b["first_labels"]  # each rank trains on its own shard ...
    assert len(a["draws"]) == 4 and a["draws"] == b["draws"] and a["history"] == b["history"]  # ... same subnets
    assert a["weights"] == b["weights"]  # gradients were averaged through the masked forward
    assert a["searched"] == b["searched"] and a["subnet_params"] == b["subnet_params"]


def test_width_search_shows_a_progress_bar_unless_disabled(capfd, monkeypatch):
    sup = Supernet(tiny("resnet"), {"pixel_values": torch.randn(2, 3, 32, 32)}, round_to=1, make_teacher=False)
    for name in ("HF_PRUNE_DISABLE_PROGRESS", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    fitness = lambda c: sup.macs_ratio(c)  # noqa: E731
    shown = sup.search(fitness, target_macs=0.6, population=4, generations=2, seed=0)
    err = capfd.readouterr().err
    assert "hf_prune: SP width search" in err and "best=" in err
    monkeypatch.setenv("HF_PRUNE_DISABLE_PROGRESS", "1")
    hidden = sup.search(fitness, target_macs=0.6, population=4, generations=2, seed=0)
    assert "hf_prune" not in capfd.readouterr().err and hidden.choice == shown.choice
