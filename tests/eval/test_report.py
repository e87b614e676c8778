"""Report files: summary.json, report.md and valid PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fakes import FakeEngine, make_data_dir

from acd_engine.eval.metrics import CellMetrics, VariantMetrics
from acd_engine.eval.report import (
    PLOT_FILES,
    REPORT_FILE,
    SUMMARY_FILE,
    BenchmarkInfo,
    EvalSummary,
    render_markdown,
    write_report,
)
from acd_engine.eval.runner import EvalOptions, run_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    height, width = imread(path).shape[:2]
    assert height > 200 and width > 300, (path, height, width)


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> EvalSummary:
    """One fake run shared by the tests of this module (each read-only)."""
    tmp_path = tmp_path_factory.mktemp("report")
    data_dir = make_data_dir(tmp_path / "data")
    options = EvalOptions(
        methods="plain,base,nid,acd",
        alphas="0.25,0.5,0.75",
        benchmarks="advbench,dangerousqa,xstest,alpaca_eval,truthfulqa",
        limit=10,
        data_dir=data_dir,
        out_dir=tmp_path / "run",
        max_new_tokens=16,
    )
    return run_eval(FakeEngine(), options)


def test_write_report_produces_every_file(summary: EvalSummary, tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = write_report(summary, out)
    names = {p.name for p in paths}
    assert names == {SUMMARY_FILE, REPORT_FILE, *PLOT_FILES.values()}
    for name in PLOT_FILES.values():
        assert_png(out / name)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_summary_json_round_trips(summary: EvalSummary, tmp_path: Path) -> None:
    write_report(summary, tmp_path)
    raw = json.loads((tmp_path / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert raw["complete"] is True
    assert raw["model_name"] == "fake-model" and raw["judge"] == "refusal"
    assert {b["name"] for b in raw["benchmarks"]} == {
        "advbench",
        "dangerousqa",
        "xstest",
        "alpaca_eval",
        "truthfulqa",
    }
    assert all(len(b["sample_ids"]) == min(10, b["rows"]) for b in raw["benchmarks"])
    assert "degenerate" in raw["definitions"]
    again = EvalSummary.model_validate(raw)
    assert again.variants == summary.variants and again.cells == summary.cells


def test_markdown_tables(summary: EvalSummary) -> None:
    md = render_markdown(summary, ["hlr_vs_alpha.png"])
    assert "| method | α | advbench HLR ↑ | dangerousqa HLR ↑ | xstest unsafe refusal ↑ " in md
    assert "| xstest over-refusal ↓ | alpaca_eval over-refusal ↓ | truthfulqa MC1 ↑ |" in md
    # one row per variant in the main table: plain and base once, each contrast method once
    # per alpha (the trade-off section lists the variants again, by its own columns)
    lines = md.split("## α sweep")[0].splitlines()
    for prefix in (
        "| plain | – |",
        "| base | – |",
        "| acd | 0.25 |",
        "| acd | 0.5 |",
        "| acd | 0.75 |",
        "| nid | 0.5 |",
    ):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix
    # sweep: one table per measured metric, one row per contrast method
    lines = md.split("## Safety gate")[0].splitlines()
    assert [line for line in lines if line.startswith("### ")] == [
        "### avg HLR ↑",
        "### avg HLR strict ↑",
        "### over-refusal ↓",
        "### TruthfulQA MC1 ↑",
        "### degenerate ↓",
    ]
    assert "## α sweep" in md and "| method | α=0.25 | α=0.5 | α=0.75 |" in md
    assert "Single-branch reference (no α): plain 0.0, base " in md
    assert "![hlr_vs_alpha](hlr_vs_alpha.png)" in md
    assert "status: complete" in md
    # the fake loops at acd alpha 0.75: HLR 100 but strict HLR 0 and 100% degenerate
    acd75 = next(line for line in md.splitlines() if line.startswith("| acd | 0.75 |"))
    cells = [c.strip() for c in acd75.strip("|").split("|")]
    avg_hlr, strict, _over, degenerate = cells[-5:-1]
    assert (avg_hlr, strict, degenerate) == ("100.0", "0.0", "100.0")


def _tiny_summary(**kw: object) -> EvalSummary:
    base: dict[str, object] = {
        "model_name": "m",
        "judge": "refusal",
        "created": "2025-01-01T00:00:00+00:00",
        "options": {"limit": 100, "seed": 0, "max_new_tokens": 8},
        "benchmarks": [
            BenchmarkInfo(
                name="advbench",
                role="harmful",
                path="a.jsonl",
                sha256="0" * 64,
                rows=2,
                license="MIT",
                sample_ids=["a-1", "a-2"],
            )
        ],
        "variants": [
            VariantMetrics(
                method="plain",
                alpha=None,
                avg_hlr=0.5,
                avg_hlr_strict=0.5,
                over_refusal=None,
                mc1_accuracy=None,
                degeneration_rate=0.0,
                mean_tokens=4.0,
                n=2,
            )
        ],
        "cells": [
            CellMetrics(
                benchmark="advbench",
                method="plain",
                alpha=None,
                n=2,
                n_harmful=2,
                n_safe=0,
                hlr=0.5,
                hlr_strict=0.5,
                over_refusal=None,
                degeneration_rate=0.0,
                mean_tokens=4.0,
                mean_seconds=0.1,
                n_mc=0,
                mc1_accuracy=None,
            )
        ],
        "n_expected": 2,
        "n_done": 2,
    }
    return EvalSummary(**{**base, **kw})  # type: ignore[arg-type]


def test_plots_without_data_are_skipped_and_stale_ones_removed(tmp_path: Path) -> None:
    (tmp_path / PLOT_FILES["tradeoff"]).write_bytes(b"stale")
    paths = write_report(_tiny_summary(), tmp_path)
    names = {p.name for p in paths}
    # no safe-prompt benchmark: nothing to trade off against
    assert PLOT_FILES["tradeoff"] not in names
    assert not (tmp_path / PLOT_FILES["tradeoff"]).exists()
    assert_png(tmp_path / PLOT_FILES["hlr_vs_alpha"])
    assert_png(tmp_path / PLOT_FILES["hlr_by_benchmark"])
    md = (tmp_path / REPORT_FILE).read_text(encoding="utf-8")
    assert "tradeoff.png" not in md
    assert "No contrastive method was run" in md
    assert "| plain | – | 50.0 | 50.0 | 50.0 | – | 0.0 | 4.0 |" in md


def test_incomplete_run_says_so(tmp_path: Path) -> None:
    md = render_markdown(_tiny_summary(n_done=1))
    assert "**incomplete**: 1/2 outputs; rerun the same command to finish" in md
