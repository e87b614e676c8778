"""Server pieces that need no model: options, readiness, the CLI's refusals."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from acd_engine import ConfigError
from acd_integrations.server import ServerOptions, create_app


def test_options_are_validated_in_house_style():
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\), got 1.5"):
        ServerOptions(defaults={"alpha": 1.5})
    with pytest.raises(ConfigError, match="max_concurrency"):
        ServerOptions(max_concurrency=0)
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        ServerOptions(defaults={"alpah": 0.3})


def test_the_backend_option_is_validated_before_loading():
    with pytest.raises(ConfigError, match="backend must be one of 'auto', 'torch' or 'llamacpp'"):
        ServerOptions(backend="gpu")
    with pytest.raises(ConfigError, match=r"backend 'llamacpp' needs a \.gguf model file"):
        ServerOptions(backend="llamacpp", model="models/llama")
    with pytest.raises(ConfigError, match="device_map must be None with backend 'llamacpp'"):
        ServerOptions(backend="llamacpp", device_map="auto")
    assert ServerOptions(backend="llamacpp").backend == "llamacpp"


def test_everything_is_503_until_the_model_is_loaded():
    # Without the lifespan (no `with`), nothing loads: the state of a server still loading.
    client = TestClient(create_app(ServerOptions()))
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    chat = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
    )
    assert chat.status_code == 503 and "still loading" in chat.json()["error"]["message"]
    assert chat.headers["retry-after"] == "5"
    assert client.get("/v1/models").status_code == 503


def test_cli_serve_refuses_bad_defaults_in_one_line():
    from typer.testing import CliRunner

    from acd_engine.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--alpha", "1.5"])
    assert result.exit_code == 2
    assert "alpha must be in [0, 1), got 1.5" in result.output
    result = CliRunner().invoke(app, ["serve", "--backend", "gpu"])
    assert result.exit_code == 2
    assert "backend must be one of 'auto', 'torch' or 'llamacpp', got 'gpu'" in result.output
