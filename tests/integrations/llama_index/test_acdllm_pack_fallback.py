"""ACDLLM without a trained pack: one WARNING, honest ``raw`` metadata, require_pack refuses.

The tiny random model has no pack (the shipped one fits the default model only); the
shipped case runs on the session's default model.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage

from acd_engine.errors import PromptPackError
from acd_integrations.llama_index import ACDLLM

REFUSAL = (
    "pack must be a trained prompt pack for method 'acd' when require_pack is set, got "
    "none (manual prompts)"
)
MSGS = [ChatMessage(role="user", content="Hi")]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "acd_engine.runtime.engine" and "no trained prompt pack" in r.message
    ]


def test_no_pack_warns_once_and_every_response_says_so(fresh_tiny_dir, caplog):
    llm = ACDLLM(model=str(fresh_tiny_dir), max_tokens=2)
    with caplog.at_level(logging.WARNING, logger="acd_engine.runtime.engine"):
        chat = llm.chat(MSGS)
        complete = llm.complete("Hi")
        streamed = list(llm.stream_chat(MSGS))
        achat = asyncio.run(llm.achat(MSGS))
    (record,) = _warnings(caplog)
    assert record.levelno == logging.WARNING
    assert "acd train --model PATH --out PACK" in record.message
    for raw in (chat.raw, complete.raw, streamed[-1].raw, achat.raw):
        assert raw is not None
        assert (raw["pack"], raw["gate"]) == ("none (manual prompts)", "none")
        assert raw["method"] == "acd" and "gate_score" not in raw


def test_the_shipped_pack_is_named_and_not_warned_about(engine, caplog):
    gate = engine.pack.gate
    assert gate is not None
    with caplog.at_level(logging.WARNING, logger="acd_engine.runtime.engine"):
        raw = ACDLLM(max_tokens=1).complete("Hi").raw
    assert _warnings(caplog) == [] and raw is not None
    assert raw["pack"] == f"smollm2-135m-instruct.safetensors (id {engine.pack.id})"
    layers = ",".join(map(str, gate.layers))
    assert raw["gate"] == f"layers {layers}, threshold {gate.threshold:.4g}"


def test_require_pack_refuses_acd_before_any_token_and_serves_other_methods(tiny_model_dir):
    llm = ACDLLM(model=str(tiny_model_dir), require_pack=True, max_tokens=2)
    assert llm.engine.require_pack
    for call in (
        lambda: llm.chat(MSGS),
        lambda: llm.complete("Hi"),
        lambda: list(llm.stream_complete("Hi")),
        lambda: asyncio.run(llm.acomplete("Hi")),
    ):
        with pytest.raises(PromptPackError) as err:
            call()
        assert str(err.value).startswith(REFUSAL)
        assert "acd train --model PATH --out PACK" in str(err.value)
    based = llm.complete("Hi", method="base")
    assert based.raw is not None
    assert (based.raw["method"], based.raw["pack"]) == ("base", "unused")
