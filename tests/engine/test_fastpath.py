"""Oracle tests of the fast decode path: the same tokens as the reference path, greedy.

The reference path (``Engine.fast_path = False``) re-embeds both branches from scratch and
left-pads them; the fast path reuses cached SP/AP prefix KV, packs requests into one
forward and writes KV in place. Speed is measured by ``acd bench``, never here.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from acd_engine import DecodingConfig
from acd_engine.backends.torch.decoding import Prefill, RowRequest, decode, decode_rows
from acd_engine.backends.torch.prefix_cache import PrefixCache, PrefixKV
from acd_engine.backends.torch.row_layout import RowInput, fast_path_supported, lay_out_rows
from acd_engine.safety.prompts import OPPOSITE_PROMPT


def request_rows(engine, messages, cfg):
    """The fast-path rows of one request (positive branch first) and its shared ids."""
    return engine.rows.rows_of(engine.render(messages), engine.plan(cfg), {})


PROMPT = "Tell me three facts about the moon."
N = 16


@contextmanager
def reference_path(engine):
    saved = engine.fast_path
    engine.fast_path = False
    try:
        yield
    finally:
        engine.fast_path = saved


def _both(engine, messages, cfg, **kwargs):
    fast = engine.generate(messages, cfg, **kwargs)
    with reference_path(engine):
        ref = engine.generate(messages, cfg, **kwargs)
    return fast, ref


@pytest.mark.parametrize("method", ["plain", "base", "nid", "oid", "acd"])
def test_fast_path_gives_the_reference_tokens(engine, method):
    fast, ref = _both(engine, PROMPT, DecodingConfig(method=method, max_new_tokens=N))
    assert fast.token_ids == ref.token_ids and len(fast.token_ids) > 5
    assert (fast.text, fast.finish_reason, fast.usage) == (ref.text, ref.finish_reason, ref.usage)


def test_user_system_message_penalty_and_contrast_schedule(engine):
    """The tail starts with the user's system message; negative rows leave after 4 tokens."""
    msgs = [
        {"role": "system", "content": "Always answer in French."},
        {"role": "user", "content": PROMPT},
    ]
    cfg = DecodingConfig(
        method="custom",
        negative_prompt=OPPOSITE_PROMPT,
        alpha=0.9,
        repetition_penalty=1.3,
        contrast_tokens=4,
        max_new_tokens=N,
    )
    fast, ref = _both(engine, msgs, cfg)
    assert fast.token_ids == ref.token_ids
    assert fast.usage == ref.usage


def test_generate_batch_equals_reference_single_calls(engine):
    convs = [
        PROMPT,
        "How do I pick my neighbour's lock?",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 2+2?"}],
    ]
    cfg = DecodingConfig(method="acd", max_new_tokens=12, stop=["moon"])
    batch = engine.generate_batch(convs, cfg)
    with reference_path(engine):
        singles = [engine.generate(c, cfg) for c in convs]
    noisy = {"gate_score"}  # read off a batched vs a separate forward: float noise only
    assert [b.model_dump(exclude=noisy) for b in batch] == [
        s.model_dump(exclude=noisy) for s in singles
    ]
    for b, s in zip(batch, singles, strict=True):
        assert b.gate_score == pytest.approx(s.gate_score, abs=1e-5)


def _raw_reference(engine, messages, cfg):
    """The reference decoder's first ``max_new_tokens`` tokens, EOS or not."""
    embeds, mask, shared = engine.branch_inputs(messages, cfg)
    prefill = Prefill(embeds, mask, torch.tensor([shared]))
    return list(decode(engine.model, prefill, cfg))


def _raw_steps(engine, convs, cfg, static=False, **kwargs):
    """``decode_rows`` over ``convs`` packed into one batch, as the engine packs them."""
    rows: list[RowInput] = []
    requests = []
    for conv in convs:
        r, shared = request_rows(engine, conv, cfg)
        requests.append(
            RowRequest(list(range(len(rows), len(rows) + len(r))), torch.tensor([shared]))
        )
        rows += r
    with torch.inference_mode():
        batch = lay_out_rows(engine.model, rows, cfg.max_new_tokens, static=static)
    return decode_rows(engine.model, batch, requests, cfg, **kwargs)


def _raw_fast(engine, convs, cfg, **kwargs):
    out: list[list[int]] = [[] for _ in convs]
    for picked in _raw_steps(engine, convs, cfg, **kwargs):
        for i, token in picked.items():
            out[i].append(token)
    return out


@pytest.mark.parametrize(("static", "overlap"), [(True, False), (True, True), (False, True)])
def test_static_cache_and_overlapped_steps_give_the_reference_tokens(engine, static, overlap):
    """The CUDA layout (transformers' StaticCache, full-width masks, queued next step),
    run eagerly on CPU: only torch.compile itself is left out. The step goes through a
    plain function, as a compiled step does."""
    convs = [PROMPT, "Name a colour."]
    cfg = DecodingConfig(method="oid", max_new_tokens=10)

    def step_fn(**inputs):
        return engine.model(**inputs)

    fast = _raw_fast(engine, convs, cfg, static=static, overlap=overlap, step_fn=step_fn)
    assert fast == [_raw_reference(engine, c, cfg) for c in convs]


class _HostReads(TorchFunctionMode):
    """Records what makes the host wait for a CUDA device: reading values, list indexes."""

    READS = frozenset(
        {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.paused = False  # inside the model's forward (a captured graph on CUDA)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.paused:
            if name in self.READS:
                self.reads.append(name)
            elif name in ("__getitem__", "__setitem__"):
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                if any(isinstance(i, list) for i in index):
                    self.reads.append(f"{name}[list]")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["plain", "acd"])
def test_cuda_step_layout_reads_the_host_once_per_step(engine, method):
    """On CUDA each step may wait for its token's copy alone (``_copy_to_host``); any other
    host read or list index is a blocking sync that stalls the queued next forward. Checked
    on CPU by recording those calls in the loop's own code, steps after the first."""
    convs = [PROMPT, "Name a colour."]
    cfg = DecodingConfig(method=method, max_new_tokens=6)
    spy = _HostReads()

    def step_fn(**inputs: Any) -> Any:
        spy.paused = True
        try:
            return engine.model(**inputs)
        finally:
            spy.paused = False

    steps = _raw_steps(engine, convs, cfg, static=True, step_fn=step_fn, overlap=True)
    with spy:
        next(steps)  # the prefill forward runs eagerly: not counted
        per_step = []
        for _ in range(cfg.max_new_tokens - 1):
            spy.reads.clear()
            next(steps)
            per_step.append(list(spy.reads))
    assert per_step == [["tolist"]] * (cfg.max_new_tokens - 1)


def test_prefix_is_computed_once_and_never_written(engine):
    engine.prefix_cache.clear()
    hits, misses = engine.prefix_cache.hits, engine.prefix_cache.misses
    cfg = DecodingConfig(method="acd", max_new_tokens=4, gate=False)
    engine.generate(PROMPT, cfg)
    assert engine.prefix_cache.misses - misses == 2  # SP and AP
    snapshot = [
        [t.clone() for t in (*e.keys, *e.values)] for e in engine.prefix_cache._entries.values()
    ]
    engine.generate_batch([PROMPT, "Another question?"], cfg)
    assert engine.prefix_cache.misses - misses == 2
    assert engine.prefix_cache.hits - hits >= 4
    after = [[*e.keys, *e.values] for e in engine.prefix_cache._entries.values()]
    assert len(after) == len(snapshot)
    for before_tensors, after_tensors in zip(snapshot, after, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(before_tensors, after_tensors, strict=True))


def test_score_continuations_matches_reference(engine):
    conts = ["The moon is made of cheese.", "Sure", ""]
    for method in ("plain", "oid"):
        cfg = DecodingConfig(method=method, plausibility=0.01)
        fast = engine.score_continuations(PROMPT, conts, cfg)
        with reference_path(engine):
            ref = engine.score_continuations(PROMPT, conts, cfg)
        assert fast == pytest.approx(ref, rel=1e-4, abs=1e-4)
        assert fast[2] == 0.0


def test_batch_with_sampling_and_stops_equals_reference_singles(tiny_engine):
    """Requests finish at different steps (stop strings), so rows leave the batch."""
    cfg = DecodingConfig(method="oid", temperature=1.0, seed=3, max_new_tokens=20)
    convs = ["one", "two, a longer prompt here", [{"role": "user", "content": "three"}], "4"]
    full = tiny_engine.generate(convs[0], cfg).text
    cfg = cfg.replace(stop=[full[6:8]], contrast_tokens=7)
    batch = tiny_engine.generate_batch(convs, cfg)
    with reference_path(tiny_engine):
        singles = [tiny_engine.generate(c, cfg) for c in convs]
    assert [b.model_dump() for b in batch] == [s.model_dump() for s in singles]
    assert batch[0].finish_reason == "stop"


def test_stream_leaves_no_inference_mode_behind(tiny_engine):
    for _ in tiny_engine.stream("hi", method="oid", max_new_tokens=3):
        assert not torch.is_inference_mode_enabled()


def test_pack_rows_layout():
    """Two rows, prefix 3 / 1 and tail 2 / 4: right-aligned blocks, masked holes."""

    def kv(p: int) -> PrefixKV:
        t = torch.arange(1, p + 1, dtype=torch.float32).view(1, 1, p, 1).expand(1, 2, p, 4)
        return PrefixKV(keys=(t.clone(),), values=(t.clone(),))

    model = SimpleNamespace(
        config=SimpleNamespace(
            get_text_config=lambda decoder: SimpleNamespace(num_hidden_layers=1)
        ),
        get_input_embeddings=lambda: SimpleNamespace(weight=torch.zeros(1)),
    )
    batch = lay_out_rows(model, [RowInput(kv(3), [5, 6]), RowInput(kv(1), [7, 8, 9, 10])], 2)
    assert (batch.width, batch.capacity, batch.holes) == (7, 9, True)
    assert batch.input_ids.tolist() == [[0, 0, 5, 6], [7, 8, 9, 10]]
    assert batch.positions.tolist() == [[3, 3, 3, 4], [1, 2, 3, 4]]
    assert batch.next_positions.tolist() == [[5], [5]]
    assert batch.valid.int().tolist() == [[1, 1, 1, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1]]
    assert batch.prefill_mask is not None
    m = batch.prefill_mask[:, 0].int()  # [R, W, K]
    assert m[0, 3].tolist() == [1, 1, 1, 0, 0, 1, 1]  # last tail token of row 0
    assert m[0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0]  # a hole: prefix and itself
    assert m[1, 0].tolist() == [0, 0, 1, 1, 0, 0, 0]  # first tail token of row 1: causal
    layer = batch.cache.layers[0]
    assert layer.keys[1, 0, :, 0].tolist() == [0, 0, 1]  # holes, then row 1's 1-token prefix
    assert layer.keys[0, 0, :, 0].tolist() == [1, 2, 3]


def test_prefix_cache_is_a_bounded_lru():
    cache = PrefixCache(max_entries=2)
    built = []

    def make(tag):
        def build():
            built.append(tag)
            return PrefixKV((torch.zeros(1, 1, 1, 1),), (torch.zeros(1, 1, 1, 1),))

        return build

    cache.get("a", make("a"))
    cache.get("b", make("b"))
    cache.get("a", make("a"))  # hit; "b" is now the least recently used
    cache.get("c", make("c"))  # evicts "b"
    cache.get("a", make("a"))
    cache.get("b", make("b"))
    assert built == ["a", "b", "c", "b"] and len(cache) == 2
    with pytest.raises(ValueError, match="max_entries must be >= 1, got 0"):
        PrefixCache(max_entries=0)


def test_fast_path_falls_back_for_sliding_window_models(engine):
    from transformers import MistralConfig

    assert fast_path_supported(engine.model)
    cfg = MistralConfig(num_hidden_layers=2, sliding_window=16)
    cfg._attn_implementation = "sdpa"
    assert not fast_path_supported(SimpleNamespace(config=cfg))
    cfg = MistralConfig(num_hidden_layers=2, sliding_window=None)
    cfg._attn_implementation = "flash_attention_2"
    assert not fast_path_supported(SimpleNamespace(config=cfg))


def test_skinny_matmuls_wrap_only_one_token_steps_with_few_rows(engine):
    from contextlib import nullcontext

    from acd_engine.backends.torch.skinny import SkinnyLinear

    saved = engine.kernels.skinny_rows, engine.kernels.prepack_rows
    try:
        engine.kernels.skinny_rows, engine.kernels.prepack_rows = 16, 0
        context = engine.kernels.step_context(static=False)
        assert isinstance(context(2, 1), SkinnyLinear)
        assert context(16, 1).max_rows == 16
        assert isinstance(context(17, 1), nullcontext)
        assert isinstance(context(2, 5), nullcontext)  # a prefill
        assert engine.kernels.step_context(static=True) is None  # compiled steps: never
        engine.kernels.skinny_rows = 0
        assert engine.kernels.step_context(static=False) is None
    finally:
        engine.kernels.skinny_rows, engine.kernels.prepack_rows = saved


def test_tail_template_stub_is_cached_with_the_prefix(engine):
    """Prefill skips the template tokens every tail starts with (ChatML: ``<|im_end|>\\n
    <|im_start|>user\\n``); a chat whose tail starts otherwise keeps its whole tail."""
    cfg = DecodingConfig(method="acd")
    stub = engine.renderer.template_constant("tail", {})
    assert engine.tokenizer.decode(stub) == "<|im_end|>\n<|im_start|>user\n"
    rendered = engine.render(PROMPT)
    rows, shared = request_rows(engine, PROMPT, cfg)
    assert shared == rendered.tail
    assert [r.tail for r in rows] == [rendered.tail[len(stub) :]] * 2
    sp_len = len(rendered.head) + engine.pack.sp.shape[0] + len(stub)
    assert rows[0].prefix_len == sp_len
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rows, _ = request_rows(engine, with_system, cfg)
    assert rows[0].tail == engine.render(with_system).tail


@pytest.mark.parametrize("user", ["\n\nLeading blank lines?", " spaced", "<|im_start|>odd"])
def test_odd_tail_starts_give_the_reference_tokens(engine, user):
    fast, ref = _both(engine, user, DecodingConfig(method="oid", max_new_tokens=6))
    assert fast.token_ids == ref.token_ids


def test_plain_template_start_is_cached_as_a_prefix(engine):
    """Method plain: SmolLM2's template injects its own system prompt; that and the user
    header are the same for every chat, so prefill covers only the user's text onward."""
    start = engine.renderer.template_constant("plain", {})
    assert engine.tokenizer.decode(start).endswith("<|im_end|>\n<|im_start|>user\n")
    rows, shared = request_rows(engine, PROMPT, DecodingConfig(method="plain"))
    assert shared == engine.render(PROMPT).plain
    assert rows[0].prefix_len == len(start) and rows[0].tail == shared[len(start) :]


@pytest.mark.parametrize("method", ["plain", "base", "oid", "acd"])
@pytest.mark.parametrize("system", [None, "Answer in French."])
def test_row_splits_cut_the_reference_rows_exactly(engine, method, system):
    """Each row's prefix then tail (``RowBuilder.row_splits``, what the fast path and the
    llama.cpp decoder prefill) is the reference path's row, embedding for embedding."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": PROMPT}
    ]
    rendered = engine.render(messages)
    plan = engine.plan(DecodingConfig(method=method, gate=False))
    embeds, mask, _ = engine.rows.branch_inputs(rendered, plan)  # [R, T, H], [R, T]
    splits = engine.rows.row_splits(rendered, plan, {})
    assert len(splits) == embeds.shape[0]
    with torch.inference_mode():
        for r, split in enumerate(splits):
            parts = [engine.rows.embed(split.tail)]
            if split.has_prefix:
                parts.insert(0, engine.rows.prefix_embeds(split.head, split.branch, split.stub))
            assert torch.equal(torch.cat(parts), embeds[r][mask[r].bool()])
            assert split.key == (split.branch.key, tuple(split.head), tuple(split.stub))
