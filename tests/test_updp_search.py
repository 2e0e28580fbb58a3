"""UPDP stages 1-2: depth supernet, its sampler and training, the evolutionary subnet search (budgets,
ranking, errors), the Trainer callback and the all-stages example. Tiny ConvNeXts, one thread."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from hf_prune.errors import PruningError
from hf_prune.methods.updp.depth import anneal, calibrate, prune_depth, set_lambda
from hf_prune.methods.updp.search import DepthSupernet, SubnetSampler, evaluate_subnet, search, train_supernet
from hf_prune.metrics.profiling import count_macs


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_convnext(depths=(1, 1, 2, 1), in_chans=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10, in_chans=in_chans, depths=depths,
                              dims=(16, 24, 32, 48))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # layer scales of a fresh model are 1e-6: make every block matter
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.normal_(1.0, 0.2, generator=g)
    return model.eval()


def labelled(model, n=48, seed=1):
    """Random images labelled by the dense model (so the dense model is 100% accurate)."""
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(-1)
    return {"pixel_values": x, "labels": y}


def test_sampler_is_a_function_of_seed_and_step():
    a, b = SubnetSampler(8, seed=3), SubnetSampler(8, seed=3)
    draws = [a(t) for t in range(50)]
    assert draws == [b(t) for t in reversed(range(50))][::-1]  # order of calls does not matter (every rank agrees)
    assert len(set(draws)) > 10 and all(c == tuple(sorted(c)) for c in draws)
    assert [SubnetSampler(8, seed=4)(t) for t in range(50)] != draws
    k = SubnetSampler(8, seed=0, num_blocks=3)
    assert all(len(k(t)) == 3 for t in range(30)) and len({k(t) for t in range(30)}) > 5
    freq = sum(len(a(t)) for t in range(400)) / (400 * 8)
    assert 0.4 < freq < 0.6  # each block pruned with probability 1/2
    with pytest.raises(PruningError, match="num_blocks=9"):
        SubnetSampler(8, num_blocks=9)


def test_supernet_choice_equals_annealed_model_and_merged_subnet():
    model = tiny_convnext()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y_dense = model(x)
    sn = DepthSupernet(copy.deepcopy(model), example_inputs=x)
    assert sn.num_candidates == 5
    ref = copy.deepcopy(model)
    wrappers = anneal(ref, [1, 3])
    calibrate(ref, [x], wrappers)
    set_lambda(wrappers, 1.0)
    with torch.no_grad():
        assert torch.equal(sn.model(x), y_dense)  # choice () is the original model, bit for bit
        sn.set_choice([3, 1])
        assert sn.choice == (1, 3)
        y = sn.model(x)
        assert torch.equal(y, ref(x))
        sub = sn.subnet((1, 3))
        assert (sub(x) - y).abs().max() <= 1e-4 * y.abs().max()  # the merge is exact
    table = sn.macs_table(x[:1])
    assert count_macs(sub, x[:1]) == sn.macs((1, 3)) < table["dense"]
    assert sn.blocks_of((1, 3)) == [1, 3]
    with pytest.raises(PruningError, match="outside"):
        sn.set_choice([7])
    plain = sn.restore()
    assert not any(type(m).__name__.startswith("Annealed") for m in plain.modules())


def test_search_respects_budgets_and_ranks_by_proxy():
    model = tiny_convnext()
    data = labelled(model)
    x = data["pixel_values"][:2]
    sn = DepthSupernet(model, example_inputs=data)
    res = search(sn, [data], target_macs=0.8, example_inputs=x, population=6, generations=3, seed=0)
    assert res.subnets and res.budget == {"target_macs": 0.8}
    proxies = [r["proxy"] for r in res.subnets]
    assert proxies == sorted(proxies, reverse=True) and [r["rank"] for r in res.subnets] == list(
        range(1, len(proxies) + 1))
    assert len({r["choice"] for r in res.subnets}) == len(res.subnets)
    for r in res.subnets:
        assert r["macs_ratio"] <= 0.8
    best = sn.subnet(res.best["choice"])
    assert count_macs(best, x[:1]) <= 0.8 * sn.macs_table(x)["dense"]
    assert res.dense["proxy"] == 1.0 and "| rank |" in res.report() and "(none: dense)" in res.report()
    assert sn.choice == () and not sn.model.training  # search leaves the supernet as it found it

    res_k = search(sn, [data], num_blocks=2, population=4, generations=2, seed=1)
    assert all(len(r["choice"]) == 2 for r in res_k.subnets)
    again = search(sn, [data], num_blocks=2, population=4, generations=2, seed=1)
    assert [r["choice"] for r in again.subnets] == [r["choice"] for r in res_k.subnets]  # deterministic


def test_search_finds_the_blocks_that_are_harmless_to_prune():
    model = tiny_convnext(depths=(1, 2, 3, 1))
    harmless = (1, 4)  # their residual branch is switched off: pruning them changes nothing
    with torch.no_grad():
        for i in harmless:
            blk = [m for m in model.modules() if type(m).__name__ == "ConvNeXtBlock"][i]
            blk.gamma.zero_()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        y = model(x)

    def score(m):  # negative output change w.r.t. the dense model
        return -float((m(x) - y).pow(2).mean())

    sn = DepthSupernet(model, example_inputs=x, end_act=False)
    res = search(sn, [x], num_blocks=2, score_fn=score, population=6, generations=4, seed=0)
    assert res.best["choice"] == harmless and res.best["proxy"] == 0.0
    assert all(r["proxy"] < 0 for r in res.subnets[1:])
    assert len(res.subnets) < 21  # C(7, 2) = 21 subnets: the search did not enumerate them all


def test_impossible_budgets_name_the_value_and_the_fix():
    model = tiny_convnext()
    data = labelled(model, n=8)
    sn = DepthSupernet(model, example_inputs=data)
    with pytest.raises(PruningError, match=r"num_blocks=6 is impossible.*\[1, 5\]"):
        search(sn, [data], num_blocks=6)
    with pytest.raises(PruningError, match=r"target_macs=0.01 is not reachable.*use target_macs >= 0\.\d+"):
        search(sn, [data], target_macs=0.01, example_inputs=data["pixel_values"][:1])
    with pytest.raises(PruningError, match=r"target_latency=0.001 is not reachable.*use target_latency >="):
        search(sn, [data], target_latency=0.001, example_inputs=data["pixel_values"][:1], latency_iters=2)
    with pytest.raises(PruningError, match="exactly one budget"):
        search(sn, [data], num_blocks=2, target_macs=0.5)
    with pytest.raises(PruningError, match="needs example_inputs"):
        search(sn, [data], target_macs=0.5)
    # a budget no timing noise can break (a loaded CI machine can make a tiny model's latency vary
    # by several times): every returned subnet was measured and is within it
    res = search(sn, [data], target_latency=50.0, example_inputs=data["pixel_values"][:1], latency_iters=3,
                 population=3, generations=1)
    assert res.subnets and all(r["latency_ratio"] <= 50.0 and r["latency_ms"] > 0 for r in res.subnets)


def test_end_to_end_on_sklearn_digits():
    from hf_prune.data import accuracy, load_digits

    train, val = load_digits(source="sklearn", image_size=32, channels=1)
    model = tiny_convnext(in_chans=1)
    teacher = copy.deepcopy(model)
    sn = DepthSupernet(model, example_inputs=train.pixel_values[:128])
    history = train_supernet(sn, train, steps=70, lr=3e-3, seed=0, teacher=teacher, kd_alpha=0.2)
    sampler = SubnetSampler(5, seed=0)
    assert [tuple(h["choice"]) for h in history] == [sampler(t) for t in range(70)]
    assert sum(h["loss"] for h in history[-10:]) < 0.5 * sum(h["loss"] for h in history[:10])
    half = len(val) // 2
    held_out = {"pixel_values": val.pixel_values[:half], "labels": val.labels[:half]}
    res = search(sn, [held_out], num_blocks=2, calib_data=[train.pixel_values[:256]], population=6, generations=2)
    proxy = evaluate_subnet(sn, res.best["choice"], [held_out], calib_data=[train.pixel_values[:256]])
    assert proxy["accuracy"] == res.best["accuracy"] > 0.6
    model = sn.restore()
    prune_depth(model, blocks=res.blocks, example_inputs=train.pixel_values[:256])
    rest = {"pixel_values": val.pixel_values[half:], "labels": val.labels[half:]}
    acc = accuracy(model, type(val)(rest["pixel_values"], rest["labels"]))
    assert acc > 0.6, acc


def test_supernet_callback_samples_per_step():
    from hf_prune.methods.updp.callback import UPDPSupernetCallback

    model = tiny_convnext()
    x = torch.randn(2, 3, 32, 32)
    cb = UPDPSupernetCallback(num_blocks=2, example_inputs=x)
    cb.on_init_end(None, None, None, model=model)
    with pytest.raises(PruningError, match="Trainer"):
        cb.on_train_begin(SimpleNamespace(seed=7), SimpleNamespace(global_step=0), None, model=tiny_convnext())
    cb.on_train_begin(SimpleNamespace(seed=7), SimpleNamespace(global_step=0), None, model=model)
    for t in (0, 5, 6):
        cb.on_step_begin(None, SimpleNamespace(global_step=t), None)
        assert cb.supernet.choice == SubnetSampler(5, seed=7, num_blocks=2)(t)
    logs = {}
    cb.on_log(None, None, None, logs=logs)
    assert logs == {"updp/supernet_pruned": 2}
    cb.on_train_end(None, None, None)
    assert cb.supernet.choice == ()


def test_example_updp_callback(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "updp_callback.py"
    spec = importlib.util.spec_from_file_location("updp_callback_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    acc, merged, result = module.main(["--supernet-steps", "40", "--steps", "40", "--output-dir", str(tmp_path)])
    assert len(merged) == 2 and acc > 0.5
    assert sorted(merged) == sorted(result.best["paths"])


def test_search_shows_a_progress_bar_unless_disabled(capfd, monkeypatch):
    model = tiny_convnext()
    data = labelled(model, n=16)
    sn = DepthSupernet(model, example_inputs=data)
    for name in ("HF_PRUNE_DISABLE_PROGRESS", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    shown = search(sn, [data], num_blocks=1, population=3, generations=2, seed=0)
    err = capfd.readouterr().err
    assert "hf_prune: UPDP subnet search" in err and "best=" in err
    monkeypatch.setenv("HF_PRUNE_DISABLE_PROGRESS", "1")
    hidden = search(sn, [data], num_blocks=1, population=3, generations=2, seed=0)
    assert "hf_prune" not in capfd.readouterr().err
    assert [r["choice"] for r in hidden.subnets] == [r["choice"] for r in shown.subnets]
