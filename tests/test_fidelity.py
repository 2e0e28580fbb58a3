"""Paper fidelity checks that are not tied to one method's machinery: DepGraph's sparse learning does what
the paper says it is for (the units it later prunes are pushed towards zero, so pruning costs little)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_resnet():
    import transformers as T

    torch.manual_seed(0)
    return T.ResNetForImageClassification(T.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16, 24, 32],
                                                         depths=[1, 1, 1, 1], layer_type="basic", num_labels=10))


def _sl_phase(model, train, lam: float, steps: int = 30):
    """``steps`` of SGD with DepGraph's sparse learning (``lam``; 0 = none), then the one-shot pruning step."""
    from hf_prune.engine.importance import unit_scores
    from hf_prune.methods.depgraph.callback import DepGraphCallback

    cb = DepGraphCallback(target_macs=0.5, schedule="oneshot", start=steps, end=steps, group_sparsity=lam)
    assert cb.config.sparse_penalty == "squared"  # the paper's form is what a user gets
    cb.setup(model, total_steps=steps + 1, example_inputs={"pixel_values": train.pixel_values[:2]})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        cb.step_begin(step)
        idx = torch.randint(len(train), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(pixel_values=train.pixel_values[idx]).logits, train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        cb.pre_optimizer_step()
        opt.step()
        cb.optimizer_step()
    graph = cb.pruner.graph
    mass = unit_scores(graph, "l2")
    units = torch.cat([g.units for g in graph.groups])
    cb.step_begin(steps)  # prunes (masks) to target_macs by group L2
    return float(mass[cb.pruner.removed].sum() / mass[units].sum())


def test_sparse_learning_empties_the_units_it_then_prunes():
    """The paper's claim in miniature: with the default (squared, γ-weighted) penalty the units that group-L2
    pruning removes afterwards hold a small share of the squared weight mass; without it they hold much more."""
    from hf_prune.data import load_digits

    train, _ = load_digits(source="sklearn", image_size=16, channels=1)
    dense = _tiny_resnet()
    without = _sl_phase(copy.deepcopy(dense), train, 0.0)
    with_sl = _sl_phase(copy.deepcopy(dense), train, 0.1)
    assert without > 0.15  # half the MACs go: the pruned units carry real weight without SL
    assert with_sl < 0.3 * without, (with_sl, without)
