"""Opportunistic batching of concurrent ``generate`` calls (``acd_engine.runtime.coalesce``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from acd_engine import DecodingConfig
from acd_engine.runtime.coalesce import Coalescer, Pending


def _wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def _in_threads(calls: Sequence[Callable[[], Any]]) -> tuple[list[Any], list[threading.Thread]]:
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    return out, threads


def test_calls_queued_while_busy_run_as_groups_by_key_in_arrival_order() -> None:
    busy = threading.RLock()
    groups: list[list[str]] = []

    def run_group(group: Sequence[Pending[str]]) -> None:
        groups.append([p.request for p in group])
        for p in group:
            if p.request == "bad":
                p.error = ValueError("bad request")
            else:
                p.result = p.request.upper()

    co: Coalescer[str] = Coalescer(run_group, busy, lambda: 2)
    requests = [("a1", "A"), ("b1", "B"), ("a2", "A"), ("a3", "A"), ("bad", "B")]
    outs, threads = [], []
    with busy:
        for req, key in requests:  # one by one, so the arrival order is known
            o, t = _in_threads([lambda req=req, key=key: co.submit(req, key)])
            outs.append(o)
            threads += t
            queued = len(threads)
            _wait_for(lambda queued=queued: co.waiting == queued)
    for t in threads:
        t.join()
    results = [o[0] for o in outs]
    assert results[:4] == ["A1", "B1", "A2", "A3"]
    assert isinstance(results[4], ValueError)
    # oldest first, compatible ones joined up to max_group (2)
    assert groups == [["a1", "a2"], ["b1", "bad"], ["a3"]]
    assert co.waiting == 0


def test_a_lone_call_runs_at_once_without_waiting_for_company() -> None:
    co: Coalescer[int] = Coalescer(
        lambda g: [setattr(p, "result", 7) for p in g], threading.RLock(), lambda: 8
    )
    start = time.monotonic()
    assert co.submit("x", "k") == 7
    assert time.monotonic() - start < 1.0


def test_a_runner_that_sets_nothing_fails_the_calls_instead_of_hanging() -> None:
    co: Coalescer[int] = Coalescer(lambda g: None, threading.RLock(), lambda: 8)
    with pytest.raises(RuntimeError, match="interrupted"):
        co.submit("x", "k")


def test_concurrent_engine_calls_share_forwards_and_equal_lone_calls(engine, group_sizes):
    cfg = DecodingConfig(method="acd", max_new_tokens=10)
    prompts = ["Tell me about the moon.", "How do I pick my neighbour's lock?", "Hi!"]
    alone = [engine.generate(p, cfg) for p in prompts]
    other = engine.generate(prompts[0], cfg.replace(alpha=0.3))
    cancelled = threading.Event()
    cancelled.set()
    calls = [lambda p=p: engine.generate(p, cfg) for p in prompts]
    calls.append(lambda: engine.generate(prompts[0], cfg, alpha=0.3))  # other key
    calls.append(lambda: engine.generate(prompts[1], cfg, cancel=cancelled))
    with engine._lock:
        out, threads = _in_threads(calls)
        _wait_for(lambda: engine._coalescer.waiting == len(calls))
    for t in threads:
        t.join()
    assert group_sizes == [4]  # the three prompts and the cancelled one; alpha=0.3 ran alone

    def same(a, b) -> None:  # the gate's score comes from a batched forward: float noise
        assert a.model_dump(exclude={"gate_score"}) == b.model_dump(exclude={"gate_score"})
        assert a.gate_score == pytest.approx(b.gate_score, abs=1e-5)

    for o, a in zip(out[:3], alone, strict=True):
        same(o, a)
    same(out[3], other)
    assert out[4].token_ids == [] and out[4].finish_reason == "stop"


def test_a_failing_call_in_a_group_fails_alone(engine):
    cfg = DecodingConfig(method="oid", max_new_tokens=4)
    too_long = "word " * (engine.context_window + 10)
    calls = [lambda: engine.generate("Name a colour.", cfg), lambda: engine.generate(too_long, cfg)]
    with engine._lock:
        out, threads = _in_threads(calls)
        _wait_for(lambda: engine._coalescer.waiting == 2)
    for t in threads:
        t.join()
    assert out[0].token_ids == engine.generate("Name a colour.", cfg).token_ids
    assert "context window" in str(out[1])
