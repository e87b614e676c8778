"""Lay the rows of one or more requests out in one batched forward: cache, mask, positions.

A row is one branch of one request: an optional cached prefix (head + branch prompt, see
:mod:`acd_engine.backends.torch.prefix_cache`) followed by token ids (the conversation tail). Rows have
different prefix and tail lengths, so the KV cache is laid out in blocks, each
right-aligned, with masked holes where a row is shorter than the block::

    column:   0 ........ Lp ........ Lp+W ..............  capacity
    row 0:    [ prefix 0 ][  tail 0   ][ generated tokens ... ]
    row 1:    [··][prefix1][···][tail 1][ generated tokens ... ]     ·· = hole (masked)

Every row carries its own position ids (prefix ``0..P-1``, tail ``P..P+T-1``, then one
more per generated token), so each row computes exactly its own sequence ``prefix + tail +
generated``, the sequence the reference path feeds it. The mask is prebuilt as a 4-D
boolean tensor, which transformers passes to attention untouched, so no mask is rebuilt
(and no host sync is spent on it) per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    StaticCache,
    StaticLayer,
    get_layer_types_and_kwargs,
)

from acd_engine.backends.torch.prefix_cache import PrefixKV

__all__ = ["RowBatch", "RowInput", "SlabLayer", "fast_path_supported", "lay_out_rows"]

# Static (compiled) caches round their capacity up to this many columns, so requests of
# similar length share one compiled graph.
STATIC_BUCKET = 256
# Static caches kept for reuse per engine (each holds rows x capacity KV).
STATIC_POOL = 4


def fast_path_supported(model: Any) -> bool:
    """Whether ``model`` fits the fast path's assumptions.

    Every layer must be plain full attention (no sliding window, chunked or linear
    attention, whose masks the 4-D mask here would not reproduce) and attention must be
    ``sdpa`` or ``eager`` (FlashAttention-2 ignores 4-D masks). Anything else takes the
    reference path, which lets transformers build its own masks.
    """
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    try:
        layer_types, _ = get_layer_types_and_kwargs(config)
    except Exception:  # noqa: BLE001 - transformers raises many types for configs it cannot read: treat as unsupported
        return False
    return all(t == "full_attention" for t in layer_types)


@dataclass(frozen=True)
class RowInput:
    """One row of the first forward: an optional cached prefix, then token ids."""

    prefix: PrefixKV | None
    tail: list[int]

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.length


class SlabLayer(CacheLayerMixin):
    """A preallocated KV buffer that hands attention only its filled columns.

    ``DynamicLayer`` grows by ``torch.cat``, copying the whole cache at every step
    (O(n^2) traffic over a generation); this writes the new columns in place and returns a
    view of the first ``filled`` ones. For eager decoding; compiled decoding uses
    transformers' ``StaticLayer``, whose shapes never change.

    Args:
        capacity: Columns to allocate.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.filled = 0
        self.key_buffer = torch.empty(0)  # [R, H, capacity, D] once allocated
        self.value_buffer = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads, _, k_dim = key_states.shape
        shape = (rows, heads, self.capacity)
        self.key_buffer = key_states.new_zeros(*shape, k_dim)  # [R, H, C, D]
        self.value_buffer = value_states.new_zeros(*shape, value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def set_filled(self, filled: int) -> None:
        """Mark columns ``0 .. filled-1`` as written; attention sees exactly those."""
        self.filled = filled
        self.keys = self.key_buffer[:, :, :filled]
        self.values = self.value_buffer[:, :, :filled]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.filled, self.filled + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV columns must be <= capacity {self.capacity}, got {end}")
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.set_filled(end)
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, 0

    def get_seq_length(self) -> int:
        return self.filled

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self.set_filled(self.filled)


@dataclass
class RowBatch:
    """Everything the decode loop needs to run a set of rows.

    Attributes:
        cache: KV cache holding the prefixes (``SlabLayer`` layers, or a ``StaticCache``).
        input_ids: ``[R, W]`` tail tokens, right-aligned (holes hold token 0).
        positions: ``[R, W]`` position ids of the tail columns.
        prefill_mask: ``[R, 1, W, K]`` boolean mask of the first forward, or None when
            no row has a prefix or a hole (SDPA's causal fast path is then exact).
        valid: ``[R, capacity]`` key columns each row may attend to (prefix, tail, and
            every generated column).
        next_positions: ``[R, 1]`` position id of each row's first generated token.
        width: Columns filled after the first forward (``Lp + W``).
        capacity: Columns allocated.
        holes: Whether any row has a hole, so decode steps need ``valid`` as a mask.
        static: Whether ``cache`` is a ``StaticCache`` (full-capacity attention).
    """

    cache: Cache
    input_ids: torch.Tensor
    positions: torch.Tensor
    prefill_mask: torch.Tensor | None
    valid: torch.Tensor
    next_positions: torch.Tensor
    width: int
    capacity: int
    holes: bool
    static: bool

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (eager caches; drops finished or no-longer-needed rows)."""
        assert not self.static, "static caches keep their rows: their shapes are compiled"
        index = torch.tensor(keep, device=self.valid.device)
        self.cache.batch_select_indices(index)
        self.valid, self.next_positions = self.valid[index], self.next_positions[index]


def lay_out_rows(
    model: Any,
    rows: list[RowInput],
    max_new_tokens: int,
    *,
    static: bool = False,
    static_pool: dict[tuple[int, int], Cache] | None = None,
) -> RowBatch:
    """Lay ``rows`` out in one KV cache with room for ``max_new_tokens`` more columns.

    Prefix KV is copied into the request's own cache, so cached prefixes are never
    written to.

    Args:
        model: The causal LM (its config sizes a ``StaticCache``).
        rows: One :class:`RowInput` per row; every ``tail`` must be non-empty.
        max_new_tokens: Tokens the caller may still generate.
        static: Use a ``StaticCache`` whose capacity is rounded up to ``STATIC_BUCKET``
            (for ``torch.compile`` with CUDA graphs).
        static_pool: Static caches to reuse, keyed by ``(rows, capacity)``: a CUDA graph
            replays on the buffers it was recorded with, so reusing them (as ``generate``
            reuses its static cache) avoids re-recording on every request.
    """
    if any(not r.tail for r in rows):
        raise ValueError("every row must have at least one tail token, got an empty tail")
    device = model.get_input_embeddings().weight.device
    n_rows = len(rows)
    lp = max(r.prefix_len for r in rows)  # prefix block width
    w = max(len(r.tail) for r in rows)  # tail block width
    width = lp + w
    capacity = width + max_new_tokens
    if static:
        capacity = -(-capacity // STATIC_BUCKET) * STATIC_BUCKET

    # Key columns each row may attend to: its prefix, its tail, every generated column.
    valid = torch.zeros(n_rows, capacity, dtype=torch.bool)  # [R, C]
    valid[:, width:] = True
    input_ids = torch.zeros(n_rows, w, dtype=torch.long)  # [R, W]
    positions = torch.zeros(n_rows, w, dtype=torch.long)  # [R, W]
    for i, r in enumerate(rows):
        p, t = r.prefix_len, len(r.tail)
        valid[i, lp - p : lp] = True
        valid[i, width - t : width] = True
        input_ids[i, w - t :] = torch.tensor(r.tail)
        positions[i, w - t :] = torch.arange(p, p + t)
        positions[i, : w - t] = p  # holes: any position, nobody attends to them
    holes = not bool(valid[:, :width].all())
    next_positions = positions[:, -1:] + 1  # [R, 1]

    # The first forward's mask: causal over the tail block, holes masked; each query also
    # sees itself so that a hole's own (ignored) row never has every key masked.
    prefill_mask = None
    if holes or lp > 0 or static:
        cols = torch.arange(capacity if static else width)  # [K]
        q_cols = torch.arange(lp, width)[:, None]  # [W, 1]
        causal = cols[None, :] <= q_cols  # [W, K]
        prefill_mask = (valid[:, None, : cols.numel()] & causal) | (cols[None, :] == q_cols)
        prefill_mask = prefill_mask[:, None].to(device)  # [R, 1, W, K]

    cache = _new_cache(model, rows, capacity, static, static_pool)
    return RowBatch(
        cache=cache,
        input_ids=input_ids.to(device),
        positions=positions.to(device),
        prefill_mask=prefill_mask,
        valid=valid.to(device),
        next_positions=next_positions.to(device),
        width=width,
        capacity=capacity,
        holes=holes,
        static=static,
    )


def _new_cache(
    model: Any,
    rows: list[RowInput],
    capacity: int,
    static: bool,
    pool: dict[tuple[int, int], Cache] | None = None,
) -> Cache:
    """A cache with every row's prefix copied in, right-aligned in the prefix block."""
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    with_prefix = [r.prefix for r in rows if r.prefix is not None]
    cache: Cache
    if static:
        pool = {} if pool is None else pool
        key = (len(rows), capacity)
        reused: Cache | None = pool.pop(key, None)
        if reused is None:
            reused = StaticCache(config=model.config, max_cache_len=capacity)
        cache = reused
        cache.reset()  # zero the buffers, next write at column 0
        pool[key] = cache  # most recently used last
        while len(pool) > STATIC_POOL:
            pool.pop(next(iter(pool)))
    else:
        cache = Cache(layers=[SlabLayer(capacity) for _ in range(n_layers)])
    if not with_prefix:
        return cache  # layers allocate on the first update
    lp = max(p.length for p in with_prefix)
    like = with_prefix[0]
    for layer_idx, layer in enumerate(cache.layers):
        assert isinstance(layer, SlabLayer | StaticLayer)  # full attention only
        k0, v0 = like.keys[layer_idx], like.values[layer_idx]  # [1, H, P, D]
        if not layer.is_initialized:
            layer.lazy_initialization(
                k0.new_zeros(len(rows), k0.shape[1], 0, k0.shape[3]),
                v0.new_zeros(len(rows), v0.shape[1], 0, v0.shape[3]),
            )
        if isinstance(layer, SlabLayer):
            keys, values = layer.key_buffer, layer.value_buffer  # [R, H, C, D]
        else:
            assert layer.keys is not None and layer.values is not None
            keys, values = layer.keys, layer.values
        for i, r in enumerate(rows):
            if r.prefix is not None:
                start = lp - r.prefix.length
                keys[i : i + 1, :, start:lp] = r.prefix.keys[layer_idx]
                values[i : i + 1, :, start:lp] = r.prefix.values[layer_idx]
        if isinstance(layer, SlabLayer):
            layer.set_filled(lp)
        else:
            layer.cumulative_length.fill_(lp)  # StaticLayer: the next write goes to column lp
    return cache
