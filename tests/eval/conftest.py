"""Fixtures of the eval tests; the fakes themselves live in ``eval_fakes`` (see why there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_fakes import make_data_dir


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path / "data")


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plots cost ~0.5 s a run; test_report.py covers them, the runner tests need records."""
    monkeypatch.setattr("acd_engine.eval.report._PLOTTERS", {})
