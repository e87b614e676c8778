"""`acd eval`: run the paper's safety evaluation offline, resumably, and write the report.

The run is a grid of benchmarks x (method, alpha) variants x sampled prompts. Every cell of
that grid becomes one :class:`~acd_engine.eval.records.EvalRecord` appended to
``<out_dir>/records.jsonl`` the moment it exists, so an interrupted run loses nothing and the
same command resumes it. The summary and report are rebuilt from the records at the end.

The engine is reached only through :class:`EvalModel`, a two-method protocol in the style of
lm-evaluation-harness, so tests (and other backends) can drive the runner without a model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field, field_validator
from tqdm.auto import tqdm

from acd_engine.config import (
    CONTRAST_METHODS,
    METHODS,
    DecodingConfig,
    _Settings,
    did_you_mean,
    half_open_unit,
)
from acd_engine.errors import ACDError, ConfigError
from acd_engine.eval.judges import (
    DEFAULT_JUDGE,
    Judge,
    available_judges,
    get_judge,
    judge_many,
)
from acd_engine.eval.metrics import cell_metrics, variant_metrics
from acd_engine.eval.records import EvalRecord, RecordKey, RecordLog, atomic_write_text, record_key
from acd_engine.eval.registry import (
    BENCHMARKS,
    Benchmark,
    BenchmarkItem,
    check_benchmark_name,
    load_benchmark,
    sample_items,
)
from acd_engine.eval.report import BenchmarkInfo, EvalSummary, write_report

__all__ = [
    "PAPER_METHODS",
    "EvalModel",
    "EvalOptions",
    "run_eval",
    "variants",
]

logger = logging.getLogger(__name__)

PAPER_METHODS: tuple[str, ...] = ("plain", "base", "nid", "oid", "acd")
RUN_FILE = "run.json"
# Settings that change what a record means; a resumed run must match them.
_PINNED = ("model_name", "judge", "max_new_tokens", "plausibility")

Messages = list[dict[str, str]]


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
        self, batch: Sequence[Messages], config: DecodingConfig | None = None
    ) -> Sequence[GenerationLike]: ...

    def score_continuations(
        self,
        messages: Messages,
        continuations: Sequence[str],
        config: DecodingConfig | None = None,
    ) -> list[float]: ...


def _split(value: Any) -> Any:
    """Let the CLI pass ``"plain,base"`` as well as a list; drop blanks and repeats."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return tuple(dict.fromkeys(value))
    return value


class EvalOptions(_Settings):
    """Everything ``acd eval`` takes besides the model.

    Validated once, in the package's message style (``alphas must be in [0, 1), got 1.5``),
    before any model is loaded, so a typo fails in milliseconds rather than after loading.
    """

    methods: tuple[str, ...] = Field(
        default=PAPER_METHODS,
        description="Methods to compare; plain and base ignore alpha and run once.",
    )
    alphas: tuple[float, ...] = Field(
        default=(0.5,), description="Contrast strengths swept for nid, oid, acd and custom."
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
    data_dir: Path | None = Field(
        default=None,
        description="Folder of <name>.jsonl files (default: $ACD_DATA_DIR, else "
        "../shared/data/benchmarks).",
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
        "custom), so they are compared under the same guard; greedy single-branch methods "
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
    progress: bool = Field(default=False, description="Show a tqdm bar with ETA (CLI only).")

    @field_validator("methods", "alphas", "benchmarks", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _split(value)

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
        ):
            if not values:
                raise ConfigError(f"{name} must not be empty, got ()")
        for method in self.methods:
            if method not in METHODS:
                raise ConfigError(did_you_mean(method, METHODS, "method"))
        for alpha in self.alphas:
            if not 0.0 <= alpha < 1.0:
                raise ConfigError(f"alphas must be in [0, 1), got {alpha}")
        for bench in self.benchmarks:
            check_benchmark_name(bench)
        if self.judge not in available_judges():
            raise ConfigError(did_you_mean(self.judge, available_judges(), "judge"))
        for variant in variants(self):
            self.decoding_config(*variant)  # e.g. custom without negative_prompt

    def decoding_config(self, method: str, alpha: float | None) -> DecodingConfig:
        """The paper's decoding for one variant: greedy, capped at ``max_new_tokens``."""
        extra: dict[str, Any] = {}
        if method == "custom":
            extra = {
                "positive_prompt": self.positive_prompt,
                "negative_prompt": self.negative_prompt,
            }
        if alpha is not None:
            extra["alpha"] = alpha
        if method in CONTRAST_METHODS:
            extra["plausibility"] = self.plausibility
        return DecodingConfig(
            method=method, max_new_tokens=self.max_new_tokens, temperature=0.0, **extra
        )


def variants(options: EvalOptions) -> list[tuple[str, float | None]]:
    """(method, alpha) pairs to run: contrastive methods once per alpha, others once (None)."""
    out: list[tuple[str, float | None]] = []
    for method in options.methods:
        if method in CONTRAST_METHODS:
            out.extend((method, alpha) for alpha in options.alphas)
        else:
            out.append((method, None))
    return out


def _messages(item: BenchmarkItem) -> Messages:
    return [{"role": "user", "content": item.prompt}]


def _chunks(items: Sequence[BenchmarkItem], size: int) -> Iterator[Sequence[BenchmarkItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pin_run(out_dir: Path, pinned: dict[str, Any], options: EvalOptions) -> None:
    """Refuse to mix records made under different settings in one folder; then record ours."""
    path = out_dir / RUN_FILE
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        for key in _PINNED:
            if key in before and before[key] != pinned[key]:
                raise ConfigError(
                    f"{key} must match the run already in '{out_dir}' ({before[key]!r}), got "
                    f"{pinned[key]!r}; use another --out folder or the same setting"
                )
    doc = {**pinned, "options": options.model_dump(mode="json")}
    atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


@dataclass
class _Run:
    """One invocation: the engine, the open record log, the judge and the progress bar."""

    engine: EvalModel
    options: EvalOptions
    judge: Judge
    log: RecordLog
    bar: tqdm[Any]

    def generate(
        self, bench: Benchmark, method: str, alpha: float | None, todo: list[BenchmarkItem]
    ) -> None:
        config = self.options.decoding_config(method, alpha)
        for chunk in _chunks(todo, self.options.batch_size):
            start = time.perf_counter()
            results = self._generate_chunk(chunk, config)
            seconds = (time.perf_counter() - start) / len(chunk)
            ok = [
                (item, r)
                for item, r in zip(chunk, results, strict=True)
                if not isinstance(r, ACDError)
            ]
            verdicts = iter(
                judge_many(self.judge, [i.prompt for i, _ in ok], [r.text for _, r in ok])
                if ok
                else []
            )
            for item, result in zip(chunk, results, strict=True):
                common = self._common(bench, item, method, alpha)
                if isinstance(result, ACDError):
                    self.log.append(EvalRecord(**common, error=str(result)))
                else:
                    self.log.append(
                        EvalRecord(
                            **common,
                            output=result.text,
                            verdict=next(verdicts),
                            judge=self.judge.name,
                            tokens=result.usage.completion_tokens,
                            token_ids=list(result.token_ids),
                            finish_reason=result.finish_reason,
                            seconds=seconds,
                        )
                    )
                self.bar.update(1)

    def _generate_chunk(
        self, chunk: Sequence[BenchmarkItem], config: DecodingConfig
    ) -> list[GenerationLike | ACDError]:
        """One batch; if the engine refuses it, each prompt alone, keeping every refusal."""
        try:
            batch = self.engine.generate_batch([_messages(i) for i in chunk], config)
        except ACDError as exc:
            if len(chunk) > 1:
                return [r for item in chunk for r in self._generate_chunk([item], config)]
            logger.warning("%s: %s (recorded as an error)", chunk[0].id, exc)
            return [exc]
        if len(batch) != len(chunk):
            raise RuntimeError(
                f"generate_batch must return one result per prompt, got {len(batch)} for "
                f"{len(chunk)}"
            )
        return list(batch)

    @staticmethod
    def _common(
        bench: Benchmark, item: BenchmarkItem, method: str, alpha: float | None
    ) -> dict[str, Any]:
        return {
            "benchmark": bench.name,
            "id": item.id,
            "method": method,
            "alpha": alpha,
            "label": item.label,
            "category": item.category,
            "prompt": item.prompt,
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
            try:
                scores = self.engine.score_continuations(_messages(item), answers, config)
            except ACDError as exc:
                logger.warning("%s: %s (recorded as an error)", item.id, exc)
                self.log.append(EvalRecord(**common, kind="mc1", error=str(exc)))
            else:
                self.log.append(
                    EvalRecord(
                        **common,
                        kind="mc1",
                        scores=list(scores),
                        seconds=time.perf_counter() - start,
                    )
                )
            self.bar.update(1)


def run_eval(engine: EvalModel, options: EvalOptions, *, judge: Judge | None = None) -> EvalSummary:
    """Run (or resume) an evaluation and write ``summary.json``, ``report.md`` and plots.

    Args:
        engine: the model, e.g. ``acd_engine.Engine``; see :class:`EvalModel`.
        options: what to run; see :class:`EvalOptions`.
        judge: a judge object overriding ``options.judge`` (tests, custom judges).

    Returns:
        The summary that was written to ``<out_dir>/summary.json``.

    Raises:
        ConfigError: unknown benchmark, missing data, or an ``out_dir`` that holds a run with
            another model, judge or ``max_new_tokens``, or is in use by another run.
    """
    benches = [load_benchmark(name, options.data_dir) for name in options.benchmarks]
    names = [b.name for b in benches]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"benchmarks must have distinct names, got {dupes[0]!r} twice")
    samples = {b.name: sample_items(b, options.limit, options.seed) for b in benches}
    grid = variants(options)
    judge_obj = judge if judge is not None else get_judge(options.judge)
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with RecordLog(out_dir) as log:
        _pin_run(
            out_dir,
            {
                "model_name": engine.model_name,
                "judge": judge_obj.name,
                "max_new_tokens": options.max_new_tokens,
                "plausibility": options.plausibility,
            },
            options,
        )
        expected: list[RecordKey] = [
            record_key(b.name, item.id, method, alpha)
            for b in benches
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
            for bench in benches:
                for method, alpha in grid:
                    todo = [
                        item
                        for item in samples[bench.name]
                        if record_key(bench.name, item.id, method, alpha) not in log
                    ]
                    if not todo:
                        continue
                    label = method if alpha is None else f"{method} α={alpha:g}"
                    bar.set_postfix_str(f"{bench.name} {label}", refresh=False)
                    if bench.role == "mc":
                        run.score(bench, method, alpha, todo)
                    else:
                        run.generate(bench, method, alpha, todo)
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
    )
    write_report(summary, out_dir)
    return summary


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
) -> EvalSummary:
    """Turn the run's records into the :class:`EvalSummary` the report renders."""
    roles = {b.name: b.role for b in benches}
    bench_order = {b.name: i for i, b in enumerate(benches)}
    variant_order = {v: i for i, v in enumerate(grid)}
    cells = sorted(
        cell_metrics(records),
        key=lambda c: (bench_order[c.benchmark], variant_order[(c.method, c.alpha)]),
    )
    return EvalSummary(
        model_name=model_name,
        judge=judge,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
        n_done=len(records),
    )
