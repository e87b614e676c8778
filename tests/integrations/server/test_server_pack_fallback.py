"""``acd serve`` without a trained pack: the ``acd`` field says so, the log warns once, and
``--require-pack`` refuses: per request with 400, at load when the default method needs a
pack (the model never becomes ready, as for a model that fails to load).

In-process (FastAPI's test client, no sockets) on the tiny random model, which has no pack.
"""

from __future__ import annotations

import json
import logging
import time

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from acd_engine import Engine
from acd_integrations.server import ServerOptions, create_app

REFUSAL = (
    "pack must be a trained prompt pack for method 'acd' when require_pack is set, got "
    "none (manual prompts)"
)
CHAT = "/v1/chat/completions"
HI = {"messages": [{"role": "user", "content": "Hi"}]}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "acd_engine.runtime.engine" and "no trained prompt pack" in r.message
    ]


def _final_acd(stream_text: str) -> dict:
    events = [line[6:] for line in stream_text.splitlines() if line.startswith("data: ")]
    finals = [json.loads(e) for e in events if e != "[DONE]" and "acd" in json.loads(e)]
    return finals[-1]["acd"]


def test_no_pack_acd_field_and_one_warning(fresh_tiny_dir, caplog):
    app = create_app(ServerOptions(defaults={"max_tokens": 2}), engine=Engine(fresh_tiny_dir))
    with (
        caplog.at_level(logging.WARNING, logger="acd_engine.runtime.engine"),
        TestClient(app) as client,
    ):
        plain = client.post(CHAT, json=HI)
        completion = client.post("/v1/completions", json={"prompt": "Hi"})
        streamed = client.post(CHAT, json={**HI, "stream": True})
        based = client.post(CHAT, json={**HI, "method": "base"})
    assert plain.status_code == completion.status_code == streamed.status_code == 200
    for acd in (plain.json()["acd"], completion.json()["acd"], _final_acd(streamed.text)):
        assert acd == {
            "method": "acd",
            "alpha": 0.5,
            "pack": "none (manual prompts)",
            "gate": "none",
            "backend": "torch",
        }
    assert based.json()["acd"] == {
        "method": "base",
        "alpha": 0.0,
        "pack": "unused",
        "gate": "none",
        "backend": "torch",
    }
    (record,) = _warnings(caplog)
    assert record.levelno == logging.WARNING and "acd train --model PATH" in record.message


def test_require_pack_answers_400_to_a_request_for_acd(tiny_model_dir, caplog):
    options = ServerOptions(require_pack=True, defaults={"method": "base", "max_tokens": 2})
    app = create_app(options, engine=Engine(tiny_model_dir))  # an engine without the flag
    with (
        caplog.at_level(logging.WARNING, logger="acd_engine.runtime.engine"),
        TestClient(app) as client,
    ):
        ok = client.post(CHAT, json=HI)
        refused = client.post(CHAT, json={**HI, "method": "acd"})
        refused_stream = client.post(CHAT, json={**HI, "method": "acd", "stream": True})
        refused_completion = client.post("/v1/completions", json={"prompt": "Hi", "method": "acd"})
    assert ok.status_code == 200 and ok.json()["acd"]["pack"] == "unused"
    for res in (refused, refused_stream, refused_completion):
        assert res.status_code == 400
        error = res.json()["error"]
        assert error["message"].startswith(REFUSAL)
        assert "acd train --model PATH --out PACK" in error["message"]
        assert (error["type"], error["param"]) == ("invalid_request_error", "method")
    assert _warnings(caplog) == []  # refused, never decoded on the manual prompts


def _settled(client: TestClient, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (health := client.get("/health").json())["status"] == "loading":
        assert time.monotonic() < deadline, "the model did not load in time"
        time.sleep(0.05)
    return health


def test_require_pack_fails_the_load_when_the_default_method_needs_a_pack(tiny_model_dir):
    strict = ServerOptions(model=str(tiny_model_dir), require_pack=True)
    with TestClient(create_app(strict)) as client:
        health = _settled(client)
        chat = client.post(CHAT, json={**HI, "method": "base"})
    assert health["status"] == "failed" and health["error"].startswith(REFUSAL)
    assert chat.status_code == 503
    assert chat.json()["error"]["message"] == f"the model failed to load: {health['error']}"
    # The same server with a default that needs no pack loads and serves.
    based = ServerOptions(
        model=str(tiny_model_dir), require_pack=True, defaults={"method": "oid", "max_tokens": 2}
    )
    with TestClient(create_app(based)) as client:
        assert _settled(client)["status"] == "ok"
        assert client.post(CHAT, json=HI).json()["acd"]["method"] == "oid"


def test_cli_serve_has_the_flag():
    from typer.testing import CliRunner

    from acd_engine.cli.main import app

    res = CliRunner().invoke(app, ["serve", "--help"])
    assert res.exit_code == 0 and "--require-pack" in res.stdout
