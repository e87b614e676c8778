"""Pinned settings: a resumed run must be made with the settings its folder was made with.

Why a module of its own: ``acd eval`` (:mod:`acd_engine.eval.runner`) and the framework
evaluation script pin the settings of a run in its ``run.json`` and refuse a resume that
would mix two settings in one folder; both compare them here, so both refuse in the same
words.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from acd_engine.errors import ConfigError

__all__ = ["check_pins", "show_pin"]

_HEX = re.compile(r"[0-9a-f]{16,}")


def show_pin(value: Any) -> str:
    """A pinned value for an error message: a hash cut to 12 digits, long values cut to 80
    characters."""
    if isinstance(value, str) and _HEX.fullmatch(value):
        return f"{value[:12]}…"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}…"


def check_pins(out_dir: Path, before: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse settings that differ from the run already in ``out_dir``, naming the first.

    Only settings both runs have are compared: a setting the earlier run did not pin (the
    pack of a run without acd, a benchmark it did not have, the model's before it loaded) is
    free, and pinned from now on.
    """
    if not before:
        return
    for key, value in now.items():
        if key in before and before[key] != value:
            raise ConfigError(
                f"run.json in '{out_dir}' was made with {key} {show_pin(before[key])}, got "
                f"{show_pin(value)}; use a new --out"
            )
