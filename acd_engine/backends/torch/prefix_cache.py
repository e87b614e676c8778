"""Prefix KV cache: each branch's head + system-prompt slot, run through the model once.

Every request of a branch starts with the same tokens: the chat template's head (for
SmolLM2 ``<|im_start|>system\\n``) followed by the branch content (a manual prompt's tokens
or the SP/AP soft-prompt embeddings). Their keys and values do not depend on anything that
comes after them (causal attention), so they are computed once and reused: prefill then
only covers the conversation tail, which is where a request actually differs.

The entries are exactly the embeddings the reference path feeds (see
``RowBuilder.prefix_embeds``), at positions ``0 .. P-1``, so a request built from a cached
prefix sees the same sequence the reference path would. Entries are read-only: requests
copy them into their own cache (``acd_engine.backends.torch.row_layout``) and never write to them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from acd_engine._compat import output_cache
from acd_engine.errors import ConfigError

__all__ = ["PrefixCache", "PrefixKV", "compute_prefix_kv"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixKV:
    """Keys and values of one prefix, per decoder layer.

    Attributes:
        keys: One tensor ``[1, H_kv, P, D]`` per layer (RoPE already applied).
        values: One tensor ``[1, H_kv, P, D]`` per layer.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        """Number of prefix positions ``P``."""
        return int(self.keys[0].shape[-2])


def compute_prefix_kv(model: Any, embeds: torch.Tensor) -> PrefixKV:
    """Run ``embeds`` (``[P, H]``, model dtype) through ``model`` and keep its KV.

    One unpadded row at positions ``0 .. P-1`` with the causal fast path: the same
    positions the reference path gives these tokens behind its left padding.
    """
    positions = torch.arange(embeds.shape[0], device=embeds.device)[None]  # [1, P]
    with torch.inference_mode():
        out = model(
            inputs_embeds=embeds[None], position_ids=positions, use_cache=True, logits_to_keep=1
        )
    layers = output_cache(out).layers
    return PrefixKV(
        keys=tuple(layer.keys.clone() for layer in layers),
        values=tuple(layer.values.clone() for layer in layers),
    )


class PrefixCache:
    """A small LRU of :class:`PrefixKV`, keyed by whatever identifies a prefix exactly.

    The engine keys an entry by the branch content's identity (prompt-text hash or
    ``sp:<pack id>``) and the head's token ids, so a changed pack, prompt or template head
    (tools rendered in the system turn, for instance) gets its own entry.

    Args:
        max_entries: Entries kept; the least recently used one is dropped beyond that.
    """

    def __init__(self, max_entries: int = 32) -> None:
        if max_entries < 1:
            raise ConfigError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, PrefixKV] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, build: Callable[[], PrefixKV]) -> PrefixKV:
        """Return the entry for ``key``, building (and storing) it on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
        entry = build()  # outside the lock: a model forward
        with self._lock:
            self.misses += 1
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        logger.debug("cached a %d-token prefix (%d entries)", entry.length, len(self._entries))
        return entry

    def clear(self) -> None:
        """Drop every entry (for example after the model's weights changed)."""
        with self._lock:
            self._entries.clear()
