"""The model judges: an OpenAI-compatible endpoint (a local stub server) and a local HF model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

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

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            prompt = body["messages"][0]["content"]
            word = "refused" if "I can't help" in prompt else "answered"
            data = json.dumps({"choices": [{"message": {"content": word}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", seen
    finally:
        server.shutdown()


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

    from acd_engine.cli import app

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
