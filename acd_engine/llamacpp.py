"""ACD on llama.cpp's batch API: a measured prototype, and the yardstick of ``acd bench``.

On a CPU, batch-1 decoding is bound by reading the weights once per token, and llama.cpp
reads them in their quantized GGUF form with hand-written SIMD kernels; PyTorch's eager
int8/int4 kernels (:mod:`acd_engine.quantize`) do not come close on the CPUs measured
(docs/performance.md). This module runs the engine's requests on llama.cpp instead:

* the engine renders the conversation and cuts each branch's row where its fast path does
  (:meth:`~acd_engine.rows.RowBuilder.row_splits`): a constant prefix (template head, the
  SP/AP soft prompt or manual prompt, the tail's template stub; for ``plain`` the
  template's constant start) and the request's own tail, both as input *embeddings*;
* each branch is one llama.cpp sequence of the same context (seq 0 positive, seq 1
  negative); llama.cpp looks up the GGUF's own token embeddings the same way, so a manual
  prompt fed as embeddings equals it fed as tokens;
* a prefix is prefilled once into a spare sequence and shared with a request's sequence by
  reference (``llama_memory_seq_cp`` on a unified KV cache, no data copied), so a request
  prefills only its own tokens, as on the engine's fast path;
* every step decodes one token on both sequences in one ``llama_decode`` batch, and the
  engine's own :class:`~acd_engine.step.TokenStep` (contrast, constraint, plausibility
  filter, processors, pick) chooses the token from the two rows of logits.

So the method is the engine's, token choice included; only the forward runs elsewhere. A
decoder is also an ``acd eval`` model (:meth:`LlamaCppDecoder.generate_batch`,
:meth:`LlamaCppDecoder.score_continuations`), so this path is measured with the same
protocol as the engine (``scripts/llamacpp_quality.py``).

It is a prototype: one request at a time. A gated request costs one extra prefill of its
plain rendering, on llama.cpp too: a second context whose evaluation callback copies the
gate's layers and stops the graph after the deepest one
(:mod:`acd_engine.llamacpp_gate`). So the engine need not hold any decoder layer:
``Engine(gguf, keep_layers=0)`` loads the embedding table alone, gated pack or not.
Needs the optional extra ``[llamacpp]`` (llama-cpp-python, compiled on install).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import LogitsProcessorList

from acd_engine.answer import Answer, GenerationResult, result_of
from acd_engine.config import DecodingConfig
from acd_engine.contrast import contrast_logits
from acd_engine.errors import ConfigError
from acd_engine.gate import GateVerdict, SafetyGate, decoded_rendering, routed_config, verdict_of
from acd_engine.install import pip_install_extra
from acd_engine.llamacpp_gate import LlamaCppGateReader
from acd_engine.rendering import Rendered
from acd_engine.rows import RowSplit
from acd_engine.step import TokenStep, continuation_logprob

__all__ = ["LlamaCppDecoder", "LlamaCppOutput"]

logger = logging.getLogger(__name__)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            f"the llama.cpp rows need llama-cpp-python: {pip_install_extra('llamacpp')} (it "
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


PLAIN = DecodingConfig(method="plain")  # the gate reads the plain rendering's row
PREFIX_SLOTS = 4  # cached prefixes kept at once: SP and AP, plus base's and plain's


@dataclass(frozen=True)
class _CachedPrefix:
    seq: int  # the spare llama.cpp sequence holding it
    length: int  # its positions 0 .. length-1


@dataclass(frozen=True)
class LlamaCppOutput:
    """The tokens of one request and when its first token was chosen."""

    token_ids: list[int]


class LlamaCppDecoder:
    """One llama.cpp model and context with two sequences, decoding an engine's requests.

    Args:
        engine: The :class:`~acd_engine.engine.Engine` whose rendering, pack and token step
            are used (its model must hold the same weights as ``gguf``, e.g. the GGUF's
            own dequantization, which is what the engine loads from a ``.gguf``). Only its
            embedding table is read (the gate's layers come from llama.cpp), so a front end
            with ``keep_layers=0`` spares every decoder layer's memory.
        gguf: The GGUF file llama.cpp runs.
        threads: CPU threads for llama.cpp (default: every core).
        n_ctx: Context length per sequence (llama.cpp allocates its KV up front, so size
            it to the requests: ``acd bench`` uses prompt + new tokens, rounded up).
        ubatch: Tokens per physical llama.cpp batch (its own default, 512): a longer prompt
            is fed in pieces, which bounds the compute buffer.
        extra_buffers: Let llama.cpp repack weights into its extra CPU buffer types (AMX,
            AVX2/NEON interleaved blocks). Default: yes, except on a CPU that reports AMX,
            where llama.cpp 0.3.36's AMX matmul crashes the process on the first batch
            (seen on this project's Xeon machines; llama.cpp issue #20824).
        prefix_tokens: KV cells kept for cached branch prefixes, beyond the two request
            sequences' ``n_ctx`` each (default: ``n_ctx``); a prefix longer than this is
            prefilled with its request instead, and older prefixes are dropped (least
            recently used first) to make room.
        gate_on: Where a gated request's gate is read: ``"llamacpp"`` (default), from
            llama.cpp's own layers (:mod:`acd_engine.llamacpp_gate`), so the engine may be
            a ``keep_layers=0`` front end; ``"engine"``, by the engine's PyTorch layers
            (it must hold the deepest gate layer), which on CPUs with slow multi-token
            Q4_1 products reads faster at ~230 MiB more memory for the default model
            (docs/performance.md).
    """

    def __init__(
        self,
        engine: Any,
        gguf: str | Path,
        threads: int | None = None,
        n_ctx: int = 1024,
        ubatch: int = 512,
        prefix_tokens: int | None = None,
        extra_buffers: bool | None = None,
        gate_on: Literal["llamacpp", "engine"] = "llamacpp",
    ) -> None:
        if gate_on not in ("llamacpp", "engine"):
            raise ConfigError(f"gate_on must be 'llamacpp' or 'engine', got {gate_on!r}")
        self.gate_on = gate_on
        if n_ctx < 1:
            raise ConfigError(f"n_ctx must be at least 1, got {n_ctx}")
        if prefix_tokens is not None and prefix_tokens < 0:
            raise ConfigError(f"prefix_tokens must be at least 0, got {prefix_tokens}")
        lib = _llama_cpp()
        _quiet(lib)
        lib.llama_backend_init()
        self.lib = lib
        self.engine = engine
        self._lock = threading.Lock()
        self.n_ctx = n_ctx
        self.prefix_tokens = n_ctx if prefix_tokens is None else prefix_tokens
        self._prefixes: OrderedDict[Hashable, _CachedPrefix] = OrderedDict()  # LRU order
        self.prefilled_tokens = 0  # positions prefilled so far (prefixes included)
        self.gguf = Path(gguf)
        mparams = lib.llama_model_default_params()
        if extra_buffers is None:
            extra_buffers = not _cpu_reports_amx()
            if not extra_buffers:
                logger.info("llama.cpp: AMX repacking off on this CPU (llama.cpp issue #20824)")
        mparams.use_extra_bufts = extra_buffers
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise ConfigError(f"llama.cpp could not load the GGUF file {gguf}")
        cparams = lib.llama_context_default_params()
        # one pool of cells for every sequence: a request's sequence then shares its cached
        # prefix's cells instead of copying them
        cparams.kv_unified = True
        cparams.n_ctx = 2 * n_ctx + self.prefix_tokens
        # both rows' prompts (or one prefix) in one llama_decode call
        cparams.n_batch = max(2 * n_ctx, self.prefix_tokens)
        cparams.n_ubatch = min(ubatch, 2 * n_ctx)  # run in pieces of this many tokens
        cparams.n_seq_max = 2 + PREFIX_SLOTS  # seq 0 positive, 1 negative, then the prefixes
        cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise ConfigError("llama.cpp could not create a context (out of memory?)")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.hidden = lib.llama_model_n_embd(self.model)
        if self.hidden != engine.model.config.hidden_size:
            raise ConfigError(
                f"the GGUF's hidden size must be the engine model's "
                f"{engine.model.config.hidden_size}, got {self.hidden}"
            )
        self.embd_batch = lib.llama_batch_init(max(2 * n_ctx, self.prefix_tokens), self.hidden, 1)
        self.token_batch = lib.llama_batch_init(2, 0, 1)
        self._ubatch, self._threads = ubatch, threads
        self._gate_reader: LlamaCppGateReader | None = None  # made on the first gated request

    def close(self) -> None:
        """Free the llama.cpp context, model and batches."""
        if getattr(self, "ctx", None):
            if self._gate_reader is not None:
                self._gate_reader.close()
            self.lib.llama_batch_free(self.embd_batch)
            self.lib.llama_batch_free(self.token_batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:
        self.close()

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
        b = self.embd_batch
        data = torch.cat([r for _, _, r in rows]).detach().to(torch.float32).contiguous().numpy()
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

    def _prefix(self, split: RowSplit, embeds: torch.Tensor) -> _CachedPrefix | None:
        """``split``'s prefix (input embeddings ``[P, H]``) in a spare sequence, prefilled on
        first use; None when it is longer than the room kept for prefixes."""
        cached = self._prefixes.get(split.key)
        if cached is not None:
            self._prefixes.move_to_end(split.key)
            return cached
        length = embeds.shape[0]
        if length > self.prefix_tokens:
            return None
        mem = self.lib.llama_get_memory(self.ctx)
        while self._prefixes and (
            len(self._prefixes) == PREFIX_SLOTS
            or sum(p.length for p in self._prefixes.values()) + length > self.prefix_tokens
        ):
            _, old = self._prefixes.popitem(last=False)
            self.lib.llama_memory_seq_rm(mem, old.seq, -1, -1)
        used = {p.seq for p in self._prefixes.values()}
        seq = next(s for s in range(2, 2 + PREFIX_SLOTS) if s not in used)
        self.lib.llama_memory_seq_rm(mem, seq, -1, -1)  # whatever a failed prefill left
        self._prefill([(seq, 0, embeds)])
        cached = self._prefixes[split.key] = _CachedPrefix(seq, length)
        return cached

    def _start(
        self,
        splits: list[RowSplit],
        new_tokens: int,
        extra: list[int] | None = None,
        outputs: int = 1,
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Set up sequence r for row r (its prefix, then its tail and ``extra`` prefilled)
        and return each row's logits at its last ``outputs`` positions ``[outputs, V]``
        and its length.

        A prefix is always prefilled in a batch of its own, kept or not: llama.cpp's
        results depend slightly on how a prompt is cut into batches, so this keeps a
        request's tokens independent of what the cache happens to hold.
        """
        rows_ = self.engine.rows
        prefixes = [
            rows_.prefix_embeds(s.head, s.branch, s.stub) if s.has_prefix else None for s in splits
        ]  # [P_r, H] each
        tails = [rows_.embed(s.tail + (extra or [])) for s in splits]  # [T_r, H] each
        lengths = [
            t.shape[0] + (0 if p is None else p.shape[0])
            for p, t in zip(prefixes, tails, strict=True)
        ]
        if max(lengths) + new_tokens > self.n_ctx:  # checked here: llama_decode would only fail
            raise ConfigError(
                f"prompt plus max_new_tokens must be at most {self.n_ctx} tokens (n_ctx), got "
                f"{max(lengths)} + {new_tokens}"
            )
        mem = self.lib.llama_get_memory(self.ctx)
        feeds = []
        for seq, (split, prefix, tail) in enumerate(zip(splits, prefixes, tails, strict=True)):
            self.lib.llama_memory_seq_rm(mem, seq, -1, -1)
            if prefix is not None:
                cached = self._prefix(split, prefix)
                if cached is None:  # too long to keep: this request's own
                    self._prefill([(seq, 0, prefix)])
                else:  # shared by reference: the cells gain this sequence's id
                    self.lib.llama_memory_seq_cp(mem, cached.seq, seq, -1, -1)
            feeds.append((seq, lengths[seq] - tail.shape[0], tail))
        return self._prefill(feeds, outputs), lengths

    def _step(self, token: int, positions: list[int]) -> list[torch.Tensor]:
        """Decode ``token`` on sequences 0..len(positions)-1; return their logits."""
        b = self.token_batch
        for seq, pos in enumerate(positions):
            b.token[seq] = token
            b.pos[seq] = pos
            b.n_seq_id[seq] = 1
            b.seq_id[seq][0] = seq
            b.logits[seq] = True
        b.n_tokens = len(positions)
        self._decode(b)
        return [self._logits(i) for i in range(len(positions))]

    # ------------------------------------------------------------------ the gate
    def gate_verdict(
        self,
        messages: list[dict[str, str]],
        cfg: DecodingConfig,
        rendered: Rendered | None = None,
    ) -> GateVerdict | None:
        """The gate's verdict on one request, read from llama.cpp's own forward of its
        plain rendering (None when ``cfg`` is not gated): the engine's
        :meth:`~acd_engine.engine.Engine.gate_verdict`, with the Q4_1 weights' hidden states.
        ``rendered``: the request's rendering, when the caller has it already.
        """
        if self.gate_on == "engine":
            return self.engine.gate_verdict(messages, cfg)
        gate = self.engine.active_gate(cfg)
        if gate is None:
            return None
        rendered = rendered or self.engine.render(messages)
        return verdict_of(gate, cfg, self.gate_states(rendered, gate))

    def gate_states(self, rendered: Rendered, gate: SafetyGate) -> torch.Tensor:
        """``[T, F]``: ``gate``'s layers' states for one rendered request, as
        :meth:`~acd_engine.engine.Engine.gate_states` reads them, from llama.cpp."""
        if self._gate_reader is None or self._gate_reader.layers != tuple(gate.layers):
            if self._gate_reader is not None:
                self._gate_reader.close()
            self._gate_reader = LlamaCppGateReader(
                self.lib, self.model, gate.layers, self.n_ctx, self._ubatch, self._threads
            )
        rows = self.engine.rows
        assert rendered.plain is not None
        span = rows.gate_span(gate.scope, rendered, {})
        # the plain row's cut: the template's constant start is cached in the gate's context
        (split,) = rows.row_splits(rendered, self.engine.plan(PLAIN), {})
        return self._gate_reader.states(rendered.plain, span, prefix=len(split.head))

    # ------------------------------------------------------------------ requests
    def stream(
        self,
        messages: list[dict[str, str]],
        cfg: DecodingConfig,
        constraint: LogitsProcessorList | Any | None = None,
    ) -> Iterator[int]:
        """Yield the tokens of one request, chosen exactly as the engine chooses them.

        Not thread-safe on its own (the context holds one request); :meth:`generate` locks.
        """
        # the gate reads middle layers of a prefill of its own (llama.cpp's, stopped after
        # them), then routes as the engine does
        rendered = self.engine.render(messages)
        verdict = self.gate_verdict(messages, cfg, rendered)
        cfg = routed_config(cfg, verdict)
        yield from self._tokens(decoded_rendering(rendered, verdict), cfg, constraint)

    def _tokens(
        self, rendered: Rendered, cfg: DecodingConfig, constraint: LogitsProcessorList | Any | None
    ) -> Iterator[int]:
        """:meth:`stream` once rendered and routed: ``cfg`` is the method it decodes with."""
        engine = self.engine
        plan = engine.plan(cfg)
        splits = engine.rows.row_splits(rendered, plan, {})
        shared = rendered.plain if plan.positive is None else rendered.tail
        assert shared is not None
        logits, lengths = self._start(splits, cfg.max_new_tokens)
        if constraint is not None and not isinstance(constraint, LogitsProcessorList):
            constraint = LogitsProcessorList([constraint])
        step = TokenStep(cfg, constraint, torch.device("cpu"))
        ids = list(shared)
        for i in range(cfg.max_new_tokens):
            pos = logits[0]
            neg = logits[1] if len(logits) > 1 and step.contrasting(i) else None
            scores = contrast_logits(pos, neg, cfg.alpha)
            token = int(step.choose(scores, pos, torch.tensor([ids])))
            yield token
            if token in engine.eos_token_ids or i + 1 == cfg.max_new_tokens:
                return
            ids.append(token)
            # once the contrast_tokens schedule ends, the negative sequence is left behind
            active = lengths if step.contrasting(i + 1) else lengths[:1]
            logits = self._step(token, [n + i for n in active])

    def generate(
        self,
        messages: list[dict[str, str]],
        cfg: DecodingConfig,
        constraint: LogitsProcessorList | Any | None = None,
    ) -> LlamaCppOutput:
        """All tokens of one request (EOS included when it ends there).

        One request at a time per decoder (its one context holds the request's two
        sequences): concurrent calls wait for each other.
        """
        with self._lock:
            return LlamaCppOutput(list(self.stream(messages, cfg, constraint)))

    # ------------------------------------------------------------------ acd eval's model
    # With these, a decoder is an ``acd_engine.eval.runner.EvalModel``: ``acd eval``'s runner
    # measures the llama.cpp path with the same protocol, judge and report as the engine.
    @property
    def model_name(self) -> str:
        """The engine's model name and the GGUF file: a run directory pins it, so records
        of this path never mix with the engine's own."""
        return f"{self.engine.model_name} on llama.cpp ({self.gguf.name})"

    @property
    def pack(self) -> Any:
        """The engine's prompt pack (and gate), which this decoder decodes with."""
        return self.engine.pack

    def answer(self, messages: list[dict[str, str]], cfg: DecodingConfig) -> GenerationResult:
        """One request reported as the engine reports it: text (stop strings applied),
        tokens, finish reason, usage and the gate's verdict."""
        engine = self.engine
        with self._lock:
            rendered = engine.render(messages)
            verdict = self.gate_verdict(messages, cfg, rendered)
            routed = routed_config(cfg, verdict)
            rendered = decoded_rendering(rendered, verdict)
            answer = Answer(engine.tokenizer, engine.eos_token_ids, cfg.stop)
            for token in self._tokens(rendered, routed, None):
                answer.push(token)
                if answer.done:
                    break
            prompt_tokens = engine.rows.prompt_tokens(rendered, engine.plan(routed))
            last = answer.closing_chunks(prompt_tokens, verdict)[-1]
            return result_of(answer, last, cfg, engine.pack_report(cfg))

    def generate_batch(
        self, batch: Sequence[list[dict[str, str]]], config: DecodingConfig | None = None
    ) -> list[GenerationResult]:
        """Each conversation's :meth:`answer`, one after another (one context)."""
        cfg = config or self.engine.defaults
        return [self.answer(messages, cfg) for messages in batch]

    def score_continuations(
        self,
        messages: list[dict[str, str]],
        continuations: Sequence[str],
        config: DecodingConfig | None = None,
    ) -> list[float]:
        """Each continuation's summed log-probability under the method, as
        :func:`acd_engine.scoring.score_continuations` computes it on the engine: routed by
        the gate, every token scored from the same filtered contrast the decoder picks from.
        """
        engine = self.engine
        cfg = config or engine.defaults
        with self._lock:
            rendered = engine.render(messages)
            verdict = self.gate_verdict(messages, cfg, rendered)
            cfg = routed_config(cfg, verdict)
            splits = engine.rows.row_splits(
                decoded_rendering(rendered, verdict), engine.plan(cfg), {}
            )
            out = []
            for text in continuations:
                ids = engine.encode_data(text)
                if not ids:
                    out.append(0.0)
                    continue
                # the last n + 1 positions: the tail's last token predicts ids[0], and so on
                logits, _ = self._start(splits, 0, extra=ids, outputs=len(ids) + 1)
                rows = torch.stack([row[:-1] for row in logits])  # [R, n, V]
                out.append(continuation_logprob(rows, torch.tensor(ids), cfg))
            return out
