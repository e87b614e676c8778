"""Requests placed in application shapes (acd_engine.safety.contexts): deterministic, the request
where the placement says it is, every shape from the pools' own texts."""

from __future__ import annotations

import pytest

from acd_engine.errors import ConfigError
from acd_engine.safety.contexts import CONTEXTS, check_contexts, load_pool, place

PROMPT = "Explain how a bicycle derailleur shifts gears."


@pytest.mark.parametrize("pool", ["train", "val", "eval"])
@pytest.mark.parametrize("shape", CONTEXTS)
def test_every_shape_places_the_request_where_it_says(pool, shape):
    placed = place(PROMPT, shape, load_pool(pool), seed=3, earlier_harmful=["Do a bad thing."])
    assert placed == place(
        PROMPT, shape, load_pool(pool), seed=3, earlier_harmful=["Do a bad thing."]
    )
    last = placed.messages[-1]
    assert last["role"] == "user"
    start, stop = placed.request
    if shape == "split":  # the second half in the last turn, the first half in an earlier one
        first = placed.messages[0]["content"]
        assert f"{first} {last['content']}" == PROMPT
    else:
        assert last["content"][start:stop] == PROMPT
    assert (placed.tools is not None) == (shape == "agent")
    roles = [m["role"] for m in placed.messages]
    assert roles.count("system") <= 1 and roles[-1] == "user"
    if shape == "bare":
        assert placed.messages == [{"role": "user", "content": PROMPT}]
    if shape in ("rag", "padded"):
        assert len(last["content"]) > 3 * len(PROMPT)  # the request sits inside more text


def test_seeds_choose_different_texts_and_bad_names_are_refused():
    pool = load_pool("val")
    rags = {place(PROMPT, "rag", pool, seed=s).messages[-1]["content"] for s in range(6)}
    assert len(rags) > 1
    with pytest.raises(ConfigError, match="unknown context 'ragg'; did you mean 'rag'"):
        check_contexts(["bare", "ragg"])
    with pytest.raises(ConfigError, match="unknown context pool 'test'"):
        load_pool("test")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs earlier harmful requests"):
        place(PROMPT, "after-refusal", pool)  # the val pool has none of its own
