"""Refusals through the real frameworks: benchmark prompts sent the way applications send them.

``acd eval --context`` places benchmark prompts in application shapes by hand (the package's
``eval`` pool of wrapper texts). This script sends them through the frameworks themselves, as
applications do (``scripts/framework_pipelines.py`` builds each one): a LlamaIndex query
engine and context chat engine over a VectorStoreIndex, a LangChain LCEL RAG chain, a chat
with ``RunnableWithMessageHistory`` (the request is the third user turn) and a tool-calling
agent turn. Each runs on the adapters' default model with the shipped defaults (``default``:
the adapters' default method, gated ACD) and with ``method="base"``, and reports how often
harmful requests are refused (AdvBench, HarmfulQA) and benign ones over-refused (XSTest's safe
prompts, AlpacaEval), with the gate's own verdicts.

Prompts are the eval registry's seeded sample (the first ``--limit`` of a seeded permutation,
as ``acd eval`` draws them; XSTest's is drawn among its safe prompts). The retrieval corpus
is the ``eval`` pool's neutral passages and the history chat's earlier turns its histories
(never benchmark text, never used to tune anything). "Refused" is the project's default
refusal-marker judge on the generated text (a tool call counts as an answer).

``DIR/records.jsonl`` gets one line per generation as it goes, so a rerun resumes (and a
larger ``--limit`` extends the sample); ``DIR/run.json`` pins the settings, and a rerun with
other ones is refused. ``DIR/summary.json`` and ``DIR/report.md`` are rewritten at the end.

    .venv/bin/python scripts/framework_eval.py --out runs/frameworks          # 16 per set
    .venv/bin/python scripts/framework_eval.py --out runs/fw-smoke --limit 2 \\
        --pipelines llamaindex-query,langchain-rag
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from framework_pipelines import PIPELINES, Ask, open_app  # scripts/ is on sys.path
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from acd_engine.atomic import atomic_write_json, atomic_write_text
from acd_engine.config import DecodingConfig, did_you_mean
from acd_engine.errors import ACDError, ConfigError
from acd_engine.eval.judges import RefusalMarkerJudge
from acd_engine.eval.pins import check_pins
from acd_engine.eval.records import JsonlLog
from acd_engine.eval.registry import (
    BenchmarkItem,
    check_benchmark_data,
    load_benchmark,
    sample_items,
)
from acd_engine.eval.runner import check_out_dir, pool_sha256
from acd_engine.safety.contexts import ContextPool, load_pool
from acd_integrations.embeddings import MiniLMEmbedding
from acd_integrations.langchain import ChatACD

__all__ = [
    "METHODS",
    "SETS",
    "FrameworkRecord",
    "main",
    "open_records",
    "parse_args",
    "pin_run",
    "render_report",
    "summarize",
]

log = logging.getLogger("framework_eval")

RECORDS_FILE = "records.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
VERSION = 1  # of the records and pins; bump when a change would make old records wrong

SETS: dict[str, Literal["harmful", "safe"]] = {
    "advbench": "harmful",
    "harmfulqa": "harmful",
    "xstest": "safe",  # its safe prompts only
    "alpaca_eval": "safe",
}
"""The benchmarks and what each should get: ``harmful`` refused, ``safe`` answered."""
SET_TITLES = {
    "advbench": "AdvBench",
    "harmfulqa": "HarmfulQA",
    "xstest": "XSTest safe",
    "alpaca_eval": "AlpacaEval",
}
METHODS: dict[str, dict[str, Any]] = {"base": {"method": "base"}, "default": {}}
"""What each ``--methods`` name adds to the adapters' keywords: ``default`` adds nothing,
so the adapters decode with their own defaults (gated ACD with the shipped pack)."""

JUDGE = RefusalMarkerJudge()  # the project's default marker judge
POOL = "eval"  # the wrapper-text pool nothing was tuned on


# ------------------------------------------------------------------ arguments
@dataclass(frozen=True)
class Settings:
    """The checked command line."""

    out: Path
    limit: int
    max_tokens: int
    seed: int
    pipelines: tuple[str, ...]
    methods: tuple[str, ...]
    data_dir: Path | None
    verbose: bool


def _names(
    parser: argparse.ArgumentParser, value: str, choices: Sequence[str], what: str
) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names:
        parser.error(f"{what}s must name at least one of {', '.join(choices)}, got {value!r}")
    for name in names:
        if name not in choices:
            parser.error(did_you_mean(name, list(choices), what))
    return names


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Read and check the command line; errors exit 2 with one ``error:`` line (argparse)."""
    parser = argparse.ArgumentParser(
        prog="framework_eval.py", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="the run folder (resumable)")
    parser.add_argument("--limit", type=int, default=16, help="seeded prompts per set (16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens, greedy (32)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (0)")
    parser.add_argument(
        "--pipelines",
        default=",".join(PIPELINES),
        help=f"comma list of {', '.join(PIPELINES)} (default: all)",
    )
    parser.add_argument(
        "--methods", default="base,default", help="comma list of base, default (both)"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="benchmark .jsonl folder (as acd eval)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error(f"limit must be >= 1, got {args.limit}")
    if args.max_tokens < 1:
        parser.error(f"max_tokens must be >= 1, got {args.max_tokens}")
    if args.seed < 0:
        parser.error(f"seed must be >= 0, got {args.seed}")
    return Settings(
        out=args.out,
        limit=args.limit,
        max_tokens=args.max_tokens,
        seed=args.seed,
        pipelines=_names(parser, args.pipelines, tuple(PIPELINES), "pipeline"),
        methods=_names(parser, args.methods, tuple(METHODS), "method"),
        data_dir=args.data_dir,
        verbose=args.verbose,
    )


# ------------------------------------------------------------------ prompts and corpus
def load_samples(
    limit: int, seed: int, data_dir: Path | None
) -> tuple[dict[str, tuple[BenchmarkItem, ...]], dict[str, str]]:
    """Each set's seeded sample (XSTest's among its safe prompts) and each file's sha256."""
    check_benchmark_data(SETS, data_dir)  # every missing set in one message
    samples: dict[str, tuple[BenchmarkItem, ...]] = {}
    shas: dict[str, str] = {}
    for name, label in SETS.items():
        bench = load_benchmark(name, data_dir)
        kept = tuple(item for item in bench.items if item.label == label)
        samples[name] = sample_items(replace(bench, items=kept), limit, seed)
        shas[name] = bench.sha256
    return samples, shas


def corpus(pool: ContextPool) -> dict[str, str]:
    """The retrieval documents: the pool's neutral passages (not its sensitive news)."""
    return {p.title: p.text for p in pool.passages if not p.sensitive}


def earlier_turns(pool: ContextPool, seed: int, session_id: str) -> list[tuple[str, str]]:
    """The two earlier exchanges a history-chat session starts from: one of the pool's
    histories, chosen by the session (so a resumed run asks the same conversation)."""
    history = random.Random(f"{seed}:{session_id}").choice(pool.histories)
    return [(m.role, m.content) for m in history]


# ------------------------------------------------------------------ records
class FrameworkRecord(BaseModel):
    """One generation: where it went, what the judge and the gate said, and the text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str
    method: str
    benchmark: str
    id: str
    label: Literal["harmful", "safe"]
    refused: bool | None  # None: the request failed (``error``)
    gate_flagged: bool | None  # None: not gated (base), or failed
    gate_score: float | None = None
    tool_calls: int = 0
    decoded_method: str | None = None  # the adapter's metadata: what actually decoded
    pack: str | None = None
    gate: str | None = None
    seconds: float = 0.0
    text: str = ""
    error: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.pipeline, self.method, self.benchmark, self.id)


def open_records(out_dir: Path) -> JsonlLog[FrameworkRecord, tuple[str, str, str, str]]:
    """``records.jsonl`` of ``out_dir``, append-only and locked for one run, as ``acd eval``
    keeps its own (:class:`acd_engine.eval.records.JsonlLog`: a torn last line is generated
    again, a corrupt one elsewhere stops the run)."""
    return JsonlLog(
        Path(out_dir) / RECORDS_FILE,
        parse=lambda line: FrameworkRecord.model_validate(json.loads(line)),
        key=lambda record: record.key,
        dump=lambda record: record.model_dump(mode="json"),
        owner="framework_eval",
        option="out",
    )


def pin_run(out_dir: Path, now: dict[str, Any]) -> None:
    """Refuse settings that differ from the run already in ``out_dir`` (naming the first),
    then write the union to ``run.json``. A setting the earlier run did not pin yet (the
    model's, before it had loaded) is free, and pinned from now on."""
    path = out_dir / RUN_FILE
    before: dict[str, Any] = {}
    if path.exists():
        try:
            before = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"run.json in '{out_dir}' must be the JSON object framework_eval wrote, got an "
                f"unreadable file ({type(exc).__name__}); use a new --out"
            ) from None
        if not isinstance(before, dict):
            raise ConfigError(
                f"run.json in '{out_dir}' must be the JSON object framework_eval wrote, got "
                f"{type(before).__name__}; use a new --out"
            )
    now = json.loads(json.dumps(now))  # as it reads back (tuples as lists)
    check_pins(out_dir, before, now)
    atomic_write_json(path, {**before, **now})


# ------------------------------------------------------------------ summary and report
def _pct(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 1) if whole else None


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(sum(kept) / len(kept), 1) if kept else None


def summarize(
    records: Iterable[FrameworkRecord],
    pipelines: Sequence[str],
    methods: Sequence[str],
) -> list[dict[str, Any]]:
    """One cell per pipeline × method: refused % per set, the harmful and benign means over
    sets (each set weighs the same, as the paper averages HLR), the gate's flag rates among
    the requests it read, counts, seconds per generation and the labels the adapters
    reported. Failed requests are counted, not rated."""
    records = list(records)
    cells = []
    for pipeline in pipelines:
        for method in methods:
            mine = [r for r in records if (r.pipeline, r.method) == (pipeline, method)]
            ok = [r for r in mine if r.error is None]
            sets: dict[str, dict[str, Any]] = {}
            for name in SETS:
                rows = [r for r in ok if r.benchmark == name]
                refused = sum(bool(r.refused) for r in rows)
                sets[name] = {"n": len(rows), "refused": refused, "pct": _pct(refused, len(rows))}
            gate: dict[str, Any] = {}
            for label in ("harmful", "safe"):
                read = [r for r in ok if r.label == label and r.gate_flagged is not None]
                flagged = sum(bool(r.gate_flagged) for r in read)
                gate[label] = {"n": len(read), "flagged": flagged, "pct": _pct(flagged, len(read))}
            cells.append(
                {
                    "pipeline": pipeline,
                    "method": method,
                    "sets": sets,
                    "harmful_refused_pct": _mean(
                        s["pct"] for n, s in sets.items() if SETS[n] == "harmful"
                    ),
                    "benign_over_refused_pct": _mean(
                        s["pct"] for n, s in sets.items() if SETS[n] == "safe"
                    ),
                    "gate_flagged": gate,
                    "n": len(ok),
                    "errors": len(mine) - len(ok),
                    "tool_calls": sum(r.tool_calls for r in ok),
                    "seconds_per_generation": (
                        round(sum(r.seconds for r in ok) / len(ok), 3) if ok else None
                    ),
                    "decoded_methods": sorted({r.decoded_method for r in ok if r.decoded_method}),
                    "packs": sorted({r.pack for r in ok if r.pack}),
                    "gates": sorted({r.gate for r in ok if r.gate}),
                }
            )
    return cells


def _show(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def protocol(cells: Sequence[dict[str, Any]], pins: dict[str, Any], limit: int) -> str:
    """The one paragraph a reader needs to compare these numbers with others."""

    def labels(method: str, key: str) -> str:
        return ", ".join(sorted({x for c in cells if c["method"] == method for x in c[key]}))

    methods = "; ".join(
        f"{m} decoded as {labels(m, 'decoded_methods') or '?'} (pack {labels(m, 'packs') or '?'}, "
        f"gate {labels(m, 'gates') or '?'})"
        for m in dict.fromkeys(c["method"] for c in cells)
    )
    judge = pins.get("judge", {})
    judge_text = ", ".join(f"{k} {v}" for k, v in judge.items() if k != "name")
    return (
        f"Sets: AdvBench and HarmfulQA (harmful), XSTest's safe prompts and AlpacaEval "
        f"(benign); {limit} seeded prompts per set (seed {pins.get('seed')}, the eval "
        f"registry's sample; XSTest's drawn among its safe prompts). Model "
        f"{pins.get('model', '?')}, greedy, {pins.get('max_tokens')} new tokens. Judge: "
        f"{judge.get('name', '?')} ({judge_text}) on the generated text; a tool call counts as "
        f"an answer. Methods: {methods}; the labels are the adapters' result metadata. "
        "Harmful refused and over-refused are the means of their two sets' rates; gate flags "
        "are among the requests the gate read."
    )


def render_report(cells: Sequence[dict[str, Any]], pins: dict[str, Any], limit: int) -> str:
    """``report.md``: the table per pipeline × method, then the protocol."""
    lines = [
        "| pipeline | method | harmful refused % | AdvBench / HarmfulQA | over-refused % "
        "| XSTest safe / AlpacaEval | gate flags harmful / benign % | n | s / gen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        s, g = c["sets"], c["gate_flagged"]
        n = c["n"] if not c["errors"] else f"{c['n']} (+{c['errors']} failed)"
        secs = c["seconds_per_generation"]
        lines.append(
            f"| {c['pipeline']} | {c['method']} | {_show(c['harmful_refused_pct'])} "
            f"| {_show(s['advbench']['pct'])} / {_show(s['harmfulqa']['pct'])} "
            f"| {_show(c['benign_over_refused_pct'])} "
            f"| {_show(s['xstest']['pct'])} / {_show(s['alpaca_eval']['pct'])} "
            f"| {_show(g['harmful']['pct'])} / {_show(g['safe']['pct'])} | {n} "
            f"| {'—' if secs is None else f'{secs:.2f}'} |"
        )
    pipelines = dict.fromkeys(c["pipeline"] for c in cells)
    where = "\n".join(f"- `{p}`: {PIPELINES[p]}" for p in pipelines)
    return (
        "# Refusals through the real frameworks\n\n"
        + "\n".join(lines)
        + f"\n\n{where}\n\n{protocol(cells, pins, limit)}\n"
    )


# ------------------------------------------------------------------ the run
@dataclass(frozen=True)
class Task:
    pipeline: str
    method: str
    benchmark: str
    item: BenchmarkItem

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.pipeline, self.method, self.benchmark, self.item.id)

    @property
    def session(self) -> str:
        return f"{self.benchmark}:{self.item.id}"


def _judge(prompt: str, text: str, tool_calls: int) -> bool:
    """Refused by the marker judge; a turn that called a tool answered."""
    return not tool_calls and JUDGE.judge(prompt, text) == "refused"


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Any]:
    bar = tqdm(total=total, desc="generations", unit="gen", file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _generate(
    settings: Settings,
    tasks: Sequence[Task],
    pool: ContextPool,
    records: JsonlLog[FrameworkRecord, tuple[str, str, str, str]],
    static_pins: dict[str, Any],
) -> None:
    """Generate every task through its application, appending each record as it is judged."""
    decoding = {"max_tokens": settings.max_tokens, "temperature": 0.0}
    engine = ChatACD(**decoding).engine  # loads the adapters' default model once
    report = engine.pack_report(DecodingConfig())  # what "default" decodes with
    pin_run(
        settings.out,
        {**static_pins, "model": engine.model_name, "pack": report["pack"], "gate": report["gate"]},
    )
    embed = MiniLMEmbedding()
    passages = corpus(pool)

    def earlier(session_id: str) -> list[BaseMessage]:
        return [
            HumanMessage(text) if role == "user" else AIMessage(text)
            for role, text in earlier_turns(pool, settings.seed, session_id)
        ]

    groups: dict[tuple[str, str], list[Task]] = {}
    for task in tasks:
        groups.setdefault((task.pipeline, task.method), []).append(task)
    with _progress(len(tasks)) as bar:
        for (pipeline, method), group in groups.items():
            bar.set_description(f"{pipeline} {method}")
            kwargs = {**decoding, **METHODS[method]}
            with open_app(
                pipeline, kwargs, passages=passages, embed_model=embed, earlier=earlier
            ) as ask:
                for task in group:
                    records.append(_one(ask, task))
                    bar.update()


def _one(ask: Ask, task: Task) -> FrameworkRecord:
    """Ask one request and judge the answer; a request the engine refuses as input (too
    long, malformed) is recorded with its error, not rated."""
    fields = {
        "pipeline": task.pipeline,
        "method": task.method,
        "benchmark": task.benchmark,
        "id": task.item.id,
        "label": task.item.label,
    }
    start = time.perf_counter()
    try:
        reply = ask(task.item.prompt, task.session)
    except (ACDError, ValueError) as exc:  # the one request's input, not the run
        log.warning("%s %s %s failed: %s", task.pipeline, task.method, task.session, exc)
        return FrameworkRecord(
            **fields, refused=None, gate_flagged=None, error=f"{type(exc).__name__}: {exc}"
        )
    seconds = time.perf_counter() - start
    meta = reply.meta
    return FrameworkRecord(
        **fields,
        refused=_judge(task.item.prompt, reply.text, reply.tool_calls),
        gate_flagged=meta.get("gate_flagged"),
        gate_score=meta.get("gate_score"),
        tool_calls=reply.tool_calls,
        decoded_method=meta.get("method"),
        pack=meta.get("pack"),
        gate=meta.get("gate"),
        seconds=round(seconds, 3),
        text=reply.text,
    )


def run(settings: Settings) -> list[dict[str, Any]]:
    """Check everything that needs no model, generate what is missing, write the summary."""
    samples, shas = load_samples(settings.limit, settings.seed, settings.data_dir)
    check_out_dir(settings.out)
    pool = load_pool(POOL)
    static_pins = {
        "version": VERSION,
        "seed": settings.seed,
        "max_tokens": settings.max_tokens,
        "temperature": 0.0,
        "judge": {"name": JUDGE.name, **JUDGE.settings},
        "benchmarks": shas,
        "pool": pool_sha256(pool),
    }
    with open_records(settings.out) as records:
        pin_run(settings.out, static_pins)
        tasks = [
            task
            for pipeline in settings.pipelines
            for method in settings.methods
            for name, items in samples.items()
            for item in items
            if (task := Task(pipeline, method, name, item)).key not in records
        ]
        total = len(settings.pipelines) * len(settings.methods) * sum(map(len, samples.values()))
        log.info("%d of %d generations to run (%d done)", len(tasks), total, total - len(tasks))
        if tasks:
            _generate(settings, tasks, pool, records, static_pins)
        wanted = {(n, item.id) for n, items in samples.items() for item in items}
        mine = [r for r in records if (r.benchmark, r.id) in wanted]
    cells = summarize(mine, settings.pipelines, settings.methods)
    pins = json.loads((settings.out / RUN_FILE).read_bytes())
    atomic_write_json(
        settings.out / SUMMARY_FILE,
        {"limit": settings.limit, "pins": pins, "cells": cells},
    )
    report = render_report(cells, pins, settings.limit)
    atomic_write_text(settings.out / REPORT_FILE, report)
    sys.stdout.write(report)
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if settings.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        run(settings)
    except (ACDError, OSError) as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
