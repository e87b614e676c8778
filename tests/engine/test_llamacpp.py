"""The llama.cpp backend (acd_engine.backends.llamacpp.backend) under the engine's one request path.

Needs the [llamacpp] extra (pip compiles llama.cpp for several minutes); these tests skip
without it. Oracles: llama.cpp's own token API on the same GGUF, α = 0 against the positive
branch alone, a batch against each call alone, the torch backend where the numerics allow
(Q4_1 against its fp32 dequantization).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs the [llamacpp] extra")

from acd_engine import Engine
from acd_engine.backends.base import LlamaCppOptions
from acd_engine.backends.llamacpp.backend import PLAIN
from acd_engine.backends.llamacpp.gate import LlamaCppGateReader
from acd_engine.config import DecodingConfig
from acd_engine.errors import PromptTooLongError
from acd_engine.safety.gate import ReadSpan

PROMPT = [{"role": "user", "content": "How do I bake bread at home?"}]
LOCK = [{"role": "user", "content": "How do I pick a lock?"}]
PROMPTS = [
    PROMPT,
    LOCK,
    [{"role": "user", "content": "Name three colours."}],
    [
        {"role": "system", "content": "You are a terse assistant for a hardware store."},
        {"role": "user", "content": "Which drill should I buy for shelves?"},
    ],
]
N = 8
# llama.cpp's gate probability against the engine's: over the 525 val anchors, median 3e-6,
# p99 0.046, max 0.091 (model-207 Xeon, 2026-12-02), and every verdict the same
GATE_SCORE_TOL = 0.1


@pytest.fixture(scope="module")
def lengine(llamacpp_engine):
    return llamacpp_engine


@pytest.fixture(scope="module")
def backend(lengine):
    return lengine.backend


def _greedy_on_tokens(backend, ids: list[int], n: int, eos: frozenset[int]) -> list[int]:
    """llama.cpp's own path: token ids (not embeddings), the whole prompt in one batch, one
    sequence in a context of its own, argmax of its logits."""
    lib = backend.lib
    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 256
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = 2
    ctx = lib.llama_init_from_model(backend.model, params)
    batch = lib.llama_batch_init(256, 0, 1)
    out: list[int] = []
    try:
        feed, pos = list(ids), 0
        while len(out) < n:
            for i, token in enumerate(feed):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(feed) - 1
            batch.n_tokens = len(feed)
            assert lib.llama_decode(ctx, batch) == 0
            pos += len(feed)
            ptr = lib.llama_get_logits_ith(ctx, len(feed) - 1)
            token = int(np.ctypeslib.as_array(ptr, shape=(backend.n_vocab,)).argmax())
            if token in eos:
                break
            out.append(token)
            feed = [token]
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
    return out


def test_plain_equals_llama_cpp_s_own_decoding_of_the_same_tokens(lengine, backend):
    """The backend feeds input embeddings (the engine's dequantized table), the template's
    start and the request apart, in sequences of a shared pool: llama.cpp's own token path
    on the same rendering, greedy, gives the same tokens."""
    for prompt in (PROMPT, LOCK):
        ids = lengine.render(prompt).plain
        ours = lengine.generate(prompt, method="plain", max_new_tokens=N)
        assert ours.token_ids == _greedy_on_tokens(backend, ids, N, lengine.eos_token_ids)


def test_alpha_zero_contrast_is_the_positive_sequence_alone(lengine):
    """Both branches share one context: the negative one must not leak into the positive
    one's cells (wrong seq ids or positions would change its logits)."""
    base = lengine.generate(PROMPT, method="base", max_new_tokens=N)
    oid0 = lengine.generate(PROMPT, method="oid", alpha=0.0, max_new_tokens=N)
    assert oid0.token_ids == base.token_ids  # oid's positive branch is base's prompt
    # acd's soft SP alone: the contrast stopped before the first token
    acd0 = lengine.generate(PROMPT, method="acd", gate=False, alpha=0.0, max_new_tokens=N)
    sp_alone = lengine.generate(
        PROMPT, method="acd", gate=False, alpha=0.5, contrast_tokens=0, max_new_tokens=N
    )
    assert acd0.token_ids == sp_alone.token_ids
    oid = lengine.generate(PROMPT, method="oid", alpha=0.9, max_new_tokens=N)
    assert oid.token_ids != base.token_ids  # the contrast does act


def test_plain_follows_the_torch_backend_on_the_same_gguf(engine, lengine):
    """llama.cpp computes with the GGUF's Q4_1 weights, torch with their fp32
    dequantization: on this prompt the greedy tokens agree (checked, not assumed)."""
    cfg = DecodingConfig(method="plain", max_new_tokens=N)
    assert lengine.generate(PROMPT, cfg).token_ids == engine.generate(PROMPT, cfg).token_ids


@pytest.mark.parametrize(
    "cfg",
    [
        DecodingConfig(method="acd", max_new_tokens=N),  # the shipped gate routes each
        DecodingConfig(method="acd", gate=False, max_new_tokens=N),
        DecodingConfig(method="plain", max_new_tokens=N, stop=("\n",)),
    ],
    ids=["gated", "ungated", "plain"],
)
def test_a_batch_equals_each_call_alone(lengine, backend, cfg):
    """Four calls step together as llama.cpp sequences, one llama_decode per token, and
    each gets exactly its lone result: rows, positions and finished requests are kept
    apart, and no request's cells land below its earlier ones (llama.cpp's flash
    attention then reads it wrongly)."""
    alone = [lengine.generate(p, cfg) for p in PROMPTS]
    steps = backend.steps
    assert lengine.generate_batch(PROMPTS, cfg) == alone
    assert backend.steps - steps <= max(len(r.token_ids) for r in alone) + 1  # together
    # and the pool the batch left behind changes no later call
    assert [lengine.generate(p, cfg) for p in reversed(PROMPTS)] == alone[::-1]


def test_concurrent_calls_are_coalesced_and_equal_their_lone_runs(lengine, monkeypatch):
    cfg = DecodingConfig(method="acd", gate=False, max_new_tokens=N)
    alone = [lengine.generate(p, cfg) for p in PROMPTS]
    sizes: list[int] = []
    real = lengine.calls.decode_group

    def spy(calls):
        sizes.append(len(calls))
        return real(calls)

    monkeypatch.setattr(lengine.calls, "decode_group", spy)
    results: dict[int, object] = {}
    with lengine._lock:  # busy: every call queues, then they run as one group
        threads = [
            threading.Thread(
                target=lambda i=i, p=p: results.__setitem__(i, lengine.generate(p, cfg))
            )
            for i, p in enumerate(PROMPTS)
        ]
        for t in threads:
            t.start()
        while lengine.calls.coalescer.waiting < len(PROMPTS):
            threading.Event().wait(0.01)
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(len(PROMPTS))] == alone
    assert sizes == [len(PROMPTS)]  # one batched decode


def test_a_stream_yields_text_chunks_that_make_the_answer(lengine):
    cfg = DecodingConfig(method="acd", max_new_tokens=24)
    whole = lengine.generate(PROMPT, cfg)
    chunks = list(lengine.stream(PROMPT, cfg))
    assert len(chunks) > 1 and all(isinstance(c, str) for c in chunks)
    assert "".join(chunks) == whole.text
    last = list(lengine.stream_chunks(PROMPT, cfg))[-1]
    assert last.finish_reason == whole.finish_reason and last.usage == whole.usage


def test_cancelling_stops_the_decode(lengine, backend):
    cancel = threading.Event()
    cancel.set()
    steps = backend.steps
    out = lengine.generate(PROMPT, method="plain", max_new_tokens=64, cancel=cancel)
    assert out.token_ids == [] and out.finish_reason == "stop"
    assert backend.steps == steps  # not one token step after the prefill
    stream = lengine.stream(PROMPT, method="plain", max_new_tokens=200, temperature=0.0)
    next(stream)
    stream.close()  # the reader leaves: the decode stops before its next token
    with lengine._lock:  # and the engine is free again
        assert backend.steps - steps < 50


def test_results_say_which_backend_ran(engine, lengine):
    ours = lengine.generate(PROMPT, method="acd", max_new_tokens=2)
    assert ours.backend == "llamacpp" and engine.generate(PROMPT, max_new_tokens=2).backend == (
        "torch"
    )
    assert lengine.describe()["backend"] == "llamacpp" and lengine.loaded.keep_layers == 0
    assert lengine.pack_report(DecodingConfig())["backend"] == "llamacpp"


def test_results_report_as_the_torch_backend_does(engine, lengine):
    """Same tokens on this prompt, so the same text, finish reason, usage, gate route and
    labels; only the gate's probability differs (Q4_1 against fp32 layers)."""
    for cfg in (
        DecodingConfig(method="plain", max_new_tokens=N),
        DecodingConfig(method="acd", max_new_tokens=N),  # gated by the shipped pack
    ):
        ours, theirs = lengine.generate(PROMPT, cfg), engine.generate(PROMPT, cfg)
        assert ours.token_ids == theirs.token_ids  # checked on this prompt, not assumed
        if theirs.gate_score is None:
            assert ours.gate_score is None
        else:
            assert ours.gate_score == pytest.approx(theirs.gate_score, abs=GATE_SCORE_TOL)
        exclude = {"gate_score", "backend"}
        assert ours.model_dump(exclude=exclude) == theirs.model_dump(exclude=exclude)


@pytest.mark.parametrize("passed_method", ["base", "plain"])
def test_a_passed_request_decodes_as_its_passed_method(lengine, passed_method):
    """The gate routes on llama.cpp as on torch: a passed request is its
    ``gate_passed_method``'s single sequence, token for token."""
    cfg = DecodingConfig(
        method="acd", gate_threshold=1 - 1e-9, gate_passed_method=passed_method, max_new_tokens=N
    )
    alone = lengine.generate(PROMPT, method=passed_method, max_new_tokens=N)
    routed = lengine.generate(PROMPT, cfg)
    assert routed.token_ids == alone.token_ids and routed.gate_flagged is False


def _val_prompts(per_label: int) -> list[str]:
    from acd_engine.training.anchors import load_anchors

    val = load_anchors("val")
    return [
        prompt
        for label in ("harmful", "benign")
        for prompt in [a.prompt for a in val if a.label == label][:per_label]
    ]


def test_the_gate_reads_llama_cpp_layers_as_torch_reads_its_own(engine, lengine, backend):
    """The tapped ``l_out-<i>`` tensors are torch's block outputs (same layer index, same
    positions, same pooling): features and gate probabilities agree up to Q4_1 weights, and
    so do the verdicts. A wrong layer, an off-by-one span or a misread layout would not."""
    gate = engine.pack.gate
    cfg = DecodingConfig(method="acd")
    scores = []
    for text in _val_prompts(5):
        msgs = [{"role": "user", "content": text}]
        ours, theirs = lengine.gate_verdict(msgs, cfg), engine.gate_verdict(msgs, cfg)
        assert ours is not None and theirs is not None
        scores.append(ours.score)
        assert ours.flagged == theirs.flagged, text
        assert ours.score == pytest.approx(theirs.score, abs=GATE_SCORE_TOL), text
    assert min(scores) < 0.5 <= max(scores)  # both verdicts were exercised
    ref = engine.gate_states(PROMPT, gate.layers, gate.scope)  # [T, F]
    got = backend.gate_states(engine.render(PROMPT), gate)
    assert got.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(got, ref).min().item() > 0.99


def test_continuation_scores_follow_the_torch_backend(engine, lengine):
    """Scores from one multi-output prefill: an off-by-one position would score another
    token; Q4_1 against fp32 leaves only a small difference, and the same ranking."""
    cfg = DecodingConfig(method="acd", gate=False, plausibility=0.0)
    answers = ["Mix flour, water, salt and yeast.", "The moon is made of cheese.", ""]
    ours = lengine.score_continuations(PROMPT, answers, cfg)
    theirs = engine.score_continuations(PROMPT, answers, cfg)
    assert ours[2] == theirs[2] == 0.0
    assert ours[:2] == pytest.approx(theirs[:2], rel=0.1)
    assert (ours[0] > ours[1]) == (theirs[0] > theirs[1])


def test_a_branch_prefix_is_prefilled_once(lengine, backend):
    """The second request of a branch prefills its own tokens only, and decodes the same."""
    cfg = DecodingConfig(method="acd", gate=False, max_new_tokens=N)
    first = lengine.generate(PROMPT, cfg)
    before = backend.prefilled_tokens
    assert lengine.generate(PROMPT, cfg) == first
    splits = lengine.rows.row_splits(lengine.render(PROMPT), lengine.plan(cfg), {})
    assert backend.prefilled_tokens - before == sum(len(s.tail) for s in splits)


@pytest.mark.parametrize("room", [80, 0], ids=["one prefix", "none"])
def test_tight_prefix_room_decodes_as_a_roomy_one(lengine, room):
    """With room for one prefix only, the AP's prefix evicts the SP's while the SP's
    sequence still uses it; with no room, every prefix is prefilled with its request.
    Either way the tokens are those of an engine that keeps every prefix."""
    tight = Engine(backend="llamacpp", llamacpp=LlamaCppOptions(threads=2, prefix_tokens=room))
    try:
        for method in ("acd", "base", "acd"):
            cfg = DecodingConfig(method=method, gate=False, max_new_tokens=N)
            assert tight.generate_batch([PROMPT, LOCK], cfg) == lengine.generate_batch(
                [PROMPT, LOCK], cfg
            )
    finally:
        tight.backend.close()


def test_gate_on_the_engine_reads_torch_s_own_forward(engine, lengine):
    """``gate_on="engine"`` reads the gate with the engine's PyTorch layers (it keeps the
    gate's): its score is the torch engine's own, and the tokens follow its route."""
    keep = max(engine.pack.gate.layers) + 1
    on_torch = Engine(
        backend="llamacpp", keep_layers=keep, llamacpp=LlamaCppOptions(threads=2, gate_on="engine")
    )
    try:
        cfg = DecodingConfig(method="acd", max_new_tokens=N)
        theirs, ours = engine.generate(PROMPT, cfg), on_torch.generate(PROMPT, cfg)
        assert ours.gate_score == pytest.approx(theirs.gate_score, abs=1e-5)
        assert ours.token_ids == lengine.generate(PROMPT, cfg).token_ids
    finally:
        on_torch.backend.close()


def test_openai_logit_bias_and_penalties_apply_on_llama_cpp(lengine):
    """llama.cpp chooses through the engine's token step, OpenAI's adjustments included."""
    forced = lengine.generate(PROMPT, method="plain", max_new_tokens=N, logit_bias={1234: 100})
    assert forced.token_ids == [1234] * N
    plain = lengine.generate(PROMPT, method="plain", max_new_tokens=N)
    first = plain.token_ids[0]
    banned = lengine.generate(PROMPT, method="plain", max_new_tokens=N, logit_bias={first: -100})
    assert first not in banned.token_ids
    tired = lengine.generate(PROMPT, method="plain", max_new_tokens=24, frequency_penalty=2.0)
    assert tired.token_ids[:1] == plain.token_ids[:1] and tired.token_ids != plain.token_ids


def test_a_prompt_longer_than_the_context_window_is_refused(lengine, backend):
    steps = backend.steps
    with pytest.raises(PromptTooLongError, match="prompt must be shorter than"):
        lengine.generate("word " * (lengine.context_window + 10), method="acd")
    assert backend.steps == steps


# ---------------------------------------------------------------------- the gate reader
def test_the_gate_forward_stops_after_its_deepest_layer(engine, backend):
    """The tap cancels the graph after the deepest gate layer: a gate on layer 2 is asked
    about far fewer nodes than the shipped gate, which ends well before the last layer.
    Each reads torch's states, the last layer's included (llama.cpp keeps only output
    positions there)."""
    rendered = engine.render(PROMPT)
    span = engine.rows.request_tokens(rendered, {})
    counts = {}
    for layers in ((2,), tuple(engine.pack.gate.layers), (29,)):
        reader = LlamaCppGateReader(backend.lib, backend.model, layers, 64, 512, 2)
        try:
            got = reader.states(rendered.plain, ReadSpan(span)).mean(0, keepdim=True)
            counts[layers] = reader.tap.asked
        finally:
            reader.close()
        ref = engine.gate_states(PROMPT, layers, "request").mean(0, keepdim=True)
        assert torch.nn.functional.cosine_similarity(got, ref).item() > 0.99, layers
    shallow, shipped, deepest = counts.values()
    assert shallow < shipped < deepest
    assert shallow < 0.2 * deepest


def test_a_gate_prompt_cut_into_ubatches_reads_the_same_states(engine, backend):
    """A plain rendering longer than the gate context's ubatch is computed in pieces; the
    tap concatenates them, so the states match one piece's up to llama.cpp's batch-cut
    numerics."""
    layers = tuple(engine.pack.gate.layers)
    ids = engine.render(PROMPT).plain
    whole = LlamaCppGateReader(backend.lib, backend.model, layers, 64, 512, 2)
    pieces = LlamaCppGateReader(backend.lib, backend.model, layers, 64, 8, 2)
    try:
        assert len(ids) > 16
        a = whole.states(ids, ReadSpan(len(ids) - 3))
        b = pieces.states(ids, ReadSpan(len(ids) - 3))
        assert torch.allclose(a, b, rtol=0.02, atol=0.02)
        assert a.shape != whole.states(ids, ReadSpan(1)).shape  # the span is honoured
    finally:
        whole.close()
        pieces.close()


def test_bad_gate_reads_are_refused(backend):
    from acd_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="gate layers must be < the GGUF's 30 layers, got 30"):
        LlamaCppGateReader(backend.lib, backend.model, (3, 30), 64, 512, 2)
    reader = LlamaCppGateReader(backend.lib, backend.model, (3,), 8, 512, 2)
    try:
        with pytest.raises(ConfigError, match=r"the gate's prompt must have 1 to 8 tokens"):
            reader.states(list(range(9)), ReadSpan(1))
    finally:
        reader.close()


def test_the_gate_caches_the_template_start_and_reads_the_same(engine, backend):
    """The plain rendering's constant start is prefilled once (in a batch of its own) and
    shared: a second read prefills only the request's tokens and gives the first read's
    states exactly; a read without the cache agrees up to llama.cpp's batch-cut numerics."""
    layers = tuple(engine.pack.gate.layers)
    rendered = engine.render(PROMPT)
    (split,) = engine.rows.row_splits(rendered, engine.plan(PLAIN), {})
    ids, start = rendered.plain, len(split.head)
    span = engine.rows.request_tokens(rendered, {})
    assert start > 0 and span == len(ids) - start
    reader = LlamaCppGateReader(backend.lib, backend.model, layers, 64, 512, 2)
    try:
        first = reader.states(ids, ReadSpan(span), prefix=start)
        assert reader.prefilled_tokens == len(ids)
        second = reader.states(ids, ReadSpan(span), prefix=start)
        assert reader.prefilled_tokens == len(ids) + (len(ids) - start)
        assert torch.equal(first, second)
        whole = reader.states(ids, ReadSpan(span))  # no start cached: one batch
        assert torch.allclose(first, whole, rtol=0.02, atol=0.02)
        other = engine.render(LOCK).plain
        reader.states(other, ReadSpan(len(other) - start), prefix=start)  # the start stays
        assert torch.equal(reader.states(ids, ReadSpan(span), prefix=start), first)
    finally:
        reader.close()


def test_a_start_longer_than_its_room_is_prefilled_with_each_request(engine, backend, monkeypatch):
    import acd_engine.backends.llamacpp.gate as gate_module

    monkeypatch.setattr(gate_module, "START_ROOM", 8)
    rendered = engine.render(PROMPT)
    ids, span = rendered.plain, engine.rows.request_tokens(rendered, {})
    reader = gate_module.LlamaCppGateReader(
        backend.lib, backend.model, tuple(engine.pack.gate.layers), 64, 512, 2
    )
    try:
        a = reader.states(ids, ReadSpan(span), prefix=len(ids) - span)
        b = reader.states(ids, ReadSpan(span))
        assert reader.prefilled_tokens == 2 * len(ids) and reader.cached == ()
        assert torch.equal(a, b)
    finally:
        reader.close()
