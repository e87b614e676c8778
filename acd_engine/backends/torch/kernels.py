"""How the engine runs its forwards: fast or reference path, compiled or eager, which matmul.

Every tuning knob of the engine is one field of :class:`EngineOptions` (validated, frozen,
set through ``Engine(options=...)`` or ``Engine.set_options``), and :class:`KernelPolicy`
applies them: whether the fast path fits the model, whether decode steps are compiled over a
static cache, and which CPU matmul kernel wraps each eager forward (skinny products for
one-token steps, oneDNN-prepacked weights for batches), measured once per model where the
option leaves it open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from acd_engine.backends.torch.decoding import RowRequest, decode_rows
from acd_engine.backends.torch.head import linear_head
from acd_engine.backends.torch.prepack import (
    PLAN_ROWS,
    Prepacked,
    PrepackedLinear,
    prepack_fits,
    prepack_plan,
    shared_prepacked,
)
from acd_engine.backends.torch.row_layout import RowInput, fast_path_supported, lay_out_rows
from acd_engine.backends.torch.skinny import SkinnyLinear, skinny_plan
from acd_engine.config import DecodingConfig, EngineOptions
from acd_engine.loading.quantize import is_quantized

__all__ = ["KernelPolicy", "StepContext"]

logger = logging.getLogger(__name__)

StepContext = Callable[[int, int], AbstractContextManager[Any]]
"""Called with a forward's rows and tokens per row; returns what wraps that forward."""


class KernelPolicy:
    """Applies :class:`EngineOptions` to one model; holds what it measured and compiled.

    Args:
        model: The causal LM.
        options: The engine's options.
        model_name: For log messages.
        device: Where the model runs.
    """

    def __init__(
        self, model: Any, options: EngineOptions, model_name: str, device: torch.device
    ) -> None:
        self.model = model
        self.options = options
        self.model_name = model_name
        self.device = device
        # what the options left open, once measured
        self.skinny_rows = options.skinny_rows
        self.skinny_pad_block = options.skinny_pad_block
        self.prepack_rows = options.prepack_rows
        self.prepacked: Prepacked | None = None
        self.compile_step = options.compile_step  # False once compiling failed
        self.compiled_step: Callable[..., Any] | None = None
        self.static_caches: dict[tuple[int, int], Any] = {}  # reused by compiled decoding
        self.fast_supported: bool | None = None
        # Skinny and prepacked products rewrite plain float weights; quantized ones keep
        # their own kernels (acd_engine.loading.quantize).
        self.plain_weights = not any(
            is_quantized(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)
        )

    def use_fast_path(self) -> bool:
        """Whether requests take the fast path (asked and fitting this model)."""
        if not self.options.fast_path:
            return False
        if self.fast_supported is None:
            self.fast_supported = fast_path_supported(self.model)
            if not self.fast_supported:
                logger.info(
                    "%s has sliding-window, linear or non-SDPA attention: using the reference "
                    "decode path",
                    self.model_name,
                )
        return self.fast_supported

    def use_static_cache(self) -> bool:
        """Compiled decoding needs fixed shapes: a static KV cache (CUDA by default)."""
        if self.compile_step is None:
            return self.device.type == "cuda"
        return self.compile_step

    def step_fn(self) -> Callable[..., Any]:
        """The decode-step forward for static caches: ``torch.compile`` with CUDA graphs.

        transformers' own compiled call (``get_compiled_call``, mode "reduce-overhead") over
        its ``StaticCache``, the combination ``generate`` uses for static-cache decoding. A
        failure to compile is raised once with the way out, then decoding stays eager.
        """
        if self.compiled_step is None:
            from transformers import CompileConfig

            compiled = self.model.get_compiled_call(CompileConfig())

            def step(**inputs: Any) -> Any:
                try:
                    return compiled(**inputs)
                except Exception as exc:  # any compile failure: reported once, then eager
                    self.compile_step = False
                    self.compiled_step = None
                    raise RuntimeError(
                        f"torch.compile of the decode step failed ({type(exc).__name__}: "
                        f"{exc}); later requests decode eagerly. Pass "
                        "Engine(compile_step=False) to skip compiling"
                    ) from exc

            self.compiled_step = step
        return self.compiled_step

    def step_context(self, static: bool = False) -> StepContext | None:
        """What wraps each eager CPU forward: the matmul kernel measured fastest here.

        The returned function takes a forward's rows and tokens per row. Forwards of at
        least ``prepack_rows`` rows (a batch: its prefill too) use prepacked weights;
        one-token steps of at most ``skinny_rows`` rows skinny matmuls; others the
        ordinary kernel (no mode: it would only add its per-op Python dispatch).
        """
        if static or self.device.type != "cpu" or not self.plain_weights:
            return None
        if self.skinny_rows is None:
            self.skinny_rows, self.skinny_pad_block = skinny_plan(self.model)
        limit, block = self.skinny_rows, self.skinny_pad_block
        if limit <= 0 and self.prepack_rows == 0:
            return None

        def context(rows: int, width: int) -> AbstractContextManager[Any]:
            packs = self.prepacked_for(rows)
            if packs is not None:
                return PrepackedLinear(packs)
            return SkinnyLinear(limit, block) if width == 1 and rows <= limit else nullcontext()

        return context

    def prepacked_for(self, rows: int) -> Prepacked | None:
        """The prepacked weights if a step of ``rows`` rows should use them (made on first need)."""
        if self.prepack_rows == 0 or rows < PLAN_ROWS[0]:
            return None
        if self.prepack_rows is None:
            if prepack_fits(self.model):
                skinny = (self.skinny_rows or 0, self.skinny_pad_block)
                self.prepack_rows = prepack_plan(self.model, skinny)
            else:
                logger.info("no prepacked weights: a copy would take too much of the free memory")
                self.prepack_rows = 0
        if not self.prepack_rows or rows < self.prepack_rows:
            return None
        if self.prepacked is None:
            self.prepacked = shared_prepacked(self.model)
        return self.prepacked

    def decode(
        self,
        rows: list[RowInput],
        requests: list[RowRequest],
        cfg: DecodingConfig,
        finished: set[int] | None = None,
    ) -> Generator[dict[int, int], None, None]:
        """Pack ``rows`` into one cache and decode ``requests`` over them (fast path)."""
        static = self.use_static_cache()
        with torch.inference_mode():
            batch = lay_out_rows(
                self.model, rows, cfg.max_new_tokens, static=static, static_pool=self.static_caches
            )
        head = None if static or not self.options.contrast_before_head else linear_head(self.model)
        return decode_rows(
            self.model,
            batch,
            requests,
            cfg,
            finished,
            self.step_fn() if static else None,
            step_context=self.step_context(static),
            head=head,
        )

    def report(self) -> dict[str, Any]:
        """The CPU matmul kernels settled on (measured on first use: known after a call)."""
        return {
            "skinny_rows": self.skinny_rows,
            "skinny_pad_block": self.skinny_pad_block,
            "prepack_rows": self.prepack_rows,
            "prepacked": self.prepacked is not None,
        }
