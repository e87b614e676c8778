"""The token step: from one request's branch outputs to its next token, in one fixed order.

contrast (:mod:`acd_engine.contrast`) -> constraint (a grammar mask) -> plausibility filter
-> transformers' processors (repetition penalty, temperature, top-k, top-p) -> pick (argmax
or one seeded draw). The reference decoder and the fast decoder both choose every token
through :class:`TokenStep`, and ``Engine.score_continuations`` scores through
:func:`filtered_scores`, the same first three stages without the sampler's, so a
multiple-choice answer ranks the way the method would generate it. A new way to shape the
scores is one more stage here, not an edit in each decoder.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from acd_engine.config import DecodingConfig
from acd_engine.contrast import (
    contrast_active,
    contrast_logits,
    contrast_rows,
    plausibility_filter,
)

__all__ = [
    "TokenStep",
    "build_processors",
    "continuation_logprob",
    "filtered_scores",
    "pick_token",
    "sampler",
]


def build_processors(cfg: DecodingConfig) -> LogitsProcessorList:
    """transformers' processors, in generate's order, applied after the contrast."""
    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.temperature > 0:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


def sampler(cfg: DecodingConfig, device: torch.device) -> torch.Generator | None:
    """The request's seeded generator (None for greedy decoding, which draws nothing)."""
    if cfg.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    return gen


def pick_token(
    scores: torch.Tensor, temperature: float, gen: torch.Generator | None
) -> torch.Tensor:
    """Greedy argmax when temperature is 0, else one seeded draw; ``[1, V] -> [1, 1]``."""
    if temperature == 0:
        return scores.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=gen)


def filtered_scores(
    scores: torch.Tensor,
    pos: torch.Tensor,
    cfg: DecodingConfig,
    ids: torch.Tensor | None = None,
    constraint: LogitsProcessorList | None = None,
) -> torch.Tensor:
    """Contrasted scores after the constraint and the plausibility filter.

    Args:
        scores: Contrasted fp32 scores ``[B, V]`` (not modified).
        pos: The positive branch's logits ``[B, V]``, for the plausibility filter.
        ids: ``[1, L]`` conversation plus generated tokens, for the constraint.
        constraint: Processors applied right after the contrast (a grammar mask), so the
            filter's cutoff is taken over the tokens they still allow.
    """
    if constraint:
        assert ids is not None
        scores = constraint(ids, scores)  # type: ignore[arg-type]
    return plausibility_filter(scores, pos, cfg.plausibility)  # [B, V] fp32


def continuation_logprob(
    logits: torch.Tensor, cont_ids: torch.Tensor, cfg: DecodingConfig
) -> float:
    """Sum of log p(token) from branch logits ``[R, n, V]`` (positive row first)
    predicting ``cont_ids`` ``[n]``: the decoder's scores, without its sampler."""
    neg = logits[1] if logits.shape[0] == 2 else None
    scores = filtered_scores(contrast_logits(logits[0], neg, cfg.alpha), logits[0], cfg)
    logp = torch.log_softmax(scores, dim=-1).gather(-1, cont_ids[:, None])
    return float(logp.sum())


class TokenStep:
    """One request's token choice, the same in every decoder.

    Holds what lives across steps: the processors built from ``cfg``, the constraint and
    the seeded generator (one per request, so a batch samples as lone calls would).

    Args:
        cfg: The request's decoding settings.
        constraint: Processors applied right after the contrast (grammar masks).
        device: Where the generator draws (the model's device).
    """

    def __init__(
        self,
        cfg: DecodingConfig,
        constraint: LogitsProcessorList | None,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.constraint = constraint
        self.procs = build_processors(cfg)
        self.gen = sampler(cfg, device)

    def contrasting(self, step: int) -> bool:
        """Whether token ``step`` is still contrasted (the ``contrast_tokens`` schedule)."""
        return contrast_active(self.cfg, step)

    def choose(self, scores: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[1, 1]`` token from contrasted fp32 scores ``[1, V]`` and positive logits."""
        scores = filtered_scores(scores, pos, self.cfg, ids, self.constraint)
        scores = self.procs(ids, scores)  # type: ignore[arg-type]
        return pick_token(scores, self.cfg.temperature, self.gen)

    def choose_rows(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[1, 1]`` token from the request's rows' logits ``[1 or 2, V]``."""
        return self.choose(*contrast_rows(logits, self.cfg.alpha), ids)
