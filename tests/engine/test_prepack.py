"""Prepacked weights for batched CPU steps: the same products and tokens, made only on need."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F

import acd_engine.backends.torch.prepack as prepack
from acd_engine import DecodingConfig
from acd_engine.backends.torch.prepack import (
    PLAN_ROWS,
    PrepackedLinear,
    prepack_fits,
    prepack_linear,
    prepack_plan,
    prepack_weights,
    prepacked_available,
    shared_prepacked,
)
from acd_engine.backends.torch.skinny import SkinnyLinear

needs_onednn = pytest.mark.skipif(not prepacked_available(), reason="no oneDNN in this build")


@needs_onednn
def test_prepacked_product_matches_linear_with_bias_and_leading_dims():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 64)
    packs = prepack_weights(layer)
    for shape in ((1, 32), (4, 32), (2, 3, 32)):
        x = torch.randn(*shape)
        got = prepack_linear(x, layer.weight, layer.bias, packs)
        torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_a_weight_changed_in_place_is_never_answered_from_its_stale_copy():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 64, bias=False)
    packs = prepack_weights(layer)
    x = torch.randn(4, 32)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.equal(prepack_linear(x, layer.weight, None, packs), F.linear(x, layer.weight))
    other = torch.randn(64, 32)  # not packed at all
    assert torch.equal(prepack_linear(x, other, None, packs), F.linear(x, other))


@needs_onednn
def test_mode_routes_linear_layers_through_the_packs_only_inside(monkeypatch):
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 64, bias=False)
    packs = prepack_weights(layer)
    calls = []
    real = prepack.prepack_linear
    monkeypatch.setattr(prepack, "prepack_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 32)
    with PrepackedLinear(packs):
        inside = layer(x)
    assert calls == [1]
    torch.testing.assert_close(layer(x), inside)
    assert calls == [1]


def test_plan_is_never_without_onednn_and_fit_follows_free_memory(tiny_engine, monkeypatch):
    model = tiny_engine.model
    monkeypatch.setattr(prepack, "_DECISIONS", prepack.weakref.WeakKeyDictionary())
    monkeypatch.setattr(prepack, "prepacked_available", lambda: False)
    assert prepack_plan(model) == 0
    need = prepack.prepack_bytes(model)
    assert need > 0
    monkeypatch.setattr(prepack, "_available_bytes", lambda: 4 * need)
    assert prepack_fits(model)
    monkeypatch.setattr(prepack, "_available_bytes", lambda: 2 * need)
    assert not prepack_fits(model)


@needs_onednn
def test_plan_is_a_measured_row_count_remembered_per_model(tiny_engine):
    first = prepack_plan(tiny_engine.model, repeats=1)
    assert first == 0 or first in PLAN_ROWS
    assert prepack_plan(tiny_engine.model, repeats=1) == first


@needs_onednn
@pytest.mark.parametrize(
    ("ratios", "answer"),
    [
        ((0.5, 0.5, 0.5, 0.5), 4),  # wins everywhere: from the smallest count
        ((0.9, 0.5, 0.79, 0.5), 8),  # 0.79 is under the 0.8 margin
        ((0.5, 0.5, 0.85, 0.5), 32),  # a loss at 16 rows: only from 32, never a gap
        ((0.5, 0.5, 0.5, 0.8), 0),  # equal to the margin at 32 rows is not a win
    ],
)
def test_plan_takes_the_smallest_count_from_which_prepacked_always_wins(
    tiny_engine, monkeypatch, ratios, answer
):
    """The rule over the timings: prepacked under ``margin`` (0.8) of the other kernel's
    time at that row count and at every larger one (timings faked, the rule real)."""
    assert PLAN_ROWS == (4, 8, 16, 32)  # the ratios above are given in this order
    monkeypatch.setattr(prepack, "_DECISIONS", prepack.weakref.WeakKeyDictionary())
    timings = iter((r, 1.0) for r in ratios)
    monkeypatch.setattr(prepack, "best_of_both", lambda *args: next(timings))
    assert prepack_plan(tiny_engine.model, repeats=1) == answer
    assert next(timings, None) is None  # every row count of PLAN_ROWS was timed


@needs_onednn
def test_engines_on_one_model_share_one_prepacked_copy(tiny_engine, tiny_model_dir):
    from acd_engine import Engine

    other = Engine(tiny_model_dir)
    assert other.model is tiny_engine.model  # loaded models are shared per process
    packs = shared_prepacked(tiny_engine.model)
    assert shared_prepacked(other.model) is packs
    with kernels(other, prepack_rows=4), kernels(tiny_engine, prepack_rows=4):
        assert other.kernels.prepacked_for(4) is tiny_engine.kernels.prepacked_for(4) is packs


@contextmanager
def kernels(engine, prepack_rows, skinny_rows=None):
    saved = engine.kernels.prepack_rows, engine.kernels.prepacked, engine.kernels.skinny_rows
    engine.kernels.prepack_rows, engine.kernels.prepacked = prepack_rows, None
    if skinny_rows is not None:
        engine.kernels.skinny_rows = skinny_rows
    try:
        yield
    finally:
        engine.kernels.prepack_rows, engine.kernels.prepacked, engine.kernels.skinny_rows = saved


@needs_onednn
def test_engine_picks_the_kernel_by_rows_and_packs_only_on_first_need(engine):
    with kernels(engine, prepack_rows=4, skinny_rows=16):
        context = engine.kernels.step_context(static=False)
        assert isinstance(context(2, 1), SkinnyLinear)  # one request: no copy made
        assert isinstance(context(2, 30), nullcontext)  # its prefill: the ordinary kernel
        assert engine.kernels.prepacked is None
        assert isinstance(context(4, 1), PrepackedLinear)  # a batch
        assert isinstance(context(4, 30), PrepackedLinear)  # and its prefill
        assert engine.kernels.prepacked is not None
        weights = {id(m.weight) for m in engine.model.modules() if isinstance(m, torch.nn.Linear)}
        assert set(engine.kernels.prepacked) == weights
    with kernels(engine, prepack_rows=0, skinny_rows=0):
        assert engine.kernels.step_context(static=False) is None


@needs_onednn
@pytest.mark.parametrize("prepack_rows", [4, 0])
def test_batches_on_prepacked_weights_give_the_reference_tokens(engine, prepack_rows):
    convs = [
        "Tell me three facts about the moon.",
        "How do I pick my neighbour's lock?",
        "Write a haiku about rain.",
    ]
    cfg = DecodingConfig(method="acd", max_new_tokens=12)
    with kernels(engine, prepack_rows=prepack_rows):
        batch = engine.generate_batch(convs, cfg)
        assert (engine.kernels.prepacked is not None) == bool(prepack_rows)
    saved = engine.fast_path
    engine.fast_path = False
    try:
        singles = [engine.generate(c, cfg) for c in convs]
    finally:
        engine.fast_path = saved
    assert [b.token_ids for b in batch] == [s.token_ids for s in singles]


@needs_onednn
def test_scoring_on_prepacked_weights_matches_the_reference(engine):
    conts = ["The moon is made of cheese.", "Sure", "It orbits the Earth."]
    cfg = DecodingConfig(method="oid")
    with kernels(engine, prepack_rows=4):
        fast = engine.score_continuations("Tell me about the moon.", conts, cfg)
        assert engine.kernels.prepacked is not None  # 3 continuations x 2 branches = 6 rows
    saved = engine.fast_path
    engine.fast_path = False
    try:
        ref = engine.score_continuations("Tell me about the moon.", conts, cfg)
    finally:
        engine.fast_path = saved
    assert fast == pytest.approx(ref, rel=1e-4, abs=1e-4)
