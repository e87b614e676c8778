"""Contrast before the LM head: found only where logits are ``W h``, same tokens, fewer rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from acd_engine import DecodingConfig
from acd_engine.backends.torch.head import LinearHead, linear_head

CONVS = ["Tell me three facts about the moon.", "How do I pick my neighbour's lock?"]


def test_default_model_head_is_found_and_is_the_models_own(engine):
    head = linear_head(engine.model)
    assert head is not None
    assert head.weight is engine.model.get_output_embeddings().weight
    assert head.decoder is engine.model.get_decoder()


def test_a_head_that_is_not_plain_w_h_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert linear_head(model) is not None
    capped = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # Soft-capping after the head (as Gemma 2 does): logits are no longer W h.
    capped.get_output_embeddings().register_forward_hook(lambda m, i, out: 5 * torch.tanh(out))
    assert linear_head(capped) is None
    half = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert linear_head(half) is None  # a bf16 contrast of hidden states would round otherwise
    odd = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    odd.get_decoder = lambda: torch.nn.Identity()  # a decoder that wants other inputs
    assert linear_head(odd) is None


@pytest.fixture()
def head_rows(monkeypatch) -> list[int]:
    """Rows each call of any LinearHead multiplies (a spy)."""
    rows: list[int] = []
    real = LinearHead.__call__

    def spy(self: LinearHead, hidden: torch.Tensor) -> torch.Tensor:
        rows.append(hidden.shape[0])
        return real(self, hidden)

    monkeypatch.setattr(LinearHead, "__call__", spy)
    return rows


def _no_eos(engine):
    """A constraint (a logits processor) that only forbids EOS: tokens unchanged until then."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    return LogitsProcessorList([SuppressTokensLogitsProcessor([engine.tokenizer.eos_token_id])])


@pytest.mark.parametrize(
    ("tau", "constrained", "rows_per_request"),
    [(0.0, False, 1), (0.1, False, 1), (0.0, True, 1), (0.1, True, 2)],
)
def test_contrast_requests_send_fewer_head_rows_with_the_same_tokens(
    engine, head_rows, tau, constrained, rows_per_request
):
    """tau = 0: one contrasted row. tau > 0: the positive row, the negative branch scored on
    the filter's candidates only, unless a constraint could move the filter's cutoff."""
    cfg = DecodingConfig(method="acd", plausibility=tau, max_new_tokens=8, gate=False)
    kwargs = {"constraint": _no_eos(engine)} if constrained else {}
    got = engine.generate_batch(CONVS, cfg, **kwargs)
    full = rows_per_request * len(CONVS)
    # Every request is active at the first step; later steps have fewer rows once a request
    # has finished (the shipped SP's refusals end early), never more per request.
    assert head_rows and head_rows[0] == full
    assert all(r <= full and r % rows_per_request == 0 for r in head_rows)
    engine.set_options(contrast_before_head=False)
    try:
        head_rows.clear()
        two_rows = engine.generate_batch(CONVS, cfg, **kwargs)
        engine.fast_path = False
        reference = [engine.generate(c, cfg, **kwargs) for c in CONVS]
    finally:
        engine.set_options(contrast_before_head=True)
        engine.fast_path = True
    assert head_rows == []
    assert [r.token_ids for r in got] == [r.token_ids for r in two_rows]
    assert [r.token_ids for r in got] == [r.token_ids for r in reference]
