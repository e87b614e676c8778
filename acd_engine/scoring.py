"""Scoring continuations: the summed log-probability of given text under a method.

Each token is scored with ``log_softmax`` of the same contrasted, plausibility-filtered
scores the decoder picks from (:func:`acd_engine.step.continuation_logprob`), so a
multiple-choice answer ranks the way the method would generate it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Protocol

import torch

from acd_engine._compat import cache_arg
from acd_engine.config import DecodingConfig
from acd_engine.contrast import BranchPlan
from acd_engine.gate import GateVerdict, decoded_rendering, routed_config
from acd_engine.kernels import EngineOptions, KernelPolicy, StepContext
from acd_engine.rendering import Messages, Rendered
from acd_engine.row_layout import RowInput, lay_out_rows
from acd_engine.rows import RowBuilder
from acd_engine.step import continuation_logprob

__all__ = ["ScoringEngine", "score_continuations", "score_reference", "score_rows"]


class ScoringEngine(Protocol):
    """What scoring reads from its engine: the model, its parts, and the request steps the
    engine owns (render, plan, the gate's verdict, text as data).

    :class:`~acd_engine.engine.Engine` is one; this module never imports it, so the engine
    sits above what it runs.
    """

    @property
    def model(self) -> Any: ...
    @property
    def kernels(self) -> KernelPolicy: ...
    @property
    def rows(self) -> RowBuilder: ...
    @property
    def options(self) -> EngineOptions: ...

    def encode_data(self, text: str) -> list[int]: ...
    def render(self, messages: Messages, **template_kwargs: Any) -> Rendered: ...
    def plan(self, config: DecodingConfig) -> BranchPlan: ...
    def gate_verdict(
        self, messages: Messages, config: DecodingConfig, **template_kwargs: Any
    ) -> GateVerdict | None: ...


def score_rows(
    model: Any,
    branch_rows: list[RowInput],
    conts: Sequence[list[int]],
    cfg: DecodingConfig,
    per_forward: int,
    kernel: StepContext | None,
) -> list[float]:
    """Fast path: the prompt's branch rows (cached prefixes) with each continuation
    appended, ``per_forward`` continuations per forward; an empty one scores 0."""
    out = [0.0] * len(conts)
    todo = [i for i, ids in enumerate(conts) if ids]
    nb = len(branch_rows)
    for start in range(0, len(todo), per_forward):
        group = todo[start : start + per_forward]
        rows = [RowInput(r.prefix, r.tail + conts[i]) for i in group for r in branch_rows]
        batch = lay_out_rows(model, rows, 0)
        keep = max(len(conts[i]) for i in group) + 1
        with kernel(*batch.input_ids.shape) if kernel else nullcontext():
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.prefill_mask,
                position_ids=batch.positions,
                **cache_arg(model, batch.cache),
                use_cache=True,
                logits_to_keep=keep,
            ).logits  # [R, keep, V]; tails are right-aligned, so every row ends here
        for j, i in enumerate(group):
            n = len(conts[i])
            rows_logits = logits[j * nb : (j + 1) * nb, keep - n - 1 : keep - 1]
            cont_ids = torch.tensor(conts[i], device=logits.device)
            out[i] = continuation_logprob(rows_logits, cont_ids, cfg)
    return out


def score_reference(
    model: Any,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    conts: Sequence[list[int]],
    cfg: DecodingConfig,
) -> list[float]:
    """Reference path: one full forward of the left-padded branches per continuation."""
    out: list[float] = []
    emb = model.get_input_embeddings()
    for ids in conts:
        if not ids:
            out.append(0.0)
            continue
        cont_ids = torch.tensor(ids, device=embeds.device)
        rows = embeds.shape[0]
        full = torch.cat([embeds, emb(cont_ids)[None].expand(rows, -1, -1)], dim=1)
        full_mask = torch.cat([mask, mask.new_ones(rows, len(ids))], dim=1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(inputs_embeds=full, attention_mask=full_mask, position_ids=pos).logits[
            :, embeds.shape[1] - 1 : -1, :
        ]  # [R, n, V] predicting cont tokens
        out.append(continuation_logprob(logits, cont_ids, cfg))
    return out


def score_continuations(
    engine: ScoringEngine, messages: Messages, continuations: Sequence[str], cfg: DecodingConfig
) -> list[float]:
    """Each continuation's score on the engine's path (its lock held).

    The gate routes the request as it would a generation: a request it passes is scored
    on ``gate_passed_method``'s single branch. On the fast path the prompt's branch
    prefixes come from the prefix cache and up to ``max_batch_requests`` continuations
    share one forward.
    """
    verdict = engine.gate_verdict(messages, cfg)
    cfg = routed_config(cfg, verdict)
    rendered = decoded_rendering(engine.render(messages), verdict)
    conts = [engine.encode_data(c) for c in continuations]
    if not engine.kernels.use_fast_path():
        embeds, mask, _ = engine.rows.branch_inputs(rendered, engine.plan(cfg))
        return score_reference(engine.model, embeds, mask, conts, cfg)
    rows, _ = engine.rows.rows_of(rendered, engine.plan(cfg), {})
    kernel = engine.kernels.step_context(static=False)
    return score_rows(engine.model, rows, conts, cfg, engine.options.max_batch_requests, kernel)
