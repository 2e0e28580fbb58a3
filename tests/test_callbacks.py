"""Pruning during training: callbacks with transformers.Trainer, checkpoints/resume, sparse learning,
staged fine-tuning with Trainer and with a plain accelerate loop."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from hf_prune import DepGraphCallback
from hf_prune.trainer.state import STATE_NAME
from hf_prune.errors import PruningError
from hf_prune.engine.masks import get_mask


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)  # a fresh config per model: compaction edits model.config


@pytest.fixture(scope="module")
def digits():
    from hf_prune.data import load_digits

    train, val = load_digits(image_size=16, channels=3)
    return train, val


def targs(tmp_path, steps, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), use_cpu=True, seed=0, data_seed=0, report_to=[], dataloader_num_workers=0,
                save_strategy="no", max_steps=steps, per_device_train_batch_size=16, learning_rate=2e-3,
                logging_steps=4, disable_tqdm=True, lr_scheduler_type="linear")
    base.update(kw)
    return TrainingArguments(**base)


def removed_values(model, cb):
    tensors = dict(model.named_parameters())
    return [tensors[t].detach().index_select(d, torch.tensor(i)) for t, d, i in cb.removed_slices() if t in tensors]


# ------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_macs=0.5, sparsity=0.2), "exactly one of target_macs"),
    (dict(), "exactly one of target_macs"),
    (dict(target_macs=1.2), r"target_macs=1\.2 must be in \(0, 1\]"),
    (dict(sparsity=-0.1), r"sparsity=-0\.1 must be in \[0, 1\)"),
    (dict(target_macs=0.5, start=0.8, end=0.3), "end=0.3 is before start=0.8"),
    (dict(target_macs=0.5, schedule="exponential"), "schedule='exponential' is not one of"),
    (dict(target_macs=0.5, frequency=0), "frequency=0"),
    (dict(target_macs=0.5, importance="hessian"), "importance='hessian'"),
    (dict(target_macs=0.5, group_sparsity=-1.0), "group_sparsity=-1.0"),
    (dict(target_macs=0.5, sparse_penalty="decoupled"), "sparse_penalty='decoupled' is not one of"),
    (dict(target_macs=0.5, sync="gather"), "sync='gather'"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepGraphCallback(**kwargs)


def test_model_and_setup_errors():
    cb = DepGraphCallback(target_macs=0.5)
    with pytest.raises(PruningError, match="not a torch.nn.Module"):
        cb.setup("vit-base", total_steps=10)
    with pytest.raises(PruningError, match="needs example_inputs"):
        cb.setup(tiny_vit(), total_steps=10)
    with pytest.raises(ValueError, match="total_steps=0"):
        cb.setup(tiny_vit(), total_steps=0, example_inputs=torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="importance='hessian' is not one of"):
        DepGraphCallback(target_macs=0.5, importance="hessian")
    with pytest.raises(PruningError, match="not set up"):
        cb.step_begin(0)


# ------------------------------------------------------------------------------------------ Trainer


def test_trainer_prunes_on_schedule_logs_compacts_and_saves(tmp_path, digits):
    from transformers import Trainer, TrainerCallback

    from hf_prune.hub import AutoPrunedModel

    train, val = digits
    model = tiny_vit()
    dense_params = sum(p.numel() for p in model.parameters())
    cb = DepGraphCallback(target_macs=0.6, schedule="cubic", start=0.0, end=0.5, frequency=2)
    zero_checks = []

    class CheckMasked(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            vals = removed_values(model, cb)
            zero_checks.append(all(bool((v == 0).all()) for v in vals))

    trainer = Trainer(model=model, args=targs(tmp_path, 12), train_dataset=train, callbacks=[cb, CheckMasked()])
    trainer.train()

    sched = cb.schedule
    assert [e["step"] for e in cb.events] == [s for s in sched.pruning_steps(12) if sched.amount_at(s, 12) > 0]
    assert [e["step"] for e in cb.events] == [2, 4, 6]
    ratios = [e["macs_ratio"] for e in cb.events]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] <= 0.6 + 1e-9
    assert all(zero_checks) and len(zero_checks) == 12  # masked slices stay zero after every optimizer step
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("prune/macs_ratio" in h and "prune/params_ratio" in h for h in logged)
    assert logged[-1]["prune/macs_ratio"] == pytest.approx(ratios[-1], abs=1e-6)

    # compacted at on_train_end; the structure spec is on the config, so save_model is reloadable
    assert get_mask(model) is None and cb.finished
    assert sum(p.numel() for p in model.parameters()) < dense_params
    assert "hf_prune" in model.config.to_dict()
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoPrunedModel.from_pretrained(str(tmp_path / "final")).eval()
    x = val.pixel_values[:8]
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, model.eval()(x).logits, atol=1e-5)


def test_taylor_waits_for_gradients_and_plain_loop_api(digits):
    train, _ = digits
    model = tiny_vit()
    cb = DepGraphCallback(target_macs=0.7, schedule="oneshot", start=0, importance="taylor", compact_at_end=False)
    cb.setup(model, total_steps=4, example_inputs={"pixel_values": train.pixel_values[:2]})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        pruned = cb.step_begin(step)
        assert (pruned is not None) == (step == 1)  # step 0 has no gradients yet: postponed by one step
        batch = slice(16 * step, 16 * step + 16)
        out = model(pixel_values=train.pixel_values[batch], labels=train.labels[batch])
        out.loss.backward()
        cb.pre_optimizer_step()
        opt.step()
        opt.zero_grad()
        cb.optimizer_step()
        if step >= 1:
            assert all(bool((v == 0).all()) for v in removed_values(model, cb))
    assert [e["step"] for e in cb.events] == [1] and cb.stats()["macs_ratio"] <= 0.7
    assert get_mask(model) is not None  # compact_at_end=False
    cb.config = cb.config.replace(compact_at_end=True)
    cb.finish()
    assert get_mask(model) is None


@pytest.mark.parametrize("penalty", ["lasso", "squared"])
def test_group_sparsity_gradient_is_weighted_group_penalty(penalty):
    """The extra gradient equals d/dw of λ Σ_u γ_u ||w_u||₂ (or ||w_u||²), γ from the paper held constant."""
    model = tiny_vit()
    lam, alpha = 1e-2, 4.0
    cb = DepGraphCallback(target_macs=0.5, group_sparsity=lam, sparse_alpha=alpha, end=0.5, sparse_penalty=penalty)
    cb.setup(model, total_steps=10, example_inputs=torch.randn(2, 3, 16, 16))
    g = cb.pruner.graph
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    cb.step = 0
    cb.pre_optimizer_step()
    got = {n: p.grad.clone() for n, p in params.items()}

    # reference with autograd
    sq = torch.zeros(g.trace.uf.size, dtype=torch.float64)
    for m in g.members:
        if m.tensor in params:
            w = params[m.tensor].double()
            dims = [d for d in range(w.dim()) if d != m.dim]
            sq = sq.index_add(0, m.units, (w ** 2).sum(dim=dims) if dims else w ** 2)
    loss = 0.0
    for grp in g.groups:
        imp = sq[grp.units].detach()
        gamma = 2.0 ** (alpha * (imp.max() - imp) / (imp.max() - imp.min()))
        norm = sq[grp.units].sqrt() if penalty == "lasso" else sq[grp.units]
        loss = loss + (gamma * norm).sum()
    ref = torch.autograd.grad(lam * loss, [params[n] for n in params], allow_unused=True)
    for (n, _), r in zip(params.items(), ref):
        expect = torch.zeros_like(got[n]) if r is None else r.float()
        assert torch.allclose(got[n], expect, atol=1e-6, rtol=1e-4), n
    assert any(bool(v.abs().sum() > 0) for v in got.values())
    # least important unit of a group gets 2**alpha times the weight of the most important one
    grp = g.groups[1]
    imp = sq[grp.units]
    imp = imp.detach()
    c = lambda u: float(torch.tensor(2.0) ** (alpha * (imp.max() - imp[u]) / (imp.max() - imp.min())))  # noqa: E731
    assert c(int(imp.argmin())) == pytest.approx(2 ** alpha) and c(int(imp.argmax())) == pytest.approx(1.0)


def _unit_coefficients(model, graph, lam, alpha):
    """``2λγ_u`` per union-find root, from the paper's formula (independent of the callback's code)."""
    params = dict(model.named_parameters())
    sq = torch.zeros(graph.trace.uf.size, dtype=torch.float64)
    for m in graph.members:
        if m.tensor in params:
            w = params[m.tensor].detach().double()
            dims = [d for d in range(w.dim()) if d != m.dim]
            sq = sq.index_add(0, m.units, (w ** 2).sum(dim=dims) if dims else w ** 2)
    coef = torch.zeros_like(sq)
    for grp in graph.groups:
        imp = sq[grp.units]
        coef[grp.units] = 2 * lam * 2.0 ** (alpha * (imp.max() - imp) / (imp.max() - imp.min()))
    return coef


def test_decoupled_squared_penalty_is_the_gradient_form_under_plain_sgd():
    """Plain SGD: w·(1 − lr·2λγ) − lr·∇L is w − lr·(∇L + 2λγw), so both forms give the same weights."""
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    finals = {}
    for penalty, lam in (("squared", 0.05), ("squared_decoupled", 0.05), ("squared", 0.0)):
        model = tiny_vit()
        cb = DepGraphCallback(target_macs=0.5, group_sparsity=lam, sparse_penalty=penalty, schedule="oneshot",
                              start=10, end=10)
        cb.setup(model, total_steps=11, example_inputs=x[:2])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # the lr changes every step
        for step in range(4):
            cb.step_begin(step)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
            opt.zero_grad()
            loss.backward()
            cb.pre_optimizer_step(opt)
            opt.step()
            cb.optimizer_step()
            sched.step()
        finals[(penalty, lam)] = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad_form, decoupled, plain = finals[("squared", 0.05)], finals[("squared_decoupled", 0.05)], finals[("squared", 0.0)]
    for n in grad_form:
        assert torch.allclose(decoupled[n], grad_form[n], rtol=1e-5, atol=1e-6), n
    assert max(float((grad_form[n] - plain[n]).abs().max()) for n in plain) > 1e-3  # the penalty did something


def test_decoupled_squared_penalty_shrinks_units_by_lr_times_coefficient_under_adamw():
    """AdamW on a zero-gradient step moves nothing itself: each weight is scaled by exactly 1 − lr·Σ 2λγ over the
    units its slice belongs to, with each parameter group's own learning rate."""
    model = tiny_vit()
    lam, alpha = 0.5, 4.0
    cb = DepGraphCallback(target_macs=0.5, group_sparsity=lam, sparse_alpha=alpha, end=0.5,
                          sparse_penalty="squared_decoupled")
    cb.setup(model, total_steps=10, example_inputs=torch.randn(2, 3, 16, 16))
    g = cb.pruner.graph
    coef = _unit_coefficients(model, g, lam, alpha)
    named = dict(model.named_parameters())
    fast = [p for n, p in named.items() if ".mlp." in n]
    rest = [p for n, p in named.items() if ".mlp." not in n]
    opt = torch.optim.AdamW([{"params": fast, "lr": 2e-3}, {"params": rest}], lr=1e-3, weight_decay=0.0)
    lr_of = {id(p): 2e-3 for p in fast} | {id(p): 1e-3 for p in rest}
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    cb.step = 0
    cb.pre_optimizer_step(opt)
    opt.step()
    touched = 0
    for n, p in named.items():
        total = torch.zeros(p.shape, dtype=torch.float64)
        for m in g.members:
            if m.tensor == n:
                shape = [1] * p.dim()
                shape[m.dim] = -1
                total = total + coef[m.units].view(shape)
        expect = (before[n].double() * (1 - lr_of[id(p)] * total)).float()
        assert torch.allclose(p.detach(), expect, rtol=1e-6, atol=1e-9), n
        touched += int(bool(total.any()))
    assert touched > 0
    # a tensor of one group along one dim: the group's least important unit shrinks by 1 − lr·2λ·2^α, its most
    # important one by 1 − lr·2λ
    penalised = {}
    for m in g.members:
        if m.tensor in named and coef[m.units].any():
            penalised[m.tensor] = penalised.get(m.tensor, 0) + 1
    n = next(t for t, k in penalised.items() if k == 1 and named[t].dim() == 2)
    ratio = named[n].detach().double()[before[n] != 0] / before[n].double()[before[n] != 0]
    lr = lr_of[id(named[n])]
    assert float(ratio.min()) == pytest.approx(1 - lr * 2 * lam * 2 ** alpha, rel=1e-5)
    assert float(ratio.max()) == pytest.approx(1 - lr * 2 * lam, rel=1e-5)


def test_decoupled_penalty_needs_the_optimizer_and_the_gradient_form_warns_under_adam():
    model = tiny_vit()
    cb = DepGraphCallback(target_macs=0.5, group_sparsity=1e-3, sparse_penalty="squared_decoupled", end=0.5)
    cb.setup(model, total_steps=10, example_inputs=torch.randn(2, 3, 16, 16))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(PruningError, match=r"squared_decoupled.*pre_optimizer_step\(optimizer\)"):
        cb.pre_optimizer_step()
    cb = DepGraphCallback(target_macs=0.5, group_sparsity=1e-3, end=0.5)
    cb.setup(model, total_steps=10, example_inputs=torch.randn(2, 3, 16, 16))
    with pytest.warns(UserWarning, match="squared_decoupled"):
        cb.pre_optimizer_step(torch.optim.Adam(model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.pre_optimizer_step()  # once per run
        DepGraphCallback(target_macs=0.5, group_sparsity=1e-3, end=0.5).setup(
            model, total_steps=10, example_inputs=torch.randn(2, 3, 16, 16))


def test_trainer_passes_its_optimizer_to_the_decoupled_penalty(tmp_path, digits):
    from transformers import Trainer

    train, _ = digits
    model = tiny_vit()
    cb = DepGraphCallback(target_macs=0.6, schedule="oneshot", start=2, end=2, group_sparsity=1.0,
                          sparse_penalty="squared_decoupled")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # AdamW and the decoupled form: no warning
        Trainer(model=model, args=targs(tmp_path, 4, weight_decay=0.0), train_dataset=train, callbacks=[cb]).train()
    assert cb.optimizer is not None and cb.events and cb.finished


def test_sparse_penalty_round_trips_in_the_config(tmp_path):
    from hf_prune import DepGraphConfig, PruningConfig

    config = DepGraphConfig(target_macs=0.5, group_sparsity=0.2, sparse_penalty="squared_decoupled")
    data = json.loads(json.dumps(config.to_dict()))
    assert data["sparse_penalty"] == "squared_decoupled" and PruningConfig.from_dict(data) == config
    config.save_pretrained(tmp_path)
    assert PruningConfig.from_pretrained(tmp_path) == config


# ------------------------------------------------------------------------------------------ checkpoints


def _resume_run(tmp_path, digits, stop_at=None, resume=None, out="run"):
    from transformers import Trainer, TrainerCallback

    train, _ = digits

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if stop_at is not None and state.global_step == stop_at:
                control.should_training_stop = True
                control.should_save = True

    model = tiny_vit(seed=1)
    cb = DepGraphCallback(target_macs=0.55, schedule="cubic", start=0.0, end=0.75, frequency=3, importance="taylor",
                          group_sparsity=1e-3)
    args = targs(tmp_path / out, 16, save_strategy="steps", save_steps=6, weight_decay=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[cb, StopAt()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return model, cb


def test_checkpoint_resume_is_exact(tmp_path, digits):
    full_model, full_cb = _resume_run(tmp_path, digits, out="full")
    _, part_cb = _resume_run(tmp_path, digits, stop_at=7, out="part")
    assert part_cb.events and part_cb.events[-1]["step"] < 7 < full_cb.events[-1]["step"]  # events on both sides

    ckpt = tmp_path / "part" / "checkpoint-7"
    state = json.loads((ckpt / STATE_NAME).read_text())
    assert state["global_step"] == 7 and state["method"] == "depgraph" and state["state"]["events"] == part_cb.events
    assert state["state"]["removed"] and {"tensor", "dim", "indices"} <= set(state["state"]["removed"][0])
    assert state["state"]["schedule"]["name"] == "cubic" and state["state"]["taylor_count"] > 0
    assert (ckpt / "hf_prune_scores.safetensors").is_file()

    resumed_model, resumed_cb = _resume_run(tmp_path, digits, resume=str(ckpt), out="part")
    assert resumed_cb.events == full_cb.events
    assert resumed_cb.final_removed == full_cb.final_removed
    a, b = full_model.state_dict(), resumed_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ------------------------------------------------------------------------------------------ staged


def test_staged_finetune_with_trainer(tmp_path, digits):
    from transformers import Trainer

    from hf_prune.trainer.staged import staged_finetune

    train, val = digits
    model = tiny_vit()
    seen = []

    def train_fn(m, stage):
        shapes = {n: p.shape for n, p in m.named_parameters()}
        trainer = Trainer(model=m, args=targs(tmp_path / f"s{stage.index}", 6), train_dataset=train,
                          callbacks=[stage.callback])
        trainer.train()
        assert {n: p.shape for n, p in m.named_parameters()} == shapes  # masks only inside train()
        assert get_mask(m) is not None

    model = staged_finetune(model, [0.8, 0.55], train_fn, on_stage_end=lambda s: seen.append(s.stats))
    assert get_mask(model) is None
    assert seen[0]["macs_ratio"] <= 0.8 + 1e-9 and seen[1]["macs_ratio"] <= 0.55 + 1e-9
    assert seen[1]["params"] < seen[0]["params"]
    with torch.no_grad():
        assert model(val.pixel_values[:4]).logits.shape == (4, 10)


def test_staged_finetune_with_accelerate_loop(digits):
    from accelerate import Accelerator

    from hf_prune.trainer.staged import staged_finetune

    train, _ = digits
    x = {"pixel_values": train.pixel_values[:2]}
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    optimizers = []

    def train_fn(model, stage):
        accelerator = Accelerator(cpu=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # rebuilt for the (smaller) model
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        wrapped, opt, dl, sched = accelerator.prepare(model, opt, loader, sched)
        optimizers.append(opt)
        cb = stage.callback
        cb.setup(accelerator.unwrap_model(wrapped), total_steps=5, example_inputs=x)
        for step, batch in zip(range(5), dl):
            cb.step_begin(step)
            accelerator.backward(wrapped(**batch).loss)
            cb.pre_optimizer_step()
            opt.step()
            sched.step()
            opt.zero_grad()
            cb.optimizer_step()
        accelerator.free_memory()
        return accelerator.unwrap_model(wrapped)

    try:
        model = staged_finetune(tiny_vit(), [{"target_macs": 0.75},
                                             {"target_macs": 0.6, "schedule": "linear", "end": 3}],
                                train_fn, importance="l1")
    finally:  # do not leave a cpu=True accelerate singleton to later tests
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(optimizers) == 2 and optimizers[0] is not optimizers[1]
    from hf_prune.engine.pruner import StructuredPruner

    dense = StructuredPruner(tiny_vit(), x).dense_macs
    assert StructuredPruner(model, x).dense_macs <= 0.6 * dense + 1


def test_staged_targets_must_grow():
    from hf_prune.trainer.staged import staged_finetune

    with pytest.raises(ValueError, match="prunes less than the stage before"):
        staged_finetune(tiny_vit(), [0.6, 0.8], lambda m, s: None)
