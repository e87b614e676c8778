"""ACD on llama.cpp's batch API: a measured prototype, and the yardstick of ``acd bench``.

On a CPU, batch-1 decoding is bound by reading the weights once per token, and llama.cpp
reads them in their quantized GGUF form with hand-written SIMD kernels; PyTorch's eager
int8/int4 kernels (:mod:`acd_engine.quantize`) do not come close on the CPUs measured
(docs/performance.md). This module runs the engine's requests on llama.cpp instead:

* the engine renders the conversation and builds each branch exactly as it does for its
  own reference path (``RowBuilder.branch_inputs``: template head, the SP/AP soft prompt or
  manual prompt, the conversation tail), as input *embeddings*;
* each branch is one llama.cpp sequence of the same context (seq 0 positive, seq 1
  negative), prefilled from those embeddings; llama.cpp looks up the GGUF's own token
  embeddings the same way, so a manual prompt fed as embeddings equals it fed as tokens;
* every step decodes one token on both sequences in one ``llama_decode`` batch, and the
  engine's own :class:`~acd_engine.step.TokenStep` (contrast, constraint, plausibility
  filter, processors, pick) chooses the token from the two rows of logits.

So the method is the engine's, token choice included; only the forward runs elsewhere.
It is a prototype: one request at a time, no prefix cache, and a gated request costs one
extra prefill on the engine's own model up to the gate's layer (the gate reads a middle
layer's hidden state, which llama.cpp does not hand out without an evaluation callback).
The engine need not hold the whole model: ``Engine(gguf, keep_layers=k)`` loads the
embedding table and the first ``k`` decoder layers only (``acd bench``'s llama.cpp rows
use ``k = 0``).
Needs the optional extra ``[llamacpp]`` (llama-cpp-python, compiled on install).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessorList

from acd_engine.config import DecodingConfig
from acd_engine.contrast import contrast_logits
from acd_engine.errors import ConfigError
from acd_engine.gate import routed_config
from acd_engine.step import TokenStep

__all__ = ["LlamaCppDecoder", "LlamaCppOutput"]

logger = logging.getLogger(__name__)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            "the llama.cpp rows need llama-cpp-python: pip install 'acd[llamacpp]' (it "
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
            embedding table and its gate's layers are read, so a front end with
            ``keep_layers`` (0, or the deepest gate layer + 1) spares the rest's memory.
        gguf: The GGUF file llama.cpp runs.
        threads: CPU threads for llama.cpp (default: every core).
        n_ctx: Context length per sequence (llama.cpp allocates its KV up front, so size
            it to the requests: ``acd bench`` uses prompt + new tokens, rounded up).
        ubatch: Tokens per physical llama.cpp batch (its own default, 512): a longer prompt
            is fed in pieces, which bounds the compute buffer.
    """

    def __init__(
        self,
        engine: Any,
        gguf: str | Path,
        threads: int | None = None,
        n_ctx: int = 1024,
        ubatch: int = 512,
    ) -> None:
        lib = _llama_cpp()
        _quiet(lib)
        lib.llama_backend_init()
        self.lib = lib
        self.engine = engine
        self._lock = threading.Lock()
        self.n_ctx = n_ctx
        mparams = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise ConfigError(f"llama.cpp could not load the GGUF file {gguf}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = 2 * n_ctx
        cparams.n_batch = 2 * n_ctx  # both rows' prompts in one llama_decode call
        cparams.n_ubatch = min(ubatch, 2 * n_ctx)  # run in pieces of this many tokens
        cparams.n_seq_max = 2
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
        self.embd_batch = lib.llama_batch_init(2 * n_ctx, self.hidden, 1)
        self.token_batch = lib.llama_batch_init(2, 0, 1)

    def close(self) -> None:
        """Free the llama.cpp context, model and batches."""
        if getattr(self, "ctx", None):
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

    def _prefill(self, rows: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
        """Feed each ``[T_r, H]`` input-embedding row as sequence r (positions 0..T_r-1),
        all in one batch; return each row's last logits ``[1, V]``."""
        b = self.embd_batch
        n = sum(r.shape[0] for r in rows)
        longest = max(r.shape[0] for r in rows)
        if longest + new_tokens > self.n_ctx:  # checked here: llama_decode would only fail
            raise ConfigError(
                f"prompt plus max_new_tokens must be at most {self.n_ctx} tokens (n_ctx), got "
                f"{longest} + {new_tokens}"
            )
        data = torch.cat(rows).detach().to(torch.float32).contiguous().numpy()  # [n, H]
        ctypes.memmove(b.embd, data.ctypes.data, data.nbytes)
        i, last = 0, []
        for seq, r in enumerate(rows):
            for pos in range(r.shape[0]):
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = pos == r.shape[0] - 1
                i += 1
            last.append(i - 1)
        b.n_tokens = n
        self._decode(b)
        return [self._logits(j) for j in last]

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
        engine = self.engine
        # The gate reads a middle layer at prefill, which llama.cpp does not hand out: the
        # engine's own model reads it (one extra prefill forward), then routes as it does.
        cfg = routed_config(cfg, engine.gate_verdict(messages, cfg))
        rendered = engine.render(messages)
        plan = engine.plan(cfg)
        embeds, mask, shared = engine.rows.branch_inputs(rendered, plan)  # [R, T, H], [R, T]
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        rows = [embeds[r][mask[r].bool()] for r in range(embeds.shape[0])]  # unpadded [T_r, H]
        logits = self._prefill(rows, cfg.max_new_tokens)
        lengths = [row.shape[0] for row in rows]
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
