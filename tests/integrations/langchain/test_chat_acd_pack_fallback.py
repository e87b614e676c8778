"""ChatACD without a trained pack: one WARNING, honest metadata, and require_pack refuses.

The tiny random model has no pack (the shipped one fits the default model only); the
shipped case runs on the session's default model.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("langchain_core")

from acd_engine.errors import PromptPackError
from acd_integrations.langchain import ChatACD

REFUSAL = (
    "pack must be a trained prompt pack for method 'acd' when require_pack is set, got "
    "none (manual prompts)"
)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "acd_engine.runtime.engine" and "no trained prompt pack" in r.message
    ]


def test_no_pack_warns_once_and_every_answer_says_so(fresh_tiny_dir, caplog):
    llm = ChatACD(model=str(fresh_tiny_dir), max_tokens=2)
    with caplog.at_level(logging.WARNING, logger="acd_engine.runtime.engine"):
        reply = llm.invoke("Hi")
        again = llm.invoke("Hello")
        chunks = list(llm.stream("Hey"))
        llm.batch(["a", "b"])
    (record,) = _warnings(caplog)
    assert record.levelno == logging.WARNING
    assert "acd train --model PATH --out PACK" in record.message
    for meta in (reply.response_metadata, again.response_metadata):
        assert (meta["pack"], meta["gate"]) == ("none (manual prompts)", "none")
        assert "gate_score" not in meta  # nothing gated it
    last = chunks[-1].response_metadata
    assert (last["pack"], last["gate"]) == ("none (manual prompts)", "none")


def test_the_shipped_pack_is_named_and_not_warned_about(engine, caplog):
    gate = engine.pack.gate
    assert gate is not None
    with caplog.at_level(logging.WARNING, logger="acd_engine.runtime.engine"):
        meta = ChatACD(max_tokens=1).invoke("Hi").response_metadata
    assert _warnings(caplog) == []
    assert meta["pack"] == f"smollm2-135m-instruct.safetensors (id {engine.pack.id})"
    assert (
        meta["gate"] == f"layers {','.join(map(str, gate.layers))}, threshold {gate.threshold:.4g}"
    )
    assert ChatACD(max_tokens=1, method="base").invoke("Hi").response_metadata["pack"] == "unused"


def test_require_pack_refuses_acd_before_any_token_and_serves_other_methods(tiny_model_dir):
    llm = ChatACD(model=str(tiny_model_dir), require_pack=True, max_tokens=2)
    assert llm.require_pack and llm.engine.require_pack
    assert llm.engine is not ChatACD(model=str(tiny_model_dir)).engine  # a strict engine
    for call in (
        lambda: llm.invoke("Hi"),
        lambda: list(llm.stream("Hi")),
        lambda: llm.get_num_tokens_from_messages([]),
    ):
        with pytest.raises(PromptPackError) as err:
            call()
        assert str(err.value).startswith(REFUSAL)
        assert "acd train --model PATH --out PACK" in str(err.value)
    based = llm.invoke("Hi", method="base")
    assert based.response_metadata["method"] == "base"
    assert based.response_metadata["pack"] == "unused"
    assert (
        ChatACD(model=str(tiny_model_dir), require_pack=True, method="oid").invoke("Hi").content
        is not None
    )
