"""What Ray Serve's HTTP proxy runs for ``acd serve --ray``: a full queue answered as 429.

Under Ray, a replica gets at most ``--max-concurrency`` requests and Ray's proxy queues the
rest, at most ``max_queued_requests`` of them; one more is refused by Ray itself, with a
503 and a plain-text body (Ray 2.46; later releases may answer 429 but still in their own
words). ``acd serve`` documents 429, ``Retry-After`` and OpenAI's error shape for "busy,
retry shortly", and clients act on it (the ``openai`` SDK retries a 429, not a 503 it cannot
parse). :class:`BackpressureAs429` rewrites exactly that answer of Ray's and nothing else:
a response without the ``x-acd-replica`` header (so not from an ACD replica) whose status is
503 or 429 and whose body says "backpressure".

Ray loads it in every proxy through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(:data:`PROXY_CALLBACK_ENV`), which names :func:`proxy_middlewares`: ``run_ray`` sets it
before it starts a local Ray; on a cluster each node's environment needs it (the image of
``deploy/Dockerfile`` sets it). This module is apart from ``acd_integrations.server`` so the
proxy imports only Starlette, never the engine and torch.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["PROXY_CALLBACK", "PROXY_CALLBACK_ENV", "BackpressureAs429", "proxy_middlewares"]

#: The variable Ray Serve's proxy reads (a ``module:function`` returning Starlette middlewares).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
#: Its value for ACD.
PROXY_CALLBACK = "acd_integrations.ray_proxy:proxy_middlewares"

_REPLICA_HEADER = b"x-acd-replica"  # every response of an ACD replica has it (server/app.py)
_RETRY_AFTER_S = "1"  # as the app's own 429


class BackpressureAs429:
    """ASGI middleware: Ray's "dropped due to backpressure" answer -> OpenAI's 429."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] | None = None  # a start line that may be Ray's refusal
        body = b""

        async def send_mapped(message: Any) -> None:
            nonlocal held, body
            if message["type"] == "http.response.start" and _may_be_refusal(message):
                held = message
                return
            if held is None:
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            start, held = held, None
            if b"backpressure" in body.lower():
                reply = _busy_body(body.decode("utf-8", "replace").strip())
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(reply)).encode()),
                    (b"retry-after", _RETRY_AFTER_S.encode()),
                ]
                await send({"type": "http.response.start", "status": 429, "headers": headers})
                await send({"type": "http.response.body", "body": reply})
            else:  # another 503 of Ray's (a deployment not ready): unchanged
                await send(start)
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_mapped)


def _may_be_refusal(start: dict[str, Any]) -> bool:
    if start["status"] not in (429, 503):
        return False
    return all(name.lower() != _REPLICA_HEADER for name, _ in start.get("headers", []))


def _busy_body(ray_says: str) -> bytes:
    message = (
        "the server is busy: every replica holds --max-concurrency requests and the queue "
        f"of waiting requests is full (Ray Serve: {ray_says}); retry shortly"
    )
    error = {"message": message, "type": "rate_limit_error", "param": None}
    return json.dumps({"error": {**error, "code": "rate_limit_exceeded"}}).encode()


def proxy_middlewares() -> list[Any]:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` calls in each Ray Serve proxy."""
    from starlette.middleware import Middleware

    return [Middleware(BackpressureAs429)]
