"""Skinny matmuls: same products as ``F.linear`` (up to summation order), measured once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from acd_engine.skinny import (
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
    from acd_engine.skinny import PAD_BLOCK

    max_rows, pad_block = skinny_plan(tiny_engine.model, repeats=1)
    assert pad_block in (0, PAD_BLOCK)
    assert pad_block == 0 or max_rows >= PAD_BLOCK
