"""The run's durable state: one JSONL record per generation, written the moment it exists.

Why this shape: an evaluation of a few thousand generations takes hours on a laptop and gets
interrupted. Appending one self-contained line per result (write, flush, fsync) means a crash
loses at most the line being written; on reopen a torn last line is cut off and everything
before it is kept, and the run skips every key already present. Summary files are written with
:func:`acd_engine.atomic.atomic_write_bytes` (temp file fsynced, renamed, folder fsynced) so a
reader never sees half a report, even after a power cut; the two writers are re-exported here
for the modules that import them from this one.

Benchmark text may hold lone surrogates (undecodable bytes read with ``surrogateescape``, or a
``"\\ud800"`` escape in the JSON); :func:`json_line` writes such a value with ASCII escapes so
it round-trips instead of crashing the write and, with it, every rerun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from acd_engine.atomic import atomic_write_bytes, atomic_write_text
from acd_engine.config import CONTRAST_METHODS, METHODS
from acd_engine.errors import ConfigError
from acd_engine.eval.verdicts import Verdict

if sys.platform != "win32":  # POSIX only; on Windows two concurrent runs go undetected
    import fcntl

__all__ = [
    "BARE",
    "EVAL_CONTRAST_METHODS",
    "EVAL_METHODS",
    "GATED_METHOD",
    "RECORDS_FILE",
    "EvalRecord",
    "JsonlLog",
    "RecordKey",
    "RecordLog",
    "atomic_write_bytes",
    "atomic_write_text",
    "json_line",
    "read_records",
    "record_key",
]

logger = logging.getLogger(__name__)

R = TypeVar("R")  # a record type of a JsonlLog
K = TypeVar("K")  # its resume key

RECORDS_FILE = "records.jsonl"

GATED_METHOD = "acd-gate"
"""The eval's name for gated ACD (``DecodingConfig(method="acd", gate=True)``). Eval's
``acd`` is the paper's ungated ACD (``gate=False``), so both can sit in one records file."""
EVAL_METHODS: tuple[str, ...] = (
    *METHODS[: METHODS.index("acd") + 1],
    GATED_METHOD,
    *METHODS[METHODS.index("acd") + 1 :],
)
"""Method names a record may carry: the engine's methods plus :data:`GATED_METHOD`."""
EVAL_CONTRAST_METHODS: frozenset[str] = CONTRAST_METHODS | {GATED_METHOD}
"""Eval methods swept over alpha and run under the plausibility guard."""

BARE = "bare"
"""The context of a record written before ``acd eval --context`` existed, and of every record
of a run without it: the benchmark prompt sent alone as one user turn."""

RecordKey = tuple[str, str, str, float | None, str]
"""``(benchmark, id, method, alpha, context)``: what makes a record unique; resume skips
these."""


class EvalRecord(BaseModel):
    """One generation (``kind='generate'``) or one multiple-choice scoring (``kind='mc1'``).

    ``alpha`` is ``None`` for single-branch methods (plain, base), which run once whatever the
    alphas. ``prompt`` is kept so a record can be audited on its own; ``judge`` names who gave
    the ``verdict`` so differently judged runs are never pooled by accident. ``seconds`` is the wall time of the engine call divided by its batch size.
    ``scores`` (MC1 only) holds the summed log-probabilities of ``best_answer`` followed by
    each incorrect answer. ``error`` is set (and nothing else is) when the engine refused the
    prompt itself (too long for the context window, say): the run goes on, the record keeps
    the reason, and metrics leave it out. The same holds for a prompt that cannot be encoded
    (a lone surrogate), a prompt whose generation raised, and an output the judge could not
    judge (``error`` starts with ``judge``; ``output`` is kept for audit). A rerun skips error
    records like any other, so a bad row never stops a run twice; delete its line to retry it.
    ``gate_score`` / ``gate_flagged`` are the safety gate's probability of harm and its
    verdict at the run's threshold (the pack's unless ``--gate-threshold``), for a gated
    generation (``acd-gate``); None otherwise (other methods, and ``acd-gate``'s MC1 rows,
    whose scoring call returns no verdict). They let the report sweep the threshold
    afterwards without rerunning anything.
    ``context`` is the application shape the prompt was placed in (:mod:`acd_engine.safety.contexts`);
    a ``bare`` record is written without the field, so a run without ``--context`` writes
    exactly the lines it wrote before the field existed, and those lines read back as ``bare``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    benchmark: str
    id: str
    method: str
    alpha: float | None
    kind: Literal["generate", "mc1"] = "generate"
    label: Literal["harmful", "safe"]
    category: str | None = None
    prompt: str = ""
    output: str = ""
    verdict: Verdict | None = None
    judge: str | None = None
    tokens: int = 0
    token_ids: list[int] = []
    finish_reason: str | None = None
    seconds: float = 0.0
    scores: list[float] | None = None
    gate_score: float | None = None
    gate_flagged: bool | None = None
    error: str | None = None
    context: str = BARE

    @property
    def key(self) -> RecordKey:
        """This record's resume key."""
        return record_key(self.benchmark, self.id, self.method, self.alpha, self.context)

    def to_json(self) -> dict[str, object]:
        """The record as one line of ``records.jsonl`` holds it (``context`` left out when
        ``bare``: see the class docstring)."""
        exclude = {"context"} if self.context == BARE else None
        data: dict[str, object] = self.model_dump(mode="json", exclude=exclude)
        return data


def record_key(
    benchmark: str, item_id: str, method: str, alpha: float | None, context: str = BARE
) -> RecordKey:
    """Build a resume key (alpha ``None`` for single-branch methods)."""
    return (benchmark, item_id, method, alpha, context)


def json_line(data: object, *, indent: int | None = None) -> str:
    """JSON text of ``data``, UTF-8 readable where possible, ASCII-escaped where it must be.

    ``ensure_ascii=False`` keeps non-English prompts readable in ``records.jsonl``, but a lone
    surrogate cannot be encoded as UTF-8; for such a value the whole document is written with
    ``\\uXXXX`` escapes, which ``json.loads`` turns back into the same string.
    """
    text = json.dumps(data, ensure_ascii=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, ensure_ascii=True, indent=indent)
    return text


class JsonlLog(Generic[R, K]):
    """Append-only JSONL file of one output folder, one record a line, held open for one run.

    Opening it takes an exclusive lock (a second run on the same folder fails fast instead of
    interleaving lines), repairs a torn last line, and loads every finished record; a corrupt
    line elsewhere stops the run with the line to delete. Use as a context manager.
    ``acd eval``'s :class:`RecordLog` is one; a measurement script with its own record type
    (``scripts/framework_eval.py``) is another, so each repairs and resumes the same way.

    Args:
        path: The file (created on open).
        parse: One line's bytes to a record (raising ``ValueError`` or ``ValidationError``
            on a line that is not one).
        key: A record's resume key.
        dump: A record as the JSON object its line holds.
        owner: What the lock error calls a run holding the folder ("acd eval").
        option: What the lock error calls the folder ("out_dir").
    """

    def __init__(
        self,
        path: Path,
        *,
        parse: Callable[[bytes], R],
        key: Callable[[R], K],
        dump: Callable[[R], object],
        owner: str,
        option: str,
    ) -> None:
        self.path = Path(path)
        self._parse, self._key, self._dump = parse, key, dump
        self._owner, self._option = owner, option
        self._records: dict[K, R] = {}
        self._fh: IO[bytes] | None = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+b")
        if sys.platform != "win32":
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise ConfigError(
                    f"{self._option} must not be in use by another {self._owner} run, got "
                    f"'{self.path.parent}'"
                ) from None
        self._fh = fh
        try:
            self._load()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None

    def _load(self) -> None:
        assert self._fh is not None
        self._fh.seek(0)
        data = self._fh.read()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = self._parse(line)
            except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
                raise ConfigError(
                    f"{self.path} line {lineno} must be a complete record, got a corrupt line "
                    f"({type(exc).__name__}); delete that line and rerun to resume"
                ) from None
            key = self._key(record)
            if key in self._records:
                logger.warning("%s line %d repeats %s; keeping the first", self.path, lineno, key)
                continue
            self._records[key] = record
        if tail.strip():
            self._repair_tail(len(data) - len(tail), tail)

    def _repair_tail(self, offset: int, tail: bytes) -> None:
        """Keep a complete last record that only lacks its newline; cut a torn one off."""
        assert self._fh is not None
        with contextlib.suppress(ValueError, ValidationError):
            record = self._parse(tail)
            self._records.setdefault(self._key(record), record)
            self._write(b"\n")
            return
        logger.warning(
            "%s ends in a torn line (%d bytes, an interrupted write); dropping it, it will be "
            "generated again",
            self.path,
            len(tail),
        )
        self._fh.truncate(offset)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _write(self, data: bytes) -> None:
        assert self._fh is not None, (
            f"{type(self).__name__} is not open; use it as a context manager"
        )
        self._fh.write(data)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[R]:
        return iter(self._records.values())

    def append(self, record: R) -> None:
        """Make ``record`` durable now (one line, flushed and fsynced) and remember it."""
        line = json_line(self._dump(record)) + "\n"
        self._write(line.encode("utf-8"))
        self._records[self._key(record)] = record


class RecordLog(JsonlLog[EvalRecord, RecordKey]):
    """``acd eval``'s ``records.jsonl`` of one output folder (:class:`JsonlLog`)."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(
            Path(out_dir) / RECORDS_FILE,
            parse=lambda line: EvalRecord.model_validate(json.loads(line)),
            key=lambda record: record.key,
            dump=lambda record: record.to_json(),
            owner="acd eval",
            option="out_dir",
        )


def read_records(out_dir: Path) -> list[EvalRecord]:
    """Every finished record of an output folder, for re-rendering a report without a model."""
    if not (Path(out_dir) / RECORDS_FILE).exists():
        return []
    with RecordLog(out_dir) as log:
        return list(log)
