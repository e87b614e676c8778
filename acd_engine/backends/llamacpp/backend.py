"""The llama.cpp backend: an engine's requests decoded by llama.cpp on the model's GGUF.

On a CPU, batch-1 decoding is bound by reading the weights once per token, and llama.cpp
reads them in their quantized GGUF form with hand-written SIMD kernels; PyTorch's eager
int8/int4 kernels (:mod:`acd_engine.loading.quantize`) do not come close on the CPUs measured
(docs/performance.md). ``Engine(gguf, backend="llamacpp")`` holds the embedding table
alone (``keep_layers=0``) and this backend runs every forward, under the engine's one
request path (:mod:`acd_engine.runtime.calls`): coalescing, streaming, cancellation, the answer
loop and the results are the engine's; only the logits come from llama.cpp.

* The engine renders each call and the gate routes it first: the gate's layers are read
  from llama.cpp's own forward of the plain rendering (:mod:`acd_engine.backends.llamacpp.gate`, a
  context of its own stopped after the deepest gate layer), or from the engine's PyTorch
  layers with ``LlamaCppOptions(gate_on="engine")``.
* Each branch's row is cut where the torch fast path cuts it
  (:meth:`~acd_engine.backends.torch.rows.RowBuilder.row_splits`): a constant prefix (template head, the
  SP/AP soft prompt or manual prompt, the tail's template stub) and the request's own
  tail, both fed as input *embeddings* (llama.cpp looks up the GGUF's own token embeddings
  the same way, so a manual prompt fed as embeddings equals it fed as tokens).
* Every row is one llama.cpp sequence of one context, with a KV stream of its own (so a
  request decodes the same beside others as alone): two per contrast request, one per
  single-branch request. A prefix is prefilled once, and its KV saved in host memory
  (``llama_state_seq_get_data``, ~23 KB a token for the default model) and restored into
  every later request's sequence (a copy, nothing computed), least recently used first
  out; so a request prefills only its own tokens, as on the torch fast path.
* All rows of all calls of a batch step together, one ``llama_decode`` per token; each
  request's token is chosen by its own :class:`~acd_engine.backends.step.TokenStep` (contrast,
  constraint, plausibility filter, penalties, sampler), exactly as on the torch backend.
  A request that ends (EOS, stop string, limit, cancel flag) leaves the batch before the
  next step.

The context grows to the batches it meets (llama.cpp allocates its KV cells up front, so
it is sized for the rows and lengths met, not for the model's whole window). Needs the
optional extra ``[llamacpp]`` (llama-cpp-python, compiled on install).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import OrderedDict
from collections.abc import Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acd_engine.backends.base import (
    BackendEngine,
    BackendName,
    BatchCall,
    LlamaCppOptions,
    RequestFacts,
    Started,
)
from acd_engine.backends.llamacpp.gate import LlamaCppGateReader
from acd_engine.backends.step import TokenStep
from acd_engine.backends.torch.backend import probe_verdict
from acd_engine.backends.torch.rows import RowSplit, fit_context
from acd_engine.config import DecodingConfig
from acd_engine.errors import ConfigError
from acd_engine.install import pip_install_extra
from acd_engine.rendering import Rendered
from acd_engine.safety.contrast import contrast_logits
from acd_engine.safety.gate import (
    GateVerdict,
    SafetyGate,
    decoded_rendering,
    routed_config,
    verdict_of,
)

__all__ = ["PLAIN", "LlamaCppBackend"]

logger = logging.getLogger(__name__)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            f"backend 'llamacpp' needs llama-cpp-python: {pip_install_extra('llamacpp')} (it "
            "compiles llama.cpp, several minutes)"
        ) from exc
    return llama_cpp


_LOG_CALLBACK: Any = None  # kept alive: llama.cpp holds the C pointer


def _quiet(lib: Any) -> None:
    """Route llama.cpp's own logging (model card, timings) to this logger at DEBUG."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:

        def log(level: int, text: bytes, user_data: Any) -> None:
            logger.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _LOG_CALLBACK = lib.llama_log_callback(log)
        lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _cpu_reports_amx() -> bool:
    """Whether this CPU reports Intel AMX (Linux ``/proc/cpuinfo``; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_int8" in line.split() for line in f)
    except OSError:
        return False


def _room(cells: int, least: int) -> int:
    """``cells`` rounded up to a power of two (at least ``least``): a context grows in few
    steps, each recreating it."""
    size = least
    while size < cells:
        size *= 2
    return size


PLAIN = DecodingConfig(method="plain")  # the gate reads the plain rendering's row
STREAM_PAD = 256  # llama.cpp pads each sequence's KV cells to a multiple of this


@dataclass(frozen=True)
class _CachedPrefix:
    """A branch prefix's KV as llama.cpp saves one sequence (``llama_state_seq_get_data``)."""

    state: Any  # ctypes uint8 array, kept as it came
    size: int
    length: int  # its positions 0 .. length-1


@dataclass
class _Request:
    """One call of a batch, rendered, routed and cut into rows (positive row first)."""

    splits: list[RowSplit]
    prefixes: list[torch.Tensor | None]  # [P_r, H] input embeddings, or no prefix
    tails: list[torch.Tensor]  # [T_r, H]
    lengths: list[int]  # prompt positions per row
    config: DecodingConfig  # what it decodes with, once routed
    step: TokenStep
    ids: torch.Tensor  # [1, L] the shared conversation, then its tokens
    limit: int
    prompt_tokens: int
    verdict: GateVerdict | None

    def facts(self) -> tuple[int, GateVerdict | None]:
        return self.prompt_tokens, self.verdict


class LlamaCppBackend:
    """llama.cpp on one GGUF, decoding an engine's calls (see the module docstring).

    Args:
        engine: The engine whose rendering, pack, gate and rows it uses. Only its
            embedding table is read (the gate's layers come from llama.cpp unless
            ``options.gate_on`` is ``"engine"``), so the engine loads it alone.
        gguf: The GGUF file llama.cpp runs: the engine's own model, whose embedding table
            the engine dequantized from it.
        options: Threads, prefix room, ubatch, buffer types and where the gate is read.
    """

    def __init__(self, engine: BackendEngine, gguf: str | Path, options: LlamaCppOptions) -> None:
        lib = _llama_cpp()
        _quiet(lib)
        lib.llama_backend_init()
        self.lib = lib
        self.engine = engine
        self.options = options
        self.gguf = Path(gguf)
        self.threads = options.threads or os.cpu_count() or 1
        self.prefilled_tokens = 0  # positions prefilled so far (prefixes included)
        self.steps = 0  # batched one-token decodes so far
        self._prefixes: OrderedDict[Hashable, _CachedPrefix] = OrderedDict()  # LRU order
        mparams = lib.llama_model_default_params()
        extra_buffers = options.extra_buffers
        if extra_buffers is None:
            extra_buffers = not _cpu_reports_amx()
            if not extra_buffers:
                logger.info("llama.cpp: AMX repacking off on this CPU (llama.cpp issue #20824)")
        mparams.use_extra_bufts = extra_buffers
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise ConfigError(f"llama.cpp could not load the GGUF file {gguf}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.hidden = lib.llama_model_n_embd(self.model)
        expected = engine.model.config.hidden_size
        if self.hidden != expected:
            lib.llama_model_free(self.model)
            self.model = None
            raise ConfigError(
                f"the GGUF's hidden size must be the engine model's {expected}, got {self.hidden}"
            )
        self.ctx: Any = None  # made for the first batch, grown for a larger one
        self.cells = 0  # KV cells of each of its sequences
        self.n_seq = 0  # its sequences, one per row of a batch
        self._embd_batch: Any = None
        self._embd_room = 0
        self._token_batch: Any = None
        self._gate_reader: LlamaCppGateReader | None = None  # made on the first gated read

    @property
    def name(self) -> BackendName:
        return "llamacpp"

    @property
    def batches(self) -> bool:
        """Always: concurrent calls step together as llama.cpp sequences."""
        return True

    def close(self) -> None:
        """Free the llama.cpp contexts, batches and model."""
        if getattr(self, "model", None):
            self._free_context()
            if self._gate_reader is not None:
                self._gate_reader.close()
                self._gate_reader = None
            if self._embd_batch is not None:
                self.lib.llama_batch_free(self._embd_batch)
                self._embd_batch = None
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------ the context
    def _free_context(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self._token_batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None
            self._prefixes.clear()  # a saved sequence loads only into a context of its shape

    def _ensure_context(self, rows: int, cells: int) -> None:
        """A context with at least ``rows`` sequences of at least ``cells`` KV cells each;
        recreated when the current one is smaller (cached prefixes live outside it).

        Every sequence has a KV stream of its own (``kv_unified=False``): llama.cpp's
        attention numbers depend on where a sequence's cells lie in a shared pool (its CPU
        flash attention even reads a sequence wrongly when a later token sits in a cell
        below an earlier one), so in one pool a request would decode differently beside
        other requests than alone. In a stream of its own it decodes the same either way.
        """
        if self.ctx and rows <= self.n_seq and cells <= self.cells:
            return
        rows, cells = max(_room(rows, 2), self.n_seq), max(_room(cells, STREAM_PAD), self.cells)
        self._free_context()
        lib = self.lib
        cparams = lib.llama_context_default_params()
        cparams.kv_unified = False
        cparams.n_ctx = rows * cells  # llama.cpp gives each sequence n_ctx / n_seq_max
        cparams.n_batch = rows * cells  # the longest feed: anything that fits
        cparams.n_ubatch = min(self.options.ubatch, rows * cells)  # prefills run in pieces
        cparams.n_seq_max = rows
        cparams.n_threads = cparams.n_threads_batch = self.threads
        ctx = lib.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise ConfigError(
                f"llama.cpp could not create a context of {rows} x {cells} KV cells "
                "(out of memory?)"
            )
        self.ctx, self.cells, self.n_seq = ctx, cells, rows
        self._token_batch = lib.llama_batch_init(rows, 0, 1)
        logger.debug("llama.cpp context: %d sequences of %d KV cells", rows, cells)

    def _embd_batch_for(self, tokens: int) -> Any:
        """A batch of input embeddings holding at least ``tokens`` positions."""
        if tokens > self._embd_room:
            if self._embd_batch is not None:
                self.lib.llama_batch_free(self._embd_batch)
            self._embd_room = _room(tokens, 64)
            self._embd_batch = self.lib.llama_batch_init(self._embd_room, self.hidden, 1)
        return self._embd_batch

    # ------------------------------------------------------------------ forwards
    def _decode(self, batch: Any) -> None:
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code}")

    def _logits(self, i: int) -> torch.Tensor:
        """Row ``i`` of the last batch's logits as ``[1, V]`` fp32 (a copy)."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())[None]

    def _prefill(
        self, rows: list[tuple[int, int, torch.Tensor]], outputs: int = 1
    ) -> list[torch.Tensor]:
        """Feed each ``(seq, first position, [T, H] input embeddings)`` in one batch and
        return each row's logits at its last ``outputs`` positions, ``[outputs, V]``."""
        data = torch.cat([r for _, _, r in rows]).detach().to(torch.float32).contiguous().numpy()
        b = self._embd_batch_for(data.shape[0])
        ctypes.memmove(b.embd, data.ctypes.data, data.nbytes)  # [n, H] fp32
        i, wanted = 0, []
        for seq, start, r in rows:
            end = start + r.shape[0]
            for pos in range(start, end):
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = pos >= end - outputs
                i += 1
            wanted.append(range(i - min(outputs, r.shape[0]), i))
        b.n_tokens = i
        self._decode(b)
        self.prefilled_tokens += i
        return [torch.cat([self._logits(j) for j in js]) for js in wanted]

    def _cached(self, split: RowSplit) -> _CachedPrefix | None:
        cached = self._prefixes.get(split.key)
        if cached is not None:
            self._prefixes.move_to_end(split.key)
        return cached

    def _keep(self, split: RowSplit, seq: int, length: int) -> None:
        """Save ``seq`` (holding ``split``'s prefix alone) in the cache, dropping the least
        recently used prefixes to stay within ``prefix_tokens``; a prefix longer than that
        is not kept."""
        room = self.options.prefix_tokens
        if length > room:
            return
        while self._prefixes and sum(p.length for p in self._prefixes.values()) + length > room:
            self._prefixes.popitem(last=False)
        size = self.lib.llama_state_seq_get_size(self.ctx, seq)
        state = (ctypes.c_uint8 * size)()
        written = self.lib.llama_state_seq_get_data(self.ctx, state, size, seq)
        self._prefixes[split.key] = _CachedPrefix(state, written, length)

    def _feed(
        self,
        request: _Request,
        seqs: list[int],
        extra: torch.Tensor | None = None,
        outputs: int = 1,
    ) -> list[torch.Tensor]:
        """Prefill ``request``'s rows into ``seqs`` (each its prefix, then its tail and
        ``extra`` embeddings) and return each row's logits at its last ``outputs``
        positions, ``[outputs, V]``.

        A cached prefix is restored into the row's sequence from its saved KV (bytes
        copied, nothing computed); a new one is prefilled in a batch of its own and saved.
        Its own batch either way: llama.cpp's numbers depend slightly on how a prompt is
        cut into batches, so a request's tokens do not depend on what the cache holds, nor
        on the calls it is batched with (each request's rows are fed in a batch of their
        own too).
        """
        lib = self.lib
        mem = lib.llama_get_memory(self.ctx)
        feeds = []
        for seq, split, prefix, tail, length in zip(
            seqs, request.splits, request.prefixes, request.tails, request.lengths, strict=True
        ):
            lib.llama_memory_seq_rm(mem, seq, -1, -1)
            if prefix is not None:
                cached = self._cached(split)
                if cached is None:
                    self._prefill([(seq, 0, prefix)])
                    self._keep(split, seq, prefix.shape[0])
                elif not lib.llama_state_seq_set_data(self.ctx, cached.state, cached.size, seq):
                    raise RuntimeError("llama.cpp could not restore a cached prefix")
            row = tail if extra is None else torch.cat([tail, extra])
            feeds.append((seq, length - tail.shape[0], row))
        return self._prefill(feeds, outputs)

    def _step(self, feeds: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Decode one ``(seq, position, token)`` per row in one batch; their logits."""
        b = self._token_batch
        for i, (seq, pos, token) in enumerate(feeds):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = True
        b.n_tokens = len(feeds)
        self._decode(b)
        self.steps += 1
        return [self._logits(i) for i in range(len(feeds))]

    def _release(self, seqs: Sequence[int]) -> None:
        """Free the cells of ``seqs`` (cached prefixes live outside the context)."""
        if self.ctx:
            mem = self.lib.llama_get_memory(self.ctx)
            for seq in seqs:
                self.lib.llama_memory_seq_rm(mem, seq, -1, -1)

    # ------------------------------------------------------------------ the gate
    def gate_verdict(
        self, rendered: Rendered, config: DecodingConfig, template_kwargs: dict[str, Any]
    ) -> GateVerdict | None:
        """The gate's verdict on one request, read from llama.cpp's own forward of its
        plain rendering (or the engine's, ``gate_on="engine"``); None when not gated."""
        if self.options.gate_on == "engine":
            return probe_verdict(self.engine, rendered, config, template_kwargs)
        gate = self.engine.active_gate(config)
        if gate is None:
            return None
        return verdict_of(gate, config, self.gate_states(rendered, gate, template_kwargs))

    def gate_states(
        self, rendered: Rendered, gate: SafetyGate, template_kwargs: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """``[T, F]``: ``gate``'s layers' states for one rendered request, at the positions
        the engine's gate reads, from llama.cpp (a reader context of its own)."""
        kwargs = template_kwargs or {}
        assert rendered.plain is not None
        needed = len(rendered.plain)
        reader = self._gate_reader
        if reader is None or reader.layers != tuple(gate.layers) or reader.n_ctx < needed:
            if reader is not None:
                reader.close()
            reader = self._gate_reader = LlamaCppGateReader(
                self.lib,
                self.model,
                gate.layers,
                _room(needed, 512),
                self.options.ubatch,
                self.threads,
            )
        rows = self.engine.rows
        span = rows.gate_span(gate.scope, rendered, kwargs)
        # the plain row's cut: the template's constant start is cached in the reader
        (split,) = rows.row_splits(rendered, self.engine.plan(PLAIN), kwargs)
        return reader.states(rendered.plain, span, prefix=len(split.head))

    # ------------------------------------------------------------------ requests
    def _request(
        self,
        rendered: Rendered,
        config: DecodingConfig,
        verdict: GateVerdict | None,
        constraint: Any,
        template_kwargs: dict[str, Any],
    ) -> _Request:
        """One call routed by ``verdict`` and cut into rows; its prompt refused when it
        does not fit the model's context window (as on the torch backend)."""
        engine, rows = self.engine, self.engine.rows
        routed = routed_config(config, verdict)
        decoded = decoded_rendering(rendered, verdict)
        plan = engine.plan(routed)
        splits = rows.row_splits(decoded, plan, template_kwargs)
        with torch.inference_mode():
            prefixes = [
                rows.prefix_embeds(s.head, s.branch, s.stub) if s.has_prefix else None
                for s in splits
            ]
            tails = [rows.embed(s.tail) for s in splits]
        lengths = [
            t.shape[0] + (0 if p is None else p.shape[0])
            for p, t in zip(prefixes, tails, strict=True)
        ]
        limit = fit_context(rows.context_window, max(lengths), routed).max_new_tokens
        shared = decoded.plain if plan.positive is None else decoded.tail
        assert shared is not None
        return _Request(
            splits,
            prefixes,
            tails,
            lengths,
            routed,
            TokenStep(routed, constraint, torch.device("cpu")),
            torch.tensor([shared]),
            limit,
            rows.prompt_tokens(decoded, plan),
            verdict,
        )

    def start(
        self,
        calls: Sequence[BatchCall],
        config: DecodingConfig,
        template_kwargs: dict[str, Any],
        finished: set[int],
    ) -> Started:
        """Render and route every call (the gate read first, one call at a time), size the
        context for the batch, then decode all of them together."""
        requests = []
        for call in calls:
            rendered = self.engine.render(call.messages, **template_kwargs)
            assert rendered.plain is not None  # refused before the gate reads all of it:
            fit_context(self.engine.rows.context_window, len(rendered.plain), config)
            verdict = self.gate_verdict(rendered, config, template_kwargs)
            requests.append(
                self._request(rendered, config, verdict, call.constraint, template_kwargs)
            )
        rows = sum(len(r.splits) for r in requests)
        self._ensure_context(rows, max(max(r.lengths) + r.limit for r in requests))
        facts: list[RequestFacts] = [r.facts for r in requests]
        return Started(
            self._decode_requests(requests, finished), [r.limit for r in requests], facts
        )

    def _decode_requests(
        self, requests: list[_Request], finished: set[int]
    ) -> Generator[dict[int, int], None, None]:
        """Yield ``{request: token}`` each step for the requests still running: one batched
        ``llama_decode`` per step over every live row. A request in ``finished`` (or at its
        limit) leaves before the next step, and its cells are freed."""
        seqs: list[list[int]] = []
        for r in requests:  # request i's rows: consecutive sequences, positive first
            first = sum(len(s) for s in seqs)
            seqs.append(list(range(first, first + len(r.splits))))
        every = [s for rs in seqs for s in rs]
        try:
            # [1, V] per row of each request, positive first
            logits = [self._feed(r, s) for r, s in zip(requests, seqs, strict=True)]
            live = list(range(len(requests)))
            step = 0
            while live:
                picked: dict[int, int] = {}
                for i in live:
                    r = requests[i]
                    pos = logits[i][0]
                    neg = logits[i][1] if len(logits[i]) > 1 and r.step.contrasting(step) else None
                    scores = contrast_logits(pos, neg, r.config.alpha)
                    token = r.step.choose(scores, pos, r.ids)  # [1, 1]
                    r.ids = torch.cat([r.ids, token], dim=-1)
                    picked[i] = int(token)
                yield picked
                step += 1
                live = [i for i in live if i not in finished and step < requests[i].limit]
                feeds: list[tuple[int, int, int]] = []
                owners: list[int] = []
                for i in live:
                    r = requests[i]
                    # once the contrast_tokens schedule ends, the negative row is left behind
                    rows = seqs[i] if r.step.contrasting(step) else seqs[i][:1]
                    for seq, length in zip(rows, r.lengths, strict=False):
                        feeds.append((seq, length + step - 1, picked[i]))
                        owners.append(i)
                if not feeds:
                    return
                logits = [[] for _ in requests]
                for i, row in zip(owners, self._step(feeds), strict=True):
                    logits[i].append(row)  # [1, V] per row, positive first
        finally:
            self._release(every)

    # ------------------------------------------------------------------ scoring
    def continuation_logits(
        self, rendered: Rendered, config: DecodingConfig, continuations: Sequence[list[int]]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """One prefill per continuation with outputs at its last ``n + 1`` positions: the
        tail's last token predicts its first token, and so on."""
        request = self._request(rendered, config, None, None, {})
        seqs = list(range(len(request.splits)))
        longest = max((len(c) for c in continuations), default=0)
        self._ensure_context(len(seqs), max(request.lengths) + longest)
        try:
            for i, ids in enumerate(continuations):
                if not ids:
                    continue
                with torch.inference_mode():
                    extra = self.engine.rows.embed(ids)
                rows = self._feed(request, seqs, extra=extra, outputs=len(ids) + 1)
                yield i, torch.stack([row[:-1] for row in rows])  # [R, n, V]
        finally:
            self._release(seqs)
