"""The `acd` command line, run in-process with typer's runner on the shared engine."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from acd_engine.cli import app

runner = CliRunner()


def test_generate_json_has_the_result_fields(engine):
    res = runner.invoke(app, ["generate", "Say hi.", "--method", "oid", "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"text", "token_ids", "finish_reason", "usage", "method", "alpha"}
    assert out["method"] == "oid" and len(out["token_ids"]) <= 4


def test_bad_alpha_exits_nonzero_with_the_message_on_stderr():
    res = runner.invoke(app, ["generate", "hi", "--alpha", "1.5"])
    assert res.exit_code == 2
    assert "alpha must be in [0, 1), got 1.5" in res.stderr
    assert res.stdout == ""


def test_bad_model_path_says_how_to_fix():
    res = runner.invoke(app, ["generate", "hi", "--model", "/nonexistent/model"])
    assert res.exit_code == 2
    assert "model must be a local Hugging Face model directory" in res.stderr


def test_compare_shows_every_method(engine):
    res = runner.invoke(
        app, ["compare", "Say hi.", "-n", "3", "--methods", "plain,base,oid,acd", "--json"]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["method"] for r in rows] == ["plain", "base", "oid", "acd"]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_help_is_instant_and_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("generate", "compare", "chat"):
        assert cmd in res.stdout
