"""Scoring continuations: the summed log-probability of given text under a method.

Each token is scored with ``log_softmax`` of the same contrasted, plausibility-filtered
scores the decoder picks from (:func:`acd_engine.backends.step.continuation_logprob`), so a
multiple-choice answer ranks the way the method would generate it. The gate routes the
request as it would a generation; the backend (:mod:`acd_engine.backends.base`) supplies the
branch logits, so every backend scores by this one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from acd_engine.backends.base import Backend
from acd_engine.backends.step import continuation_logprob
from acd_engine.config import DecodingConfig
from acd_engine.rendering import Messages, Rendered
from acd_engine.safety.gate import decoded_rendering, routed_config

__all__ = ["ScoringEngine", "score_continuations"]


class ScoringEngine(Protocol):
    """What scoring reads from its engine: its backend, rendering and text as data.

    :class:`~acd_engine.runtime.engine.Engine` is one; this module never imports it, so the engine
    sits above what it runs.
    """

    @property
    def backend(self) -> Backend: ...

    def encode_data(self, text: str) -> list[int]: ...
    def render(self, messages: Messages, **template_kwargs: Any) -> Rendered: ...


def score_continuations(
    engine: ScoringEngine, messages: Messages, continuations: Sequence[str], cfg: DecodingConfig
) -> list[float]:
    """Each continuation's score on the engine's backend (its lock held); an empty
    continuation scores 0.

    The gate routes the request as it would a generation: a request it passes is scored
    on ``gate_passed_method``'s single branch, a request it flags on its latest user
    message alone (:func:`~acd_engine.safety.gate.decoded_rendering`).
    """
    backend = engine.backend
    rendered = engine.render(messages)
    verdict = backend.gate_verdict(rendered, cfg, {})
    cfg = routed_config(cfg, verdict)
    conts = [engine.encode_data(c) for c in continuations]
    out = [0.0] * len(conts)
    for i, logits in backend.continuation_logits(decoded_rendering(rendered, verdict), cfg, conts):
        out[i] = continuation_logprob(logits, torch.tensor(conts[i], device=logits.device), cfg)
    return out
