"""CE and UL on a toy distribution, checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from acd_engine.training.losses import (
    IGNORE_INDEX,
    OBJECTIVES,
    position_weights,
    response_ce,
    response_ul,
    sequence_losses,
)


def _toy() -> tuple[torch.Tensor, torch.Tensor]:
    # Two sequences over a 3-token vocabulary; logits are log-probabilities, so softmax gives
    # exactly these distributions back.
    probs = torch.tensor(
        [
            [[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]],
            [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]],
        ]
    )
    labels = torch.tensor([[0, 2, IGNORE_INDEX], [IGNORE_INDEX, 1, 0]])
    return probs.log(), labels


def test_ce_is_the_mean_negative_log_prob_of_scored_tokens():
    logits, labels = _toy()
    ce = response_ce(logits, labels)
    expected = [-(math.log(0.5) + math.log(0.7)) / 2, -(math.log(0.2) + math.log(0.9)) / 2]
    assert ce.tolist() == pytest.approx(expected, abs=1e-6)


def test_ul_is_the_mean_negative_log_of_one_minus_p():
    logits, labels = _toy()
    ul = response_ul(logits, labels)
    expected = [-(math.log(0.5) + math.log(0.3)) / 2, -(math.log(0.8) + math.log(0.1)) / 2]
    assert ul.tolist() == pytest.approx(expected, abs=1e-6)


def test_ul_is_clamped_when_a_token_is_certain():
    logits = torch.tensor([[[60.0, 0.0, 0.0]]])  # p(token 0) == 1 in fp32
    labels = torch.tensor([[0]])
    ul = response_ul(logits, labels, min_prob=1e-4)
    assert torch.isfinite(ul).all()
    assert ul.item() == pytest.approx(-math.log(1e-4), rel=1e-3)
    logits.requires_grad_(True)
    response_ul(logits, labels).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_sequence_losses_applies_each_rows_objective():
    logits, labels = _toy()
    mixed = sequence_losses(logits, labels, ["ce", "ul"])
    assert mixed[0].item() == pytest.approx(response_ce(logits, labels)[0].item())
    assert mixed[1].item() == pytest.approx(response_ul(logits, labels)[1].item())


def test_objectives_follow_the_paper_plus_the_two_sided_benign_term():
    # L_SP = CE(D_HR) + UL(D_HA) + CE(D_S) + UL(D_BR); L_AP = CE(D_HA) + UL(D_HR) + CE(D_S)
    # + CE(D_BR): the SP avoids refusal openings on benign prompts, the AP makes them likely,
    # so SP - alpha * AP lowers them on both counts.
    assert OBJECTIVES["sp"] == {"hr": "ce", "ha": "ul", "s": "ce", "br": "ul"}
    assert OBJECTIVES["ap"] == {"hr": "ul", "ha": "ce", "s": "ce", "br": "ce"}


def test_position_weights_favour_the_first_tokens_and_decay_to_one():
    w = position_weights(6, first_token_weight=4.0, first_tokens=3)
    assert w.tolist() == pytest.approx([4.0, 3.0, 2.0, 1.0, 1.0, 1.0])
    assert position_weights(4, 1.0, 3).tolist() == [1.0] * 4  # weight 1: the plain mean


def test_weighted_ce_and_ul_weight_each_position():
    logits, labels = _toy()
    w = torch.tensor([3.0, 1.0, 1.0])
    ce = response_ce(logits, labels, w)
    # Row 0 scores positions 0 and 1 (weights 3, 1); row 1 positions 1 and 2 (weights 1, 1).
    expected = [-(3 * math.log(0.5) + math.log(0.7)) / 4, -(math.log(0.2) + math.log(0.9)) / 2]
    assert ce.tolist() == pytest.approx(expected, abs=1e-6)
    ul = response_ul(logits, labels, weights=w)
    assert ul[0].item() == pytest.approx(-(3 * math.log(0.5) + math.log(0.3)) / 4, abs=1e-6)
    mixed = sequence_losses(logits, labels, ["ul", "ce"], weights=w)
    assert mixed.tolist() == pytest.approx([ul[0].item(), ce[1].item()], abs=1e-6)
