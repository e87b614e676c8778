"""The torch backend: the engine's own PyTorch model, on its fast path or its reference path.

* Fast path (:meth:`TorchBackend.start` when ``engine.kernels.use_fast_path()``): every
  call's rows are planned into one batch (:meth:`~acd_engine.backends.torch.rows.RowBuilder.plan_batch`:
  cached SP/AP prefixes, a gated request's probe row) and decoded together
  (:meth:`~acd_engine.backends.torch.kernels.KernelPolicy.decode`); the gate reads each gated request
  inside that prefill, so it costs no forward of its own. Concurrent calls are coalesced.
* Reference path (``EngineOptions(fast_path=False)``, or a model the fast path does not
  fit): one call at a time, the gate read by a forward of its own
  (:func:`acd_engine.safety.gate.probe_states`), both branches re-embedded and left-padded
  (:func:`acd_engine.backends.torch.decoding.decode`). The tests' oracle.

Either way the tokens are those of transformers' ``generate`` on the same weights.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from acd_engine._compat import cache_arg
from acd_engine.backends.base import BackendEngine, BackendName, BatchCall, Started
from acd_engine.backends.torch.decoding import decode
from acd_engine.backends.torch.row_layout import RowInput, lay_out_rows
from acd_engine.config import DecodingConfig
from acd_engine.rendering import Rendered
from acd_engine.safety.gate import (
    GateVerdict,
    decoded_rendering,
    probe_states,
    routed_config,
    verdict_of,
)

__all__ = ["TorchBackend", "probe_verdict"]


def probe_verdict(
    engine: BackendEngine,
    rendered: Rendered,
    config: DecodingConfig,
    template_kwargs: dict[str, Any],
) -> GateVerdict | None:
    """The gate's verdict on one rendered request from a forward of the engine's own model
    over its plain rendering, stopped after the deepest gate layer (None: not gated)."""
    gate = engine.active_gate(config)
    if gate is None:
        return None
    assert rendered.plain is not None
    span = engine.rows.gate_span(gate.scope, rendered, template_kwargs)
    states = probe_states(engine.model, rendered.plain, gate.layers, span, engine.device)
    return verdict_of(gate, config, states)


class TorchBackend:
    """Decodes an engine's calls with its own PyTorch model (see the module docstring).

    Args:
        engine: The engine whose model, rows, kernels and request steps it uses.
    """

    def __init__(self, engine: BackendEngine) -> None:
        self.engine = engine

    @property
    def name(self) -> BackendName:
        return "torch"

    @property
    def batches(self) -> bool:
        """On the fast path (asked for and fitting the model)."""
        return self.engine.kernels.use_fast_path()

    def close(self) -> None:
        """Nothing to free: the model belongs to the process-wide cache."""

    def gate_verdict(
        self, rendered: Rendered, config: DecodingConfig, template_kwargs: dict[str, Any]
    ) -> GateVerdict | None:
        return probe_verdict(self.engine, rendered, config, template_kwargs)

    def start(
        self,
        calls: Sequence[BatchCall],
        config: DecodingConfig,
        template_kwargs: dict[str, Any],
        finished: set[int],
    ) -> Started:
        """The fast path plans every call's rows into one batch (a gated call's route is
        chosen inside the prefill); the reference path (one call) re-embeds its branches
        and reads the gate with a forward of its own."""
        engine, kwargs = self.engine, template_kwargs
        if engine.kernels.use_fast_path():
            rendered = [engine.render(call.messages, **kwargs) for call in calls]
            constraints = [call.constraint for call in calls]
            gate, plan = engine.active_gate(config), engine.plan(config)
            planned = engine.rows.plan_batch(rendered, plan, config, gate, constraints, kwargs)
            run = config.replace(max_new_tokens=max(p.limit for p in planned))
            rows = [r for p in planned for r in p.rows]
            steps = engine.kernels.decode(rows, [p.request for p in planned], run, finished)
            return Started(steps, [p.limit for p in planned], [p.gate_facts for p in planned])
        (call,) = calls
        whole = engine.render(call.messages, **kwargs)
        verdict = self.gate_verdict(whole, config, kwargs)
        run = routed_config(config, verdict)
        prefill, n_prompt, run = engine.rows.reference_prefill(
            decoded_rendering(whole, verdict), engine.plan(run), run, call.constraint
        )
        steps = lone_request(decode(engine.model, prefill, run))
        return Started(steps, [run.max_new_tokens], [lambda: (n_prompt, verdict)])

    def continuation_logits(
        self, rendered: Rendered, config: DecodingConfig, continuations: Sequence[list[int]]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Fast path: the prompt's branch rows (cached prefixes) with each continuation
        appended, ``max_batch_requests`` continuations per forward. Reference path: one
        full forward of the left-padded branches per continuation."""
        engine = self.engine
        plan = engine.plan(config)
        if not engine.kernels.use_fast_path():
            embeds, mask, _ = engine.rows.branch_inputs(rendered, plan)
            yield from _reference_logits(engine.model, embeds, mask, continuations)
            return
        rows, _ = engine.rows.rows_of(rendered, plan, {})
        kernel = engine.kernels.step_context(static=False)
        per_forward = engine.options.max_batch_requests
        todo = [i for i, ids in enumerate(continuations) if ids]
        nb = len(rows)
        model = engine.model
        for start in range(0, len(todo), per_forward):
            group = todo[start : start + per_forward]
            batch = lay_out_rows(
                model,
                [RowInput(r.prefix, r.tail + continuations[i]) for i in group for r in rows],
                0,
            )
            keep = max(len(continuations[i]) for i in group) + 1
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
                n = len(continuations[i])
                yield i, logits[j * nb : (j + 1) * nb, keep - n - 1 : keep - 1]


def _reference_logits(
    model: Any, embeds: torch.Tensor, mask: torch.Tensor, continuations: Sequence[list[int]]
) -> Iterator[tuple[int, torch.Tensor]]:
    """One full forward of the left-padded branches ``[R, T, H]`` per continuation."""
    emb = model.get_input_embeddings()
    rows = embeds.shape[0]
    for i, ids in enumerate(continuations):
        if not ids:
            continue
        cont_ids = torch.tensor(ids, device=embeds.device)
        full = torch.cat([embeds, emb(cont_ids)[None].expand(rows, -1, -1)], dim=1)
        full_mask = torch.cat([mask, mask.new_ones(rows, len(ids))], dim=1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(inputs_embeds=full, attention_mask=full_mask, position_ids=pos).logits
        yield i, logits[:, embeds.shape[1] - 1 : -1, :]  # [R, n, V] predicting its tokens


def lone_request(tokens: Generator[int, None, None]) -> Generator[dict[int, int], None, None]:
    """A one-request decoder's token stream as ``{0: token}`` steps (closing closes it)."""
    try:
        for token in tokens:
            yield {0: token}
    finally:
        tokens.close()
