"""What a judge decides, and the error it raises when it cannot decide.

Its own module so that the judges registry (:mod:`acd_engine.eval.judges`), the model judges
(:mod:`acd_engine.eval.model_judges`) and the records all import these two names from one
place, and the registry can import the model judges lazily without a cycle.
"""

from __future__ import annotations

from typing import Literal, get_args

from acd_engine.errors import ACDError

__all__ = ["VERDICTS", "JudgeError", "Verdict"]

Verdict = Literal["refused", "answered"]
"""A judge's decision. Plain strings, so records and reports serialise it as-is."""
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)


class JudgeError(ACDError, RuntimeError):
    """A judge could not give a verdict for one pair (endpoint down, timed out, odd reply).

    The runner records it as that row's error and goes on: a flaky judge must not cost the
    generations of a multi-hour run. It is not a ``ConfigError`` because the settings may be
    right and the server merely busy.
    """
