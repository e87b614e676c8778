"""Summarise garak runs against ``acd serve``: attack success per probe and detector, plain vs ACD.

garak writes one ``report.jsonl`` per run. Its ``eval`` lines carry, per probe and detector,
``fails`` (outputs the detector flagged: the attack succeeded), ``passed`` and ``nones``
(outputs that could not be scored, e.g. a request the server answered with 400: garak does
not retry a 400 and stores no output). Its ``attempt`` lines are written twice per prompt
(status 1 after generation, 2 after detection); the status-2 ones are counted here as
attempts, and one with a missing output as a failed attempt.

Everything here is a pure function of the report lines (standard library only), so it is
tested on committed sample lines without garak installed. The attack success rate is
``fails / total_evaluated``, garak's own definition; a probe with no scored output has rate
``None`` (shown as "n/a"), never 0 %, because "not measured" is not "safe".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DetectorResult",
    "RunReport",
    "compare",
    "main",
    "parse_report",
    "render_markdown",
]

logger = logging.getLogger(__name__)


def plugin_name(name: str) -> str:
    """``probes.dan.Dan_11_0`` / ``detector.dan.DAN`` -> ``dan.Dan_11_0`` / ``dan.DAN``."""
    for prefix in ("probes.", "detectors.", "detector."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


@dataclass(frozen=True)
class DetectorResult:
    """garak's verdict counts for one (probe, detector) pair in one run."""

    probe: str
    detector: str
    hits: int  # garak's "fails": the detector flagged the output (attack succeeded)
    passed: int
    nones: int  # outputs that could not be scored (failed requests)

    @property
    def evaluated(self) -> int:
        """Outputs the detector scored."""
        return self.hits + self.passed

    @property
    def hit_rate(self) -> float | None:
        """Attack success rate, or ``None`` when nothing was scored."""
        return self.hits / self.evaluated if self.evaluated else None


@dataclass(frozen=True)
class RunReport:
    """What one garak run measured, keyed by probe (``module.Class``)."""

    requested: tuple[str, ...]
    attempts: dict[str, int] = field(default_factory=dict)
    failed_attempts: dict[str, int] = field(default_factory=dict)
    results: dict[tuple[str, str], DetectorResult] = field(default_factory=dict)

    @property
    def probes(self) -> list[str]:
        """Every probe requested or seen, in a stable order."""
        seen = set(self.requested) | set(self.attempts) | {p for p, _ in self.results}
        return sorted(seen)


def requested_probes(setup: Mapping[str, Any]) -> list[str]:
    """The probes a run asked for, from its ``start_run setup`` line (classes only).

    garak 0.17 records the resolved selection as ``transient.active_probes`` (a list); older
    versions only the request, as ``run.spec`` (``{"include": [...]}``) or
    ``plugins.probe_spec`` (a comma-separated string). Whole modules (``probes.dan``) and
    tags are left out: which classes they expand to is only known from the attempts.
    """
    names: list[str] = []
    active, spec, legacy = (
        setup.get("transient.active_probes"),
        setup.get("run.spec"),
        setup.get("plugins.probe_spec"),
    )
    if isinstance(active, list):
        names = [str(n) for n in active]
    elif isinstance(spec, Mapping):
        names = [str(n) for n in spec.get("include", [])]
    elif isinstance(legacy, str):
        names = legacy.split(",")
    probes = [plugin_name(n.strip()) for n in names if n.strip()]
    return [p for p in probes if "." in p and not p.startswith("tag:")]


def parse_report(lines: Iterable[str]) -> RunReport:
    """Read one run's ``report.jsonl`` lines into a :class:`RunReport`.

    Blank lines are skipped; a line that is not JSON raises ``ValueError`` naming its number
    (a truncated report should be noticed, not silently summarised).
    """
    requested: list[str] = []
    attempts: dict[str, int] = {}
    failed: dict[str, int] = {}
    results: dict[tuple[str, str], DetectorResult] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"report line {number} is not JSON: {exc.msg}") from None
        kind = entry.get("entry_type")
        if kind == "start_run setup":
            requested = requested_probes(entry)
        elif kind == "attempt" and entry.get("status") == 2:
            probe = plugin_name(str(entry.get("probe_classname", "")))
            attempts[probe] = attempts.get(probe, 0) + 1
            outputs = entry.get("outputs") or []
            if not outputs or any(o is None or o.get("text") is None for o in outputs):
                failed[probe] = failed.get(probe, 0) + 1
        elif kind == "eval":
            key = (plugin_name(str(entry["probe"])), plugin_name(str(entry["detector"])))
            results[key] = DetectorResult(
                probe=key[0],
                detector=key[1],
                hits=int(entry.get("fails", 0)),
                passed=int(entry.get("passed", 0)),
                nones=int(entry.get("nones", 0)),
            )
    return RunReport(tuple(requested), attempts, failed, results)


def compare(
    runs: Mapping[str, RunReport], baseline: str = "plain", treatment: str = "acd"
) -> list[dict[str, Any]]:
    """One row per (probe, detector) seen in either run: both rates and their difference.

    ``difference`` is ``treatment - baseline`` in rate points (negative: ACD lowered attack
    success); ``None`` when either side measured nothing. A requested probe with no eval line
    in any run gets one row with ``detector`` ``None``, so it shows in the table as unmeasured.
    """
    missing = [m for m in (baseline, treatment) if m not in runs]
    if missing:
        raise ValueError(f"runs must include {baseline!r} and {treatment!r}, missing {missing}")
    pairs = sorted({key for run in runs.values() for key in run.results})
    probes = sorted({p for run in runs.values() for p in run.probes})
    rows: list[dict[str, Any]] = []
    for probe in probes:
        detectors: list[str | None] = [d for p, d in pairs if p == probe] or [None]
        for detector in detectors:
            row: dict[str, Any] = {"probe": probe, "detector": detector}
            for method in (baseline, treatment):
                run = runs[method]
                result = run.results.get((probe, detector)) if detector else None
                row[method] = {
                    "attempts": run.attempts.get(probe, 0),
                    "failed_attempts": run.failed_attempts.get(probe, 0),
                    "hits": result.hits if result else 0,
                    "evaluated": result.evaluated if result else 0,
                    "nones": result.nones if result else 0,
                    "hit_rate": result.hit_rate if result else None,
                }
            base, treat = row[baseline]["hit_rate"], row[treatment]["hit_rate"]
            row["difference"] = treat - base if base is not None and treat is not None else None
            rows.append(row)
    return rows


def percent(rate: float | None) -> str:
    """``0.25`` -> ``25.0``; ``None`` -> ``n/a``."""
    return "n/a" if rate is None else f"{100 * rate:.1f}"


def signed(diff: float | None) -> str:
    """``-0.25`` -> ``-25.0``; ``None`` -> ``n/a``."""
    return "n/a" if diff is None else f"{100 * diff:+.1f}"


def render_markdown(
    rows: list[dict[str, Any]],
    control: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
    baseline: str = "plain",
    treatment: str = "acd",
) -> str:
    """The summary table (percentages) with the control and where garak's own reports are."""
    lines = [
        "# garak red-team of `acd serve`: plain vs ACD",
        "",
        f"Command: `{meta.get('command', '?')}`  ",
        f"Machine: {meta.get('machine', '?')}; wall time {meta.get('wall_s', '?')} s  ",
        f"garak {meta.get('garak_version', '?')}; model {meta.get('model', '?')}",
        "",
        "Attack success rate (% of scored outputs the detector flagged; lower is safer). "
        "Δ = ACD - plain in points. n = attempts (prompts x generations); "
        "failed = attempts with no output.",
        "",
        f"| probe | detector | {baseline} ASR | {treatment} ASR | Δ | n {baseline} | "
        f"n {treatment} | failed {baseline} | failed {treatment} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        b, t = row[baseline], row[treatment]
        lines.append(
            f"| {row['probe']} | {row['detector'] or '(no eval)'} | {percent(b['hit_rate'])} | "
            f"{percent(t['hit_rate'])} | {signed(row['difference'])} | {b['attempts']} | "
            f"{t['attempts']} | {b['failed_attempts']} | {t['failed_attempts']} |"
        )
    if control:
        methods = control.get("methods", {})
        lines += [
            "",
            f"Benign control: {control.get('n_prompts', '?')} XSTest-safe prompts per method, "
            f"judge `{control.get('judge', '?')}` (over-refusal: % refused; lower is better).",
            "",
            "| method | over-refusal % | refused / judged | failed |",
            "|---|---:|---:|---:|",
        ]
        for method, stats in methods.items():
            lines.append(
                f"| {method} | {percent(stats.get('over_refusal'))} | "
                f"{stats.get('refused', 0)} / {stats.get('judged', 0)} | {stats.get('failed', 0)} |"
            )
    reports = meta.get("reports", {})
    if reports:
        lines += ["", "garak's own reports:", ""]
        lines += [f"- {m}: " + ", ".join(f"`{p}`" for p in paths) for m, paths in reports.items()]
    return "\n".join(lines) + "\n"


def machine() -> str:
    """CPU model name and core count (Linux ``/proc/cpuinfo``; the platform string elsewhere)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
    """``python redteam/summarise.py OUT`` -> ``OUT/summary.md`` and ``OUT/summary.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the run folder scripts/redteam.sh wrote")
    parser.add_argument("--methods", default="plain,acd")
    parser.add_argument("--wall-s", type=int)
    parser.add_argument("--command", default="scripts/redteam.sh")
    args = parser.parse_args(argv)
    baseline, treatment = args.methods.split(",")[:2]
    runs: dict[str, RunReport] = {}
    reports: dict[str, list[str]] = {}
    garak_version = "?"
    for method in (baseline, treatment):
        path = args.out / "garak" / f"{method}.report.jsonl"
        text = path.read_text(encoding="utf-8").splitlines()
        runs[method] = parse_report(text)
        # relative to the run folder, so a committed summary names no local path
        reports[method] = [
            str(path.relative_to(args.out)),
            str(path.with_suffix(".html").relative_to(args.out)),
        ]
        for line in text:
            if '"start_run setup"' in line:
                garak_version = json.loads(line).get("_config.version", garak_version)
                break
    control_path = args.out / "control.json"
    control = (
        json.loads(control_path.read_text(encoding="utf-8")) if control_path.exists() else None
    )
    meta = {
        "command": args.command,
        "machine": machine(),
        "wall_s": args.wall_s,
        "garak_version": garak_version,
        "model": "SmolLM2-135M-Instruct (acd serve default)",
        "reports": reports,
    }
    rows = compare(runs, baseline, treatment)
    control_summary = None
    if control:
        # the per-prompt responses stay in control.json; the summary keeps the counts
        methods = {
            m: {k: v for k, v in stats.items() if k != "records"}
            for m, stats in control.get("methods", {}).items()
        }
        control_summary = {k: v for k, v in control.items() if k != "methods"} | {
            "methods": methods
        }
    summary = {
        "meta": meta,
        "rows": rows,
        "control": control_summary,
        "runs": {
            m: {
                "requested": list(r.requested),
                "attempts": r.attempts,
                "failed_attempts": r.failed_attempts,
            }
            for m, r in runs.items()
        },
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (args.out / "summary.md").write_text(
        render_markdown(rows, control_summary, meta, baseline, treatment), encoding="utf-8"
    )
    logger.info("wrote %s", args.out / "summary.md")


if __name__ == "__main__":
    main()
