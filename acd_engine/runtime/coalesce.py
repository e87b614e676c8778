"""Opportunistic batching: concurrent blocking calls that arrive while the engine is busy
share its next batched forward.

LangChain's ``Runnable.batch`` / ``abatch`` and LlamaIndex's concurrent ``achat`` calls
reach the engine as several threads, each calling ``Engine.generate`` for one
conversation. The engine runs one request at a time under its lock, so without this they
would decode one after another. Here each call joins a queue. Whichever caller gets the
engine's lock next takes the oldest waiting request and every compatible one behind it
(same decoding settings and tools) and runs them together, 2·N rows per forward. A request
that arrives when the engine is idle starts at once, alone: no call ever waits for a batch
to fill.

The module knows nothing about models: :class:`Coalescer` takes a grouping key and a
function that runs a group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Coalescer", "Pending"]

R = TypeVar("R")


@dataclass(eq=False)
class Pending(Generic[R]):
    """One queued call: its arguments, and later its result or error.

    Attributes:
        request: Whatever the group runner needs (the engine passes a small record).
        key: Requests with equal keys may run in one group.
    """

    request: Any
    key: Hashable
    result: R | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class Coalescer(Generic[R]):
    """Groups concurrent calls by key and runs each group once, in arrival order.

    Args:
        run_group: Sets ``result`` or ``error`` on every ``Pending`` of a group. It is
            called with ``busy`` held, and it must not raise.
        busy: The resource a group needs (the engine's lock). Taking it before choosing
            the group lets every request that queued up meanwhile join.
        max_group: Most requests per group.
    """

    def __init__(
        self,
        run_group: Callable[[Sequence[Pending[R]]], None],
        busy: AbstractContextManager[Any],
        max_group: Callable[[], int],
    ) -> None:
        self._run_group = run_group
        self._busy = busy
        self._max_group = max_group
        self._cv = threading.Condition()
        self._queue: list[Pending[R]] = []
        self._leading = False  # a caller is choosing or running a group

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken into a group."""
        with self._cv:
            return len(self._queue)

    def submit(self, request: Any, key: Hashable) -> R:
        """Run ``request`` (possibly with others) and return its result, or raise its error."""
        mine: Pending[R] = Pending(request, key)
        with self._cv:
            self._queue.append(mine)
        while True:
            with self._cv:
                while self._leading and not mine.done:
                    self._cv.wait()
                if mine.done:
                    break
                self._leading = True
            group: list[Pending[R]] = []
            try:
                with self._busy:
                    with self._cv:
                        group = self._take_group()
                    self._run_group(group)
            finally:
                with self._cv:
                    for p in group:
                        if p.result is None and p.error is None:
                            p.error = RuntimeError("the batch this request was in was interrupted")
                        p.done = True
                    self._leading = False
                    self._cv.notify_all()
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    def _take_group(self) -> list[Pending[R]]:
        """The oldest request and the compatible ones queued behind it (under ``_cv``)."""
        first = self._queue[0]
        group = [p for p in self._queue if p.key == first.key][: max(1, self._max_group())]
        taken = set(map(id, group))
        self._queue = [p for p in self._queue if id(p) not in taken]
        return group
