"""Skinny matmuls for CPU decode steps: ``W @ x.T`` instead of ``x @ W.T`` for 1-4 rows.

A decode step multiplies every weight matrix by only R rows (R = 1 for plain decoding, 2
for a contrast request). On the 2-core AMD EPYC this project is developed on, MKL's
``sgemm``/``sgemv`` for that shape is slow: the 49152 x 576 LM head takes ~10 ms for one
row and ~23 ms for two, while the same product written as ``W @ x.T`` (N = 2 columns)
takes ~4 ms. Every ``nn.Linear`` of the step gains similarly, so a whole step of the
default model goes from ~57 ms (1 row) / ~91 ms (2 rows) to ~35 / ~52 ms.

Whether this wins depends on the BLAS and the CPU, so :func:`skinny_wins` measures it once
per model on the largest weight and the engine only uses it when it does. The rewrite is a
``TorchFunctionMode``: thread-local and active only around the engine's own decode-step
forwards, so nothing else that shares the model (training, other threads) is affected.
Only the summation order changes (like any other GEMM kernel choice); the oracle tests
check the tokens stay the reference path's.
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

__all__ = ["MAX_ROWS", "SkinnyLinear", "skinny_linear", "skinny_wins"]

logger = logging.getLogger(__name__)

# Above this many rows the ordinary kernel was as fast or faster (measured at 8 and 16).
MAX_ROWS = 4


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` computed as ``weight @ x.T`` for at most :data:`MAX_ROWS` rows.

    One row is padded to two (a copy of itself): the two-column product is the fast one.
    """
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows == 0 or rows > MAX_ROWS or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, k)  # [M, K]
    if rows == 1:
        x2 = torch.cat([x2, x2])  # [2, K]
    y = torch.mm(weight, x2.t()).t()[:rows]  # [N, K] @ [K, M] -> [M, N]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class SkinnyLinear(TorchFunctionMode):
    """Within this context (this thread only), ``F.linear`` goes through :func:`skinny_linear`."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            return skinny_linear(*args, **kwargs)
        return func(*args, **kwargs)


def _best_of(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


_DECISIONS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def skinny_wins(model: Any, repeats: int = 5, margin: float = 0.85) -> bool:
    """Whether :class:`SkinnyLinear` speeds up this model's decode steps on this machine.

    Times the largest weight (the LM head, typically) both ways for one and two rows, best
    of ``repeats``; skinny must take under ``margin`` of the ordinary time for both. Only
    for CPU float weights; about 0.2 s, once per model (the answer is remembered).
    """
    if model in _DECISIONS:
        return _DECISIONS[model]
    weights = [
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu"
    ]
    if not weights or not weights[0].is_floating_point():
        return False
    w = max(weights, key=lambda t: t.numel())
    with torch.inference_mode():
        timings: dict[int, tuple[float, float]] = {}
        for rows in (1, 2):
            x = torch.randn(rows, w.shape[1], dtype=w.dtype)

            def skinny(x: torch.Tensor = x) -> torch.Tensor:
                return skinny_linear(x, w)

            def plain(x: torch.Tensor = x) -> torch.Tensor:
                return F.linear(x, w)

            skinny(), plain()  # warm both paths once
            timings[rows] = (_best_of(skinny, repeats), _best_of(plain, repeats))
    wins = all(skinny < margin * plain for skinny, plain in timings.values())
    _DECISIONS[model] = wins
    logger.info(
        "skinny decode matmuls %s: %s",
        "on" if wins else "off",
        ", ".join(
            f"{r} row(s) {s * 1e3:.1f} ms vs {p * 1e3:.1f} ms" for r, (s, p) in timings.items()
        ),
    )
    return wins
