"""Streams hold no lock between tokens: a stream that is started and left, closed, dropped
or read from two threads never blocks anyone, and closing one stops its decode. Concurrent
calls of every kind give what they give alone.
"""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from acd_engine import DecodingConfig

LONG = DecodingConfig(method="oid", max_new_tokens=200)


def _forwards(engine, request) -> list[int]:
    """Counts the model's forwards (a forward hook), for 'did decoding stop?' checks."""
    count = [0]
    hook = engine.model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    request.addfinalizer(hook.remove)
    return count


def test_an_unconsumed_stream_does_not_block_a_concurrent_generate(tiny_engine):
    stream = tiny_engine.stream_chunks("tell me a long story", LONG)
    first = next(stream)  # started, then left alone
    assert first.text or first.finish_reason
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(tiny_engine.generate, "hello", max_new_tokens=3, method="base")
        assert other.result(timeout=60).usage.completion_tokens <= 3
    stream.close()


def test_closing_or_dropping_a_stream_stops_its_decode(tiny_engine, request):
    for drop in (False, True):
        count = _forwards(tiny_engine, request)
        stream = tiny_engine.stream_chunks("tell me a long story", LONG)
        next(stream)
        if drop:
            del stream
            gc.collect()
        else:
            stream.close()
        with tiny_engine._lock:  # the worker released the engine
            pass
        time.sleep(0.2)
        assert count[0] < LONG.max_new_tokens  # it stopped well before its 200 tokens


def test_a_stream_read_from_two_threads_gives_the_whole_answer(tiny_engine):
    cfg = DecodingConfig(method="oid", max_new_tokens=24)
    expected = tiny_engine.generate("count to ten", cfg).text
    stream = tiny_engine.stream("count to ten", cfg)
    parts: list[str] = []
    with ThreadPoolExecutor(2) as pool:  # what Starlette's iterate_in_threadpool does
        while True:
            piece = pool.submit(next, stream, None).result(timeout=60)
            if piece is None:
                break
            parts.append(piece)
    assert "".join(parts) == expected
    assert tiny_engine._lock.acquire(timeout=10)
    tiny_engine._lock.release()


def test_sixteen_concurrent_mixed_calls_equal_serial(tiny_engine):
    cfg = DecodingConfig(method="oid", max_new_tokens=12)
    prompts = [f"question number {i}" for i in range(16)]

    def run(i: int):
        p = prompts[i]
        kind = i % 4
        if kind == 0:
            return "".join(tiny_engine.stream(p, cfg))
        if kind == 1:
            return tiny_engine.generate(p, cfg).text
        if kind == 2:
            return [r.text for r in tiny_engine.generate_batch([p, p + "!"], cfg)]
        return tiny_engine.score_continuations(p, ["yes", "no"], cfg)

    serial = [run(i) for i in range(16)]
    start = threading.Barrier(16)

    def together(i: int):
        start.wait(timeout=60)
        return run(i)

    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(together, range(16), timeout=300))
    for i, (a, b) in enumerate(zip(concurrent, serial, strict=True)):
        if i % 4 == 3:
            assert a == pytest.approx(b, abs=1e-4)
        else:
            assert a == b
