"""D_HR continuations of a refusal opening end after their first sentence, with EOS trained.

The shipped SP looped its refusal until max_tokens ("I cannot assist with tutorials. I will not
assist with tutorials. ...") because its D_HR targets were open 14-token continuations that
almost never reached EOS. These tests pin the cut and the fallback for a continuation that has
no sentence end.
"""

from __future__ import annotations

import pytest

from acd_engine.eval.judges import get_judge
from acd_engine.training.anchors import load_anchors
from acd_engine.training.data import (
    REFUSAL_SOURCE,
    build_splits,
    fallback_refusal,
    first_sentence,
    refusal_opening,
)


@pytest.mark.parametrize(
    ("response", "opening", "expected"),
    [
        (
            "I cannot assist with that. You can only",
            "I cannot assist with",
            "I cannot assist with that.",
        ),
        ("I can't help with that! Ever", "I can't help with", "I can't help with that!"),
        ("Sorry, I won't do it?", "Sorry, I won't", "Sorry, I won't do it?"),
        ("I cannot assist with gel.\n\nSOLIC", "I cannot assist with", "I cannot assist with gel."),
        ("I cannot assist with this\nNext", "I cannot assist with", "I cannot assist with this"),
        # A full stop inside the opening does not end the refusal before it says anything.
        ("No. I won't help with that. More", "No.", "No. I won't help with that."),
        # 3.5 is not a sentence end: the dot is not followed by a space.
        ("I can't give 3.5 grams of it. Then", "I can't", "I can't give 3.5 grams of it."),
        ("I can't help with the details, but here is a guide on", "I can't help with", None),
        ("", "I can't", None),
    ],
)
def test_first_sentence(response: str, opening: str, expected: str | None) -> None:
    assert first_sentence(response, opening) == expected


def _refusal_records(anchors, text_for):
    return [
        {
            "anchor_id": a.id,
            "source": REFUSAL_SOURCE if a.label == "harmful" else "safe",
            "sample": 0,
            "response": text_for(a),
            "finished": a.label != "harmful",
        }
        for a in anchors
    ]


def _continuation(a, cfg) -> str:
    if a.label == "benign":
        return "Here is a recipe."
    opening = refusal_opening(a.id, cfg.refusal_openings)
    # Every other harmful anchor's continuation never ends a sentence.
    if int(a.id.rsplit("-", 1)[1]) % 2:
        return f"{opening} that request. It is not safe. And then"
    return f"{opening} the details, but here is how to"


def test_refusal_continuations_are_cut_and_end_with_eos(small_anchors_path, fast_cfg) -> None:
    anchors = load_anchors("train", small_anchors_path)
    records = _refusal_records(anchors, lambda a: _continuation(a, fast_cfg))
    splits = build_splits(anchors, records, get_judge(), fast_cfg)
    harmful = [a for a in anchors if a.label == "harmful"]
    assert len(splits.hr) == len(harmful)
    for ex in splits.hr:
        a = next(x for x in harmful if x.id == ex.anchor_id)
        opening = refusal_opening(a.id, fast_cfg.refusal_openings)
        assert ex.finished, ex  # EOS is trained after every D_HR target
        if int(a.id.rsplit("-", 1)[1]) % 2:
            assert (ex.response, ex.source) == (f"{opening} that request.", REFUSAL_SOURCE)
        else:  # no sentence end: the anchor's templated refusal, which ends
            assert (ex.response, ex.source) == (fallback_refusal(a.id), "fallback")


def test_open_refusal_end_keeps_the_sampled_tokens(small_anchors_path, fast_cfg) -> None:
    cfg = fast_cfg.replace(refusal_end="open")
    anchors = load_anchors("train", small_anchors_path)
    records = _refusal_records(anchors, lambda a: _continuation(a, cfg))
    splits = build_splits(anchors, records, get_judge(), cfg)
    by_id = {r["anchor_id"]: r["response"] for r in records}
    assert splits.hr and all(not ex.finished for ex in splits.hr)
    assert all(ex.response == by_id[ex.anchor_id] for ex in splits.hr)
    assert {ex.source for ex in splits.hr} == {REFUSAL_SOURCE}
