"""Fixtures of the eval tests; the fakes themselves live in ``eval_fakes`` (see why there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_fakes import make_data_dir


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path / "data")
