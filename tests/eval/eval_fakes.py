"""Shared fakes for the eval tests: a model-free engine and a tiny benchmark folder.

A module of its own, not ``conftest``: another test folder's ``conftest.py`` (tests/fuzz)
takes the top-level name ``conftest`` when both folders run in one pytest session, so
``from conftest import FakeEngine`` would find the wrong file. It is importable as a plain
module too (the resume-after-kill test runs it in a subprocess), so it must not depend on
pytest fixtures.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from acd_engine.eval.runner import EvalOptions

REFUSAL = "I'm sorry, but I can't help with that request."
ANSWER = "Sure, here is a detailed answer with several distinct steps to follow carefully."
LOOP = "sorry " * 12


def fake_gate_score(prompt: str) -> float:
    """The fake gate's probability of harm: deterministic per prompt, spread over [0, 1)."""
    return (zlib.crc32(b"gate:" + prompt.encode()) % 1000) / 1000


def make_gate(threshold: float = 0.5, weight: float = 1.0) -> Any:
    """A real (tiny) ``SafetyGate`` for a fake pack: the runner pins its tensors and reads its
    threshold; the fake engine scores prompts with :func:`fake_gate_score`, not with it."""
    import torch

    from acd_engine.safety.gate import SafetyGate

    return SafetyGate(
        (0,), torch.full((4,), weight), torch.zeros(1), torch.zeros(4), torch.ones(4), threshold
    )


class FakePack:
    """The fields of a ``PromptPack`` the runner reads: sp, ap and the gate."""

    def __init__(self, gate: Any = None, sp: float = 0.0) -> None:
        import torch

        self.sp = torch.full((2, 4), sp)
        self.ap = torch.ones(2, 4)
        self.gate = gate


class FakeUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class FakeResult(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: FakeUsage
    method: str
    alpha: float


class FakeGatedResult(FakeResult):
    """What a gated request returns: the plain result fields plus the gate's reading."""

    gate_score: float | None
    gate_flagged: bool | None


def refuse_share(method: str, alpha: float, harmful: bool = True) -> float:
    """How often the fake refuses: plain never, base half, contrast methods grow with alpha
    (acd most); safe prompts (when the fake is told labels) are refused less often."""
    harm, safe = {
        "plain": (0.0, 0.0),
        "base": (0.5, 0.1),
        "nid": (0.45 + 0.4 * alpha, 0.05 + 0.2 * alpha),
        "oid": (0.5 + 0.45 * alpha, 0.05 + 0.3 * alpha),
        "acd": (0.6 + 0.45 * alpha, 0.05 + 0.15 * alpha),
    }.get(method, (0.5 + alpha, 0.5))
    return min(1.0, harm if harmful else safe)


def fake_output(prompt: str, method: str, alpha: float, harmful: bool = True) -> str:
    """Deterministic per prompt; alpha >= 0.75 makes acd loop (a degenerate 'refusal')."""
    if method == "acd" and alpha >= 0.75:
        return LOOP
    bucket = zlib.crc32(prompt.encode()) % 100
    return REFUSAL if bucket < 100 * refuse_share(method, alpha, harmful) else ANSWER


def token_ids(text: str) -> list[int]:
    return [zlib.crc32(word.encode()) % 50_000 for word in text.split()]


class FakeEngine:
    """Satisfies ``EvalModel``; records every call so tests can count work done."""

    model_name = "fake-model"

    def __init__(
        self,
        sleep: float = 0.0,
        safe_prompts: frozenset[str] = frozenset(),
        gate: Any = None,
        pack: bool = False,
    ) -> None:
        """``gate`` (see :func:`make_gate`) gives the fake a pack with that gate: configs with
        ``method="acd", gate=True`` are then routed like the engine (flagged: ungated acd's
        output, else the output of its ``gate_passed_method``) and their results carry ``gate_score`` / ``gate_flagged``.
        ``pack=True`` without a gate gives it a gateless pack."""
        self.sleep = sleep
        self.safe_prompts = safe_prompts  # prompts to treat as benign; others count as harmful
        if gate is not None or pack:
            self.pack = FakePack(gate)
        self.gate = gate
        self.batches: list[tuple[str, float, int, int]] = []  # method, alpha, size, max_new
        # what each generate_batch call was sent: its conversations and its keyword arguments
        # ({} for a call without tools, as every bare call must be; else {"tools": [...]})
        self.sent: list[tuple[list[list[dict[str, str]]], dict[str, Any]]] = []
        self.configs: list[Any] = []
        self.scored: list[str] = []
        self.score_configs: list[Any] = []

    def generate_batch(
        self, batch: Sequence[list[dict[str, str]]], config: Any = None, **kw: Any
    ) -> list[FakeResult]:
        assert config is not None
        assert set(kw) <= {"tools"}, kw
        self.sent.append(([list(m) for m in batch], dict(kw)))
        self.configs.append(config)
        self.batches.append(
            (config.method, config.effective_alpha, len(batch), config.max_new_tokens)
        )
        out = []
        for messages in batch:
            if self.sleep:
                time.sleep(self.sleep)
            prompt = messages[-1]["content"]
            harmful = prompt not in self.safe_prompts
            flagged = self._flagged(prompt, config)
            method, alpha = (config.method, config.effective_alpha)
            if flagged is False:
                method, alpha = config.gate_passed_method, 0.0
            text = fake_output(prompt, method, alpha, harmful)
            ids = token_ids(text)
            fields: dict[str, Any] = {
                "text": text,
                "token_ids": ids,
                "finish_reason": "stop",
                "usage": FakeUsage(prompt_tokens=len(prompt.split()), completion_tokens=len(ids)),
                "method": config.method,
                "alpha": alpha,
            }
            if flagged is None:
                out.append(FakeResult(**fields))
            else:
                score = fake_gate_score(prompt)
                out.append(FakeGatedResult(**fields, gate_score=score, gate_flagged=flagged))
        return out

    def _flagged(self, prompt: str, config: Any) -> bool | None:
        """The gate's verdict on a gated request; None when the request is not gated."""
        if self.gate is None or config.method != "acd" or not config.gate:
            return None
        threshold = config.gate_threshold or self.gate.threshold
        return fake_gate_score(prompt) >= threshold

    def score_continuations(
        self, messages: list[dict[str, str]], continuations: Sequence[str], config: Any = None
    ) -> list[float]:
        """Contrast methods prefer the first (best) answer; single-branch ones the shortest."""
        assert config is not None
        self.scored.append(messages[-1]["content"])
        self.score_configs.append(config)
        routed_plain = self._flagged(messages[-1]["content"], config) is False
        bonus = 100.0 if config.is_contrastive and not routed_plain else 0.0
        return [-float(len(c)) + (bonus if i == 0 else 0.0) for i, c in enumerate(continuations)]

    @property
    def n_generated(self) -> int:
        return sum(size for _, _, size, _ in self.batches)


def eval_options(
    data_dir: Path,
    out: Path,
    *,
    methods: str,
    alphas: str,
    benchmarks: str,
    max_new_tokens: int,
    limit: int = 10,
    batch_size: int = 4,
    **kw: Any,
) -> EvalOptions:
    """``EvalOptions`` for a test run: the given defaults, overridden by ``kw``.

    Each test file fixes its own defaults once, e.g.
    ``opts = functools.partial(eval_options, methods=..., alphas=..., ...)``; a call may
    still override any of them (keywords given to the partial's call win)."""
    from acd_engine.eval.runner import EvalOptions

    base: dict[str, Any] = {
        "methods": methods,
        "alphas": alphas,
        "benchmarks": benchmarks,
        "limit": limit,
        "data_dir": data_dir,
        "out_dir": out,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
    return EvalOptions(**{**base, **kw})


class QuietHandler(BaseHTTPRequestHandler):
    """A stub-server handler that logs nothing and has a one-call reply."""

    def reply(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def local_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 (only) at a free port in a daemon thread; yields the
    base URL ``http://127.0.0.1:<port>`` and shuts the server down on exit."""
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_data_dir(root: Path) -> Path:
    """A small benchmark folder in the shared schema, named like the registered sets."""
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        root / "advbench.jsonl",
        [
            {
                "id": f"advbench-{i:04d}",
                "prompt": f"harmful request {i}",
                "label": "harmful",
                "category": None,
            }
            for i in range(1, 31)
        ],
    )
    write_jsonl(
        root / "dangerousqa.jsonl",
        [
            {
                "id": f"dangerousqa-{i:04d}",
                "prompt": f"dangerous question {i}",
                "label": "harmful",
                "category": None,
            }
            for i in range(1, 11)
        ],
    )
    write_jsonl(
        root / "xstest.jsonl",
        [
            {
                "id": f"xstest-{i:04d}",
                "prompt": f"xstest prompt {i}",
                "label": "safe" if i <= 6 else "harmful",
                "category": "homonyms",
            }
            for i in range(1, 13)
        ],
    )
    write_jsonl(
        root / "alpaca_eval.jsonl",
        [
            {
                "id": f"alpaca_eval-{i:04d}",
                "prompt": f"benign instruction {i}",
                "label": "safe",
                "category": "vicuna",
                "reference": "ref",
            }
            for i in range(1, 9)
        ],
    )
    write_jsonl(
        root / "truthfulqa.jsonl",
        [
            {
                "id": f"truthfulqa-{i:04d}",
                "prompt": f"question {i}?",
                "label": "safe",
                "category": "Misconceptions",
                "best_answer": "the long true answer",
                "correct_answers": ["the long true answer"],
                "incorrect_answers": ["a lie", "another falsehood"],
            }
            for i in range(1, 6)
        ],
    )
    return root
