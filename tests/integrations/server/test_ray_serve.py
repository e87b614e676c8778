"""``acd serve --ray`` for real: the single-node recipe of docs/serving.md.

One ``acd serve --ray`` process (a local Ray, 2 replicas of the default model at half a
CPU each, ``--max-concurrency 1`` per replica) on a loopback port, driven by the official
``openai`` client: chat and a stream on both replicas; with both replicas full, two requests
wait in Ray's queue and the next gets 429 with ``Retry-After`` in OpenAI's shape; the
waiting ones are answered once the streams holding the replicas go away, and their slots
come back; SIGTERM stops Serve, Ray and every process they started.

Not part of ``make test``: it starts a Ray cluster (several processes, two more copies of
the model), about a minute on 2 cores. ``make ray-test`` installs the ``ray`` extra and
runs it (with ``ACD_RAY_TESTS=1``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import httpx
import pytest

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("ACD_RAY_TESTS") != "1",
        reason="starts a local Ray cluster with 2 model replicas (a minute on 2 cores); "
        "run make ray-test",
    ),
    pytest.mark.allow_hosts(["127.0.0.1"]),
]

START_TIMEOUT_S = 240
PROMPT = [{"role": "user", "content": "Name three colours."}]
LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@dataclass
class RayServer:
    url: str
    process: subprocess.Popen
    log: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory) -> Iterator[RayServer]:
    pytest.importorskip("ray.serve")
    port = _free_port()
    log = str(tmp_path_factory.mktemp("ray") / "serve.log")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}  # offline: no usage report
    env.pop("RAY_ADDRESS", None)  # a local Ray, never a cluster from the environment
    command = [
        *(sys.executable, "-m", "acd_engine.cli.main", "serve", "--ray"),
        *("--replicas", "2", "--num-cpus-per-replica", "0.5", "--max-concurrency", "1"),
        *("--method", "plain", "--max-tokens", "8", "--host", "127.0.0.1", "--port", str(port)),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        ready: set[str] = set()  # both replicas loaded: /health 200 from two of them
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(ready) < 2:
            if process.poll() is not None:
                pytest.fail(f"acd serve --ray exited {process.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"replicas ready after {START_TIMEOUT_S} s: {ready}\n{_tail(log)}")
            try:
                r = httpx.get(url + "/health", timeout=10)
                if r.status_code == 200:
                    ready.add(r.headers["x-acd-replica"])
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield RayServer(url, process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(ray_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=ray_server.url + "/v1", api_key="unused", max_retries=0)


def test_the_openai_client_gets_chat_and_streams_from_both_replicas(client):
    model = client.models.list().data[0].id
    text = client.chat.completions.create(model=model, messages=PROMPT).choices[0].message.content
    assert text
    stream = client.chat.completions.create(model=model, messages=PROMPT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    seen = set()
    for _ in range(16):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=PROMPT)
        seen.add(raw.headers["x-acd-replica"])
        assert raw.parse().choices[0].message.content == text  # every replica agrees (greedy)
    assert len(seen) == 2, f"16 requests landed on {seen}"


def test_past_the_bounded_queue_a_request_gets_429_and_no_answer_is_lost(client):
    import openai

    model = client.models.list().data[0].id

    def chat(_: int = 0):
        try:
            return client.chat.completions.create(model=model, messages=PROMPT)
        except openai.RateLimitError as exc:
            return exc

    holders = []
    with ThreadPoolExecutor(3) as pool:
        try:
            # A stream's headers come with its first token: once both are open, each replica
            # holds its one request (--max-concurrency 1); Ray never sends a replica more.
            for _ in range(2):
                cm = client.chat.completions.with_streaming_response.create(
                    model=model, messages=LONG, max_tokens=1000, stream=True
                )
                holders.append((cm, cm.__enter__()))
            replicas = {response.headers["x-acd-replica"] for _, response in holders}
            assert len(replicas) == 2, "Ray sent the second stream to the busy replica"
            # Ray's proxy queues as many as the replicas take (2 x --max-concurrency 1) and
            # refuses the next, at once.
            waiting = [pool.submit(chat) for _ in range(3)]
            done, _ = wait(waiting, timeout=60, return_when=FIRST_COMPLETED)
            assert len(done) == 1, "requests were answered while both replicas were full"
            [first] = done
            queued = [f for f in waiting if f is not first]
            refused = first.result()
            assert isinstance(refused, openai.RateLimitError), refused
            response = refused.response
            assert response.status_code == 429
            assert response.headers["retry-after"] == "1"
            assert "x-acd-replica" not in response.headers  # Ray's refusal, mapped
            error = response.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
            assert "queue" in error["message"] and "backpressure" in error["message"]
            for _, stream in holders:  # both were still decoding: the replicas really were full
                assert next(stream.iter_lines(), None) is not None
        finally:
            for cm, _ in holders:  # the clients leave mid-stream: Ray cancels, slots free up
                cm.__exit__(None, None, None)
        for future in queued:  # the queued requests are answered, not dropped
            answer = future.result(timeout=60)
            assert not isinstance(answer, Exception), answer
            assert answer.choices[0].message.content

    deadline = time.monotonic() + 30
    while True:  # both slots come back: two requests at once are both answered again
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(chat, range(2)))
        if not any(isinstance(a, Exception) for a in answers):
            break
        assert time.monotonic() < deadline, "the streams' slots did not come back in 30 s"
        time.sleep(0.5)


def test_sigterm_stops_serve_ray_and_every_process_they_started(ray_server):
    psutil = pytest.importorskip("psutil")
    children = psutil.Process(ray_server.process.pid).children(recursive=True)
    assert children, "a local Ray runs in processes of its own"
    ray_server.process.send_signal(signal.SIGTERM)  # what Kubernetes and systemd send
    assert ray_server.process.wait(timeout=90) == 0, _tail(ray_server.log)
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(ray_server.url + "/health", timeout=5)
