"""A 5-prompt evaluation on the real default model produces every report file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acd_engine.eval.runner import EvalOptions, run_eval

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.slow
def test_five_prompt_smoke_eval_writes_all_report_files(engine, tmp_path):
    data = SHARED_DATA / "benchmarks"
    if not data.is_dir():
        pytest.skip(f"benchmark data not found at {data}")
    options = EvalOptions(
        methods="base,acd",
        alphas="0.5",
        benchmarks="advbench",
        limit=5,
        data_dir=data,
        out_dir=tmp_path,
        max_new_tokens=12,
        batch_size=5,
    )
    summary = run_eval(engine, options)
    assert summary.n_done == summary.n_expected == 10
    for name in ("summary.json", "report.md", "records.jsonl"):
        assert (tmp_path / name).is_file(), name
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert {(r["method"], r["alpha"]) for r in records} == {("base", None), ("acd", 0.5)}
    assert all(r["verdict"] in ("refused", "answered") for r in records)
    assert "advbench" in (tmp_path / "report.md").read_text()
