"""``acd serve`` against clients it cannot trust: oversized bodies, clients that leave while
queued, proxies that close idle streams, pages of other origins, and OpenAI's sampling
fields (applied, or refused naming the field; never dropped).

A request is held in the queue by holding the engine's lock, as the 429 test does; a
long prefill is a first chunk that comes late.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import httpx
import pytest

from acd_engine import ConfigError
from acd_integrations.server import ServerOptions

openai = pytest.importorskip("openai")

# On torch and on llama.cpp (``acd serve --backend llamacpp``; skipped without the extra):
# ``server_engine`` is the engine of the backend, see conftest.py.
pytestmark = pytest.mark.server_backends("torch", "llamacpp")

CHAT = "/v1/chat/completions"
FORCED = 1234  # a token id logit_bias forces


def _body(model_id: str, **extra) -> dict:
    return {
        "model": model_id,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        **extra,
    }


def _metric(url: str, line: str) -> bool:
    return line in httpx.get(url + "/metrics").text


def _wait_for(url: str, line: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _metric(url, line):
        assert time.monotonic() < deadline, f"never saw {line!r} in /metrics"
        time.sleep(0.05)


@contextmanager
def _raw_post(url: str, body: bytes, length: int | None = None) -> Iterator[socket.socket]:
    """A POST on a socket of our own, so the test decides when the client leaves."""
    parts = urlparse(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    try:
        yield sock
    finally:
        sock.close()


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1]), rest


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0)


# -- options -------------------------------------------------------------------------------


def test_options_refuse_bad_limits_and_origins():
    with pytest.raises(ConfigError, match="max_body_bytes must be >= 1, got 0"):
        ServerOptions(max_body_bytes=0)
    with pytest.raises(ConfigError, match="sse_keepalive must be a finite number, got inf"):
        ServerOptions(sse_keepalive=float("inf"))
    with pytest.raises(ConfigError, match="got 'http://localhost:3000/'"):
        ServerOptions(cors_origins=["http://localhost:3000/"])  # a trailing slash never matches
    both = ServerOptions(cors_origins=["http://a.test:3000,https://b.test", "http://a.test:3000"])
    assert both.cors_origins == ("http://a.test:3000", "https://b.test")
    assert ServerOptions().cors_origins == ()  # CORS off by default


def test_cli_refuses_a_bad_origin_in_one_line():
    from typer.testing import CliRunner

    from acd_engine.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--cors-origin", "localhost:3000"])
    assert result.exit_code == 2
    assert "cors_origins must be '*' or origins such as" in result.output


# -- body size -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_body_url(start_server) -> Iterator[str]:
    with start_server(max_body_bytes=4096) as url:
        yield url


def test_a_body_over_the_limit_is_413_in_openai_s_shape(small_body_url, model_id):
    big = _body(model_id, user="x" * 8000)
    res = httpx.post(small_body_url + CHAT, json=big)
    assert res.status_code == 413
    error = res.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert "must be at most 4096 bytes (acd serve --max-body-bytes)" in error["message"]
    assert _metric(small_body_url, 'acd_requests_total{endpoint="chat",status="413"}')
    client = openai.OpenAI(base_url=small_body_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**big)
    assert info.value.status_code == 413
    assert httpx.post(small_body_url + CHAT, json=_body(model_id), timeout=120).status_code == 200


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(
    small_body_url,
):
    """Headers that announce 10 MB, and no body at all: the answer comes anyway."""
    with _raw_post(small_body_url, b"", length=10 * 2**20) as sock:
        status, body = _read_response(sock)
    assert status == 413
    assert "got Content-Length 10485760" in json.loads(body)["error"]["message"]


def test_a_chunked_body_is_counted_as_it_arrives(small_body_url, model_id):
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 64 KiB in all, never announced
            sent.append(1)
            yield b" " * 1024

    res = httpx.post(small_body_url + CHAT, content=chunks(), timeout=60)
    assert res.status_code == 413
    assert "got more than 4096" in res.json()["error"]["message"]
    small = json.dumps(_body(model_id)).encode()
    ok = httpx.post(small_body_url + CHAT, content=iter([small[:10], small[10:]]), timeout=120)
    assert ok.status_code == 200  # a chunked body under the limit is read as usual


# -- SSE -----------------------------------------------------------------------------------


@pytest.fixture()
def late_first_chunk(server_engine, monkeypatch):
    """The engine's first chunk comes ``delay[0]`` seconds late (a long prefill)."""
    delay = [0.0]
    real = server_engine.stream_chunks

    def slow(*args, **kwargs):
        inner = real(*args, **kwargs)
        try:
            first = True
            for chunk in inner:
                if first:
                    time.sleep(delay[0])
                    first = False
                yield chunk
        finally:
            inner.close()

    monkeypatch.setattr(server_engine, "stream_chunks", slow)
    return delay


def test_a_stream_says_no_cache_and_no_buffering(server_url, model_id):
    body = _body(model_id, stream=True)
    with httpx.stream("POST", server_url + CHAT, json=body, timeout=120) as res:
        lines = [line for line in res.iter_lines() if line]
    assert res.headers["cache-control"] == "no-cache"
    assert res.headers["x-accel-buffering"] == "no"
    assert res.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and not any(line.startswith(":") for line in lines)


def test_a_long_prefill_gets_keepalive_comments_and_clients_ignore_them(
    start_server, model_id, late_first_chunk
):
    with start_server(sse_keepalive=0.2) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "Name a fruit."}]
        plain = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=8)
        late_first_chunk[0] = 1.0
        body = {"model": model_id, "messages": msgs, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", url + CHAT, json=body, timeout=120) as res:
            lines = [line for line in res.iter_lines() if line]
        assert res.status_code == 200 and res.headers["cache-control"] == "no-cache"
        keepalives = [i for i, line in enumerate(lines) if line == ": keep-alive"]
        first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
        assert len(keepalives) >= 3 and max(keepalives) < first_data  # while it waited
        streamed = client.chat.completions.create(
            model=model_id, messages=msgs, max_tokens=8, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == plain.choices[0].message.content  # the comments change nothing


# -- clients that leave while queued -------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "keepalive"),
    [(True, 30.0), (True, 0.2), (False, 30.0)],
    ids=["stream-before-any-byte", "stream-after-keepalives", "plain"],
)
def test_a_queued_client_that_leaves_frees_its_slot(
    start_server, model_id, server_engine, stream, keepalive
):
    """The engine is busy (its lock held): the request is admitted and waits. Its client
    leaves; the slot must come back while the engine is still busy, not at a first token."""
    body = json.dumps(_body(model_id, stream=stream)).encode()
    with start_server(max_concurrency=1, sse_keepalive=keepalive) as url:
        with server_engine._lock:
            with _raw_post(url, body):
                _wait_for(url, "acd_queue_depth 1.0")
                time.sleep(keepalive if keepalive < 1 else 0.3)  # keep-alives, if any, began
            _wait_for(url, "acd_queue_depth 0.0", timeout=10)  # the engine is still busy
            assert _metric(url, 'status="499"')
            # The slot is free: the next request is admitted (and waits), not refused.
            answers: list[httpx.Response] = []
            worker = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(url + CHAT, json=_body(model_id), timeout=120)
                )
            )
            worker.start()
            _wait_for(url, "acd_queue_depth 1.0")
        worker.join(timeout=120)
        assert answers and answers[0].status_code == 200
    assert server_engine._lock.acquire(timeout=30)  # nothing was left holding the engine
    server_engine._lock.release()


@pytest.mark.parametrize("keepalive", [30.0, 0.2], ids=["before-any-byte", "after-keepalives"])
def test_a_stream_that_leaves_before_its_first_token_frees_its_slot(
    start_server, model_id, server_engine, monkeypatch, keepalive
):
    """The wait inside the engine's stream (the coalescer's queue, the prefill): the
    engine holds the first chunk until the test lets it go, long after the client left."""
    held = threading.Event()
    entered = threading.Event()
    real = server_engine.stream_chunks

    def holding(*args, **kwargs):
        entered.set()
        held.wait(60)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(server_engine, "stream_chunks", holding)
    body = json.dumps(_body(model_id, stream=True)).encode()
    try:
        with start_server(max_concurrency=1, sse_keepalive=keepalive) as url:
            with _raw_post(url, body) as sock:
                assert entered.wait(30)
                time.sleep(0.6)  # keep-alives, if any, have begun
                if keepalive < 1:
                    assert b": keep-alive" in sock.recv(65536)
            _wait_for(url, "acd_queue_depth 0.0", timeout=10)  # first chunk still held
            assert _metric(url, 'status="499"')
            # Let the stream go while the server runs: stopping it waits (up to 30 s) for
            # the request still held in the engine.
            held.set()
    finally:
        held.set()


# -- OpenAI's sampling fields --------------------------------------------------------------


def test_logit_bias_and_penalties_are_applied(client, model_id, server_engine):
    forced = server_engine.generate(
        "Hi", method="plain", max_new_tokens=3, logit_bias={FORCED: 100}
    )
    assert forced.token_ids == [FORCED] * 3
    kwargs = {"max_tokens": 3, "extra_body": {"method": "plain"}}
    res = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Hi"}],
        logit_bias={str(FORCED): 100},
        **kwargs,
    )
    assert res.choices[0].message.content == forced.text
    msgs = [{"role": "user", "content": "Write the word 'la' ten times."}]
    penalised = server_engine.generate(
        msgs, method="plain", max_new_tokens=12, frequency_penalty=2.0
    )
    assert penalised.text != server_engine.generate(msgs, method="plain", max_new_tokens=12).text
    for stream in (False, True):
        out = client.chat.completions.create(
            model=model_id,
            messages=msgs,
            max_tokens=12,
            frequency_penalty=2.0,
            stream=stream,
            extra_body={"method": "plain"},
        )
        text = (
            "".join(c.choices[0].delta.content or "" for c in out if c.choices)
            if stream
            else out.choices[0].message.content
        )
        assert text == penalised.text


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("presence_penalty", 2.5, "presence_penalty must be <= 2.0, got 2.5"),
        ("frequency_penalty", -3, "frequency_penalty must be >= -2.0, got -3"),
        ("logit_bias", {"abc": 1}, "logit_bias must map token ids (integers >= 0) to biases"),
        ("logit_bias", {"5": 150}, "got 150 for token 5"),
    ],
)
def test_bad_sampling_fields_are_400_naming_the_field(client, model_id, field, value, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Hi"}], **{field: value}
        )
    assert info.value.body["param"] == field
    assert message in info.value.body["message"]


def test_a_token_outside_the_vocabulary_is_a_400(client, model_id, server_engine):
    vocab = server_engine.model.config.vocab_size
    with pytest.raises(openai.BadRequestError, match=f"vocabulary size {vocab}") as info:
        client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            logit_bias={str(vocab): 1},
            stream=True,
        ).close()
    assert info.value.body["param"] == "logit_bias"


def test_defaults_are_accepted(client, model_id):
    res = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
    )
    assert res.choices[0].message.content is not None


# -- CORS ----------------------------------------------------------------------------------

PREFLIGHT = {
    "Origin": "http://localhost:3000",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
}


def test_cors_is_off_by_default(server_url):
    res = httpx.options(server_url + CHAT, headers=PREFLIGHT)
    assert "access-control-allow-origin" not in res.headers
    get = httpx.get(server_url + "/health", headers={"Origin": "http://localhost:3000"})
    assert "access-control-allow-origin" not in get.headers


def test_cors_allows_the_origins_it_is_given(start_server, model_id):
    with start_server(cors_origins=["http://localhost:3000"], api_key="k") as url:
        pre = httpx.options(url + CHAT, headers=PREFLIGHT)  # no key: browsers send none
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "x-stainless-os" in pre.headers["access-control-allow-headers"].lower()
        res = httpx.post(
            url + CHAT,
            json=_body(model_id),
            headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k"},
            timeout=120,
        )
        assert res.status_code == 200
        assert res.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "retry-after" in res.headers["access-control-expose-headers"].lower()
        other = httpx.options(url + CHAT, headers={**PREFLIGHT, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
