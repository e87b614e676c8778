"""The safety gate's features read from llama.cpp's own forward, so no PyTorch layer runs.

The gate (:mod:`acd_engine.safety.gate`) scores a request from middle decoder layers' outputs over
its plain rendering. On the engine those come from PyTorch forward hooks; on llama.cpp
(:mod:`acd_engine.backends.llamacpp.backend`) a front-end engine used to hold the layers up to the deepest
gate layer in fp32 just to run that prefill: for the default model 17 of its 30 layers,
~240 MB beside a 90 MB GGUF, and a prefill on the slower path.

llama.cpp hands out intermediate tensors through its scheduler's evaluation callback
(``llama_context_params.cb_eval``): asked for each graph node whether the caller wants it,
then handed each wanted node once computed. Decoder layer ``i``'s output (the residual
stream after its FFN, what a PyTorch hook on block ``i`` sees) is the node named
``l_out-<i>``. :class:`LayerTap` copies the gate's layers and then cancels the rest of the
graph (the callback returning False), so the gate's forward stops at its deepest layer as
the front end's truncated model did.

The callback is a Python function called for every node of every graph its context runs,
so it lives on a context of its own (:class:`LlamaCppGateReader`) that runs gate prefills
only; the decoding context has no callback and pays nothing.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from acd_engine.errors import ConfigError
from acd_engine.safety.gate import ReadSpan

__all__ = ["GgmlTensor", "LayerTap", "LlamaCppGateReader"]

GGML_TYPE_F32 = 0
# KV cells kept for the template's cached start (SmolLM2's is 24 tokens; a longer one is
# prefilled with each request instead)
START_ROOM = 64


class GgmlTensor(ctypes.Structure):
    """The head of ``struct ggml_tensor`` (ggml.h of llama-cpp-python 0.3.36), up to the
    fields read here: type, shape, strides, data pointer and name."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),  # elements per dimension, innermost first
        ("nb", ctypes.c_size_t * 4),  # stride in bytes per dimension
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


class LayerTap:
    """An evaluation callback that records decoder layers' outputs, ``[T, H]`` per layer.

    A prompt longer than the context's ubatch is computed in several graphs; each call
    records its tokens, so :meth:`states` returns every position in order. After the deepest
    wanted layer it returns False, which cancels the rest of that graph (ggml-backend.h:
    "if the user returns false, the scheduler will cancel the graph compute").
    """

    def __init__(self, lib: Any, layers: Sequence[int]) -> None:
        self.wanted = {f"l_out-{layer}".encode(): k for k, layer in enumerate(layers)}
        self.last = f"l_out-{max(layers)}".encode()
        self.chunks: list[list[np.ndarray]] = [[] for _ in layers]
        self.error: str | None = None
        self.asked = 0  # graph nodes llama.cpp asked about (the graph stops after the last)
        # kept on self: llama.cpp holds the C pointer for the context's lifetime
        self.callback = lib.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, node: int, ask: bool, _user_data: Any) -> bool:
        t = GgmlTensor.from_address(node)
        slot = self.wanted.get(t.name)
        if ask:
            self.asked += 1
            return slot is not None
        if slot is None:  # not asked for; keep computing
            return True
        n_embd, n_tokens = t.ne[0], t.ne[1]
        if t.type != GGML_TYPE_F32 or t.nb[1] != 4 * n_embd or t.ne[2] != 1 or t.ne[3] != 1:
            # raising inside a C callback would abort the process: report after the decode
            self.error = f"{t.name.decode()} is not a contiguous fp32 [tokens, hidden] matrix"
            return False
        buf = (ctypes.c_float * (n_embd * n_tokens)).from_address(t.data)
        self.chunks[slot].append(np.ctypeslib.as_array(buf).reshape(n_tokens, n_embd).copy())
        return t.name != self.last

    def reset(self) -> None:
        self.chunks = [[] for _ in self.chunks]
        self.error = None
        self.asked = 0

    def states(self) -> list[np.ndarray]:
        """Each wanted layer's ``[T, H]`` output over the positions decoded since
        :meth:`reset`."""
        if self.error is not None:
            raise RuntimeError(f"llama.cpp layer tap: {self.error}")
        if any(not c for c in self.chunks):
            raise RuntimeError("llama.cpp layer tap: a wanted layer was never computed")
        return [np.concatenate(c) for c in self.chunks]


class LlamaCppGateReader:
    """The gate's ``[T, F]`` states for a plain rendering, from llama.cpp's forward.

    One llama.cpp context of its own on the decoder's model (weights shared, its own small
    KV cache), with a :class:`LayerTap` as its evaluation callback. Each read prefills the
    request at positions 0.. of sequence 0, keeps each layer's states at the positions the
    gate reads as :func:`acd_engine.safety.gate.capture_states` does, and clears the
    sequence. The template's constant start (``prefix`` tokens, the same for every request)
    is prefilled once into sequence 1 and shared by reference, as the decoder shares its
    branch prefixes; it always gets a batch of its own, so a read does not depend on what is
    cached (llama.cpp's numbers depend slightly on how a prompt is cut into batches). Not
    thread-safe: the decoder calls it under its lock.
    """

    def __init__(
        self,
        lib: Any,
        model: Any,
        layers: Sequence[int],
        n_ctx: int,
        ubatch: int,
        threads: int | None,
    ) -> None:
        n_layer = lib.llama_model_n_layer(model)
        if max(layers) >= n_layer:
            raise ConfigError(
                f"gate layers must be < the GGUF's {n_layer} layers, got {max(layers)}"
            )
        self.lib = lib
        self.layers = tuple(layers)
        self.n_ctx = n_ctx
        # llama.cpp keeps only the output positions in its last layer's output: a gate that
        # reads it marks every position as an output (the graph stops before the head)
        self.all_outputs = max(layers) == n_layer - 1
        self.tap = LayerTap(lib, layers)
        self.cached: tuple[int, ...] = ()  # the constant start held in sequence 1
        self.prefilled_tokens = 0  # positions prefilled so far (the cached start included)
        cparams = lib.llama_context_default_params()
        cparams.kv_unified = True  # sequence 0 shares sequence 1's cells, no copy
        cparams.n_ctx = n_ctx + START_ROOM  # a request, and the cached start
        cparams.n_batch = n_ctx
        cparams.n_ubatch = min(ubatch, n_ctx)
        cparams.n_seq_max = 2
        cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
        cparams.cb_eval = self.tap.callback
        cparams.cb_eval_user_data = None
        self.ctx = lib.llama_init_from_model(model, cparams)
        if not self.ctx:
            raise ConfigError("llama.cpp could not create the gate's context (out of memory?)")
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        """Free the context and its batch (the model is the decoder's)."""
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def _run(self, seq: int, start: int, ids: Sequence[int]) -> list[np.ndarray]:
        """Prefill ``ids`` at positions ``start``.. of ``seq``; each gate layer's ``[T, H]``."""
        b = self.batch
        for i, token in enumerate(ids):
            b.token[i] = token
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = self.all_outputs  # else no output row: only the taps are read
        b.n_tokens = len(ids)
        self.tap.reset()
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} (gate prefill)")
        self.prefilled_tokens += len(ids)
        return self.tap.states()

    def states(self, ids: Sequence[int], span: ReadSpan, prefix: int = 0) -> torch.Tensor:
        """``[T, F]``: each gate layer's output at the positions ``span`` of ``ids`` reads,
        concatenated in the gate's layer order. ``ids[:prefix]`` is the template's constant
        start (cached; it must not reach into the span)."""
        if not 0 < len(ids) <= self.n_ctx:
            raise ConfigError(
                f"the gate's prompt must have 1 to {self.n_ctx} tokens (n_ctx), got {len(ids)}"
            )
        if not 0 <= prefix <= min(len(ids) - span.length - span.trail, START_ROOM):
            prefix = 0  # no usable start (or too long to keep): all of it is the request's
        mem = self.lib.llama_get_memory(self.ctx)
        start = tuple(ids[:prefix])
        try:
            if start and start != self.cached:
                self.lib.llama_memory_seq_rm(mem, 1, -1, -1)
                self.cached = ()
                self._run(1, 0, start)  # in a batch of its own, cached or not
                self.cached = start
            if start:  # shared by reference: the cells gain sequence 0's id
                self.lib.llama_memory_seq_cp(mem, 1, 0, -1, -1)
            states = self._run(0, prefix, ids[prefix:])  # [T, H] per layer
        finally:
            # the layers past the deepest gate layer were cancelled: drop the request
            self.lib.llama_memory_seq_rm(mem, 0, -1, -1)
        read = span.of(len(ids) - prefix)  # the states cover ids[prefix:]
        return torch.cat([torch.from_numpy(s[read]).float() for s in states], dim=-1)
