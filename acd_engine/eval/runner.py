"""`acd eval`: run the paper's safety evaluation offline, resumably, and write the report.

The run is a grid of benchmarks x contexts x (method, alpha) variants x sampled prompts. Every
cell of that grid becomes one :class:`~acd_engine.eval.records.EvalRecord` appended to
``<out_dir>/records.jsonl`` the moment it exists, so an interrupted run loses nothing and the
same command resumes it. The summary and report are rebuilt from the records at the end.

The engine is reached only through :class:`EvalModel`, a two-method protocol in the style of
lm-evaluation-harness, so tests (and other backends) can drive the runner without a model.

Hostile input is contained where it enters. :func:`prepare_eval` checks everything that needs
no model (benchmark files, the output folder and its files, ``run.json``) so ``acd eval``
fails in milliseconds, not after loading. A row that cannot be generated (a lone surrogate,
a prompt the engine refuses, a generation that raises) or judged (an endpoint that timed
out) becomes one error record and the run goes on; a rerun skips it like any finished row.
``run.json`` pins every setting that changes an output, so one folder never mixes runs.

A context (``--context``) places each sampled prompt where applications put it (behind an
app's system prompt, inside retrieved passages, in an agent turn with tools; see
:mod:`acd_engine.safety.contexts`) with the wrapper texts of the package's ``eval`` pool, which no
gate or threshold was tuned on. ``bare``, the default, sends the prompt alone, as the paper
does. The judge always reads the benchmark prompt itself, so a verdict means the same thing in
every context.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from pydantic import Field, field_validator
from tqdm.auto import tqdm

from acd_engine.atomic import atomic_write_text, probe_writable
from acd_engine.config import (
    UNICODE_RULE,
    DecodingConfig,
    Settings,
    comma_list,
    did_you_mean,
    half_open_unit,
    unicode_problem,
)
from acd_engine.errors import ACDError, ConfigError
from acd_engine.eval.judges import (
    DEFAULT_JUDGE,
    Judge,
    Verdict,
    available_judges,
    get_judge,
    judge_many,
)
from acd_engine.eval.metrics import (
    cell_metrics,
    context_gate_curve,
    context_metrics,
    gate_checks,
    gate_flag_rates,
    gate_sweep,
    variant_metrics,
)
from acd_engine.eval.pins import check_pins
from acd_engine.eval.records import (
    BARE,
    EVAL_CONTRAST_METHODS,
    EVAL_METHODS,
    GATED_METHOD,
    RECORDS_FILE,
    EvalRecord,
    RecordKey,
    RecordLog,
    json_line,
    record_key,
)
from acd_engine.eval.registry import (
    BENCHMARKS,
    Benchmark,
    BenchmarkItem,
    check_benchmark_data,
    check_benchmark_name,
    load_benchmark,
    sample_items,
)
from acd_engine.eval.report import (
    PLOT_FILES,
    REPORT_FILE,
    SUMMARY_FILE,
    BenchmarkInfo,
    EvalSummary,
    write_report,
)
from acd_engine.methods import METHOD_REGISTRY
from acd_engine.safety.contexts import ContextPool, check_contexts, load_pool, place

__all__ = [
    "EVAL_POOL",
    "MAX_UNEXPECTED_IN_A_ROW",
    "PAPER_METHODS",
    "RUN_FILE",
    "EvalModel",
    "EvalOptions",
    "EvalPlan",
    "check_engine_gate",
    "check_out_dir",
    "check_pack_file",
    "gate_sha256",
    "pack_gate",
    "pack_sha256",
    "pool_sha256",
    "prepare_eval",
    "run_eval",
    "variants",
]

logger = logging.getLogger(__name__)

PAPER_METHODS: tuple[str, ...] = ("plain", "base", "nid", "oid", "acd", GATED_METHOD)
RUN_FILE = "run.json"
OUTPUT_FILES: tuple[str, ...] = (
    RECORDS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    REPORT_FILE,
    *PLOT_FILES.values(),
)
# run.json files written before every setting was pinned kept four at the top level.
_LEGACY_PINS = {
    "model_name": "model",
    "judge": "judge",
    "max_new_tokens": "max_new_tokens",
    "plausibility": "plausibility",
}
# DecodingConfig fields pinned under their own names or not at all: method and alpha are part
# of every record's key, the custom prompts are pinned only when custom runs, and gate is
# fixed by the eval method name (acd: False, acd-gate: True; pinned when acd runs).
_UNPINNED_DECODING = frozenset(
    {
        "method",
        "alpha",
        "max_new_tokens",
        "plausibility",
        "positive_prompt",
        "negative_prompt",
        "gate",
    }
)
GATELESS_PACK = (
    f"{GATED_METHOD} needs a prompt pack with a safety gate; fit one with "
    "acd gate --pack ... --out ..."
)

MAX_UNEXPECTED_IN_A_ROW = 16
"""Rows in a row that may fail with an error that is not about their input before the run
stops with that error (a bug, a broken device): recording thousands of identical failures
would hide it, and the unrecorded rows are retried by the next run."""
# What a single row's bad input raises: the engine's own refusals, and ValueErrors (which
# include UnicodeError and pydantic's ValidationError) from tokenizers and parsers.
_INPUT_ERRORS: tuple[type[Exception], ...] = (ACDError, ValueError)
# What a judge raises for one pair it cannot judge (JudgeError is an ACDError; OSError for
# judges that do their own I/O).
_JUDGE_ERRORS: tuple[type[Exception], ...] = (ACDError, ValueError, OSError)

Messages = list[dict[str, str]]
Tools = list[dict[str, Any]]
EVAL_POOL: Final = "eval"
"""The pool of wrapper texts ``--context`` places prompts with: written apart from the gate's
``train`` and ``val`` pools, and never used to fit or tune anything."""


class _UsageLike(Protocol):
    @property
    def completion_tokens(self) -> int: ...


class GenerationLike(Protocol):
    """The fields of ``acd_engine.GenerationResult`` the runner reads."""

    @property
    def text(self) -> str: ...

    @property
    def token_ids(self) -> list[int]: ...

    @property
    def finish_reason(self) -> str: ...

    @property
    def usage(self) -> _UsageLike: ...


class EvalModel(Protocol):
    """What the runner needs from a model; ``acd_engine.Engine`` satisfies it."""

    @property
    def model_name(self) -> str: ...

    def generate_batch(
        self,
        batch: Sequence[Messages],
        config: DecodingConfig | None = None,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Sequence[GenerationLike]: ...

    def score_continuations(
        self,
        messages: Messages,
        continuations: Sequence[str],
        config: DecodingConfig | None = None,
    ) -> list[float]: ...


class EvalOptions(Settings):
    """Everything ``acd eval`` takes besides the model.

    Validated once, in the package's message style (``alphas must be in [0, 1), got 1.5``),
    before any model is loaded, so a typo fails in milliseconds rather than after loading.
    """

    methods: tuple[str, ...] = Field(
        default=PAPER_METHODS,
        description="Methods to compare; plain and base ignore alpha and run once. acd is the "
        "paper's ungated ACD; acd-gate is ACD routed by the pack's safety gate (flagged "
        "requests: SP - alpha*AP, others: DecodingConfig's gate_passed_method, base).",
    )
    alphas: tuple[float, ...] = Field(
        default=(0.5,),
        description="Contrast strengths swept for nid, oid, acd, acd-gate and custom.",
    )
    benchmarks: tuple[str, ...] = Field(
        default=tuple(BENCHMARKS),
        description="Registered names or paths to JSONL files in the shared schema.",
    )
    limit: int | None = Field(
        default=100,
        ge=1,
        description="Prompts sampled per benchmark (the paper uses 100); None takes all.",
    )
    seed: int = Field(default=0, description="Seed of the per-benchmark sample.")
    contexts: tuple[str, ...] = Field(
        default=(BARE,),
        description="Application shapes each prompt is placed in (acd_engine.safety.contexts: bare, "
        "system, multi-turn, rag, rag-system, agent, padded, after-refusal, split), with the "
        "package's eval pool of wrapper texts. bare sends the prompt alone, as the paper does; "
        "multiple-choice sets (truthfulqa) are scored only in bare.",
    )
    data_dir: Path | None = Field(
        default=None,
        description="Folder of <name>.jsonl files, as `acd data fetch` writes them (default: "
        "$ACD_DATA_DIR, else ../shared/data/benchmarks when there, else "
        "~/.local/share/acd/benchmarks).",
    )
    out_dir: Path = Field(
        default=Path("runs/eval"),
        description="Where records.jsonl, summary.json, report.md and plots go; rerunning "
        "with the same folder resumes.",
    )
    max_new_tokens: int = Field(default=256, ge=1, description="Generation length cap.")
    batch_size: int = Field(default=8, ge=1, description="Prompts per generate_batch call.")
    plausibility: float = Field(
        default=0.1,
        description="Plausibility constraint tau for every contrast method (nid, oid, acd, "
        "acd-gate, custom), so they are compared under the same guard; greedy single-branch methods "
        "are unaffected by it. 0.1 is the shipped pack's recommendation, chosen on the anchor "
        "validation split (docs/opo.md), never on these benchmarks; 0 is the paper's raw "
        "contrast.",
    )
    judge: str = Field(default=DEFAULT_JUDGE, description="Refusal judge name (get_judge).")
    positive_prompt: str | None = Field(
        default=None, description="method 'custom' only: positive-branch system prompt."
    )
    negative_prompt: str | None = Field(
        default=None, description="method 'custom' only: negative-branch system prompt."
    )
    gate_threshold: float | None = Field(
        default=None,
        description="acd-gate only: the gate threshold its requests decode with instead of the "
        "pack's (DecodingConfig.gate_threshold), so a threshold an application sets can be "
        "measured where it puts its requests. None: the pack's.",
    )
    progress: bool = Field(default=False, description="Show a tqdm bar with ETA (CLI only).")

    @field_validator("methods", "alphas", "benchmarks", "contexts", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("plausibility")
    @classmethod
    def _unit_range(cls, v: float) -> float:
        return half_open_unit(v)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        # Checked here rather than in pydantic validators so the message names the list
        # and the bad element exactly, without pydantic's location suffixes.
        for name, values in (
            ("methods", self.methods),
            ("alphas", self.alphas),
            ("benchmarks", self.benchmarks),
            ("contexts", self.contexts),
        ):
            if not values:
                raise ConfigError(f"{name} must not be empty, got ()")
        for method in self.methods:
            if method not in EVAL_METHODS:
                raise ConfigError(did_you_mean(method, EVAL_METHODS, "method"))
        for alpha in self.alphas:
            if not 0.0 <= alpha < 1.0:
                raise ConfigError(f"alphas must be in [0, 1), got {alpha}")
        for bench in self.benchmarks:
            check_benchmark_name(bench)
        check_contexts(self.contexts)
        if self.judge not in available_judges():
            raise ConfigError(did_you_mean(self.judge, available_judges(), "judge"))
        if self.gate_threshold is not None and GATED_METHOD not in self.methods:
            raise ConfigError(
                f"gate_threshold applies to {GATED_METHOD} only; add it to methods, got "
                f"{','.join(self.methods)}"
            )
        for variant in variants(self):
            self.decoding_config(*variant)  # e.g. custom without negative_prompt

    def decoding_config(self, method: str, alpha: float | None) -> DecodingConfig:
        """The paper's decoding for one variant: greedy, capped at ``max_new_tokens``.

        ``method`` is an eval method name: ``acd`` sets ``gate=False`` explicitly (the
        engine's default would gate it whenever the pack has a gate, and the paper's ACD is
        ungated) and ``acd-gate`` is the engine's ``acd`` with ``gate=True``.
        """
        extra: dict[str, Any] = {}
        gated = method == GATED_METHOD
        if gated:
            method = "acd"
        entry = METHOD_REGISTRY.get(method)  # None: DecodingConfig names the unknown method
        if entry is not None and entry.gated:
            extra["gate"] = gated
        if gated and self.gate_threshold is not None:
            extra["gate_threshold"] = self.gate_threshold
        if entry is not None and entry.takes_prompts:
            extra["positive_prompt"] = self.positive_prompt
            extra["negative_prompt"] = self.negative_prompt
        if alpha is not None:
            extra["alpha"] = alpha
        if method in EVAL_CONTRAST_METHODS:
            extra["plausibility"] = self.plausibility
        return DecodingConfig(
            method=method, max_new_tokens=self.max_new_tokens, temperature=0.0, **extra
        )


def variants(options: EvalOptions) -> list[tuple[str, float | None]]:
    """(method, alpha) pairs to run: contrastive methods once per alpha, others once (None)."""
    out: list[tuple[str, float | None]] = []
    for method in options.methods:
        if method in EVAL_CONTRAST_METHODS:
            out.extend((method, alpha) for alpha in options.alphas)
        else:
            out.append((method, None))
    return out


def _messages(item: BenchmarkItem) -> Messages:
    return [{"role": "user", "content": item.prompt}]


def _needs_pool(options: EvalOptions) -> bool:
    """Whether the run places prompts in any shape besides ``bare`` (and so reads the pool)."""
    return any(context != BARE for context in options.contexts)


@dataclass(frozen=True)
class _Row:
    """One sampled item as it is sent: the conversation and the tools of its context."""

    item: BenchmarkItem
    messages: Messages
    tools: Tools | None = None

    @property
    def tools_key(self) -> str:
        """Rows with equal keys can share one ``generate_batch`` call (it takes one tools
        list for the whole batch)."""
        return "" if self.tools is None else json.dumps(self.tools, sort_keys=True)


def _place(item: BenchmarkItem, context: str, pool: ContextPool | None, seed: int) -> _Row:
    """``item`` in ``context``; ``bare`` is exactly the one user turn a run without
    ``--context`` sends (and needs no pool). The seed is the run's seed and the item's id, so
    a prompt keeps its wrapper across methods, alphas and reruns."""
    if context == BARE:
        return _Row(item, _messages(item))
    assert pool is not None, "a placed context needs the eval pool (prepare_eval loads it)"
    placed = place(item.prompt, context, pool, seed=f"{seed}|{item.id}")
    return _Row(item, placed.messages, placed.tools)


def _chunks(rows: Sequence[_Row], size: int) -> Iterator[Sequence[_Row]]:
    """Batches of at most ``size`` rows, each of rows with the same tools (in the order the
    tools first appear; a bare or tool-less context is one group, so its batches are the
    plain slices they always were)."""
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.tools_key, []).append(row)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


def pack_sha256(pack: Any) -> str:
    """SHA-256 over a prompt pack's SP and AP tensors (dtype, shape and bytes).

    The pack's own ``id`` is a short prefix; the full hash is pinned so two packs can never
    pass for one.
    """
    digest = hashlib.sha256()
    for name in ("sp", "ap"):
        tensor = getattr(pack, name).detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def pack_gate(engine: Any) -> Any:
    """The safety gate of ``engine``'s prompt pack, or None (no pack, or a gateless one)."""
    return getattr(getattr(engine, "pack", None), "gate", None)


def pool_sha256(pool: ContextPool) -> str:
    """SHA-256 over a pool's texts (canonical JSON), pinned when a run places prompts with it:
    other wrapper texts make other requests, so one folder must never mix two pools."""
    text = json.dumps(pool.model_dump(mode="json"), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def gate_sha256(gate: Any) -> str:
    """SHA-256 over a safety gate: its tensors (dtype, shape, bytes), layers, pooling and
    threshold (the same tensors pooled another way read other features).

    Pinned apart from :func:`pack_sha256` so refitting or re-thresholding the gate refuses
    a folder with ``acd-gate`` records but leaves ungated ``acd`` records (which never read
    the gate) valid.
    """
    digest = hashlib.sha256()
    digest.update(
        f"layers:{tuple(gate.layers)};threshold:{float(gate.threshold)!r};"
        f"pooling:{gate.pooling};".encode()
    )
    for name, tensor in sorted(gate.tensors().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _static_pins(
    options: EvalOptions,
    benches: Sequence[Benchmark],
    judge: Judge | None,
    pool: ContextPool | None = None,
) -> dict[str, Any]:
    """The pinned settings that need no model: decoding, benchmark contents, the judge, and
    the eval pool's texts when a context other than ``bare`` places prompts with them (a
    bare-only run reads no pool, so it pins none and a later run may add contexts)."""
    pins: dict[str, Any] = {
        "max_new_tokens": options.max_new_tokens,
        "plausibility": options.plausibility,
    }
    decoding = options.decoding_config("plain", None).model_dump(mode="json")
    for name, value in decoding.items():
        if name not in _UNPINNED_DECODING:
            pins[f"decoding {name}"] = value
    if "acd" in options.methods:
        pins["decoding gate"] = options.decoding_config("acd", 0.5).gate
    if GATED_METHOD in options.methods:  # None (the pack's) unless --gate-threshold
        pins["decoding gate_threshold"] = options.gate_threshold
    if "custom" in options.methods:
        pins["custom positive_prompt"] = options.positive_prompt
        pins["custom negative_prompt"] = options.negative_prompt
    for bench in benches:
        pins[f"benchmark {bench.name} sha256"] = bench.sha256
    if pool is not None and _needs_pool(options):
        pins[f"context pool {EVAL_POOL} sha256"] = pool_sha256(pool)
    if judge is not None:
        pins["judge"] = judge.name
        settings = getattr(judge, "settings", None)
        if isinstance(settings, dict):
            for key, value in settings.items():
                pins[f"judge {key}"] = value
    return _as_json(pins)


def _engine_pins(engine: EvalModel, options: EvalOptions) -> dict[str, Any]:
    """The pinned settings of the model: its name, its weights' fingerprint, dtype and pack.

    Read with ``getattr`` because :class:`EvalModel` only promises ``model_name``; an
    ``acd_engine.Engine`` has them all. The pack is pinned only when ``acd`` or ``acd-gate``
    runs (no other method reads it), so a plain-only run can later be extended with ``acd``;
    its gate (tensors, layers, threshold) only when ``acd-gate`` runs, for the same reason.
    """
    pins: dict[str, Any] = {"model": engine.model_name}
    fingerprint = getattr(engine, "fingerprint", None)
    if isinstance(fingerprint, dict):
        for key, value in sorted(fingerprint.items()):
            pins[f"model {key}"] = value
    describe = getattr(engine, "describe", None)
    if callable(describe):
        facts = describe()
        if isinstance(facts, dict) and "dtype" in facts:
            pins["model dtype"] = facts["dtype"]
        # llama.cpp runs the GGUF's quantized weights: its records never mix with torch's
        if isinstance(facts, dict) and "backend" in facts:
            pins["model backend"] = facts["backend"]
    # Quantized weights answer differently: a run never mixes them with float ones. A run
    # directory written before this pin existed gains it on resume (new pins extend).
    model_config = getattr(engine, "model_config", None)
    if model_config is not None:
        pins["model quantize"] = model_config.quantize
    if "acd" in options.methods or GATED_METHOD in options.methods:
        pack = getattr(engine, "pack", None)
        if pack is not None:
            pins["pack sha256"] = pack_sha256(pack)
    gate = pack_gate(engine)
    if GATED_METHOD in options.methods and gate is not None:
        pins["pack gate sha256"] = gate_sha256(gate)
        pins["pack gate threshold"] = float(gate.threshold)
    return _as_json(pins)


def _as_json(pins: dict[str, Any]) -> dict[str, Any]:
    """Pins as they read back from run.json (tuples as lists), so comparisons are exact."""
    loaded: dict[str, Any] = json.loads(json.dumps(pins))
    return loaded


def _read_pins(out_dir: Path) -> dict[str, Any] | None:
    """The settings pinned by the run already in ``out_dir``, or None for a new folder."""
    path = out_dir / RUN_FILE
    if not path.exists():
        return None
    problem = ""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # unreadable, not JSON, not UTF-8
        doc, problem = None, f" ({type(exc).__name__})"
    if not isinstance(doc, dict):
        raise ConfigError(
            f"run.json in '{out_dir}' must be the JSON object acd eval wrote, got an unreadable "
            f"file{problem}; use a new --out"
        )
    pins = doc.get("pinned")
    if isinstance(pins, dict):
        return pins
    return {new: doc[old] for old, new in _LEGACY_PINS.items() if old in doc}


def _pin_run(out_dir: Path, now: dict[str, Any], options: EvalOptions) -> None:
    """Check ``now`` against ``run.json`` and write the union back (call under the lock)."""
    before = _read_pins(out_dir)
    check_pins(out_dir, before, now)
    pinned = {**(before or {}), **now}
    doc = {
        "model_name": pinned.get("model"),
        "judge": pinned.get("judge"),
        "pinned": pinned,
        "options": options.model_dump(mode="json"),
    }
    atomic_write_text(out_dir / RUN_FILE, json_line(doc, indent=2) + "\n")


def check_out_dir(out_dir: Path) -> None:
    """Make sure ``out_dir`` is (or can become) a writable folder whose output names are free.

    Raises:
        ConfigError: ``out_dir`` is a file or under one, cannot be created or written, or one
            of the files the run writes (records.jsonl, run.json, ...) is a folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir must be a folder, got the file '{out_dir}'")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe_writable(out_dir)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"out_dir must be a writable folder, got '{out_dir}' ({reason})"
        ) from None
    for name in OUTPUT_FILES:
        path = out_dir / name
        if path.exists() and not path.is_file():
            raise ConfigError(
                f"{name} in '{out_dir}' must be a file, got a folder (or another non-file); "
                "move it away or use a new --out"
            )
        if path.is_file() and not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"{name} in '{out_dir}' must be readable and writable, got neither")


@dataclass(frozen=True)
class EvalPlan:
    """What :func:`prepare_eval` checked and loaded: the benchmarks, samples and variants,
    and the eval pool of wrapper texts (None when every context is ``bare``)."""

    benches: tuple[Benchmark, ...]
    samples: dict[str, tuple[BenchmarkItem, ...]]
    grid: list[tuple[str, float | None]]
    pool: ContextPool | None = None


def _load_eval_pool(options: EvalOptions) -> ContextPool | None:
    """The eval pool when a context needs it, checked by placing a probe in every context
    the run asks for, so a pool that cannot serve one (``after-refusal`` without earlier
    requests) fails before the model loads, not as an error on every row."""
    if not _needs_pool(options):
        return None
    pool = load_pool(EVAL_POOL)
    for context in options.contexts:
        place("How do I reset my router?", context, pool, seed=options.seed)
    return pool


def prepare_eval(options: EvalOptions, judge: Judge | None = None) -> EvalPlan:
    """Check everything a run needs that does not need the model, before one is loaded.

    Loads every benchmark (and the eval pool of wrapper texts, when a context needs it),
    checks the output folder and its files, opens ``records.jsonl`` once (a corrupt line or
    another run holding the folder fails here) and compares the model-free settings with
    ``run.json``. :func:`run_eval` calls it too; ``acd eval`` calls it before loading the
    model so a typo costs milliseconds, not a model load.

    Raises:
        ConfigError: bad or duplicate benchmark, unusable ``out_dir``, a pool that cannot
            place a requested context, or a ``run.json`` made with other settings (another
            pool's texts among them).
    """
    check_benchmark_data(options.benchmarks, options.data_dir)  # every missing set at once
    benches = tuple(load_benchmark(name, options.data_dir) for name in options.benchmarks)
    names = [b.name for b in benches]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"benchmarks must have distinct names, got {dupes[0]!r} twice")
    pool = _load_eval_pool(options)
    out_dir = Path(options.out_dir)
    check_out_dir(out_dir)
    with RecordLog(out_dir):
        check_pins(out_dir, _read_pins(out_dir), _static_pins(options, benches, judge, pool))
    samples = {b.name: sample_items(b, options.limit, options.seed) for b in benches}
    return EvalPlan(benches, samples, variants(options), pool)


def check_engine_gate(engine: Any, options: EvalOptions) -> None:
    """Refuse ``acd-gate`` on an engine whose pack has no safety gate, before any generation.

    The engine would otherwise run ``acd-gate`` as ungated ACD without a word (no gate, no
    routing), and the records would silently duplicate ``acd`` under another name.
    """
    if GATED_METHOD in options.methods and pack_gate(engine) is None:
        raise ConfigError(GATELESS_PACK)


def check_pack_file(options: EvalOptions, pack: str | os.PathLike[str] | None) -> None:
    """The same check as :func:`check_engine_gate` on a pack file, before the model loads.

    ``acd eval --pack FILE`` calls it so a gateless pack fails in milliseconds; without
    ``--pack`` the engine picks the model's shipped pack and :func:`run_eval` checks it.
    """
    if pack is None or GATED_METHOD not in options.methods:
        return
    from acd_engine.safety.prompts import PromptPack

    if PromptPack.load(pack).gate is None:
        raise ConfigError(GATELESS_PACK)


def _gate_threshold(engine: Any, options: EvalOptions) -> float | None:
    """The threshold the acd-gate generations ran with (None without a gate): the engine's
    rule (``gate_threshold``) applied to the run's acd-gate decoding, so ``--gate-threshold``
    wins over the pack's exactly as it does when a request is gated."""
    from acd_engine.safety.gate import gate_threshold  # torch: options validate without it

    gate = pack_gate(engine)
    if gate is None:
        return None
    return gate_threshold(options.decoding_config(GATED_METHOD, None), gate)


def _describe_error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ACDError) else f"{type(exc).__name__}: {exc}"


def _unencodable(texts: Sequence[str]) -> str | None:
    """The error of a row whose text cannot reach a tokenizer, or None when it can."""
    for text in texts:
        problem = unicode_problem(text)
        if problem is not None:
            return f"prompt {UNICODE_RULE}, {problem}"
    return None


@dataclass
class _Run:
    """One invocation: the engine, the open record log, the judge and the progress bar.

    Failures are contained per row. A row whose input is bad (an ``ACDError`` or
    ``ValueError``) is recorded as an error at once. A row that fails otherwise is recorded
    too, but only once a later row succeeds (or the run ends): when
    :data:`MAX_UNEXPECTED_IN_A_ROW` rows fail that way in a row, the run stops with the error
    instead, and those rows, never written, are retried by the next run.
    """

    engine: EvalModel
    options: EvalOptions
    judge: Judge
    log: RecordLog
    bar: tqdm[Any]
    pending: list[EvalRecord] = field(default_factory=list)

    def _record_failure(self, common: dict[str, Any], exc: Exception, kind: str) -> None:
        record = EvalRecord(**common, kind=kind, error=_describe_error(exc))
        if isinstance(exc, _INPUT_ERRORS):
            logger.warning("%s: %s (recorded as an error)", common["id"], record.error)
            self.log.append(record)
            return
        logger.warning(
            "%s: unexpected %s (recorded as an error)", common["id"], record.error, exc_info=exc
        )
        self.pending.append(record)
        if len(self.pending) >= MAX_UNEXPECTED_IN_A_ROW:
            logger.error(
                "%d rows in a row failed with unexpected errors; stopping (they are not "
                "recorded, the next run retries them)",
                len(self.pending),
            )
            self.pending.clear()
            raise exc

    def _succeeded(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Record the pending unexpected failures: a success showed they were the rows' own."""
        for record in self.pending:
            self.log.append(record)
        self.pending.clear()

    def generate(
        self,
        bench: Benchmark,
        method: str,
        alpha: float | None,
        todo: list[_Row],
        context: str = BARE,
    ) -> None:
        config = self.options.decoding_config(method, alpha)
        for chunk in _chunks(todo, self.options.batch_size):
            start = time.perf_counter()
            results = self._generate_chunk(chunk, config)
            seconds = (time.perf_counter() - start) / len(chunk)
            ok = [
                (row.item, r)
                for row, r in zip(chunk, results, strict=True)
                if not isinstance(r, Exception)
            ]
            # The judge reads the benchmark prompt, not the placed conversation: a verdict
            # answers "did it refuse this request" in every context alike.
            verdicts = iter(self._judge([i.prompt for i, _ in ok], [r.text for _, r in ok]))
            for row, result in zip(chunk, results, strict=True):
                common = self._common(bench, row.item, method, alpha, context)
                if isinstance(result, Exception):
                    self._record_failure(common, result, "generate")
                else:
                    self._succeeded()
                    verdict = next(verdicts)
                    self.log.append(
                        EvalRecord(
                            **common,
                            output=result.text,
                            verdict=None if isinstance(verdict, Exception) else verdict,
                            judge=self.judge.name,
                            tokens=result.usage.completion_tokens,
                            token_ids=list(result.token_ids),
                            finish_reason=result.finish_reason,
                            seconds=seconds,
                            gate_score=getattr(result, "gate_score", None),
                            gate_flagged=getattr(result, "gate_flagged", None),
                            error=(
                                f"judge {self.judge.name}: {_describe_error(verdict)}"
                                if isinstance(verdict, Exception)
                                else None
                            ),
                        )
                    )
                self.bar.update(1)

    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict | Exception]:
        """Verdicts in order; a pair the judge cannot judge gets its exception instead."""
        if not prompts:
            return []
        try:
            return list(judge_many(self.judge, prompts, responses))
        except _JUDGE_ERRORS as exc:
            if len(prompts) == 1:
                logger.warning("judge %s failed: %s", self.judge.name, exc)
                return [exc]
            logger.warning(
                "judge %s failed on a batch (%s); judging its pairs one by one",
                self.judge.name,
                exc,
            )
        out: list[Verdict | Exception] = []
        for prompt, response in zip(prompts, responses, strict=True):
            try:
                out.append(self.judge.judge(prompt, response))
            except _JUDGE_ERRORS as exc:
                logger.warning("judge %s failed: %s", self.judge.name, exc)
                out.append(exc)
        return out

    def _generate_chunk(
        self, chunk: Sequence[_Row], config: DecodingConfig
    ) -> list[GenerationLike | Exception]:
        """One batch (rows that share their tools); if it fails, each row alone, so one bad
        row costs only itself."""
        bad = [_unencodable([m["content"] for m in row.messages]) for row in chunk]
        if any(bad):
            good = [row for row, why in zip(chunk, bad, strict=True) if why is None]
            done = iter(self._generate_chunk(good, config) if good else [])
            return [next(done) if why is None else ConfigError(why) for why in bad]
        messages = [row.messages for row in chunk]
        tools = chunk[0].tools
        try:
            # Without tools the call is the one a run without --context always made, so a
            # model that knows nothing of tools still runs every other context.
            batch = (
                self.engine.generate_batch(messages, config)
                if tools is None
                else self.engine.generate_batch(messages, config, tools=tools)
            )
        # Broad on purpose: whatever one row makes the engine raise fails its whole batch, and
        # only running the rows alone tells which one it was. Errors a lone row raises are
        # classified (and, when systematic, re-raised) by _record_failure.
        except Exception as exc:  # noqa: BLE001 - classified, and re-raised when systematic, by _record_failure
            if len(chunk) > 1:
                logger.info("a batch failed (%s); generating its %d rows alone", exc, len(chunk))
                return [r for row in chunk for r in self._generate_chunk([row], config)]
            return [exc]
        if len(batch) != len(chunk):
            raise RuntimeError(
                f"generate_batch must return one result per prompt, got {len(batch)} for "
                f"{len(chunk)}"
            )
        return list(batch)

    @staticmethod
    def _common(
        bench: Benchmark,
        item: BenchmarkItem,
        method: str,
        alpha: float | None,
        context: str = BARE,
    ) -> dict[str, Any]:
        return {
            "benchmark": bench.name,
            "id": item.id,
            "method": method,
            "alpha": alpha,
            "label": item.label,
            "category": item.category,
            "prompt": item.prompt,
            "context": context,
        }

    def score(
        self, bench: Benchmark, method: str, alpha: float | None, todo: list[BenchmarkItem]
    ) -> None:
        # Raw contrast: the plausibility filter is a decoding guard that gives -inf to any
        # token outside the safe branch's top set, which would turn MC1 into a count of ties
        # (see DEFINITIONS["MC1"]).
        config = self.options.decoding_config(method, alpha).replace(plausibility=0.0)
        assert isinstance(config, DecodingConfig)
        for item in todo:
            answers = [item.best_answer or "", *(item.incorrect_answers or ())]
            common = self._common(bench, item, method, alpha)
            start = time.perf_counter()
            why = _unencodable([item.prompt, *answers])
            try:
                if why is not None:
                    raise ConfigError(why)
                scores = self.engine.score_continuations(_messages(item), answers, config)
            # Broad for the reason given in _generate_chunk; _record_failure re-raises errors
            # that are not about this row once they repeat.
            except Exception as exc:  # noqa: BLE001 - classified, and re-raised when systematic, by _record_failure
                self._record_failure(common, exc, "mc1")
            else:
                self._succeeded()
                self.log.append(
                    EvalRecord(
                        **common,
                        kind="mc1",
                        scores=list(scores),
                        seconds=time.perf_counter() - start,
                    )
                )
            self.bar.update(1)


def run_eval(
    engine: EvalModel,
    options: EvalOptions,
    *,
    judge: Judge | None = None,
    plan: EvalPlan | None = None,
) -> EvalSummary:
    """Run (or resume) an evaluation and write ``summary.json``, ``report.md`` and plots.

    Args:
        engine: the model, e.g. ``acd_engine.Engine``; see :class:`EvalModel`.
        options: what to run; see :class:`EvalOptions`.
        judge: a judge object overriding ``options.judge`` (tests, custom judges).
        plan: the result of :func:`prepare_eval` for these options, if already made.

    Returns:
        The summary that was written to ``<out_dir>/summary.json``.

    Raises:
        ConfigError: unknown benchmark, missing data, an unusable ``out_dir``, one in use by
            another run, one whose ``run.json`` was made with other settings (the message
            names the setting and both values), or ``acd-gate`` with a gateless pack.
    """
    judge_obj = judge if judge is not None else get_judge(options.judge)
    if plan is None:
        plan = prepare_eval(options, judge_obj)
    check_engine_gate(engine, options)
    benches, samples, grid = plan.benches, plan.samples, plan.grid
    cells = _grid_cells(benches, options.contexts)
    out_dir = Path(options.out_dir)
    check_out_dir(out_dir)

    # Everything from pinning to the report happens under the folder's lock, so a second run
    # can never interleave records with ours or overwrite our report with its own.
    with RecordLog(out_dir) as log:
        _pin_run(
            out_dir,
            {
                **_static_pins(options, benches, judge_obj, plan.pool),
                **_engine_pins(engine, options),
            },
            options,
        )
        expected: list[RecordKey] = [
            record_key(b.name, item.id, method, alpha, context)
            for b, context in cells
            for method, alpha in grid
            for item in samples[b.name]
        ]
        done = sum(key in log for key in expected)
        logger.info(
            "acd eval: %d outputs planned, %d already in %s, %d to go",
            len(expected),
            done,
            log.path,
            len(expected) - done,
        )
        bar: tqdm[Any] = tqdm(
            total=len(expected),
            initial=done,
            disable=not options.progress,
            desc="acd eval",
            unit="out",
            dynamic_ncols=True,
        )
        run = _Run(engine, options, judge_obj, log, bar)
        try:
            for bench, context in cells:
                rows = [_place(i, context, plan.pool, options.seed) for i in samples[bench.name]]
                for method, alpha in grid:
                    todo = [
                        row
                        for row in rows
                        if record_key(bench.name, row.item.id, method, alpha, context) not in log
                    ]
                    if not todo:
                        continue
                    label = method if alpha is None else f"{method} α={alpha:g}"
                    where = "" if context == BARE else f" in {context}"
                    bar.set_postfix_str(f"{bench.name}{where} {label}", refresh=False)
                    if bench.role == "mc":
                        run.score(bench, method, alpha, [row.item for row in todo])
                    else:
                        run.generate(bench, method, alpha, todo, context)
            run.flush()
        except KeyboardInterrupt:
            logger.warning(
                "interrupted: %d records are safe in %s; rerun the same command to resume",
                len(log),
                log.path,
            )
            raise
        finally:
            bar.close()
        wanted = set(expected)
        records = [r for r in log if r.key in wanted]
        summary = summarize(
            records,
            benches,
            samples,
            grid,
            model_name=engine.model_name,
            judge=judge_obj.name,
            options=options,
            n_expected=len(expected),
            gate_threshold=_gate_threshold(engine, options),
            context_pool_sha256=None if plan.pool is None else pool_sha256(plan.pool),
        )
        write_report(summary, out_dir)
    return summary


def _grid_cells(
    benches: Sequence[Benchmark], contexts: Sequence[str]
) -> list[tuple[Benchmark, str]]:
    """(benchmark, context) pairs to run, benchmark by benchmark. A multiple-choice set is
    scored only ``bare``: its score is a log-probability of each answer given the question,
    which a wrapper around the question would change into another measure, not test in
    another setting (logged once, so the missing cells are explained)."""
    skipped = [b.name for b in benches if b.role == "mc"]
    placed = [c for c in contexts if c != BARE]
    if skipped and placed:
        logger.info(
            "%s: multiple choice, scored only in the bare context; contexts %s skip it",
            ", ".join(skipped),
            ", ".join(placed),
        )
    return [(b, c) for b in benches for c in contexts if c == BARE or b.role != "mc"]


def summarize(
    records: Sequence[EvalRecord],
    benches: Sequence[Benchmark],
    samples: dict[str, tuple[BenchmarkItem, ...]],
    grid: Sequence[tuple[str, float | None]],
    *,
    model_name: str,
    judge: str,
    options: EvalOptions,
    n_expected: int,
    gate_threshold: float | None = None,
    context_pool_sha256: str | None = None,
) -> EvalSummary:
    """Turn the run's records into the :class:`EvalSummary` the report renders.

    ``gate_threshold`` is the threshold the acd-gate generations ran with (the pack's, or
    ``--gate-threshold``'s), marked on the threshold sweep and the gate curve (None: not
    marked). Every table the report had before ``--context`` reads the ``bare``
    records only, so it means what it always meant (and a bare run's report is unchanged);
    with any other context, ``by_context`` holds one row per (method, alpha, context).
    ``context_pool_sha256`` is the hash of the eval pool the contexts were placed with.
    """
    roles = {b.name: b.role for b in benches}
    by_context = (
        context_metrics(records, roles, options.contexts, grid)
        if options.contexts != (BARE,)
        else []
    )
    gate_curve = (
        context_gate_curve(records, options.contexts, shipped=gate_threshold) if by_context else []
    )
    n_done = len(records)
    records = [r for r in records if r.context == BARE]
    passed = options.decoding_config(GATED_METHOD, None).gate_passed_method
    sweep, notes = gate_sweep(records, roles, shipped=gate_threshold, passed=passed)
    bench_order = {b.name: i for i, b in enumerate(benches)}
    variant_order = {v: i for i, v in enumerate(grid)}
    cells = sorted(
        cell_metrics(records),
        key=lambda c: (bench_order[c.benchmark], variant_order[(c.method, c.alpha)]),
    )
    return EvalSummary(
        model_name=model_name,
        judge=judge,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        options=options.model_dump(mode="json"),
        benchmarks=[
            BenchmarkInfo(
                name=b.name,
                role=b.role,
                path=str(b.path),
                sha256=b.sha256,
                rows=len(b.items),
                license=BENCHMARKS[b.name].license if b.name in BENCHMARKS else None,
                sample_ids=[item.id for item in samples[b.name]],
            )
            for b in benches
        ],
        variants=sorted(
            variant_metrics(cells, roles, records),
            key=lambda v: variant_order[(v.method, v.alpha)],
        ),
        cells=cells,
        n_expected=n_expected,
        n_done=n_done,
        gate_threshold=gate_threshold,
        gate_passed_method=passed,
        gate_flags=gate_flag_rates(records, roles, [b.name for b in benches]),
        gate_sweep=sweep,
        gate_notes=notes,
        gate_checks=gate_checks(records, passed),
        by_context=by_context,
        context_gate_curve=gate_curve,
        context_pool_sha256=context_pool_sha256,
    )
