"""HTTP hygiene of ``acd serve``: the body size limit, SSE keep-alives, the wait for a queued
answer that notices a client leaving, and CORS.

Each is the server's defence against a client it cannot trust to behave: a body of any size
(``await request.json()`` would hold all of it), a proxy that closes an idle stream or
buffers it, a client that leaves while its request waits for the engine (it kept its slot
until the first token), a browser page of another origin. None of it decodes anything.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Generic, TypeVar

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware

from acd_integrations.server.protocol import ApiError

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_SSE_KEEPALIVE_S",
    "KEEPALIVE",
    "SSE_HEADERS",
    "WAITING",
    "ClientGone",
    "EventWaiter",
    "add_cors",
    "check_origins",
    "read_body",
    "until_gone",
]

T = TypeVar("T")

#: The largest request body read (``--max-body-bytes``). The largest legitimate body is a
#: full context window: 128k tokens of non-ASCII text, which JSON clients escape as
#: ``\uXXXX`` (6 bytes a character), come to about 1.5 MB; 4 MiB holds that with tools and
#: history, while no request can make the server hold more than a few MiB.
DEFAULT_MAX_BODY_BYTES = 4 * 2**20

#: Seconds without a byte on an SSE stream before a keep-alive comment (``--sse-keepalive``):
#: under the 30-60 s idle timeouts of common proxies and load balancers.
DEFAULT_SSE_KEEPALIVE_S = 15.0

#: An SSE comment line: clients ignore it, proxies see bytes and keep the stream open.
KEEPALIVE = b": keep-alive\n\n"

#: ``no-cache``: no cache or proxy may store or replay a stream; ``X-Accel-Buffering: no``:
#: nginx (and proxies that copy it) pass each event on at once instead of buffering.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

#: How often a wait polls for a client that went away.
DISCONNECT_POLL_S = 0.25

_ORIGIN = re.compile(r"https?://[^/\s?#]+")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _Waiting:
    """The type of :data:`WAITING`."""

    def __repr__(self) -> str:
        return "WAITING"


#: What :meth:`EventWaiter.next` returns when no event came within the time it was given.
WAITING = _Waiting()


def _too_large(limit: int, got: str) -> ApiError:
    return ApiError(
        413,
        f"the request body must be at most {limit} bytes (acd serve --max-body-bytes), got {got}",
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes before more is read.

    A ``Content-Length`` over the limit is refused before a byte of the body is read; a body
    without one (chunked) is counted as it arrives and refused at the first chunk past the
    limit, so no more than ``limit`` bytes (plus one chunk) are ever held.

    Raises:
        ApiError: 413 past the limit; 400 for a ``Content-Length`` that is not a number.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"Content-Length must be a number of bytes, got {declared!r}")
        if int(declared) > limit:
            raise _too_large(limit, f"Content-Length {int(declared)}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def until_gone(request: Request, task: asyncio.Future[T]) -> T:
    """``task``'s result, unless the client leaves first.

    For every wait of an admitted request (preparing it, a whole plain generation), so a
    client that leaves frees its slot within :data:`DISCONNECT_POLL_S`, whatever it waits on.

    Raises:
        ClientGone: The client disconnected first; ``task`` is cancelled (for the engine's
            own tasks that sets its cancel event: it stops before the next token).
    """
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientGone


class EventWaiter(Generic[T]):
    """Waits for the next item of an async iterator for at most a given time.

    The wait for an item is a task that outlives a timeout, so a caller can send something
    (a keep-alive) or check on its client, then wait on for the same item: the engine's
    stream is never re-entered or abandoned half-read. :meth:`aclose` cancels that task
    before it closes the iterator, which sets the engine's cancel event.
    """

    def __init__(self, events: AsyncIterator[T]) -> None:
        self.events = events
        self.pending: asyncio.Task[T] | None = None

    async def _next(self) -> T:
        return await anext(self.events)

    async def next(self, timeout: float | None) -> T | _Waiting:
        """The next item, or :data:`WAITING` after ``timeout`` seconds without one.

        Raises:
            StopAsyncIteration: The iterator is exhausted.
            Exception: Whatever the iterator raised.
        """
        if self.pending is None:
            self.pending = asyncio.ensure_future(self._next())
        done, _ = await asyncio.wait({self.pending}, timeout=timeout)
        if not done:
            return WAITING
        task, self.pending = self.pending, None
        return task.result()

    async def next_watched(self, request: Request, timeout: float) -> T | _Waiting:
        """:meth:`next`, polling ``request`` for a disconnect while it waits.

        Raises:
            ClientGone: The client disconnected first (the item is still pending:
                :meth:`aclose` stops it).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            item = await self.next(max(0.0, min(DISCONNECT_POLL_S, left)))
            if item is not WAITING:
                return item
            if await request.is_disconnected():
                raise ClientGone
            if loop.time() >= deadline:
                return WAITING

    async def aclose(self) -> None:
        """Stop the pending wait, or close the iterator: either way the engine stops."""
        pending, self.pending = self.pending, None
        if pending is not None and not pending.done():
            # Cancelling the wait throws into the iterator where it waits, and its own
            # cleanup (aiter_in_thread's) sets the engine's cancel event. Closing it instead
            # would fail: an async generator cannot be closed while it runs.
            pending.cancel()
            return
        if pending is not None and not pending.cancelled():
            pending.exception()  # looked at: asyncio logs an exception nobody retrieved
        aclose = getattr(self.events, "aclose", None)
        if aclose is not None:
            await aclose()


def check_origins(origins: Sequence[str]) -> tuple[str, ...]:
    """``origins`` if each is ``*`` or a browser origin (``https://app.example:8443``).

    A browser sends ``Origin`` as scheme, host and port only; an entry with a path or a
    trailing slash would never match one, and CORS would fail without a word.

    Raises:
        ValueError: The first entry that is no origin, in the house style.
    """
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ValueError(
                "must be '*' or origins such as 'http://localhost:3000' (scheme, host and "
                f"port; no path or trailing slash), got {origin!r}"
            )
    return tuple(origins)


def add_cors(app: FastAPI, origins: Sequence[str]) -> None:
    """Let pages of ``origins`` call the API from a browser (nothing when empty).

    Added last, so it is the outermost layer: a preflight ``OPTIONS`` is answered before
    routing and before the API key check (browsers send no credentials with it). Requests
    carry their key in ``Authorization``, never a cookie, so credentials stay off and
    ``*`` is allowed. Any request header is allowed (the ``openai`` JS SDK sends its own
    ``x-stainless-*`` ones); ``Retry-After`` and the replica header are readable by the page.
    """
    if not origins:
        return
    kwargs: dict[str, Any] = {
        "allow_origins": list(origins),
        "allow_methods": ["GET", "POST", "OPTIONS"],
        "allow_headers": ["*"],
        "allow_credentials": False,
        "expose_headers": ["Retry-After", "X-Acd-Replica"],
        "max_age": 600,
    }
    app.add_middleware(CORSMiddleware, **kwargs)
