"""The decode loops: prefill every row, then one batched forward per generated token.

Two loops share one token step (:class:`acd_engine.backends.step.TokenStep`: contrast, constraint,
plausibility filter, processors, pick):

* :func:`decode_rows`, the fast path. Rows come from :func:`acd_engine.backends.torch.row_layout.lay_out_rows`:
  cached SP/AP prefixes, so prefill covers only the conversation; several requests in one
  forward (2·N rows for N contrast requests); KV written in place; a prebuilt 4-D mask.
* :func:`decode`, the reference path: one request, both branches re-embedded from scratch
  and left-padded, transformers' own masks. The oracle the fast path is tested against.

Row 0 of a request is always its positive branch, row 1 (if any) its negative branch. Both
rows are fed the same chosen token at every step, so the branches differ only in what sits in
their system-prompt slot.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList

from acd_engine._compat import cache_arg, output_cache
from acd_engine.backends.step import TokenStep, build_processors, pick_token
from acd_engine.backends.torch.head import LinearHead
from acd_engine.backends.torch.row_layout import RowBatch
from acd_engine.config import DecodingConfig
from acd_engine.errors import ConfigError
from acd_engine.safety.contrast import (
    contrast_active,
    contrast_candidates,
    contrast_hidden,
    contrast_rows,
)
from acd_engine.safety.gate import RowGate, capture_states, states_of

__all__ = [
    "Prefill",
    "RowRequest",
    "build_processors",
    "decode",
    "decode_rows",
    "pick_token",
]


@dataclass
class Prefill:
    """Model inputs for the first forward of one request (reference path).

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


@dataclass
class RowRequest:
    """One request of a fast batch (see :class:`Prefill` for ``context_ids``/``constraint``).

    Attributes:
        rows: Its rows in the :class:`~acd_engine.backends.torch.row_layout.RowBatch`, positive branch first.
        gate: When set, the prefill scores the safety gate on its probe row and the request
            continues with the rows the verdict chooses (:class:`~acd_engine.safety.gate.RowGate`).
    """

    rows: list[int]
    context_ids: torch.Tensor
    constraint: LogitsProcessorList | None = None
    gate: RowGate | None = None


def _request_scores(
    out: torch.Tensor,
    rows_of: list[list[int]],
    live: list[int],
    contrast: bool,
    cfg: DecodingConfig,
    head: LinearHead | None,
    step_context: Callable[[int, int], AbstractContextManager[Any]] | None,
    constrained: set[int],
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each live request's contrasted fp32 scores ``[1, V]`` and positive logits ``[1, V]``.

    Args:
        out: The step's logits ``[R, V]``, or its last hidden states ``[R, H]`` when
            ``head`` is given. Then a contrast request sends one row through the head
            (see :mod:`acd_engine.backends.torch.head`): with no plausibility filter the row is
            ``h_pos - alpha * h_neg`` (its "positive logits" are that row, which the
            filter, off, never reads); with the filter it is ``h_pos``, and the negative
            branch is scored only on the tokens the filter keeps (on CPU: finding them
            is a host sync on CUDA). A request with a constraint keeps both rows,
            because its constraint may move the filter's cutoff.
        constrained: The live requests that have a constraint.
    """
    rows = {i: rows_of[i] if contrast else rows_of[i][:1] for i in live}
    negatives: dict[int, torch.Tensor] = {}  # scored on the filter's candidates only
    if head is None:
        per_request = {i: out[_span(r)] for i, r in rows.items()}  # [1 or 2, V] each
    else:
        parts = {}
        for i, r in rows.items():
            h = out[_span(r)]  # [1 or 2, H]
            if len(h) == 2 and cfg.plausibility == 0:
                h = contrast_hidden(h[:1], h[1:], cfg.alpha)
            elif len(h) == 2 and i not in constrained and h.device.type == "cpu":
                negatives[i], h = h[1:], h[:1]
            parts[i] = h
        sizes = [len(h) for h in parts.values()]
        with step_context(sum(sizes), 1) if step_context else nullcontext():
            logits = head(torch.cat(list(parts.values())))  # [n, V]
        per_request = dict(zip(parts, logits.split(sizes), strict=True))
    result = {}
    for i, logits_i in per_request.items():
        if i in negatives:
            assert head is not None
            pos = logits_i[:1]  # [1, V]
            neg = negatives[i]
            result[i] = (
                contrast_candidates(pos, neg, head.weight, cfg.alpha, cfg.plausibility),
                pos,
            )
        else:
            result[i] = contrast_rows(logits_i, cfg.alpha)
    return result


def _span(rows: list[int]) -> slice:
    """A request's rows (always consecutive) as a slice.

    Indexing a CUDA tensor with a Python list sends the list to the device with a blocking
    copy, which would make the host wait for every queued forward at each step; a slice
    is a view and waits for nothing.
    """
    assert rows == list(range(rows[0], rows[0] + len(rows))), rows
    return slice(rows[0], rows[0] + len(rows))


def _copy_to_host(values: torch.Tensor) -> Callable[[], list[int]]:
    """Queue a device-to-host copy of ``values``; the returned call waits for it alone.

    On CUDA the copy goes to pinned memory behind an event (as transformers'
    ``DeferredStopCheck`` does), so work queued after it keeps the GPU busy meanwhile.
    """
    if values.device.type != "cuda":
        ready = values.tolist()
        return lambda: ready
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> list[int]:
        done.synchronize()
        out: list[int] = host.tolist()
        return out

    return wait


@torch.inference_mode()  # entered on every resume, left on every yield: nothing leaks out
def decode_rows(
    model: Any,
    batch: RowBatch,
    requests: list[RowRequest],
    cfg: DecodingConfig,
    finished: set[int] | None = None,
    step_fn: Callable[..., Any] | None = None,
    overlap: bool | None = None,
    step_context: Callable[[int, int], AbstractContextManager[Any]] | None = None,
    head: LinearHead | None = None,
) -> Generator[dict[int, int], None, None]:
    """Fast path: every running request gets one token per step from one batched forward.

    Yields ``{request index: token id}`` for the requests still running. The caller
    decides when a request ends (EOS, stop strings) by adding its index to ``finished``;
    its rows leave the batch before the next forward. Closing the generator ends all.

    Args:
        step_fn: The decode-step forward (a compiled ``model`` for static caches).
        overlap: Queue step t+1's forward before reading token t on the host, so the
            device never waits for Python (default: static caches on CUDA). One forward
            is wasted when a request ends, and finished rows stay in the batch.
        step_context: Called with a forward's rows and tokens per row (``R, W`` for the
            prefill, ``R, 1`` for a step, ``n, 1`` for the head); what it returns is entered
            around that forward. The engine passes its matmul kernel choice
            (:class:`~acd_engine.backends.torch.skinny.SkinnyLinear`,
            :class:`~acd_engine.backends.torch.prepack.PrepackedLinear`) where it measured faster.
        head: The model's LM head as a linear map (:func:`acd_engine.backends.torch.head.linear_head`):
            forwards stop at the decoder and the contrast runs on hidden states, so a
            contrast request sends one row through the head, not two. Eager steps only.
    """
    if head is not None and step_fn is not None:
        raise ConfigError("head needs eager decode steps; got a step_fn as well, pass one")
    module = head.decoder if head is not None else model  # whose forward runs (or compiled)
    forward = step_fn or module
    device = batch.valid.device
    steps = [TokenStep(cfg, r.constraint, device) for r in requests]
    ids = [r.context_ids for r in requests]  # each [1, L]
    rows_of = [list(r.rows) for r in requests]  # positive row first
    live = list(range(len(requests)))
    finished = set() if finished is None else finished
    if overlap is None:
        overlap = batch.static and device.type == "cuda"
    gates = {i: r.gate for i, r in enumerate(requests) if r.gate is not None}
    layers = next(iter(gates.values())).gate.layers if gates else ()
    spans = [(g.probe_row, g.probe_span) for g in gates.values()]
    with (
        step_context(*batch.input_ids.shape) if step_context else nullcontext(),
        capture_states(module, layers, spans) if gates else nullcontext() as captured,
    ):
        out = module(
            input_ids=batch.input_ids,  # [R, W]
            attention_mask=batch.prefill_mask,  # [R, 1, W, K] or None
            position_ids=batch.positions,  # [R, W]
            **cache_arg(module, batch.cache),
            use_cache=True,
            **({} if head is not None else {"logits_to_keep": 1}),
        )
    if gates:  # each gated request keeps the rows its verdict chooses
        assert captured is not None
        states = states_of(captured)  # [T_p, F] per gated request
        for j, (i, gate) in enumerate(gates.items()):
            rows_of[i] = gate.route(states[j])
    # [R, V] logits, or [R, H] hidden states when the contrast runs before the head
    state = out.logits[:, -1, :] if head is None else out.last_hidden_state[:, -1, :]
    tokens = batch.input_ids[:, -1:].clone()  # [R, 1] what each row is fed next
    pos, n = batch.next_positions, batch.width  # [R, 1], filled cache columns
    mask = None
    if batch.static:
        mask = torch.zeros(len(tokens), 1, 1, batch.capacity, dtype=torch.bool, device=device)
        mask[:, 0, 0, : batch.width] = batch.valid[:, : batch.width]  # [R, 1, 1, C]

    def advance() -> torch.Tensor:
        """Feed ``tokens`` to every row; return the next ``[R, V]`` logits (``[R, H]``)."""
        nonlocal pos, n
        n += 1
        if batch.static:
            assert mask is not None
            mask[:, 0, 0, n - 1] = True  # the new column; later ones stay masked
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
        step_mask = (
            mask if batch.static else batch.valid[:, None, None, :n] if batch.holes else None
        )
        with step_context(len(tokens), 1) if step_context else nullcontext():
            out = forward(
                input_ids=tokens,  # [R, 1]
                attention_mask=step_mask,  # [R, 1, 1, n] (or [R, 1, 1, C] static), or None
                position_ids=pos,  # [R, 1]
                **cache_arg(module, batch.cache),
                use_cache=True,
            )
        pos = pos + 1
        if head is not None:
            return out.last_hidden_state[:, -1, :]
        return out.logits[:, -1, :].clone() if batch.static else out.logits[:, -1, :]

    for step in range(cfg.max_new_tokens):
        contrast = contrast_active(cfg, step)
        picked: dict[int, torch.Tensor] = {}
        constrained = {i for i in live if requests[i].constraint}
        scores = _request_scores(
            state, rows_of, live, contrast, cfg, head, step_context, constrained
        )
        for i in live:
            picked[i] = steps[i].choose(*scores[i], ids[i])
            ids[i] = torch.cat([ids[i], picked[i]], dim=-1)
            tokens[_span(rows_of[i])] = picked[i]
        last = step == cfg.max_new_tokens - 1
        host = _copy_to_host(torch.cat(list(picked.values())).view(-1))
        if overlap and not last:
            state = advance()  # queued behind the copy: the device works while we wait
        yield dict(zip(picked, host(), strict=True))  # the one host sync per step
        live = [i for i in live if i not in finished]
        if last or not live:
            return
        if not batch.static and not overlap:  # drop rows nobody reads any more
            contrast_next = contrast_active(cfg, step + 1)
            keep = [r for i in live for r in (rows_of[i] if contrast_next else rows_of[i][:1])]
            if len(keep) < len(tokens):
                batch.select(keep)
                index = {r: j for j, r in enumerate(keep)}
                rows_of = [[index[r] for r in rows if r in index] for rows in rows_of]
                tokens, pos = tokens[keep], pos[keep]
        if not overlap:
            state = advance()


@torch.inference_mode()
def decode(model: Any, prefill: Prefill, cfg: DecodingConfig) -> Generator[int, None, None]:
    """Reference path: yield generated token ids one at a time, up to ``cfg.max_new_tokens``.

    The caller decides when to stop (EOS, stop strings) by closing the generator, so no
    forward pass is spent on a token nobody will read.
    """
    embeds, mask = prefill.embeds, prefill.mask  # [R, T, H], [R, T]
    rows = embeds.shape[0]
    chooser = TokenStep(cfg, prefill.constraint, embeds.device)
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
    cache, logits = output_cache(out), out.logits[:, -1, :]  # logits [R, V]
    pos = pos[:, -1:]  # [R, 1]
    for step in range(cfg.max_new_tokens):
        if rows == 2 and not contrast_active(cfg, step):
            # Contrast is over: keep only the positive row (SafeDecoding's schedule).
            cache.batch_select_indices(torch.tensor([0], device=embeds.device))
            rows, mask, pos, logits = 1, mask[:1], pos[:1], logits[:1]
            padded = bool((mask == 0).any())
        token = chooser.choose_rows(logits, ids)  # [1, 1]
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
            **cache_arg(model, cache),
            use_cache=True,
        )
        cache, logits = output_cache(out), out.logits[:, -1, :]
