"""The LM head as a plain linear map, so the contrast can run before it.

For Llama-like models ``logits = W h``: no bias, no soft-capping, no scaling. Then
``W h_pos - alpha * W h_neg = W (h_pos - alpha * h_neg)``, and a contrast request needs one
row through the head instead of two. The head is the largest single matmul of a small
model's step (SmolLM2-135M: 49152 x 576, a fifth of all weights), and once a batch makes
the step compute-bound (16 rows for 8 requests) halving its rows is a real saving.

Only the summation order changes, as with any GEMM kernel choice; the oracle tests check
the tokens stay the reference path's. The plausibility filter needs the positive branch's
own logits, so with ``plausibility > 0`` both rows still go through the head.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from acd_engine.loading.quantize import is_quantized

__all__ = ["LinearHead", "linear_head"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearHead:
    """A model split into its decoder and a bias-free linear LM head.

    Attributes:
        decoder: The model without its head (``model.get_decoder()``); its output's
            ``last_hidden_state`` is what the head multiplies.
        weight: The head's weight ``[V, H]``.
    """

    decoder: Any
    weight: torch.Tensor

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H] -> [N, V]`` logits."""
        return F.linear(hidden, self.weight)


_FOUND: weakref.WeakKeyDictionary[Any, LinearHead | None] = weakref.WeakKeyDictionary()


def linear_head(model: Any) -> LinearHead | None:
    """The model's head as a :class:`LinearHead`, or None when logits are not ``W h``.

    Checked, not assumed: the head must be a bias-free fp32 ``nn.Linear`` (a contrast of
    hidden states in bf16 would round differently from the reference's fp32 contrast of
    logits), and one short forward must give the same logits both ways. Anything a model
    does after the head (soft-capping, scaling, a bias) fails that check. Remembered per
    model.
    """
    if model in _FOUND:
        return _FOUND[model]
    found: LinearHead | None = None
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and head.weight.dtype == torch.float32
        # A quantized head (acd_engine.loading.quantize) computes its own products: the rows of it
        # the plausibility filter gathers (``weight[candidates]``) are not plain floats.
        and not is_quantized(head.weight)
        and decoder is not None
        and decoder is not model
    ):
        candidate = LinearHead(decoder, head.weight)
        ids = torch.arange(4, device=head.weight.device)[None]  # [1, 4]
        try:
            with torch.inference_mode():
                logits = model(input_ids=ids, use_cache=False).logits  # [1, 4, V]
                hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [1, 4, H]
                if torch.allclose(candidate(hidden), logits, rtol=1e-4, atol=1e-4):
                    found = candidate
        except Exception as exc:  # a decoder that wants other inputs: keep the plain path  # noqa: BLE001
            logger.debug("linear head check failed: %s", exc)
    _FOUND[model] = found
    logger.info("contrast before the LM head: %s", "on" if found else "off")
    return found
