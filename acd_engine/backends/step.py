"""The token step: from one request's branch outputs to its next token, in one fixed order.

contrast (:mod:`acd_engine.safety.contrast`) -> constraint (a grammar mask) -> plausibility filter
-> OpenAI's logit bias and presence/frequency penalties (:class:`AnswerPenalties`) ->
transformers' processors (repetition penalty, temperature, top-k, top-p) -> pick (argmax
or one seeded draw). The reference decoder and the fast decoder both choose every token
through :class:`TokenStep`, and ``Engine.score_continuations`` scores through
:func:`filtered_scores`, the same first three stages without the sampler's, so a
multiple-choice answer ranks the way the method would generate it. A new way to shape the
scores is one more stage here, not an edit in each decoder.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from acd_engine.config import DecodingConfig
from acd_engine.errors import ConfigError
from acd_engine.safety.contrast import (
    contrast_active,
    contrast_logits,
    contrast_rows,
    plausibility_filter,
)

__all__ = [
    "AnswerPenalties",
    "TokenStep",
    "build_processors",
    "continuation_logprob",
    "filtered_scores",
    "pick_token",
    "run_processors",
    "sampler",
]


class AnswerPenalties(LogitsProcessor):
    """OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty``, as OpenAI
    defines them: ``score[j] += bias[j] - frequency * count[j] - presence * (count[j] > 0)``.

    ``count`` is over the answer so far, never the prompt (OpenAI's and vLLM's rule; the
    prompt-wide penalty is ``repetition_penalty``). Every decoder calls its token step
    before it appends the first token, so the first call's ``input_ids`` are the prompt
    alone and their length marks where the answer starts: one instance per request, which
    :class:`TokenStep` builds. Finite additions leave a ``-inf`` score ``-inf``, so nothing
    here revives a token the grammar or the plausibility filter removed.

    Raises:
        ConfigError: A ``logit_bias`` token id is not in the model's vocabulary.
    """

    def __init__(self, cfg: DecodingConfig) -> None:
        self.presence = cfg.presence_penalty
        self.frequency = cfg.frequency_penalty
        self.bias = cfg.logit_bias
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[-1]
        vocab = scores.shape[-1]
        if self.bias:
            top = self.bias[-1][0]  # pairs are sorted by token id
            if top >= vocab:
                raise ConfigError(
                    f"logit_bias must name token ids below the model's vocabulary size "
                    f"{vocab}, got {top}"
                )
            ids = torch.tensor([t for t, _ in self.bias], device=scores.device)
            values = torch.tensor([b for _, b in self.bias], device=scores.device)
            scores = scores.index_add(-1, ids, values.to(scores.dtype).expand(len(scores), -1))
        answer = input_ids[0, self.start :]
        if (self.presence or self.frequency) and answer.numel():
            counts = torch.bincount(answer, minlength=vocab)[:vocab].to(scores.dtype)
            scores = (
                scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
            )
        return scores


def build_processors(cfg: DecodingConfig) -> LogitsProcessorList:
    """The request's processors, applied after the contrast: OpenAI's bias and penalties
    (vLLM's order: before the repetition penalty), then transformers' in generate's order.
    A new list per request: :class:`AnswerPenalties` remembers where its answer starts."""
    procs = LogitsProcessorList()
    if cfg.logit_bias or cfg.presence_penalty or cfg.frequency_penalty:
        procs.append(AnswerPenalties(cfg))
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


def run_processors(
    procs: LogitsProcessorList, ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """``procs(ids, scores)``. transformers types ``input_ids`` as the legacy
    ``torch.LongTensor`` class, which no torch op returns; ``ids`` holds int64 token ids,
    which is all the processors read."""
    return procs(cast(torch.LongTensor, ids), scores)


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
        scores = run_processors(constraint, ids, scores)
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
        scores = run_processors(self.procs, ids, scores)
        return pick_token(scores, self.cfg.temperature, self.gen)

    def choose_rows(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[1, 1]`` token from the request's rows' logits ``[1 or 2, V]``."""
        return self.choose(*contrast_rows(logits, self.cfg.alpha), ids)
