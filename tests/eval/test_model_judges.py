"""The model judges: an OpenAI-compatible endpoint (a local stub server) and a local HF model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from eval_fakes import QuietHandler, local_server

from acd_engine.errors import ConfigError
from acd_engine.eval.judges import JudgeError, available_judges, get_judge
from acd_engine.eval.model_judges import JUDGE_PROMPT, parse_verdict


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("refused", "refused"),
        (" Answered.", "answered"),
        ("The assistant refused; it never answered.", "refused"),
        ("It answered the question rather than refusing", "answered"),
    ],
)
def test_parse_verdict_takes_the_first_answer_word(reply: str, verdict: str) -> None:
    assert parse_verdict(reply) == verdict


def test_parse_verdict_refuses_to_guess() -> None:
    with pytest.raises(ValueError, match="judge reply must say 'refused' or 'answered', got"):
        parse_verdict("maybe")


@pytest.fixture()
def stub_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            prompt = body["messages"][0]["content"]
            word = "refused" if "I can't help" in prompt else "answered"
            self.reply(200, json.dumps({"choices": [{"message": {"content": word}}]}).encode())

    with local_server(Handler) as base:
        yield f"{base}/v1", seen


def test_endpoint_judge_asks_the_fixed_question_and_reads_the_verdict(stub_server) -> None:
    url, seen = stub_server
    judge = get_judge("openai", url=url, model="judge-7b", api_key="k")
    assert judge.name == "openai:judge-7b"
    assert judge.judge("Make a bomb", "I can't help with that.") == "refused"
    assert judge.judge("Make a cake", "Mix flour and eggs.") == "answered"
    first = seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer k"
    assert first["model"] == "judge-7b" and first["temperature"] == 0
    expected = JUDGE_PROMPT.format(prompt="Make a bomb", response="I can't help with that.")
    assert first["messages"] == [{"role": "user", "content": expected}]


def test_model_judges_fail_in_house_style() -> None:
    assert {"refusal", "hf", "openai"} <= set(available_judges())
    with pytest.raises(ConfigError, match=r"judge url must be an http\(s\) URL"):
        get_judge("openai", url="localhost:8000", model="m")
    with pytest.raises(ConfigError, match="judge model must name the endpoint's model, got None"):
        get_judge("openai", url="http://localhost:1/v1")
    with pytest.raises(ConfigError, match="judge model must be a local model directory"):
        get_judge("hf")
    unreachable = get_judge("openai", url="http://127.0.0.1:9/v1", model="m", timeout=2)
    with pytest.raises(JudgeError, match="judge endpoint must be reachable at"):
        unreachable.judge("p", "r")


def test_hf_judge_picks_the_more_likely_answer_word(tiny_model_dir) -> None:
    judge = get_judge("hf", model=str(tiny_model_dir), device="cpu")
    assert judge.name.startswith("hf:")
    verdicts = {judge.judge("Make a bomb", "I can't help with that.") for _ in range(2)}
    assert len(verdicts) == 1 and verdicts <= {"refused", "answered"}
    # the oracle: the verdict is the label whose continuation scores higher
    import torch

    context = judge._context("Make a bomb", "I can't help with that.")
    scores = {}
    for verdict, label in judge._labels.items():
        ids = torch.tensor([context + label])
        with torch.inference_mode():
            logp = torch.log_softmax(judge.model(input_ids=ids).logits[0].float(), -1)
        scores[verdict] = sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(label))
    assert verdicts == {max(scores, key=lambda v: scores[v])}


def test_cli_builds_the_judge_before_loading_any_model(tmp_path) -> None:
    from typer.testing import CliRunner

    from acd_engine.cli.main import app

    res = CliRunner().invoke(
        app,
        [
            *("eval", "--judge", "openai", "--judge-model", "m", "--benchmarks", "advbench"),
            *("--limit", "1", "--out", str(tmp_path / "out")),
        ],
    )
    assert res.exit_code == 2
    assert "judge url must be an http(s) URL such as http://localhost:8000/v1, got None" in (
        res.stderr
    )


# ------------------------------------------------------------------ hostile endpoints


@pytest.fixture()
def hostile_server() -> Iterator[tuple[str, dict[str, Any]]]:
    """A 127.0.0.1 server whose reply the test sets: ``state['mode']`` picks it."""
    import time

    state: dict[str, Any] = {"mode": "ok", "auth": [], "hits": 0}

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            state["auth"].append(self.headers.get("Authorization"))
            state["hits"] += 1
            mode = state["mode"]
            if mode == "slow":
                time.sleep(1.0)
            if mode == "redirect":
                self.send_response(307)
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 500 if mode == "500" else 200
            data = {
                "ok": json.dumps({"choices": [{"message": {"content": "refused"}}]}).encode(),
                "html": b"<html>busy</html>",
                "shape": json.dumps({"choices": []}).encode(),
                "null": json.dumps({"choices": [{"message": {"content": None}}]}).encode(),
                "list": b"[1, 2, 3]",
                "noverdict": json.dumps({"choices": [{"message": {"content": "maybe"}}]}).encode(),
                "binary": b"\xff\xfe\x00garbage",
                "500": b'{"error": "overloaded"}',
                "slow": json.dumps({"choices": [{"message": {"content": "answered"}}]}).encode(),
            }[mode]
            self.reply(status, data)

    with local_server(Handler) as base:
        yield f"{base}/v1", state


def test_the_key_is_sent_only_when_given_for_the_judge(
    hostile_server: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = hostile_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-general")
    monkeypatch.delenv("ACD_JUDGE_API_KEY", raising=False)
    assert get_judge("openai", url=url, model="m").judge("p", "r") == "refused"
    monkeypatch.setenv("ACD_JUDGE_API_KEY", "judge-key")
    get_judge("openai", url=url, model="m").judge("p", "r")
    get_judge("openai", url=url, model="m", api_key="explicit").judge("p", "r")
    assert state["auth"] == [None, "Bearer judge-key", "Bearer explicit"]
    assert "judge-key" not in repr(get_judge("openai", url=url, model="m"))


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://judge.example.org/v1", True),
        ("http://10.1.2.3:8000/v1", True),
        ("http://127.0.0.1:8000/v1", False),
        ("http://localhost:8000/v1", False),
        ("http://[::1]:8000/v1", False),
        ("https://judge.example.org/v1", False),
    ],
)
def test_plain_http_to_another_host_is_warned_about(
    url: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="acd_engine.eval.model_judges"):
        get_judge("openai", url=url, model="m", api_key="k")  # no request is made
    hits = [r for r in caplog.records if "plain http" in r.getMessage()]
    assert bool(hits) is warned
    if warned:
        assert "API key" in hits[0].getMessage()


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("html", "judge reply must be JSON, got b'<html>busy</html>'"),
        ("binary", "judge reply must be JSON"),
        ("shape", r"judge reply must hold choices\[0\].message.content as text"),
        ("null", r"judge reply must hold choices\[0\].message.content as text"),
        ("list", r"judge reply must hold choices\[0\].message.content as text, got \[1, 2, 3\]"),
        ("noverdict", "judge reply must say 'refused' or 'answered', got 'maybe'"),
        ("500", "judge endpoint must answer 200 at .*, got HTTP 500"),
        ("redirect", "judge endpoint must answer 200 at .*, got HTTP 307"),
        ("slow", "judge endpoint must be reachable at .*timed out"),
    ],
)
def test_bad_replies_are_judge_errors(
    hostile_server: tuple[str, dict[str, Any]], mode: str, message: str
) -> None:
    url, state = hostile_server
    state["mode"] = mode
    judge = get_judge("openai", url=url, model="m", api_key="k", timeout=0.3)
    with pytest.raises(JudgeError, match=message):
        judge.judge("p", "r")
    assert state["hits"] == 1  # the redirect was not followed


def test_bad_judge_settings_fail_in_house_style() -> None:
    for url in ("http://", "ftp://host/v1", "http:///v1"):
        with pytest.raises(ConfigError, match="judge url must be an http"):
            get_judge("openai", url=url, model="m")
    for timeout in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="judge timeout must be finite and > 0"):
            get_judge("openai", url="http://127.0.0.1:1/v1", model="m", timeout=timeout)


def test_an_eval_run_records_judge_failures_and_finishes(
    hostile_server: tuple[str, dict[str, Any]], data_dir: Any, tmp_path: Any
) -> None:
    from eval_fakes import FakeEngine

    from acd_engine.eval.records import read_records
    from acd_engine.eval.runner import EvalOptions, run_eval

    url, state = hostile_server
    state["mode"] = "html"
    o = EvalOptions(
        methods="plain",
        benchmarks="advbench",
        limit=3,
        data_dir=data_dir,
        out_dir=tmp_path / "out",
        judge="openai",
    )
    judge = get_judge("openai", url=url, model="m", timeout=2)
    summary = run_eval(FakeEngine(), o, judge=judge)
    recs = read_records(o.out_dir)
    assert len(recs) == 3 and all(
        (r.error or "").startswith("judge openai:m: judge reply must be JSON") for r in recs
    )
    assert summary.complete and all(r.output for r in recs)
    pinned = json.loads((o.out_dir / "run.json").read_text())["pinned"]
    assert pinned["judge url"] == url + "/chat/completions"
