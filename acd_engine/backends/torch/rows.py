"""Rendered token ids -> model inputs: one row per branch of a request.

A branch's row is its template head, its system-slot content (nothing, a manual prompt's
tokens, or soft-prompt embeddings) and the conversation tail. The fast path takes the first
part from the prefix cache (:mod:`acd_engine.backends.torch.prefix_cache`) and prefills only the rest
(:meth:`RowBuilder.plan_request`); the reference path embeds every row from scratch and
left-pads them together (:meth:`RowBuilder.branch_inputs`). Both give each row the same
sequence, which the fast-path oracle tests check token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList

from acd_engine.backends.torch.decoding import Prefill, RowRequest
from acd_engine.backends.torch.prefix_cache import PrefixCache, PrefixKV, compute_prefix_kv
from acd_engine.backends.torch.row_layout import RowInput
from acd_engine.config import DecodingConfig
from acd_engine.errors import PromptTooLongError
from acd_engine.rendering import Rendered, Renderer
from acd_engine.safety.contrast import Branch, BranchPlan, plan_branches
from acd_engine.safety.gate import (
    GateScope,
    GateVerdict,
    ReadSpan,
    RowGate,
    SafetyGate,
    gate_threshold,
    passed_config,
    read_span,
)

__all__ = ["PlannedRequest", "RowBuilder", "RowSplit", "fit_context", "left_pad"]

_NO_BRANCH = Branch("empty", key="empty")  # an empty system slot adds nothing to a prefix
_PLAIN = BranchPlan(None, None)  # the model's own template, untouched


def _leading(ids: list[int], start: list[int]) -> list[int]:
    """``start`` when ``ids`` begins with it and goes on past it, else ``[]``."""
    return start if len(ids) > len(start) and ids[: len(start)] == start else []


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T_i, H]`` rows -> left-padded ``[R, T, H]`` and the ``[R, T]`` mask (0 on padding)."""
    length = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
    for i, r in enumerate(rows):
        embeds[i, length - r.shape[0] :] = r
        mask[i, length - r.shape[0] :] = 1
    return embeds, mask


def fit_context(context_window: int, prompt_len: int, cfg: DecodingConfig) -> DecodingConfig:
    """Refuse prompts that fill the context window; clamp max_new_tokens to the rest."""
    room = context_window - prompt_len
    if room <= 0:
        raise PromptTooLongError(
            f"prompt must be shorter than the model's context window of "
            f"{context_window} tokens, got {prompt_len}; shorten the conversation"
        )
    return cfg.replace(max_new_tokens=room) if cfg.max_new_tokens > room else cfg


@dataclass(frozen=True)
class RowSplit:
    """One branch's row cut where the request's own tokens begin.

    The prefix (template head, system-slot content, the tail's template stub; for method
    ``plain`` the template's constant start) is the same for every request of the branch,
    so a decoder computes its KV once and keeps it (:attr:`key` names it); only
    :attr:`tail` is prefilled per request. The engine's fast path and the llama.cpp decoder
    cut rows here, so both cache exactly the same part.

    Attributes:
        head: Template tokens before the system-slot content.
        branch: The system-slot content.
        stub: Template tokens after it that every request's tail starts with.
        tail: The rest: the request's own tokens, prefilled per request.
    """

    head: list[int]
    branch: Branch
    stub: list[int]
    tail: list[int]

    @property
    def key(self) -> tuple[Any, ...]:
        """The prefix's identity: the branch content and both template token runs."""
        return (self.branch.key, tuple(self.head), tuple(self.stub))

    @property
    def has_prefix(self) -> bool:
        """Whether there is a prefix at all (a blank slot with no template tokens has none)."""
        return bool(self.head or self.stub) or self.branch.kind != "empty"


@dataclass
class PlannedRequest:
    """One request's fast-path rows, placed in a batch.

    Attributes:
        rows: Its rows (positive branch first; a gated request's plain probe row and,
            for ``gate_passed_method='base'``, its passed row last).
        request: What the decoder needs to know about it.
        prompt_tokens: Its prompt tokens (positive branch).
        limit: The max_new_tokens it may use (clamped to the context window).
    """

    rows: list[RowInput]
    request: RowRequest
    prompt_tokens: int
    limit: int

    def gate_facts(self) -> tuple[int, GateVerdict | None]:
        """Its prompt tokens and gate verdict, known once its prefill ran: a request the
        gate passed reports its passed row's prompt tokens."""
        gate = self.request.gate
        if gate is None or gate.verdict is None:
            return self.prompt_tokens, None
        tokens = self.prompt_tokens if gate.verdict.flagged else gate.benign_prompt_tokens
        return tokens, gate.verdict


class RowBuilder:
    """Builds one model's rows (embeddings or cached prefixes) for rendered requests.

    Args:
        model: The causal LM.
        renderer: Its chat-template renderer.
        prefix_cache: Where the KV of branch prefixes is kept between requests.
        context_window: The model's context window, in tokens.
        device: Where the model runs.
    """

    def __init__(
        self,
        model: Any,
        renderer: Renderer,
        prefix_cache: PrefixCache,
        context_window: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.device = device
        self.renderer = renderer
        self.prefix_cache = prefix_cache
        self.context_window = context_window

    def embed(self, ids: list[int]) -> torch.Tensor:
        """``[T, H]`` input embeddings of ``ids``, in the model's dtype."""
        emb = self.model.get_input_embeddings()
        return emb(torch.tensor(ids, dtype=torch.long, device=emb.weight.device))  # [T, H]

    def prefix_embeds(
        self, head: list[int], branch: Branch, stub: list[int] | None = None
    ) -> torch.Tensor:
        """``[P, H]``: the template head, the branch content and ``stub``: the part shared by
        every request of the branch (what the prefix cache stores the KV of)."""
        parts = [self.embed(head)]
        if branch.kind == "text":
            assert branch.text is not None
            parts.append(self.embed(self.renderer.encode_data(branch.text)))
        elif branch.kind == "soft":
            assert branch.soft is not None
            weight = self.model.get_input_embeddings().weight
            parts.append(branch.soft.to(device=weight.device, dtype=weight.dtype))
        if stub:
            parts.append(self.embed(stub))
        return torch.cat(parts, dim=0)

    def _branch_embeds(self, rendered: Rendered, branch: Branch | None) -> torch.Tensor:
        """``[T, H]`` input embeddings of one branch (reference path)."""
        if branch is None:
            assert rendered.plain is not None
            return self.embed(rendered.plain)
        prefix = self.prefix_embeds(rendered.head, branch)
        return torch.cat([prefix, self.embed(rendered.tail)], dim=0)

    def branch_inputs(
        self, rendered: Rendered, plan: BranchPlan
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Reference path: left-padded ``[R, T, H]`` embeddings, ``[R, T]`` mask, and the
        ids every branch shares (what the repetition penalty reads)."""
        rows = [self._branch_embeds(rendered, plan.positive)]
        if plan.negative is not None:
            rows.append(self._branch_embeds(rendered, plan.negative))
        embeds, mask = left_pad(rows)
        shared = rendered.plain if plan.positive is None else rendered.tail
        assert shared is not None
        return embeds, mask, shared

    def _prefix_kv(self, split: RowSplit) -> PrefixKV | None:
        """The cached KV of ``split``'s prefix (None when it has none)."""
        if not split.has_prefix:
            return None
        return self.prefix_cache.get(
            split.key,
            lambda: compute_prefix_kv(
                self.model, self.prefix_embeds(split.head, split.branch, split.stub)
            ),
        )

    def row_splits(
        self, rendered: Rendered, plan: BranchPlan, template_kwargs: dict[str, Any]
    ) -> list[RowSplit]:
        """One request's rows (positive branch first), each cut into its constant prefix and
        the request's tail (:class:`RowSplit`); together they are the sequence
        :meth:`branch_inputs` embeds from scratch."""
        splits = []
        constant = self.renderer.template_constant
        for branch in (plan.positive, plan.negative)[: plan.n_branches]:
            if branch is None:  # method 'plain': the untouched template
                assert rendered.plain is not None
                start = _leading(rendered.plain, constant("plain", template_kwargs))
                head, branch, stub, tail = start, _NO_BRANCH, [], rendered.plain[len(start) :]
            else:
                stub = _leading(rendered.tail, constant("tail", template_kwargs))
                head, tail = rendered.head, rendered.tail[len(stub) :]
            splits.append(RowSplit(head, branch, stub, tail))
        return splits

    def rows_of(
        self, rendered: Rendered, plan: BranchPlan, template_kwargs: dict[str, Any]
    ) -> tuple[list[RowInput], list[int]]:
        """Fast-path rows of one request (positive branch first) and its shared ids.

        Each row is its branch's cached prefix (head + branch content + the tail's template
        stub) followed by the rest of the conversation tail: the same sequence
        :meth:`branch_inputs` embeds from scratch. Method ``plain`` caches the template's
        constant start the same way.
        """
        rows = [
            RowInput(self._prefix_kv(split), split.tail)
            for split in self.row_splits(rendered, plan, template_kwargs)
        ]
        shared = rendered.plain if plan.positive is None else rendered.tail
        assert shared is not None
        return rows, shared

    def request_tokens(self, rendered: Rendered, template_kwargs: dict[str, Any]) -> int:
        """How many tokens at the end of the plain rendering are the request's own: all after
        the template's constant start, or all but the first when it has none (a system
        message of the caller's own). The safety gate pools over them; the first token is
        left out either way because its states are the attention sink's outliers.

        The fast path's plain row holds exactly these as its right-aligned tail (the start
        comes from the prefix cache), so both paths pool the same positions.
        """
        assert rendered.plain is not None
        start = _leading(rendered.plain, self.renderer.template_constant("plain", template_kwargs))
        return len(rendered.plain) - max(len(start), 1)

    def gate_span(
        self, scope: GateScope, rendered: Rendered, template_kwargs: dict[str, Any]
    ) -> ReadSpan:
        """The positions of ``rendered``'s plain rendering that a gate of ``scope`` reads
        (:func:`~acd_engine.safety.gate.read_span`); every path asks here."""
        assert rendered.plain is not None
        return read_span(
            scope,
            len(rendered.plain),
            self.request_tokens(rendered, template_kwargs),
            rendered.user_span,
        )

    def plan_request(
        self,
        rendered: Rendered,
        plan: BranchPlan,
        cfg: DecodingConfig,
        gate: SafetyGate | None,
        constraint: LogitsProcessorList | None,
        first_row: int,
        template_kwargs: dict[str, Any],
        passed_plan: BranchPlan = _PLAIN,
    ) -> PlannedRequest:
        """One request's fast-path rows, placed from row ``first_row`` of a batch.

        A gated request gets a third row, its plain rendering: the prefill scores the gate
        on it (the gate was fitted on plain renderings), and the request then keeps either
        its two contrast rows (flagged) or one row of ``passed_plan`` (passed, the plan of
        ``cfg.gate_passed_method``): the plain row itself, or a fourth row behind the safe
        system prompt (:class:`~acd_engine.safety.gate.RowGate`).
        """
        with torch.inference_mode():
            # a gated request's contrast rows are what a flagged request decodes: its latest
            # user message alone (gate.decoded_rendering)
            flagged = rendered if gate is None else (rendered.alone or rendered)
            rows, shared = self.rows_of(flagged, plan, template_kwargs)
            n = len(rows)  # the method's own rows; a gated request's extra rows follow
            row_gate = None
            if gate is not None:
                plain, _ = self.rows_of(rendered, _PLAIN, template_kwargs)
                passed = (
                    []
                    if passed_plan == _PLAIN
                    else self.rows_of(rendered, passed_plan, template_kwargs)[0]
                )
                benign = (passed or plain)[0]
                row_gate = RowGate(
                    gate,
                    gate_threshold(cfg, gate),
                    probe_row=first_row + n,
                    probe_span=self.gate_span(gate.scope, rendered, template_kwargs),
                    flagged_rows=list(range(first_row, first_row + n)),
                    benign_rows=[first_row + n + len(passed)],
                    benign_prompt_tokens=benign.prefix_len + len(benign.tail),
                )
                rows += plain + passed
        longest = max(r.prefix_len + len(r.tail) for r in rows)
        limit = fit_context(self.context_window, longest, cfg).max_new_tokens
        context = torch.tensor([shared], device=self.device)
        request = RowRequest(list(range(first_row, first_row + n)), context, constraint, row_gate)
        return PlannedRequest(rows, request, rows[0].prefix_len + len(rows[0].tail), limit)

    def plan_batch(
        self,
        rendered: list[Rendered],
        plan: BranchPlan,
        cfg: DecodingConfig,
        gate: SafetyGate | None,
        constraints: list[LogitsProcessorList | None],
        template_kwargs: dict[str, Any],
    ) -> list[PlannedRequest]:
        """Every request's rows, one after another in one batch."""
        passed_plan = plan_branches(passed_config(cfg), None) if gate is not None else _PLAIN
        planned: list[PlannedRequest] = []
        for r, constraint in zip(rendered, constraints, strict=True):
            first = sum(len(p.rows) for p in planned)
            planned.append(
                self.plan_request(
                    r, plan, cfg, gate, constraint, first, template_kwargs, passed_plan
                )
            )
        return planned

    def reference_prefill(
        self,
        rendered: Rendered,
        plan: BranchPlan,
        cfg: DecodingConfig,
        constraint: LogitsProcessorList | None,
    ) -> tuple[Prefill, int, DecodingConfig]:
        """Reference path: one request's prefill, its prompt tokens (positive branch), and
        ``cfg`` with max_new_tokens clamped to the context window."""
        embeds, mask, shared = self.branch_inputs(rendered, plan)
        cfg = fit_context(self.context_window, embeds.shape[1], cfg)
        context = torch.tensor([shared], device=embeds.device)
        return Prefill(embeds, mask, context, constraint), int(mask[0].sum()), cfg

    def prompt_tokens(self, rendered: Rendered, plan: BranchPlan) -> int:
        """The positive branch's prompt tokens (its system or soft prompt included)."""
        positive = plan.positive
        if positive is None:
            assert rendered.plain is not None
            return len(rendered.plain)
        content = 0
        if positive.text is not None:
            content = len(self.renderer.encode_data(positive.text))
        elif positive.soft is not None:
            content = int(positive.soft.shape[0])
        return len(rendered.head) + content + len(rendered.tail)
