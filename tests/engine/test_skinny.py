"""Skinny matmuls: same products as ``F.linear`` (up to summation order), measured once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import acd_engine.backends.torch.skinny as skinny
from acd_engine.backends.torch.skinny import (
    ROW_COUNTS,
    SkinnyLinear,
    padded_rows,
    skinny_linear,
    skinny_plan,
)


def test_skinny_linear_matches_linear_for_every_row_count():
    torch.manual_seed(0)
    w, b = torch.randn(64, 32), torch.randn(64)
    for rows in (1, 2, 3, 16, 32):
        x = torch.randn(1, rows, 32)
        torch.testing.assert_close(skinny_linear(x, w, b), F.linear(x, w, b))


def test_skinny_linear_leaves_bigger_products_to_the_ordinary_kernel():
    torch.manual_seed(0)
    w, x = torch.randn(64, 32), torch.randn(9, 32)
    assert torch.equal(skinny_linear(x, w, max_rows=8), F.linear(x, w))


def test_skinny_mode_rewrites_linear_layers_only_inside_the_context():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 64, bias=False)
    x = torch.randn(2, 32)
    with SkinnyLinear(4):
        inside = layer(x)
    assert torch.equal(inside, torch.mm(layer.weight, x.t()).t())
    torch.testing.assert_close(layer(x), inside)


def test_skinny_plan_is_a_measured_row_count_remembered_per_model(tiny_engine):
    model = tiny_engine.model
    first = skinny_plan(model, repeats=1)[0]
    assert first == 0 or first in ROW_COUNTS
    assert skinny_plan(model, repeats=1)[0] == first  # measured once


def test_padded_rows_rounds_up_only_above_half_a_block():
    assert [padded_rows(r, 16) for r in (2, 8, 9, 12, 16, 17, 30, 32)] == [
        2, 8, 16, 16, 16, 32, 32, 32,
    ]  # fmt: skip
    assert padded_rows(12, 0) == 12


def test_padding_with_zero_rows_keeps_the_product():
    torch.manual_seed(0)
    w, x = torch.randn(64, 32), torch.randn(12, 32)
    torch.testing.assert_close(skinny_linear(x, w, pad_block=16), F.linear(x, w))
    assert skinny_linear(x, w, pad_block=16).shape == (12, 64)


def test_skinny_plan_pads_only_when_skinny_reaches_a_block(tiny_engine):
    from acd_engine.backends.torch.skinny import PAD_BLOCK

    max_rows, pad_block = skinny_plan(tiny_engine.model, repeats=1)
    assert pad_block in (0, PAD_BLOCK)
    assert pad_block == 0 or max_rows >= PAD_BLOCK


@pytest.mark.parametrize(
    ("ratios", "plan"),
    [
        ((0.5, 0.5, 0.5, 0.5, 0.5, 0.5), (32, 16)),  # last ratio: 12 rows padded vs not
        ((0.5, 0.5, 0.95), (2, 0)),  # stops at the first loss; no padding test below 16
        ((0.5, 0.5, 0.5, 0.5, 0.9, 0.9), (16, 0)),  # equal to the 0.9 margin is a loss
        ((0.95,), (0, 0)),
    ],
)
def test_skinny_plan_rule_on_faked_timings(tiny_engine, monkeypatch, ratios, plan):
    """The rule over the timings: skinny under ``margin`` (0.9) of the ordinary time at
    every count up to ``max_rows``; padding only from a block's worth of rows and only
    where it wins by the margin too (timings faked, the rule real)."""
    assert ROW_COUNTS == (1, 2, 8, 16, 32)  # the ratios above are given in this order
    monkeypatch.setattr(skinny, "_DECISIONS", skinny.weakref.WeakKeyDictionary())
    timings = iter((r, 1.0) for r in ratios)
    monkeypatch.setattr(skinny, "best_of_both", lambda *args: next(timings))
    assert skinny_plan(tiny_engine.model, repeats=1) == plan
    assert next(timings, None) is None  # every faked timing was asked for
