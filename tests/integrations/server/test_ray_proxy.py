"""Ray's "dropped due to backpressure" answer becomes the 429 ``acd serve`` documents.

``acd_integrations.ray_proxy`` runs in Ray Serve's proxy; here it wraps stand-in ASGI apps
that answer as Ray's proxy and as an ACD replica do (the real proxy: ``test_ray_serve.py``).
"""

from __future__ import annotations

import json

import pytest

from acd_integrations.ray_proxy import PROXY_CALLBACK, BackpressureAs429, proxy_middlewares

# Ray 2.46's words (ray.serve.exceptions.BackPressureError), sent as text/plain with a 503.
RAY_REFUSAL = b"Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1)."


def responder(status: int, body: bytes, headers=(), chunks: int = 1):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        step = max(1, len(body) // chunks)
        parts = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
        for i, part in enumerate(parts):
            await send(
                {"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1}
            )

    return app


async def call(app) -> tuple[int, dict[str, str], bytes]:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await BackpressureAs429(app)(scope, receive, send)
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], headers, body


@pytest.mark.parametrize("status", [503, 429])  # 503 in Ray 2.46; 429 where Ray is set to it
@pytest.mark.parametrize("chunks", [1, 3])
async def test_rays_backpressure_refusal_is_a_429_in_openais_shape(status, chunks):
    ray = responder(status, RAY_REFUSAL, [(b"content-type", b"text/plain")], chunks)
    got_status, headers, body = await call(ray)
    assert got_status == 429
    assert headers["retry-after"] == "1"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}  # the app's error shape
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "max_queued_requests=1" in error["message"]  # Ray's figures are kept


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [
        # A replica's own answers carry x-acd-replica: never rewritten, even a 503 that
        # happened to mention backpressure.
        (
            503,
            b'{"error": {"message": "backpressure: still loading"}}',
            [(b"x-acd-replica", b"h:1")],
        ),
        (429, b'{"error": {"message": "busy"}}', [(b"X-ACD-Replica", b"h:1")]),
        # Ray's other 503 (no replica of the deployment is up): unchanged.
        (503, b"Deployment ACDReplica is unavailable.", []),
        (200, RAY_REFUSAL, []),
    ],
)
async def test_every_other_answer_passes_unchanged(status, body, headers):
    assert await call(responder(status, body, headers)) == (
        status,
        {k.decode(): v.decode() for k, v in headers},
        body,
    )


def test_the_callback_ray_imports_names_this_middleware():
    import importlib

    module, name = PROXY_CALLBACK.split(":")
    [middleware] = getattr(importlib.import_module(module), name)()
    assert middleware.cls is BackpressureAs429
    assert proxy_middlewares()[0].cls is BackpressureAs429


def test_the_proxy_imports_neither_the_engine_nor_torch():
    import subprocess
    import sys

    code = (
        "import sys, acd_integrations.ray_proxy as p; p.proxy_middlewares(); "
        "print(sorted(m for m in ('torch', 'acd_engine', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
