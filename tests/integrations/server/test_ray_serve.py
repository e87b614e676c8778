"""``acd serve --ray``: a local Ray with 2 replicas (fractional CPUs) serves chat and
streaming, and requests land on both replicas.

Not part of ``make test``: it starts a Ray cluster (several processes, two more copies of
the model) and takes a minute or more on 2 cores. Run it on its own:

    ACD_RAY_TESTS=1 python -m pytest -q tests/integrations/server/test_ray_serve.py
"""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("ACD_RAY_TESTS") != "1",
    reason="starts a local Ray cluster with 2 model replicas (minutes on 2 cores); "
    "run with ACD_RAY_TESTS=1",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_serve_chat_and_streams_on_both():
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    openai = pytest.importorskip("openai")
    from acd_integrations.server import ServerOptions
    from acd_integrations.server.ray_serve import build_application

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ServerOptions(defaults={"max_tokens": 8, "method": "plain"})
        app = build_application(options, replicas=2, num_cpus=0.5)
        serve.run(app, name="acd", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        ready: set[str] = set()
        while len(ready) < 2 and time.monotonic() < deadline:
            try:
                r = httpx.get(url + "/health", timeout=10)
                if r.status_code == 200:
                    ready.add(r.headers["x-acd-replica"])
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert len(ready) == 2, f"replicas ready: {ready}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        msgs = [{"role": "user", "content": "Name three colours."}]
        plain = client.chat.completions.create(model=model, messages=msgs)
        text = plain.choices[0].message.content
        stream = client.chat.completions.create(model=model, messages=msgs, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
        seen = set()
        for _ in range(16):
            raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs)
            seen.add(raw.headers["x-acd-replica"])
            assert raw.parse().choices[0].message.content == text  # every replica agrees
        assert len(seen) == 2, f"requests landed on {seen}"
    finally:
        serve.shutdown()
        ray.shutdown()
