"""Run the (blocking, thread-safe) engine from asyncio without blocking the event loop.

Both adapters need the same two things: await one generation, and iterate a stream of
chunks, each in a worker thread, with cancellation that actually stops the model. The
engine checks a ``threading.Event`` before every token, so cancelling the awaiting task
(or closing the async iterator early) sets that event and the worker finishes within one
decode step instead of generating to ``max_tokens`` for nobody.

This module imports no framework.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["aiter_in_thread", "arun_in_thread"]

T = TypeVar("T")


@dataclass
class _Failed:
    exc: BaseException


class _Done:
    """The worker's last item: its iterator is exhausted, closed or failed."""


_DONE = _Done()


async def arun_in_thread(fn: Callable[[threading.Event], T]) -> T:
    """Await ``fn(cancel)`` in a worker thread; cancelling the task sets ``cancel``."""
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, fn, cancel)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        raise


async def aiter_in_thread(
    make_iter: Callable[[threading.Event], Iterator[T]],
) -> AsyncGenerator[T, None]:
    """Iterate ``make_iter(cancel)`` in a worker thread, yielding items on the event loop.

    Items cross over through an unbounded queue, so the worker never waits for a slow
    consumer (a stream is at most ``max_tokens`` chunks). Leaving the ``async for`` early,
    or cancelling the consuming task, sets ``cancel``; the worker then stops at the next
    token and its iterator is closed.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[T | _Failed | _Done] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: T | _Failed | _Done) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            cancel.set()

    def worker() -> None:
        try:
            iterator = make_iter(cancel)
            try:
                for item in iterator:
                    put(item)
                    if cancel.is_set():
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer, who re-raises it  # noqa: BLE001
            put(_Failed(exc))
        finally:
            put(_DONE)

    loop.run_in_executor(None, worker)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        cancel.set()
