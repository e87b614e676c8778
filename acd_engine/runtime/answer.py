"""The answer loop: generated tokens -> text deltas, stop strings, chunks and the result.

One loop (:func:`run_answers`) serves every way of asking: a lone call, a stream, a batch,
a coalesced group, on every backend (torch's fast and reference paths, llama.cpp). It reads ``{request: token}``
from a decoder, turns each request's tokens into text with :class:`Answer` (EOS, stop
strings, text held back while it could still become one), hands deltas to the request's
sink as they become safe, and ends a request by adding it to the decoder's ``finished`` set.
So a stream's concatenated deltas and a batch's texts are always the text a lone
``generate`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from acd_engine.config import DecodingConfig
from acd_engine.safety.gate import GateVerdict, applied_alpha

__all__ = [
    "Answer",
    "CancelFlag",
    "GenerationResult",
    "Sink",
    "StreamChunk",
    "Usage",
    "eos_token_ids",
    "result_of",
    "run_answers",
    "stop_prefix_overlap",
]


class Usage(BaseModel):
    """Token counts of one request (positive branch prompt; generated tokens)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class GenerationResult(BaseModel):
    """What one request produced."""

    text: str = Field(description="The answer, stop string excluded.")
    token_ids: list[int] = Field(description="Generated token ids (EOS excluded).")
    finish_reason: Literal["stop", "length"] = Field(
        description="'stop' on EOS or a stop string, 'length' at max_new_tokens."
    )
    usage: Usage
    method: str
    alpha: float = Field(
        description="The alpha applied (0 for single-branch methods and for requests the "
        "safety gate passed to its single branch)."
    )
    gate_score: float | None = Field(
        default=None,
        description="The safety gate's probability that the request is harmful (None when "
        "the request was not gated: another method, gate=False, or a pack without a gate).",
    )
    gate_flagged: bool | None = Field(
        default=None,
        description="Whether the gate flagged the request (decoded with SP - alpha * AP) "
        "rather than passing it to DecodingConfig.gate_passed_method.",
    )
    pack: str | None = Field(
        default=None,
        description="The prompt pack the method read: its file name and id, 'none (manual "
        "prompts)' when the model has no trained pack (acd then equals oid), 'unused' for a "
        "method that reads none (acd_engine.safety.pack_info). None: not reported.",
    )
    gate: str | None = Field(
        default=None,
        description="The safety gate that routed the request: its layers and threshold, or "
        "'none' (no gate in the pack, gate=False, or a method the gate does not route). "
        "None: not reported.",
    )
    backend: str | None = Field(
        default=None,
        description="The backend that ran the request's forwards: 'torch' (the engine's "
        "PyTorch model) or 'llamacpp' (llama.cpp on the model's GGUF). None: not reported.",
    )


@dataclass
class StreamChunk:
    """One piece of a stream; the last one carries ``finish_reason`` and ``usage``."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None
    gate: GateVerdict | None = None  # on the last chunk of a gated request


class CancelFlag(Protocol):
    """Anything with ``is_set()``: a ``threading.Event``, or several combined."""

    def is_set(self) -> bool: ...


Sink = Callable[[StreamChunk], None]


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token that ends an answer: the generation config's EOS ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(e) for e in ids)


def stop_prefix_overlap(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Answer:
    """The text side of one answer: EOS, stop strings, and how much may be streamed yet.

    Text is held back while it could still be the start of a stop string or ends in an
    incomplete multi-byte character.
    """

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], stops: Sequence[str]) -> None:
        self.tokenizer, self.eos_ids, self.stops = tokenizer, eos_ids, stops
        self.longest = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.emitted = ""  # text already handed out; always a prefix of the final text
        self.final: str | None = None  # set when a stop string cut the text
        self.finish: Literal["stop", "length"] = "length"
        self.done = False

    def stop(self) -> None:
        """End the answer before the next token (cancelled)."""
        self.finish, self.done = "stop", True

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became safe to hand out."""
        if token in self.eos_ids:
            self.stop()
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, len(self.emitted) - self.longest)
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        if hits:
            self.final = text[: min(hits)]
            self.stop()
            return ""
        ready = len(text.rstrip("\ufffd"))  # never split a multi-byte character
        ready -= stop_prefix_overlap(text[:ready], self.stops)
        if ready > len(self.emitted) and text.startswith(self.emitted):
            delta, self.emitted = text[len(self.emitted) : ready], text[:ready]
            return delta
        return ""

    def rest(self) -> str:
        """Once the answer is over: the text not handed out yet."""
        if self.final is None:
            self.final = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(self.final) > len(self.emitted) and self.final.startswith(self.emitted):
            return self.final[len(self.emitted) :]
        return ""

    def closing_chunks(
        self, prompt_tokens: int, verdict: GateVerdict | None = None
    ) -> list[StreamChunk]:
        """The end of a stream: the text held back, then ``finish_reason``, ``usage``, gate."""
        rest = self.rest()
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=len(self.ids))
        last = StreamChunk("", self.ids, finish_reason=self.finish, usage=usage, gate=verdict)
        return [StreamChunk(rest, []), last] if rest else [last]


def result_of(
    answer: Answer,
    last: StreamChunk,
    config: DecodingConfig,
    report: Mapping[str, str] | None = None,
) -> GenerationResult:
    """A request's result from its answer, its stream's last chunk (finish reason, usage,
    gate verdict) and the engine's ``pack_report`` (``{"pack": ..., "gate": ...,
    "backend": ...}``): one place decides what a result reports."""
    assert last.finish_reason is not None and last.usage is not None
    verdict = last.gate
    flagged = None if verdict is None else verdict.flagged
    return GenerationResult(
        text=answer.emitted + answer.rest(),  # what was handed out, then the rest
        token_ids=last.token_ids,
        finish_reason=last.finish_reason,
        usage=last.usage,
        method=config.method,
        alpha=applied_alpha(config, flagged),
        gate_score=None if verdict is None else verdict.score,
        gate_flagged=flagged,
        pack=None if report is None else report["pack"],
        gate=None if report is None else report["gate"],
        backend=None if report is None else report["backend"],
    )


def run_answers(
    steps: Generator[dict[int, int], None, None],
    finished: set[int],
    answers: Sequence[Answer],
    limits: Sequence[int],
    cancels: Sequence[CancelFlag | None],
    sinks: Sequence[Sink | None],
    facts: Sequence[Callable[[], tuple[int, GateVerdict | None]]],
) -> list[StreamChunk]:
    """Drive a decoder to the end of every answer; return each answer's last chunk.

    Args:
        steps: The decoder: yields ``{request: token}`` for the requests still running
            and drops a request once it is in ``finished``. Closed here.
        finished: The decoder's set of ended requests (filled here).
        answers: One per request.
        limits: The tokens each request may generate (its clamped ``max_new_tokens``).
        cancels: When one is set, that answer stops before its next token.
        sinks: Where each request's chunks go as they become ready (None: nowhere).
        facts: Per request, its prompt tokens and gate verdict, asked when it ends (the
            prefill decides the gate's route).
    """
    lasts: dict[int, StreamChunk] = {}

    def close(i: int) -> None:
        *_, lasts[i] = chunks = answers[i].closing_chunks(*facts[i]())
        if (sink := sinks[i]) is not None:
            for chunk in chunks:
                sink(chunk)

    try:
        for picked in steps:
            for i, token in picked.items():
                answer, cancel = answers[i], cancels[i]
                if cancel is not None and cancel.is_set():
                    answer.stop()
                else:
                    delta = answer.push(token)
                    if delta and (sink := sinks[i]) is not None and not answer.done:
                        sink(StreamChunk(delta, [token]))
                if (answer.done or len(answer.ids) >= limits[i]) and i not in finished:
                    close(i)
                    finished.add(i)
            if len(finished) == len(answers):
                break
    finally:
        steps.close()
    for i in range(len(answers)):  # decoding ran out before they finished
        if i not in finished:
            close(i)
    return [lasts[i] for i in range(len(answers))]
