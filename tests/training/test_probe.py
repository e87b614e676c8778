"""Fitting the gate's probe: the optimisers separate what they should, the threshold keeps
its false-positive budget (pooled and in every benign group), and fitting is seeded.

Pure tensor tests: no model is loaded.
"""

from __future__ import annotations

import torch

from acd_engine.training.gate_fit import worst_group_threshold
from acd_engine.training.probe import fit_gate, fit_mlp_gate, roc_auc, threshold_for


def test_fit_gate_separates_and_threshold_keeps_the_false_positive_budget():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(60, 8, generator=g) + 1.5, torch.randn(60, 8, generator=g)])
    y = torch.cat([torch.ones(60), torch.zeros(60)])
    gate = fit_gate(x, y, layers=(3,))
    p = gate.probability(x)
    assert roc_auc(p, y) > 0.95
    t = threshold_for(p, y, max_fpr=0.05)
    assert int((p[y == 0] >= t).sum()) <= 3  # 5 % of 60 benign
    assert float((p[y == 1] >= t).float().mean()) > 0.5
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0


def test_fit_mlp_gate_learns_what_a_linear_gate_cannot_and_is_seeded():
    """XOR of two features: no linear probe beats chance, one hidden layer separates it. The
    same seed gives the same gate, and the caller's RNG is left where it was."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).float()
    assert roc_auc(fit_gate(x, y, (0,)).probability(x), y) < 0.65
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    gate = fit_mlp_gate(x, y, (0,), width=32, weight_decay=0.0, dropout=0.0, lr=1e-2)
    assert torch.equal(torch.rand(1), before)
    assert roc_auc(gate.probability(x), y) > 0.95
    again = fit_mlp_gate(x, y, (0,), width=32, weight_decay=0.0, dropout=0.0, lr=1e-2)
    assert all(torch.equal(t, again.tensors()[name]) for name, t in gate.tensors().items())
    other = fit_mlp_gate(x, y, (0,), width=32, weight_decay=0.0, dropout=0.0, lr=1e-2, seed=1)
    assert not torch.equal(other.weight, gate.weight)


def test_worst_group_threshold_keeps_the_budget_in_every_benign_group():
    # 20 easy benign (low scores), 10 hard benign (high), 10 harmful.
    p = torch.cat(
        [torch.linspace(0.0, 0.2, 20), torch.linspace(0.5, 0.9, 10), torch.full((10,), 0.95)]
    )
    y = torch.cat([torch.zeros(30), torch.ones(10)])
    groups = ["plain"] * 20 + ["lookalike"] * 10 + ["plain"] * 10
    pooled = threshold_for(p, y, max_fpr=0.1)  # 3 of 30 benign may be flagged: all hard ones
    assert int((p[20:30] >= pooled).sum()) == 3
    t = worst_group_threshold(p, y, groups, max_fpr=0.1)  # 1 of 10 hard ones at most
    assert int((p[20:30] >= t).sum()) == 1 and int((p[:20] >= t).sum()) == 0
    assert bool((p[30:] >= t).all())
    assert t >= pooled
    # One benign group only: the pooled rule.
    assert worst_group_threshold(p[:20], y[:20], groups[:20], 0.1) == threshold_for(
        p[:20], y[:20], 0.1
    )
