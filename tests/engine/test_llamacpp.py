"""ACD on llama.cpp (acd_engine.llamacpp): needs the [llamacpp] extra, which `make test`
does not install (pip compiles llama.cpp for ~9 minutes); these tests skip without it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp", reason="the llama.cpp decoder needs the [llamacpp] extra")

from acd_engine.config import DecodingConfig
from acd_engine.gate import ReadSpan
from acd_engine.llamacpp import LlamaCppDecoder
from acd_engine.loading import default_model_path

PROMPT = [{"role": "user", "content": "How do I bake bread at home?"}]
N = 8
# llama.cpp's gate probability against the engine's: over the 525 val anchors, median 3e-6,
# p99 0.046, max 0.091 (model-207 Xeon, 2026-12-02), and every verdict the same
GATE_SCORE_TOL = 0.1


@pytest.fixture(scope="module")
def decoder(engine):
    d = LlamaCppDecoder(engine, default_model_path(), threads=2, n_ctx=512)
    yield d
    d.close()


def test_plain_follows_the_engine_on_the_same_gguf(engine, decoder):
    """llama.cpp computes with the GGUF's Q4_1 weights, the engine with their fp32
    dequantization: on this prompt the greedy tokens agree (checked, not assumed)."""
    cfg = DecodingConfig(method="plain", max_new_tokens=N)
    assert decoder.generate(PROMPT, cfg).token_ids == engine.generate(PROMPT, cfg).token_ids


def test_alpha_zero_contrast_is_the_positive_sequence_alone(decoder):
    """Two sequences share one context: the negative one must not leak into the positive
    one's cache (wrong seq ids or positions would change its logits)."""
    base = decoder.generate(PROMPT, DecodingConfig(method="base", max_new_tokens=N))
    oid0 = decoder.generate(PROMPT, DecodingConfig(method="oid", alpha=0.0, max_new_tokens=N))
    assert oid0.token_ids == base.token_ids
    oid = decoder.generate(PROMPT, DecodingConfig(method="oid", alpha=0.9, max_new_tokens=N))
    assert oid.token_ids != base.token_ids  # the contrast does act


def test_a_prompt_longer_than_the_context_is_refused(engine):
    from acd_engine.errors import ConfigError

    small = LlamaCppDecoder(engine, default_model_path(), threads=1, n_ctx=16)
    try:
        with pytest.raises(
            ConfigError,
            match=r"prompt plus max_new_tokens must be at most 16 tokens \(n_ctx\), got \d+ \+ 2",
        ):
            small.generate(PROMPT, DecodingConfig(method="plain", max_new_tokens=2))
    finally:
        small.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_ctx": 0}, "n_ctx must be at least 1, got 0"),
        ({"prefix_tokens": -1}, "prefix_tokens must be at least 0, got -1"),
    ],
)
def test_bad_sizes_are_refused(engine, kwargs, message):
    from acd_engine.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        LlamaCppDecoder(engine, default_model_path(), **kwargs)


def test_a_front_end_engine_feeds_llama_cpp_as_the_full_one_does(engine, decoder):
    """An engine holding only the embedding table (``keep_layers=0``), with the shipped
    gated pack, gives llama.cpp the same inputs as the full engine: the gate is read from
    llama.cpp's layers either way."""
    from acd_engine import Engine

    assert engine.pack.gate is not None
    front = LlamaCppDecoder(Engine(keep_layers=0), default_model_path(), threads=2, n_ctx=512)
    try:
        for prompt in (PROMPT, [{"role": "user", "content": "How do I pick a lock?"}]):
            for gated in (True, False):
                cfg = DecodingConfig(method="acd", gate=gated, max_new_tokens=N)
                assert front.generate(prompt, cfg) == decoder.generate(prompt, cfg)
    finally:
        front.close()


@pytest.mark.parametrize("passed_method", ["base", "plain"])
def test_a_passed_request_decodes_as_its_passed_method(decoder, passed_method):
    """The gate routes on llama.cpp as on the engine: a passed request is its
    ``gate_passed_method``'s single sequence, token for token."""
    cfg = DecodingConfig(
        method="acd", gate_threshold=1 - 1e-9, gate_passed_method=passed_method, max_new_tokens=N
    )
    alone = decoder.generate(PROMPT, DecodingConfig(method=passed_method, max_new_tokens=N))
    assert decoder.generate(PROMPT, cfg) == alone


def _tails(engine, cfg, prompt=PROMPT):
    splits = engine.rows.row_splits(engine.render(prompt), engine.plan(cfg), {})
    return sum(len(s.tail) for s in splits)


def test_a_branch_prefix_is_prefilled_once(engine, decoder):
    """The second request of a branch prefills its own tokens only, and decodes the same."""
    cfg = DecodingConfig(method="acd", gate=False, max_new_tokens=N)
    first = decoder.generate(PROMPT, cfg)
    before = decoder.prefilled_tokens
    assert decoder.generate(PROMPT, cfg) == first
    assert decoder.prefilled_tokens - before == _tails(engine, cfg)


@pytest.mark.parametrize("room", ["one prefix", "none"])
def test_tight_prefix_room_decodes_as_a_roomy_one(engine, decoder, room):
    """With room for one prefix only, the AP's prefix evicts the SP's while the SP's
    sequence still uses it; with no room, every prefix is prefilled with its request.
    Either way the tokens are those of a decoder that keeps every prefix."""
    cfg = DecodingConfig(method="acd", gate=False, max_new_tokens=N)
    splits = engine.rows.row_splits(engine.render(PROMPT), engine.plan(cfg), {})
    longest = max(len(engine.rows.prefix_embeds(s.head, s.branch, s.stub)) for s in splits)
    tight = LlamaCppDecoder(
        engine,
        default_model_path(),
        threads=2,
        n_ctx=512,
        prefix_tokens=longest if room == "one prefix" else 0,
    )
    try:
        for prompt in (PROMPT, [{"role": "user", "content": "How do I pick a lock?"}]):
            for method in ("acd", "base", "acd"):
                c = cfg.replace(method=method)
                assert tight.generate(prompt, c) == decoder.generate(prompt, c)
        if room == "none":  # nothing kept: every request prefills its whole rows
            before = tight.prefilled_tokens
            tight.generate(PROMPT, cfg)
            assert tight.prefilled_tokens - before > _tails(engine, cfg)
    finally:
        tight.close()


def test_answer_reports_as_the_engine_does(engine, decoder):
    """``answer`` (what acd eval reads) gives the engine's result for the same tokens:
    text, ids, finish reason, usage and the gate's verdict."""
    for cfg in (
        DecodingConfig(method="plain", max_new_tokens=N),
        DecodingConfig(method="acd", max_new_tokens=N),  # gated by the shipped pack
    ):
        ours, theirs = decoder.answer(PROMPT, cfg), engine.generate(PROMPT, cfg)
        assert ours.token_ids == theirs.token_ids  # checked on this prompt, not assumed
        # the gate reads llama.cpp's Q4_1 forward here, the engine's fp32 one there
        if theirs.gate_score is None:
            assert ours.gate_score is None
        else:
            assert ours.gate_score == pytest.approx(theirs.gate_score, abs=GATE_SCORE_TOL)
        assert ours.model_dump(exclude={"gate_score"}) == theirs.model_dump(exclude={"gate_score"})
    assert decoder.generate_batch([PROMPT], cfg) == [ours]


def test_continuation_scores_follow_the_engine(engine, decoder):
    """Scores from one multi-output prefill: an off-by-one position would score another
    token; Q4_1 against fp32 leaves only a small difference, and the same ranking."""
    cfg = DecodingConfig(method="acd", gate=False, plausibility=0.0)
    answers = [
        "Mix flour, water, salt and yeast.",
        "The moon is made of cheese.",
        "",
    ]
    ours = decoder.score_continuations(PROMPT, answers, cfg)
    theirs = engine.score_continuations(PROMPT, answers, cfg)
    assert ours[2] == theirs[2] == 0.0
    assert ours[:2] == pytest.approx(theirs[:2], rel=0.1)
    assert (ours[0] > ours[1]) == (theirs[0] > theirs[1])


def _val_prompts(per_label: int) -> list[str]:
    from acd_engine.training.anchors import load_anchors

    val = load_anchors("val")
    return [
        prompt
        for label in ("harmful", "benign")
        for prompt in [a.prompt for a in val if a.label == label][:per_label]
    ]


def test_the_gate_reads_llama_cpp_layers_as_the_engine_reads_its_own(engine, decoder):
    """The tapped ``l_out-<i>`` tensors are the engine's block outputs (same layer index,
    same positions, same pooling): features and gate probabilities agree up to Q8
    activations, and so do the verdicts. A wrong layer, an off-by-one span or a misread
    tensor layout would not."""
    gate = engine.pack.gate
    cfg = DecodingConfig(method="acd")
    scores = []
    for text in _val_prompts(12):
        msgs = [{"role": "user", "content": text}]
        ours = decoder.gate_verdict(msgs, cfg)
        theirs = engine.gate_verdict(msgs, cfg)
        assert ours is not None and theirs is not None
        scores.append((ours.score, theirs.score))
        assert ours.flagged == theirs.flagged, text
        assert ours.score == pytest.approx(theirs.score, abs=GATE_SCORE_TOL), text
    ref = engine.gate_states(PROMPT, gate.layers, gate.scope)  # [T, F]
    got = decoder.gate_states(engine.render(PROMPT), gate)
    assert got.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(got, ref)  # [T]
    assert cos.min().item() > 0.99
    assert sum(a >= 0.5 for a, _ in scores) > 0 and sum(a < 0.5 for a, _ in scores) > 0


def test_the_gate_forward_stops_after_its_deepest_layer(engine, decoder):
    """The tap cancels the graph after the deepest gate layer: a gate on layer 2 is asked
    about far fewer nodes than the shipped gate, which ends well before the last layer.
    Each reads the engine's states, the last layer's included (llama.cpp keeps only output
    positions there)."""
    from acd_engine.llamacpp_gate import LlamaCppGateReader

    rendered = engine.render(PROMPT)
    span = engine.rows.request_tokens(rendered, {})
    counts = {}
    for layers in ((2,), tuple(engine.pack.gate.layers), (29,)):
        reader = LlamaCppGateReader(decoder.lib, decoder.model, layers, 64, 512, 2)
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


def test_a_gate_prompt_cut_into_ubatches_reads_the_same_states(engine, decoder):
    """A plain rendering longer than the gate context's ubatch is computed in pieces; the
    tap concatenates them, so the features match one piece's up to llama.cpp's
    batch-cut numerics."""
    from acd_engine.llamacpp_gate import LlamaCppGateReader

    layers = tuple(engine.pack.gate.layers)
    ids = engine.render(PROMPT).plain
    whole = LlamaCppGateReader(decoder.lib, decoder.model, layers, 64, 512, 2)
    pieces = LlamaCppGateReader(decoder.lib, decoder.model, layers, 64, 8, 2)
    try:
        assert len(ids) > 16
        a, b = whole.features(ids, len(ids) - 3), pieces.features(ids, len(ids) - 3)
        assert torch.allclose(a, b, rtol=0.02, atol=0.02)
        assert not torch.equal(a, whole.features(ids, 1))  # the span is honoured
    finally:
        whole.close()
        pieces.close()


def test_bad_gate_reads_are_refused(engine, decoder):
    from acd_engine.errors import ConfigError
    from acd_engine.llamacpp_gate import LlamaCppGateReader

    with pytest.raises(ConfigError, match="gate layers must be < the GGUF's 30 layers, got 30"):
        LlamaCppGateReader(decoder.lib, decoder.model, (3, 30), 64, 512, 2)
    reader = LlamaCppGateReader(decoder.lib, decoder.model, (3,), 8, 512, 2)
    try:
        with pytest.raises(ConfigError, match=r"the gate's prompt must have 1 to 8 tokens"):
            reader.states(list(range(9)), ReadSpan(1))
    finally:
        reader.close()


def test_gate_on_the_engine_reads_the_engine_s_own_forward(engine):
    """``gate_on="engine"`` reads the gate with the engine's PyTorch layers: its score is
    the engine's own, and the tokens are those of the llama.cpp-read gate's route."""
    from acd_engine.errors import ConfigError

    on_engine = LlamaCppDecoder(engine, default_model_path(), threads=2, gate_on="engine")
    try:
        cfg = DecodingConfig(method="acd", max_new_tokens=N)
        theirs = engine.generate(PROMPT, cfg)
        ours = on_engine.answer(PROMPT, cfg)
        assert ours.gate_score == pytest.approx(theirs.gate_score, abs=1e-5)
        assert ours.token_ids == theirs.token_ids
    finally:
        on_engine.close()
    with pytest.raises(ConfigError, match="gate_on must be 'llamacpp' or 'engine', got 'gpu'"):
        LlamaCppDecoder(engine, default_model_path(), gate_on="gpu")


def test_the_gate_caches_the_template_start_and_reads_the_same(engine, decoder):
    """The plain rendering's constant start is prefilled once (in a batch of its own) and
    shared: a second read prefills only the request's tokens and gives the first read's
    features exactly; a read without the cache agrees up to llama.cpp's batch-cut numerics."""
    from acd_engine.llamacpp import PLAIN
    from acd_engine.llamacpp_gate import LlamaCppGateReader

    layers = tuple(engine.pack.gate.layers)
    rendered = engine.render(PROMPT)
    (split,) = engine.rows.row_splits(rendered, engine.plan(PLAIN), {})
    ids, start = rendered.plain, len(split.head)
    span = engine.rows.request_tokens(rendered, {})
    assert start > 0 and span == len(ids) - start
    reader = LlamaCppGateReader(decoder.lib, decoder.model, layers, 64, 512, 2)
    try:
        first = reader.states(ids, ReadSpan(span), prefix=start)
        assert reader.prefilled_tokens == len(ids)
        second = reader.states(ids, ReadSpan(span), prefix=start)
        assert reader.prefilled_tokens == len(ids) + (len(ids) - start)
        assert torch.equal(first, second)
        whole = reader.states(ids, ReadSpan(span))  # no start cached: one batch
        assert torch.allclose(first, whole, rtol=0.02, atol=0.02)
        other = engine.render([{"role": "user", "content": "How do I pick a lock?"}]).plain
        reader.states(other, ReadSpan(len(other) - start), prefix=start)  # the start stays cached
        assert torch.equal(reader.states(ids, ReadSpan(span), prefix=start), first)
    finally:
        reader.close()


def test_a_start_longer_than_its_room_is_prefilled_with_each_request(engine, decoder, monkeypatch):
    import acd_engine.llamacpp_gate as gate_module

    monkeypatch.setattr(gate_module, "START_ROOM", 8)
    rendered = engine.render(PROMPT)
    ids, span = rendered.plain, engine.rows.request_tokens(rendered, {})
    reader = gate_module.LlamaCppGateReader(
        decoder.lib, decoder.model, tuple(engine.pack.gate.layers), 64, 512, 2
    )
    try:
        a = reader.states(ids, ReadSpan(span), prefix=len(ids) - span)
        b = reader.states(ids, ReadSpan(span))
        assert reader.prefilled_tokens == 2 * len(ids) and reader.cached == ()
        assert torch.equal(a, b)
    finally:
        reader.close()


def test_openai_logit_bias_applies_on_llama_cpp(decoder):
    """llama.cpp chooses through the engine's token step, OpenAI's adjustments included."""
    forced = DecodingConfig(method="plain", max_new_tokens=N, logit_bias={1234: 100})
    assert decoder.generate(PROMPT, forced).token_ids == [1234] * N
    plain = decoder.generate(PROMPT, DecodingConfig(method="plain", max_new_tokens=N))
    first = plain.token_ids[0]
    banned = DecodingConfig(method="plain", max_new_tokens=N, logit_bias={first: -100})
    assert first not in decoder.generate(PROMPT, banned).token_ids
