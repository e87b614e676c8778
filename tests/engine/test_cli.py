"""The `acd` command line, run in-process with typer's runner on the shared engine."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from acd_engine.cli.main import app

runner = CliRunner()


def test_generate_json_has_the_result_fields(engine):
    res = runner.invoke(app, ["generate", "Say hi.", "--method", "oid", "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {
        "text",
        "token_ids",
        "finish_reason",
        "usage",
        "method",
        "alpha",
        "gate_score",
        "gate_flagged",
        "pack",
        "gate",
        "backend",
    }
    assert out["method"] == "oid" and len(out["token_ids"]) <= 4 and out["backend"] == "torch"
    assert (out["pack"], out["gate"]) == ("unused", "none")  # oid reads no pack


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


# ------------------------------------------------------------------ hostile input

import pytest  # noqa: E402


def one_error_line(res) -> str:
    """The single ``error:`` line of a user error (exit 2, nothing else on stderr)."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if any command gets as far as loading a model."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("acd_engine.runtime.engine.get_engine", boom)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate"], "Missing argument 'prompt'"),
        (["generate", "hi", "-n", "abc"], "Invalid value for '--max-new-tokens'"),
        (["generate", "hi", "--bogus"], "No such option: --bogus"),
        (["generate", "hi\udcff"], "prompt must be valid Unicode text"),
        (["generate", "hi", "--system", "s\udc80"], "system must be valid Unicode text"),
        (["compare", "ok", "b\udcffad"], "prompts[1] must be valid Unicode text"),
        (["compare", "ok", "--methods", ","], "methods must name at least one method"),
        (["chat", "--system", "\udcff"], "system must be valid Unicode text"),
        (["generate", "hi", "--seed", str(2**80)], "seed must be <="),
        (["eval", "--methods", "acd,zzz"], "unknown method 'zzz'"),
        (["eval", "--alphas", "nan"], "alphas.0 must be a finite number, got 'nan'"),
        (["eval", "--alphas", "2"], "alphas must be in [0, 1), got 2.0"),
        (["train", "--out", "x.safetensors", "--lr", "inf"], "lr must be a finite number"),
        (["train", "--out", "x.safetensors", "--epochs", "0"], "epochs must be >= 1"),
        (["train", "--out", "x.safetensors", "--set", "{bad"], "--set must be a JSON object"),
        (["bench", "--model", "random:nope"], "must name one of"),
    ],
)
def test_bad_input_is_one_error_line_before_any_model(no_model, args, message) -> None:
    line = one_error_line(runner.invoke(app, args))
    assert message in line


def test_surrogates_in_the_message_are_escaped_not_a_crash(no_model) -> None:
    line = one_error_line(runner.invoke(app, ["generate", "hi", "--method", "a\udcffb"]))
    assert "\\udcff" in line


@pytest.mark.parametrize("command", ["generate", "compare", "chat"])
def test_os_errors_while_loading_are_one_line(monkeypatch, command) -> None:
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/models/m")

    monkeypatch.setattr("acd_engine.runtime.engine.get_engine", denied)
    args = [command] if command == "chat" else [command, "hi"]
    line = one_error_line(runner.invoke(app, args))
    assert "Permission denied" in line and "/models/m" in line


def test_train_os_errors_are_one_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr("acd_engine.runtime.engine.get_engine", lambda *a, **k: object())

    def is_a_dir(*args, **kwargs):
        raise IsADirectoryError(21, "Is a directory", str(tmp_path))

    monkeypatch.setattr("acd_engine.training.run.train_pack", is_a_dir)
    line = one_error_line(runner.invoke(app, ["train", "--out", str(tmp_path / "p.safetensors")]))
    assert "Is a directory" in line


def test_a_genuine_bug_still_tracebacks(monkeypatch) -> None:
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("acd_engine.runtime.engine.get_engine", bug)
    res = runner.invoke(app, ["generate", "hi"])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda out: out.write_text("x"), "out_dir must be a folder, got the file"),
        (lambda out: (out / "records.jsonl").mkdir(parents=True), "records.jsonl in"),
        (lambda out: (out / "run.json").mkdir(parents=True), "run.json in"),
    ],
)
def test_eval_checks_its_folder_before_the_model(no_model, tmp_path, setup, message) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "advbench.jsonl").write_text('{"id": "a", "prompt": "p", "label": "harmful"}\n')
    out = tmp_path / "out"
    setup(out)
    args = ["eval", "--benchmarks", "advbench", "--data-dir", str(data), "--out", str(out)]
    assert message in one_error_line(runner.invoke(app, args))


def test_eval_refuses_a_missing_benchmark_before_the_model(no_model, tmp_path) -> None:
    args = ["eval", "--benchmarks", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]
    assert "benchmark file must exist" in one_error_line(runner.invoke(app, args))


def test_eval_runs_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "advbench.jsonl").write_text(
        '{"id": "a", "prompt": "Say hi.", "label": "harmful"}\n'
        '{"id": "b", "prompt": "bad \\ud800", "label": "harmful"}\n'
    )
    out = tmp_path / "out"
    args = [
        *("eval", "--methods", "plain", "--benchmarks", "advbench", "--data-dir", str(data)),
        *("--out", str(out), "-n", "2", "--model", str(tiny_model_dir)),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "1 output(s) recorded as errors" in res.stdout
    again = runner.invoke(app, args)  # a rerun finishes too
    assert again.exit_code == 0, again.output
