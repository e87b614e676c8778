"""Skinny matmuls for CPU decode steps: ``W @ x.T`` instead of ``x @ W.T``.

A decode step multiplies every weight matrix by only R rows (R = 1 for plain decoding, 2
for a contrast request, 2·N for a batch of N). On the 2-core AMD EPYC this project is
developed on, MKL's ``sgemm`` for that shape is slow: the 49152 x 576 LM head takes ~21 ms
for two rows and ~20 ms for sixteen, while the same product written as ``W @ x.T`` takes
~5 ms and ~13 ms. Every ``nn.Linear`` of the step gains similarly (a 16-row step of the
default model: ~68 ms of matmuls become ~56 ms).

Whether this wins depends on the BLAS, the CPU and the row count, so
:func:`skinny_plan` measures it once per model on the largest weight for
:data:`ROW_COUNTS` rows, and the engine uses it only for steps of at most that many rows.
The rewrite is a ``TorchFunctionMode``: thread-local and active only around the engine's
own decode-step forwards, so nothing else that shares the model (training, other threads)
is affected. Only the summation order changes (like any other GEMM kernel choice); the
oracle tests check the tokens stay the reference path's.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "PAD_BLOCK",
    "ROW_COUNTS",
    "LinearMode",
    "SkinnyLinear",
    "best_of_both",
    "padded_rows",
    "skinny_linear",
    "skinny_plan",
]

logger = logging.getLogger(__name__)

# Row counts timed by skinny_plan: one row, one contrast request, then batches (a
# batch of N contrast requests is 2·N rows). Above the largest, the ordinary kernel runs.
ROW_COUNTS = (1, 2, 8, 16, 32)


def padded_rows(rows: int, block: int) -> int:
    """``rows`` rounded up to a multiple of ``block`` when above half a block, else ``rows``.

    MKL's skinny kernels on this AVX-512 CPU work in blocks of 16 columns: 10-14 rows cost
    more than 16 (the 576 x 1536 projection: 0.41-0.56 ms against 0.34 ms), 18-30 about as
    much as 32 or more. Padding with zero rows costs nothing then; ``block = 0`` never pads.
    """
    if block <= 0 or rows <= block // 2 or rows % block == 0:
        return rows
    return -(-rows // block) * block


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_rows: int = ROW_COUNTS[-1],
    pad_block: int = 0,
) -> torch.Tensor:
    """``F.linear`` computed as ``weight @ x.T`` for at most ``max_rows`` rows.

    One row is padded to two (a copy of itself): the two-column product is the fast one.
    With ``pad_block``, zero rows pad the product as :func:`padded_rows` says. More rows
    than ``max_rows`` (a prefill, say) take ``F.linear``.
    """
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows == 0 or rows > max_rows or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, k)  # [M, K]
    if rows == 1:
        x2 = torch.cat([x2, x2])  # [2, K]
    elif (padded := padded_rows(rows, pad_block)) > rows:
        x2 = torch.cat([x2, x2.new_zeros(padded - rows, k)])  # [M', K]
    # The product comes out transposed ([M, N] with strides (1, M)); it is made contiguous
    # because that layout is slow downstream: MKL took ~4x longer with it as the next
    # product's operand, and SDPA's CPU flash kernel refuses such queries (math fallback).
    y = torch.mm(weight, x2.t()).t()[:rows].contiguous()  # [N, K] @ [K, M] -> [M, N]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class LinearMode(TorchFunctionMode):
    """Within this context (this thread only), ``F.linear`` calls :meth:`linear` instead.

    The base of the engine's matmul kernel choices (:class:`SkinnyLinear`,
    :class:`~acd_engine.backends.torch.prepack.PrepackedLinear`); every other function runs as it is.
    """

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            return self.linear(*args, **kwargs)
        return func(*args, **kwargs)


class SkinnyLinear(LinearMode):
    """Within this context (this thread only), ``F.linear`` goes through :func:`skinny_linear`.

    Args:
        max_rows: Products with more rows than this keep the ordinary kernel.
        pad_block: See :func:`padded_rows` (0: never pad).
    """

    def __init__(self, max_rows: int = ROW_COUNTS[-1], pad_block: int = 0) -> None:
        super().__init__()
        self.max_rows = max_rows
        self.pad_block = pad_block

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return skinny_linear(x, weight, bias, self.max_rows, self.pad_block)


def best_of_both(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Best times of ``a`` and ``b``, run alternately so a burst of load hits both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, fn in enumerate((a, b)):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best[0], best[1]


_DECISIONS: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()

PAD_BLOCK = 16  # the padding block tried by skinny_plan (16 fp32 lanes in AVX-512)


def skinny_plan(model: Any, repeats: int = 5, margin: float = 0.9) -> tuple[int, int]:
    """``(max_rows, pad_block)`` for :class:`SkinnyLinear` on this model and machine.

    Times the largest weight (the LM head, typically) both ways for each of
    :data:`ROW_COUNTS` rows, best of ``repeats``. Skinny must take under ``margin`` of the
    ordinary time at every count up to ``max_rows``; 0 means never. When that reaches 16
    rows, 12 rows are timed as they are and padded to 16: ``pad_block`` is
    :data:`PAD_BLOCK` if padding is faster by ``margin``, else 0. Only for CPU float
    weights; about 1 s, once per model (the answer is remembered).
    """
    if model in _DECISIONS:
        return _DECISIONS[model]
    weights = [
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu"
    ]
    if not weights or not weights[0].is_floating_point():
        return 0, 0
    w = max(weights, key=lambda t: t.numel())
    timings: dict[int, tuple[float, float]] = {}
    max_rows = 0
    with torch.inference_mode():
        for rows in ROW_COUNTS:
            x = torch.randn(rows, w.shape[1], dtype=w.dtype)

            def skinny(x: torch.Tensor = x) -> torch.Tensor:
                return skinny_linear(x, w)

            def plain(x: torch.Tensor = x) -> torch.Tensor:
                return F.linear(x, w)

            skinny(), plain()  # warm both paths once
            fast, slow = timings[rows] = best_of_both(skinny, plain, repeats)
            if fast >= margin * slow:
                break
            max_rows = rows
    pad_block = 0
    if max_rows >= PAD_BLOCK:
        x = torch.randn(12, w.shape[1], dtype=w.dtype)
        with torch.inference_mode():
            padded, unpadded = best_of_both(
                lambda: skinny_linear(x, w, pad_block=PAD_BLOCK),
                lambda: skinny_linear(x, w),
                repeats,
            )
        pad_block = PAD_BLOCK if padded < margin * unpadded else 0
        timings[12] = (padded, unpadded)
    _DECISIONS[model] = (max_rows, pad_block)
    logger.info(
        "skinny decode matmuls up to %d rows, padding to blocks of %d: %s",
        max_rows,
        pad_block,
        ", ".join(
            f"{r} row(s) {s * 1e3:.1f} ms vs {p * 1e3:.1f} ms" for r, (s, p) in timings.items()
        ),
    )
    return max_rows, pad_block
