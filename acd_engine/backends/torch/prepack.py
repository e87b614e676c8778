"""Prepacked weights for CPU decode steps with many rows (batched requests).

A batch of N contrast requests multiplies every weight by 2·N rows per step, and then the
step is compute-bound, not memory-bound. MKL's ``sgemm`` re-blocks the weight on every
call; oneDNN can reorder each weight once into its own blocked layout (the same prepacking
``torch.compile`` does on CPU when it freezes weights) and then runs the product from it.
On the 2-core AMD EPYC this project is developed on, all linears of a SmolLM2-135M decoder
step take (real weights, best kernel otherwise, :mod:`acd_engine.backends.torch.skinny` included):

=====  ============  ==========
rows   W @ x.T/MKL   prepacked
=====  ============  ==========
2      16 ms         24 ms
4      24 ms         17 ms
8      40 ms         21 ms
16     49 ms         28 ms
32     70 ms         45 ms
=====  ============  ==========

so a batch of 8 requests went from ~78 to ~104 tokens/s (`acd bench`). The price is a second copy of
every linear weight (the model's own weights stay: training, Hugging Face ``generate`` and
other threads use them). So the copy is made only when a step first needs it (a batch,
never a single request), only where :func:`prepack_plan` measured it faster, and only when
it fits comfortably in the memory available (:func:`prepack_fits`).

Like :class:`~acd_engine.backends.torch.skinny.SkinnyLinear` this is a thread-local ``TorchFunctionMode``
active only around the engine's own decode steps. Only the summation order changes (like
any GEMM kernel choice); the oracle tests check the tokens stay the reference path's.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from acd_engine.backends.torch.skinny import LinearMode, best_of_both, skinny_linear

__all__ = [
    "PLAN_ROWS",
    "Prepacked",
    "PrepackedLinear",
    "prepack_bytes",
    "prepack_fits",
    "prepack_linear",
    "prepack_plan",
    "prepack_weights",
    "prepacked_available",
    "shared_prepacked",
]

logger = logging.getLogger(__name__)

# Row counts timed by prepack_plan (a batch of N contrast requests is 2·N rows). Fewer rows
# than the smallest never use prepacked weights: one request is memory-bound, where the
# skinny product wins.
PLAN_ROWS = (4, 8, 16, 32)
PACK_HINT = 16  # oneDNN picks its blocking for this many rows; 8 and 32 measured the same
PLAN_BYTES = 48 << 20  # weights timed by the plan: more than a CPU's last-level cache

# id(weight) -> (the weight, its version when packed, the packed copy)
Prepacked = dict[int, tuple[torch.Tensor, int, torch.Tensor]]


def prepacked_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear (x86 and ARM builds do)."""
    ops = torch.ops.mkldnn
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def _linears(model: Any) -> list[torch.Tensor]:
    """The distinct CPU float weights of ``model``'s ``nn.Linear`` modules, in module order."""
    seen: dict[int, torch.Tensor] = {}
    for m in model.modules():
        w = m.weight if isinstance(m, torch.nn.Linear) else None
        if w is not None and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16):
            seen.setdefault(id(w), w)
    return list(seen.values())


def prepack_weights(model: Any) -> Prepacked:
    """A oneDNN prepacked copy of each of ``model``'s linear weights, keyed by ``id``."""
    return _pack(_linears(model))


_SHARED: weakref.WeakKeyDictionary[Any, Prepacked] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def shared_prepacked(model: Any) -> Prepacked:
    """``model``'s prepacked weights, made on the first call and shared by every later one.

    Engines share loaded models (one per path, device and dtype in the process), so they
    share the copy too: a second engine on the same model costs no second copy.
    """
    with _SHARED_LOCK:
        packs = _SHARED.get(model)
        if packs is None:
            start = time.perf_counter()
            packs = _SHARED[model] = prepack_weights(model)
            logger.info(
                "prepacked %d linear weights for batched steps: %.0f MiB in %.1f s",
                len(packs),
                prepack_bytes(model) / 2**20,
                time.perf_counter() - start,
            )
        return packs


def _pack(weights: list[torch.Tensor]) -> Prepacked:
    with torch.inference_mode():
        return {
            id(w): (w, w._version, torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_HINT))  # noqa: SLF001 - torch's prepacked-linear ops and tensor versions have no public names
            for w in weights
        }


def prepack_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packs: Prepacked
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` from ``weight``'s prepacked copy when ``packs`` has one.

    A weight changed in place since it was packed (its ``_version`` moved) takes
    ``F.linear``: a stale copy must never answer.
    """
    entry = packs.get(id(weight))
    if entry is None or entry[0] is not weight or entry[1] != weight._version:  # noqa: SLF001 - torch's prepacked-linear ops and tensor versions have no public names
        return F.linear(x, weight, bias)
    if x.dtype != weight.dtype or not x.is_contiguous():
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, entry[2], bias, "none", [], "")  # noqa: SLF001 - torch's prepacked-linear ops and tensor versions have no public names


class PrepackedLinear(LinearMode):
    """Within this context (this thread only), ``F.linear`` uses the prepacked weights."""

    def __init__(self, packs: Prepacked) -> None:
        super().__init__()
        self.packs = packs

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return prepack_linear(x, weight, bias, self.packs)


def _available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def prepack_bytes(model: Any) -> int:
    """What a prepacked copy of ``model``'s linear weights takes (about their own size)."""
    return sum(w.numel() * w.element_size() for w in _linears(model))


def prepack_fits(model: Any, share: float = 0.25) -> bool:
    """Whether :func:`prepack_bytes` is at most ``share`` of the memory available now
    (where that is unknown: at most 1 GiB)."""
    available = _available_bytes()
    return prepack_bytes(model) <= (share * available if available is not None else 1 << 30)


_DECISIONS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def prepack_plan(
    model: Any, skinny: tuple[int, int] = (0, 0), repeats: int = 3, margin: float = 0.8
) -> int:
    """The fewest rows from which prepacked weights are faster here; 0 means never.

    Times the first linear weights of the model (the LM head aside), :data:`PLAN_BYTES` of
    them so they stream from memory as in a real step, through the kernel a step would
    otherwise use (``skinny = (max_rows, pad_block)`` from
    :func:`~acd_engine.backends.torch.skinny.skinny_plan`, else ``F.linear``) and prepacked, alternately,
    for each of :data:`PLAN_ROWS`. Prepacked must take under ``margin`` of the other time
    from the answer's row count up. About a second, once per model (remembered).
    """
    if model in _DECISIONS:
        return _DECISIONS[model]
    answer = 0
    weights = _linears(model)
    if prepacked_available() and len(weights) > 1:
        head = max(weights, key=lambda w: w.numel())
        timed: list[torch.Tensor] = []
        size = 0
        for w in weights:
            if w is not head and size < PLAN_BYTES:
                timed.append(w)
                size += w.numel() * w.element_size()
        try:
            answer = _measure(timed, skinny, repeats, margin)
        except RuntimeError as exc:  # a build whose oneDNN refuses these weights
            logger.info("prepacked weights unavailable here (%s)", exc)
    _DECISIONS[model] = answer
    return answer


def _measure(
    weights: list[torch.Tensor], skinny: tuple[int, int], repeats: int, margin: float
) -> int:
    """See :func:`prepack_plan`."""
    packs = _pack(weights)
    max_rows, pad_block = skinny
    timings: dict[int, tuple[float, float]] = {}
    dtype, widths = weights[0].dtype, {w.shape[1] for w in weights}
    with torch.inference_mode():
        for rows in PLAN_ROWS:
            xs = {k: torch.randn(rows, k, dtype=dtype) for k in widths}

            def packed(xs: dict[int, torch.Tensor] = xs) -> None:
                for w in weights:
                    prepack_linear(xs[w.shape[1]], w, None, packs)

            def other(xs: dict[int, torch.Tensor] = xs) -> None:
                for w in weights:  # skinny_linear takes F.linear above max_rows itself
                    skinny_linear(xs[w.shape[1]], w, max_rows=max_rows, pad_block=pad_block)

            packed()  # warm both once
            other()
            timings[rows] = best_of_both(packed, other, repeats)
    answer = 0
    for rows in reversed(PLAN_ROWS):  # the smallest count from which prepacked always wins
        fast, slow = timings[rows]
        if fast >= margin * slow:
            break
        answer = rows
    logger.info(
        "prepacked linear weights from %d rows (0: never): %s",
        answer,
        ", ".join(
            f"{r} rows {p * 1e3:.1f} ms vs {o * 1e3:.1f} ms" for r, (p, o) in timings.items()
        ),
    )
    return answer
