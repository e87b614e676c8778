"""The decode loop: prefill both branches, then one batched forward per generated token.

R is the number of branches (1 for single-branch methods, 2 for contrast methods); row 0 is
always the positive branch. Both rows are fed the same chosen token at every step, so the
branches differ only in what sits in their system-prompt slot.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from acd_engine.config import DecodingConfig
from acd_engine.contrast import contrast_logits, plausibility_filter

__all__ = ["Prefill", "build_processors", "decode", "pick_token"]


@dataclass
class Prefill:
    """Model inputs for the first forward of one request.

    Attributes:
        embeds: Left-padded input embeddings ``[R, T, H]`` in the model's dtype.
        mask: Attention mask ``[R, T]`` (0 on left padding).
        context_ids: Token ids ``[1, L]`` the repetition penalty looks at (the shared
            conversation); generated tokens are appended to it.
        constraint: Extra logits processors applied right after the contrast, before the
            plausibility filter and the sampler: a grammar mask for tool calls and
            structured output goes here. They receive ``context_ids`` plus the generated
            tokens and the contrasted fp32 scores ``[1, V]``.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    context_ids: torch.Tensor
    constraint: LogitsProcessorList | None = None


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


def pick_token(
    scores: torch.Tensor, temperature: float, gen: torch.Generator | None
) -> torch.Tensor:
    """Greedy argmax when temperature is 0, else one seeded draw; ``[1, V] -> [1, 1]``."""
    if temperature == 0:
        return scores.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=gen)


def decode(model: Any, prefill: Prefill, cfg: DecodingConfig) -> Generator[int, None, None]:
    """Yield generated token ids one at a time, up to ``cfg.max_new_tokens``.

    The caller decides when to stop (EOS, stop strings) by closing the generator, so no
    forward pass is spent on a token nobody will read.
    """
    embeds, mask = prefill.embeds, prefill.mask  # [R, T, H], [R, T]
    rows = embeds.shape[0]
    procs = build_processors(cfg)
    gen = None
    if cfg.temperature > 0:
        gen = torch.Generator(device=embeds.device)
        gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    ids = prefill.context_ids  # [1, L]
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [R, T]
    # Without padding the mask is all ones: passing None lets SDPA take its causal fast path.
    padded = bool((mask == 0).any())
    out = model(
        inputs_embeds=embeds,
        attention_mask=mask if padded else None,
        position_ids=pos,
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out.past_key_values, out.logits[:, -1, :]  # logits [R, V]
    pos = pos[:, -1:]  # [R, 1]
    for step in range(cfg.max_new_tokens):
        if rows == 2 and cfg.contrast_tokens is not None and step >= cfg.contrast_tokens:
            # Contrast is over: keep only the positive row (SafeDecoding's schedule).
            cache.batch_select_indices(torch.tensor([0], device=embeds.device))
            rows, mask, pos, logits = 1, mask[:1], pos[:1], logits[:1]
            padded = bool((mask == 0).any())
        scores = contrast_logits(logits[:1], logits[1:] if rows == 2 else None, cfg.alpha)
        if prefill.constraint:
            scores = prefill.constraint(ids, scores)  # type: ignore[arg-type]
        scores = plausibility_filter(scores, logits[:1], cfg.plausibility)  # [1, V] fp32
        scores = procs(ids, scores)  # type: ignore[arg-type]
        token = pick_token(scores, cfg.temperature, gen)  # [1, 1]
        yield int(token)
        if step == cfg.max_new_tokens - 1:
            return
        ids = torch.cat([ids, token], dim=-1)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=-1)  # [R, T+1]
        pos = pos + 1
        out = model(
            input_ids=token.expand(rows, 1),
            attention_mask=mask if padded else None,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1, :]
