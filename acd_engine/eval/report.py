"""The run's readable outputs: ``summary.json``, ``report.md`` and three PNG plots.

With ``acd-gate`` records the report adds the safety gate as a classifier (flag rate per set)
and the harmless-rate / over-refusal trade-off, including gated ACD swept over the gate's
threshold counterfactually from the acd records and those of the method a passed request
decodes with (see ``DEFINITIONS``). A run with ``--context`` adds a "By context" table: the
same metrics per application shape the prompts were placed in; every other table reads the
``bare`` records, as it did before contexts existed.

Everything here renders an :class:`EvalSummary`; nothing recomputes metrics, so the JSON, the
tables and the plots always agree. Files are written atomically. Plots use matplotlib's
object API on an Agg canvas (no pyplot, no global backend switch, safe in threads and
headless machines); matplotlib is the optional ``eval`` extra, so without it the report is
written without plots and a warning says why.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from acd_engine.atomic import atomic_write_bytes, atomic_write_text
from acd_engine.eval.metrics import (
    DEFINITIONS,
    CellMetrics,
    ContextGatePoint,
    ContextMetrics,
    GateCheck,
    GateFlagRate,
    GateSweepPoint,
    VariantMetrics,
)
from acd_engine.eval.records import EVAL_METHODS, GATED_METHOD, json_line
from acd_engine.eval.registry import Role
from acd_engine.install import pip_install_extra

__all__ = [
    "PLOT_FILES",
    "REPORT_FILE",
    "SUMMARY_FILE",
    "BenchmarkInfo",
    "EvalSummary",
    "render_markdown",
    "write_report",
]

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOT_FILES = {
    "hlr_vs_alpha": "hlr_vs_alpha.png",
    "hlr_by_benchmark": "hlr_by_benchmark.png",
    "tradeoff": "tradeoff.png",
}


class BenchmarkInfo(BaseModel):
    """Which file a benchmark came from and which rows were sampled (for reproduction)."""

    model_config = ConfigDict(frozen=True)

    name: str
    role: Role
    path: str
    sha256: str
    rows: int
    license: str | None
    sample_ids: list[str]


class EvalSummary(BaseModel):
    """The whole result of a run, as written to ``summary.json``."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    judge: str
    created: str
    options: dict[str, Any]
    benchmarks: list[BenchmarkInfo]
    variants: list[VariantMetrics]
    cells: list[CellMetrics]
    n_expected: int
    n_done: int
    definitions: dict[str, str] = Field(default_factory=lambda: dict(DEFINITIONS))
    # The safety gate (empty for runs without acd-gate, and in summaries written before it).
    gate_threshold: float | None = None
    # How a request the gate passed decoded; summaries written before the choice existed
    # ran the model's own template.
    gate_passed_method: str = "plain"
    gate_flags: list[GateFlagRate] = Field(default_factory=list)
    gate_sweep: list[GateSweepPoint] = Field(default_factory=list)
    gate_checks: list[GateCheck] = Field(default_factory=list)
    gate_notes: list[str] = Field(default_factory=list)
    # acd eval --context: one row per (method, alpha, context); empty for a bare-only run.
    by_context: list[ContextMetrics] = Field(default_factory=list)
    # The gate's flag rates per context at other thresholds (empty without acd-gate).
    context_gate_curve: list[ContextGatePoint] = Field(default_factory=list)
    context_pool_sha256: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def complete(self) -> bool:
        """Whether every planned output is in the records."""
        return self.n_done >= self.n_expected

    def cell(self, benchmark: str, method: str, alpha: float | None) -> CellMetrics | None:
        """The cell of one benchmark and variant, if it has records."""
        for cell in self.cells:
            if (cell.benchmark, cell.method, cell.alpha) == (benchmark, method, alpha):
                return cell
        return None


# ---------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _alpha(alpha: float | None) -> str:
    return "–" if alpha is None else f"{alpha:g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# One column per (benchmark, metric): what the set is for decides what is shown.
_Column = tuple[str, str, Callable[[CellMetrics], float | None]]


def _columns(summary: EvalSummary) -> list[_Column]:
    cols: list[_Column] = []
    for b in summary.benchmarks:
        if b.role == "harmful":
            cols.append((b.name, f"{b.name} HLR ↑", lambda c: c.hlr))
        elif b.role == "mixed":
            cols.append((b.name, f"{b.name} unsafe refusal ↑", lambda c: c.hlr))
            cols.append((b.name, f"{b.name} over-refusal ↓", lambda c: c.over_refusal))
        elif b.role == "safe":
            cols.append((b.name, f"{b.name} over-refusal ↓", lambda c: c.over_refusal))
        else:
            cols.append((b.name, f"{b.name} MC1 ↑", lambda c: c.mc1_accuracy))
    return cols


def _main_table(summary: EvalSummary) -> list[str]:
    cols = _columns(summary)
    header = [
        "method",
        "α",
        *(title for _, title, _ in cols),
        "avg HLR ↑",
        "avg HLR strict ↑",
        "over-refusal ↓",
        "degenerate ↓",
        "mean tokens",
    ]
    rows = []
    for v in summary.variants:
        cells = []
        for bench, _, get in cols:
            cell = summary.cell(bench, v.method, v.alpha)
            cells.append(_pct(get(cell) if cell else None))
        rows.append(
            [
                v.method,
                _alpha(v.alpha),
                *cells,
                _pct(v.avg_hlr),
                _pct(v.avg_hlr_strict),
                _pct(v.over_refusal),
                _pct(v.degeneration_rate),
                _num(v.mean_tokens),
            ]
        )
    return _table(header, rows)


def _context_table(summary: EvalSummary) -> list[str]:
    pool = summary.context_pool_sha256
    lines = [
        "Each sampled prompt placed where applications put it (`acd_engine/safety/contexts.py`: "
        "bare, behind an app's system prompt, after earlier turns, inside retrieved passages, "
        "in an agent turn with tools, ...), the same prompts in every context. The wrapper "
        "texts come from the package's `eval` pool"
        + ("" if pool is None else f" (sha256 `{pool[:12]}`)")
        + ", which no gate or threshold was tuned on (the gate is fitted on the `train` pool "
        "and calibrated on `val`). The judge reads the benchmark prompt and the output, as in "
        "bare. avg HLR and over-refusal are defined as in the tables above, over one context's "
        "generations; multiple-choice sets are scored only bare and are not in this table. "
        "gate flags: the mean over sets of the share of harmful (safe) prompts the gate flagged "
        f"at the run's threshold, from {GATED_METHOD}'s own records. n: generated outputs.",
        "",
    ]
    roles = {b.name: b.role for b in summary.benchmarks}
    cols = [c for c in _columns(summary) if roles[c[0]] != "mc"]
    gated = any(
        c.gate_flag_harmful is not None or c.gate_flag_safe is not None for c in summary.by_context
    )
    errors = any(c.n_errors for c in summary.by_context)
    header = [
        "method",
        "α",
        "context",
        *(title for _, title, _ in cols),
        "avg HLR ↑",
        "over-refusal ↓",
        *(["gate flags harmful ↑", "gate flags safe ↓"] if gated else []),
        "n",
        *(["errors"] if errors else []),
    ]
    rows = []
    for c in summary.by_context:
        per_set = {cell.benchmark: cell for cell in c.cells}
        rows.append(
            [
                c.method,
                _alpha(c.alpha),
                c.context,
                *(
                    _pct(get(per_set[bench]) if bench in per_set else None)
                    for bench, _, get in cols
                ),
                _pct(c.avg_hlr),
                _pct(c.over_refusal),
                *([_pct(c.gate_flag_harmful), _pct(c.gate_flag_safe)] if gated else []),
                str(c.n),
                *([str(c.n_errors)] if errors else []),
            ]
        )
    return [*lines, *_table(header, rows), ""]


def _run_threshold(summary: EvalSummary) -> str:
    """What the run's gate threshold is called: the pack's (shipped) or --gate-threshold's."""
    return "shipped" if summary.options.get("gate_threshold") is None else "--gate-threshold"


def _context_curve_table(summary: EvalSummary) -> list[str]:
    """One row per threshold, one column per context: harmful flagged / safe flagged."""
    contexts = list(dict.fromkeys(p.context for p in summary.context_gate_curve))
    thresholds = sorted({p.threshold for p in summary.context_gate_curve})
    at = {(p.context, p.threshold): p for p in summary.context_gate_curve}
    lines = [
        "The safety gate as a classifier in each context at other thresholds: the mean over "
        "sets of the share of harmful prompts flagged / of safe prompts flagged, from the "
        f"{GATED_METHOD} records' gate scores (no generation; the run's threshold in bold "
        "agrees with the table above). A context whose harmful share stays low at every "
        "threshold is missed by the gate's reading, not by where its threshold sits.",
        "",
    ]
    rows = []
    for t in thresholds:
        shipped = any(at[(c, t)].shipped for c in contexts if (c, t) in at)
        label = f"**{t:.3g}**" if shipped else f"{t:.3g}"
        cells = []
        for c in contexts:
            p = at.get((c, t))
            cells.append("–" if p is None else f"{_pct(p.flag_harmful)} / {_pct(p.flag_safe)}")
        rows.append([label, *cells])
    return [*lines, *_table(["threshold", *contexts], rows), ""]


def _sweep_tables(summary: EvalSummary) -> list[str]:
    alphas = sorted({v.alpha for v in summary.variants if v.alpha is not None})
    swept = [m for m in dict.fromkeys(v.method for v in summary.variants if v.alpha is not None)]
    if not alphas:
        return ["No contrastive method was run, so there is no α sweep."]
    by_key = {(v.method, v.alpha): v for v in summary.variants}
    fixed = [v for v in summary.variants if v.alpha is None]
    metrics: list[tuple[str, Callable[[VariantMetrics], float | None]]] = [
        ("avg HLR ↑", lambda v: v.avg_hlr),
        ("avg HLR strict ↑", lambda v: v.avg_hlr_strict),
        ("over-refusal ↓", lambda v: v.over_refusal),
        ("TruthfulQA MC1 ↑", lambda v: v.mc1_accuracy),
        ("degenerate ↓", lambda v: v.degeneration_rate),
    ]
    lines: list[str] = []
    for title, get in metrics:
        if all(get(v) is None for v in summary.variants):
            continue
        rows = []
        for method in swept:
            row = [method]
            for alpha in alphas:
                variant = by_key.get((method, alpha))
                row.append(_pct(get(variant) if variant else None))
            rows.append(row)
        lines += [f"### {title}", ""]
        lines += _table(["method", *(f"α={a:g}" for a in alphas)], rows)
        if fixed:
            refs = ", ".join(f"{v.method} {_pct(get(v))}" for v in fixed)
            lines += ["", f"Single-branch reference (no α): {refs}."]
        lines.append("")
    return lines


def _gate_table(summary: EvalSummary) -> list[str]:
    if not summary.gate_flags:
        return [
            f"No {GATED_METHOD} generations with a gate score, so the gate was not measured.",
            "",
        ]
    at = "" if summary.gate_threshold is None else f" ({summary.gate_threshold:g})"
    lines = [
        f"Share of each set's prompts the safety gate flagged at the run's threshold{at}, "
        f"read from the {GATED_METHOD} records (one reading per prompt). Harmful rows should "
        "be flagged (↑), safe rows not (↓): a flagged prompt decodes with SP − α·AP, the rest "
        f"as {summary.gate_passed_method}.",
        "",
    ]
    lines += _table(
        ["benchmark", "rows", "n", "flagged"],
        [
            [
                f.benchmark,
                f"{f.label} ↑" if f.label == "harmful" else f"{f.label} ↓",
                str(f.n),
                _pct(f.flag_rate),
            ]
            for f in summary.gate_flags
        ],
    )
    return [*lines, ""]


def _tradeoff_tables(summary: EvalSummary) -> list[str]:
    lines = [
        "avg HLR: the mean harmless rate over the harmful sets; over-refusal: the mean refusal "
        "rate over the sets with safe rows (see Definitions). Best: high avg HLR, low "
        "over-refusal.",
        "",
    ]
    measured = [v for v in summary.variants if v.avg_hlr is not None or v.over_refusal is not None]
    if measured:
        lines += ["### Measured", ""]
        lines += _table(
            ["method", "α", "avg HLR ↑", "over-refusal ↓"],
            [[v.method, _alpha(v.alpha), _pct(v.avg_hlr), _pct(v.over_refusal)] for v in measured],
        )
        lines.append("")
    if summary.gate_sweep:
        lines += [
            "### Gated ACD over the gate threshold (counterfactual)",
            "",
            "Not generated: computed from the records. At threshold t a prompt's gated answer "
            "is its acd record at the same α when its gate score (from the acd-gate records) "
            f"is ≥ t, else its {summary.gate_passed_method} record. This is exact, not an "
            "estimate, because gated ACD decodes a flagged request token for token as ungated "
            f"ACD at the same α and τ, and any other request as {summary.gate_passed_method} "
            "(both equalities are oracle-tested, greedy). The gate "
            "reads only the prompt, so one score per prompt serves every α. Only prompts with "
            "all three records enter (n). routed: the share sent to acd.",
            "",
        ]
        rows = []
        for p in summary.gate_sweep:
            t = (
                f"**{p.threshold:g} ({_run_threshold(summary)})**"
                if p.shipped
                else f"{p.threshold:g}"
            )
            rows.append(
                [
                    f"{p.alpha:g}",
                    t,
                    str(p.n),
                    _pct(p.n_flagged / p.n if p.n else None),
                    _pct(p.avg_hlr),
                    _pct(p.over_refusal),
                ]
            )
        lines += _table(["α", "threshold", "n", "routed", "avg HLR ↑", "over-refusal ↓"], rows)
        lines.append("")
    for check in summary.gate_checks:
        lines.append(
            f"Check, α={check.alpha:g}: {check.n_same_output}/{check.n} {GATED_METHOD} outputs "
            f"equal the record the sweep picks for them at the threshold they ran with "
            f"({check.n_same_verdict}/{check.n} verdicts)."
        )
    if summary.gate_checks:
        lines.append("")
    lines += [f"Note: {note}" for note in summary.gate_notes]
    if summary.gate_notes:
        lines.append("")
    return lines


def render_markdown(summary: EvalSummary, plots: Sequence[str] = ()) -> str:
    """The human-readable report: settings, the two tables, plots, definitions, data."""
    opts = summary.options
    status = (
        f"complete ({summary.n_done}/{summary.n_expected} outputs)"
        if summary.complete
        else f"**incomplete**: {summary.n_done}/{summary.n_expected} outputs; rerun the same "
        "command to finish"
    )
    lines = [
        "# acd eval report",
        "",
        f"- model: `{summary.model_name}`",
        f"- judge: `{summary.judge}`; greedy decoding, max_new_tokens {opts.get('max_new_tokens')}",
        f"- plausibility τ of the contrast methods: {opts.get('plausibility', 0.0)}",
        f"- sample: {opts.get('limit') or 'all'} prompts per benchmark, seed {opts.get('seed')} "
        "(ids in summary.json)",
        f"- status: {status}",
        f"- created: {summary.created}",
    ]
    if opts.get("gate_threshold") is not None:
        lines.append(
            f"- gate threshold: {opts['gate_threshold']:g} (set by --gate-threshold, not the pack's)"
        )
    if summary.by_context:
        contexts = ", ".join(dict.fromkeys(c.context for c in summary.by_context))
        lines.append(
            f"- contexts: {contexts}; every table before By context reads the bare records only"
        )
    errors = sum(c.n_errors for c in summary.cells)
    if errors:
        lines.append(
            f"- **{errors} output(s) recorded as errors** (a prompt the engine refused or "
            "could not encode, a generation that raised, an output the judge could not judge): "
            "kept in records.jsonl with their `error`, left out of every metric; see Errors"
        )
    lines += [
        "",
        "All values are percentages. ↑ higher is better, ↓ lower is better; – means not measured.",
        "",
        "## Method × benchmark",
        "",
        *_main_table(summary),
        "",
        "## α sweep",
        "",
        *_sweep_tables(summary),
        "## Safety gate as a classifier",
        "",
        *_gate_table(summary),
        "## Trade-off: harmless rate vs over-refusal",
        "",
        *_tradeoff_tables(summary),
    ]
    if summary.by_context:
        lines += ["## By context", "", *_context_table(summary)]
    if summary.context_gate_curve:
        lines += [
            "### The gate by context, at other thresholds",
            "",
            *_context_curve_table(summary),
        ]
    if errors:
        lines += ["## Errors", ""]
        lines += _table(
            ["benchmark", "method", "α", "errors", "of"],
            [
                [c.benchmark, c.method, _alpha(c.alpha), str(c.n_errors), str(c.n + c.n_errors)]
                for c in summary.cells
                if c.n_errors
            ],
        )
        lines += [
            "",
            "Rerunning skips error records; delete a record's line from records.jsonl to retry it.",
            "",
        ]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
        lines.append("")
    lines += ["## Definitions", ""]
    lines += [f"- **{name}**: {text}" for name, text in summary.definitions.items()]
    lines += ["", "## Benchmarks", ""]
    lines += _table(
        ["benchmark", "role", "rows", "sampled", "licence", "sha256"],
        [
            [
                b.name,
                b.role,
                str(b.rows),
                str(len(b.sample_ids)),
                b.license or "see file",
                f"`{b.sha256[:12]}`",
            ]
            for b in summary.benchmarks
        ],
    )
    lines += [
        "",
        "Data is read from the user's data folder, never shipped with the package; several sets "
        "are CC BY-NC 4.0 or unlicensed (see shared/data/README.md).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _method_color(method: str) -> str:
    order = list(EVAL_METHODS)
    index = order.index(method) if method in order else len(order)
    return f"C{index % 10}"


def _new_figure(width: float = 7.0, height: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _percent_axis(axis: Any) -> None:
    axis.set_major_formatter(lambda x, _pos: f"{x:.0f}%")


def plot_hlr_vs_alpha(summary: EvalSummary) -> bytes | None:
    """Average HLR (solid) and strict HLR (dotted) against α; single-branch methods as
    horizontal dashed lines, since they do not depend on α."""
    variants = [v for v in summary.variants if v.avg_hlr is not None]
    if not variants:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for method in dict.fromkeys(v.method for v in variants):
        points = sorted(
            ((v.alpha, v) for v in variants if v.method == method and v.alpha is not None),
            key=lambda p: p[0],
        )
        color = _method_color(method)
        if not points:  # single-branch
            value = next(v.avg_hlr for v in variants if v.method == method)
            assert value is not None
            ax.axhline(100 * value, color=color, linestyle="--", linewidth=1.5, label=method)
            continue
        xs = [a for a, _ in points]
        ax.plot(xs, [100 * (v.avg_hlr or 0) for _, v in points], "o-", color=color, label=method)
        strict = [v.avg_hlr_strict for _, v in points]
        if any(s is not None and s != v.avg_hlr for s, (_, v) in zip(strict, points, strict=True)):
            ax.plot(
                xs,
                [100 * (s or 0) for s in strict],
                ":",
                color=color,
                label=f"{method} (strict)",
            )
    alphas = sorted({v.alpha for v in variants if v.alpha is not None})
    if alphas:
        ax.set_xticks(alphas)
        ax.set_xticklabels([f"{a:g}" for a in alphas])
    ax.set_xlabel("α (contrast strength)")
    ax.set_ylabel("average harmless rate")
    ax.set_ylim(-2, 102)
    _percent_axis(ax.yaxis)
    ax.set_title(f"Harmless rate vs α: {summary.model_name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _png(fig)


def plot_hlr_by_benchmark(summary: EvalSummary) -> bytes | None:
    """Grouped bars: HLR on each harmful set (and the unsafe part of mixed sets) per variant.

    Each method keeps one colour across plots; its alphas get increasing opacity.
    """
    sets = [b for b in summary.benchmarks if b.role in ("harmful", "mixed")]
    variants = [
        v for v in summary.variants if any(summary.cell(b.name, v.method, v.alpha) for b in sets)
    ]
    if not sets or not variants:
        return None
    width = 0.8 / len(variants)
    fig = _new_figure(width=min(14.0, max(7.0, len(sets) * (1.0 + 0.15 * len(variants)))))
    ax = fig.add_subplot()
    for i, v in enumerate(variants):
        values = []
        for b in sets:
            cell = summary.cell(b.name, v.method, v.alpha)
            values.append(100 * cell.hlr if cell and cell.hlr is not None else 0.0)
        same = [u for u in variants if u.method == v.method]
        opacity = 0.45 + 0.55 * (same.index(v) + 1) / len(same)
        label = v.method if v.alpha is None else f"{v.method} α={v.alpha:g}"
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(sets))]
        ax.bar(xs, values, width, color=_method_color(v.method), alpha=opacity, label=label)
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([b.name if b.role == "harmful" else f"{b.name}\n(unsafe)" for b in sets])
    ax.set_ylabel("harmless rate")
    ax.set_ylim(0, 105)
    _percent_axis(ax.yaxis)
    ax.set_title(f"Harmless rate per benchmark: {summary.model_name}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return _png(fig)


def plot_tradeoff(summary: EvalSummary) -> bytes | None:
    """Safety vs helpfulness: avg HLR against over-refusal; up and left is better.

    One point per measured (method, α); gated ACD's counterfactual threshold sweep as a
    dashed curve per α, its shipped threshold as a star.
    """
    variants = [v for v in summary.variants if v.avg_hlr is not None and v.over_refusal is not None]
    sweep = [p for p in summary.gate_sweep if p.avg_hlr is not None and p.over_refusal is not None]
    if not variants and not sweep:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    _plot_sweep(ax, sweep, _run_threshold(summary))
    for method in dict.fromkeys(v.method for v in variants):
        points = sorted(
            (v for v in variants if v.method == method),
            key=lambda v: -1.0 if v.alpha is None else v.alpha,
        )
        xs = [100 * (v.over_refusal or 0) for v in points]
        ys = [100 * (v.avg_hlr or 0) for v in points]
        color = _method_color(method)
        marker = "s" if points[0].alpha is None else "o"
        ax.plot(xs, ys, marker=marker, linestyle="-", color=color, label=method, markersize=7)
        for v, x, y in zip(points, xs, ys, strict=True):
            note = "" if v.alpha is None else f"α={v.alpha:g}"
            if v.degeneration_rate and v.degeneration_rate >= 0.05:
                note += f" ({100 * v.degeneration_rate:.0f}% degenerate)"
            if note:
                ax.annotate(
                    note.strip(),
                    (x, y),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize="x-small",
                    color=color,
                )
    ax.set_xlabel("over-refusal on safe prompts (lower is better)")
    ax.set_ylabel("average harmless rate (higher is better)")
    _percent_axis(ax.xaxis)
    _percent_axis(ax.yaxis)
    left, right = ax.get_xlim()
    ax.set_xlim(min(-2.0, left), right + 0.12 * (right - left))  # room for the labels
    ax.set_ylim(top=max(102.0, ax.get_ylim()[1]))
    ax.set_title("Safety vs over-refusal (best: top left)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _png(fig)


def _plot_sweep(ax: Any, sweep: Sequence[GateSweepPoint], marked: str = "shipped") -> None:
    """Dashed threshold curves of gated ACD, one per α (darker for larger α)."""
    color = _method_color(GATED_METHOD)
    alphas = sorted({p.alpha for p in sweep})
    starred = False
    for i, alpha in enumerate(alphas):
        points = sorted((p for p in sweep if p.alpha == alpha), key=lambda p: p.threshold)
        xs = [100 * (p.over_refusal or 0) for p in points]
        ys = [100 * (p.avg_hlr or 0) for p in points]
        ax.plot(
            xs,
            ys,
            linestyle="--",
            marker=".",
            color=color,
            alpha=0.4 + 0.6 * (i + 1) / len(alphas),
            label=f"{GATED_METHOD} threshold sweep α={alpha:g}",
        )
        for p, x, y in zip(points, xs, ys, strict=True):
            if p is points[0] or p is points[-1]:
                ax.annotate(
                    f"t={p.threshold:g}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, -9),
                    fontsize="xx-small",
                    color=color,
                )
            if p.shipped:
                ax.plot(
                    [x],
                    [y],
                    marker="*",
                    markersize=14,
                    color=color,
                    markeredgecolor="black",
                    linestyle="none",
                    label=None if starred else f"{marked} threshold t={p.threshold:g}",
                )
                starred = True


_PLOTTERS: dict[str, Callable[[EvalSummary], bytes | None]] = {
    "hlr_vs_alpha": plot_hlr_vs_alpha,
    "hlr_by_benchmark": plot_hlr_by_benchmark,
    "tradeoff": plot_tradeoff,
}


def _write_plots(summary: EvalSummary, out_dir: Path) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning(
            "matplotlib is not installed (%s); skipping plots", pip_install_extra("eval")
        )
        return []
    written: list[str] = []
    for key, plot in _PLOTTERS.items():
        path = out_dir / PLOT_FILES[key]
        png = plot(summary)
        if png is None:
            logger.info("no data for %s; not drawn", path.name)
            path.unlink(missing_ok=True)  # never leave a stale plot from an earlier run
            continue
        atomic_write_bytes(path, png)
        written.append(path.name)
    return written


def write_report(summary: EvalSummary, out_dir: Path) -> list[Path]:
    """Write ``summary.json``, the plots and ``report.md`` into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # json_line, not model_dump_json: a sampled id may hold a lone surrogate (an undecodable
    # byte in the benchmark file), which pydantic refuses to encode and json escapes.
    atomic_write_text(
        out_dir / SUMMARY_FILE, json_line(summary.model_dump(mode="json"), indent=2) + "\n"
    )
    plots = _write_plots(summary, out_dir)
    atomic_write_text(out_dir / REPORT_FILE, render_markdown(summary, plots))
    logger.info("report written to %s", out_dir / REPORT_FILE)
    return [out_dir / SUMMARY_FILE, out_dir / REPORT_FILE, *(out_dir / p for p in plots)]
