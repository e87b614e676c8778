"""A request as the engine queues it, and how calls are run: decoded together, in a
coalesced group, in batches, or streamed from a worker thread.

:class:`Call` is what :class:`~acd_engine.runtime.coalesce.Coalescer` carries for the engine;
:class:`CallRunner` decides how a call runs (alone when the backend does not batch, else
queued for coalescing; batches in groups); :func:`decode_calls` is the request path itself
(the backend's decode -> the one answer loop); :func:`run_coalesced` runs one group with a
fallback that gives every call its own answer or its own error; :func:`stream_in_thread`
turns a blocking call into a stream that holds no lock between tokens.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from transformers import LogitsProcessorList

from acd_engine.backends.base import Backend
from acd_engine.config import DecodingConfig, EngineOptions
from acd_engine.errors import ConfigError
from acd_engine.rendering import Messages, template_kwargs
from acd_engine.runtime.answer import (
    Answer,
    CancelFlag,
    GenerationResult,
    Sink,
    StreamChunk,
    result_of,
    run_answers,
)
from acd_engine.runtime.coalesce import Coalescer, Pending

__all__ = ["AnyEvent", "Call", "CallEngine", "CallRunner", "calls_of", "coalesce_key"]
__all__ += ["decode_calls", "run_coalesced", "stream_in_thread", "text_deltas"]

logger = logging.getLogger(__name__)


class CallEngine(Protocol):
    """What running a call reads from its engine: its backend, tokenizer, options and the
    few checks and labels the engine owns.

    :class:`~acd_engine.runtime.engine.Engine` is one. The request path takes this instead of the
    engine, so the engine, which imports this module, is never imported back: the arrows
    point one way, from the engine down to the path it runs.
    """

    @property
    def backend(self) -> Backend: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    @property
    def options(self) -> EngineOptions: ...

    def check_decodes(self) -> None: ...
    def pack_report(self, config: DecodingConfig) -> dict[str, str]: ...


class AnyEvent:
    """Set when any of its events is (the caller's cancel, or the stream being closed)."""

    def __init__(self, *events: CancelFlag | None) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


@dataclass
class Call:
    """One request, as queued for coalescing.

    ``sink`` receives its stream chunks as they are ready (streaming calls); ``streamed``
    records that it received any, so a failed batch never reruns a call whose reader has
    already seen part of an answer.
    """

    messages: Messages
    config: DecodingConfig
    tools: Sequence[dict[str, Any]] | None
    constraint: LogitsProcessorList | None
    cancel: CancelFlag | None
    sink: Sink | None = None
    streamed: bool = False

    def emit(self, chunk: StreamChunk) -> None:
        """Hand one chunk to the sink."""
        if self.sink is not None:
            self.streamed = True
            self.sink(chunk)

    @property
    def out(self) -> Sink | None:
        """Where this call's chunks go (None when nobody streams it)."""
        return self.emit if self.sink is not None else None


def calls_of(
    batch: Sequence[Messages],
    config: DecodingConfig,
    tools: Sequence[dict[str, Any]] | None,
    constraint: LogitsProcessorList | Sequence[LogitsProcessorList | None] | None,
    cancel: CancelFlag | None,
) -> list[Call]:
    """One call per conversation of a batch; ``constraint`` is one (stateless) list for
    all, or one list (or None) per conversation."""
    if constraint is None or isinstance(constraint, LogitsProcessorList):
        constraints: list[LogitsProcessorList | None] = [constraint] * len(batch)
    elif len(constraints := list(constraint)) != len(batch):
        raise ConfigError(
            f"constraint must have one entry per conversation ({len(batch)}), got "
            f"{len(constraints)}"
        )
    return [Call(m, config, tools, c, cancel) for m, c in zip(batch, constraints, strict=True)]


def coalesce_key(call: Call) -> tuple[str, str]:
    """Calls with equal keys (the same decoding settings and tools) may share a decode."""
    return call.config.model_dump_json(), json.dumps(call.tools, sort_keys=True, default=str)


class CallRunner:
    """How an engine's calls run: the one way in for ``generate``, streams and batches.

    On a backend that does not batch (the torch reference path) every call runs alone
    under the engine's lock. On one that does (the torch fast path, llama.cpp) a call
    queues in the :class:`~acd_engine.runtime.coalesce.Coalescer`, and a batch runs in groups of
    ``max_batch_requests``; both go through :meth:`decode_group`, the one place a batched
    decode of several calls starts.

    Args:
        engine: The engine whose kernels, options and request path the calls use.
        lock: The engine's lock; held while anything decodes.
    """

    def __init__(self, engine: CallEngine, lock: threading.RLock) -> None:
        self.engine = engine
        self.lock = lock
        self.coalescer: Coalescer[GenerationResult] = Coalescer(
            self.run_coalesced, lock, lambda: engine.options.max_batch_requests
        )

    def decode(self, calls: list[Call]) -> list[GenerationResult]:
        """Decode ``calls`` together under the lock (:func:`decode_calls`)."""
        with self.lock:
            return decode_calls(self.engine, calls)

    def decode_group(self, calls: list[Call]) -> list[GenerationResult]:
        """One batched decode of several calls (what coalescing and batches run)."""
        return self.decode(calls)

    def submit(self, call: Call) -> GenerationResult:
        """Run one call: alone when the backend does not batch, else coalesced with
        compatible ones."""
        self.engine.check_decodes()
        if not self.engine.backend.batches:
            return self.decode([call])[0]
        return self.coalescer.submit(call, coalesce_key(call))

    def run_coalesced(self, group: Sequence[Pending[GenerationResult]]) -> None:
        """Run a coalesced group (lock held): one batched decode, or each call alone."""
        run_coalesced(group, self.decode_group, lambda call: self.decode([call])[0])

    def batch(self, calls: list[Call]) -> list[GenerationResult]:
        """Results of ``calls`` in order: batched decodes of ``max_batch_requests`` calls
        when the backend batches, else one call at a time."""
        self.engine.check_decodes()
        if not self.engine.backend.batches:
            return [self.submit(call) for call in calls]
        k = self.engine.options.max_batch_requests
        return [r for s in range(0, len(calls), k) for r in self.decode_group(calls[s : s + k])]


def decode_calls(engine: CallEngine, calls: list[Call]) -> list[GenerationResult]:
    """Decode ``calls`` (same config and tools) together, the engine's lock held; each
    call's chunks go to its sink as they are ready.

    The backend starts the batch (render, route by the gate, prefill, one forward per
    step: :meth:`~acd_engine.backends.base.Backend.start`); every backend's tokens then go
    through the one answer loop, which ends a request at EOS, a stop string, its limit or
    its cancel flag (the backend drops it before its next forward).
    """
    cfg, kwargs = calls[0].config, template_kwargs(calls[0].tools)
    finished: set[int] = set()
    steps, limits, facts = engine.backend.start(calls, cfg, kwargs, finished)
    answers = [Answer(engine.tokenizer, engine.eos_token_ids, cfg.stop) for _ in calls]
    sinks: list[Sink | None] = [call.out for call in calls]
    cancels: list[CancelFlag | None] = [call.cancel for call in calls]
    lasts = run_answers(steps, finished, answers, limits, cancels, sinks, facts)
    report = engine.pack_report(cfg)
    return [result_of(a, last, cfg, report) for a, last in zip(answers, lasts, strict=True)]


def run_coalesced(
    group: Sequence[Pending[GenerationResult]],
    run_many: Callable[[list[Call]], list[GenerationResult]],
    run_one: Callable[[Call], GenerationResult],
) -> None:
    """Run a coalesced group: one batched decode, or one call alone.

    If a batch fails (one prompt too long, say), every call that has not streamed anything
    yet is retried alone, so each gets its own result or its own error.
    """
    calls: list[Call] = [p.request for p in group]
    if len(group) > 1:
        try:
            for p, result in zip(group, run_many(calls), strict=True):
                p.result = result
            return
        except Exception as exc:  # any failure: each call gets its own answer or error  # noqa: BLE001
            logger.debug("a coalesced batch failed (%s); running its calls one by one", exc)
            for p, call in zip(group, calls, strict=True):
                if call.streamed:  # its reader has seen deltas: a rerun would repeat them
                    p.error = exc
    for p, call in zip(group, calls, strict=True):
        if p.error is not None:
            continue
        try:
            p.result = run_one(call)
        except Exception as exc:  # handed to that call's caller, who raises it  # noqa: BLE001
            p.error = exc


def stream_in_thread(
    submit: Callable[[Call], GenerationResult], call: Call
) -> Generator[StreamChunk, None, None]:
    """Run ``submit(call)`` in a worker thread; yield the chunks it hands over.

    The stream holds no lock between tokens, a slow or abandoned reader never blocks other
    requests, and the iterator may be advanced from any thread (as Starlette does with sync
    iterators). Closing or dropping it stops the decode before its next token.
    """
    chunks: queue.SimpleQueue[StreamChunk | BaseException | None] = queue.SimpleQueue()
    closed = threading.Event()
    call.sink = chunks.put
    call.cancel = AnyEvent(call.cancel, closed)

    def work() -> None:
        try:
            submit(call)
        except BaseException as exc:  # handed to the reader, who raises it  # noqa: BLE001
            chunks.put(exc)
        else:
            chunks.put(None)

    threading.Thread(target=work, name="acd-stream", daemon=True).start()
    try:
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # closed, dropped or finished: stop decoding at the next token
        closed.set()


def text_deltas(chunks: Generator[StreamChunk, None, None]) -> Iterator[str]:
    """The non-empty text of ``chunks``; closing this iterator closes the stream (and so
    stops its decode)."""
    try:
        yield from (chunk.text for chunk in chunks if chunk.text)
    finally:
        chunks.close()
