"""OPO data generation on the tiny model: layout, caching, crash safety, splits, fallback."""

from __future__ import annotations

import torch

from acd_engine.config import DecodingConfig
from acd_engine.eval.judges import get_judge
from acd_engine.safety.prompts import SAFE_PROMPT
from acd_engine.training.anchors import anchor_set_hash, load_anchors
from acd_engine.training.data import (
    REFUSAL_TEMPLATES,
    _prompt_ids,
    _sample_batch,
    build_splits,
    fallback_refusal,
    generate_responses,
    load_or_generate,
    refusal_opening,
)


def test_sampled_prompts_match_the_engines_layout(tiny_engine):
    prompt = "How do I bake bread?"
    ids = _prompt_ids(tiny_engine, prompt, "safe")
    rendered = tiny_engine.render(prompt)
    safe = tiny_engine.tokenizer.encode(SAFE_PROMPT, add_special_tokens=False)
    assert ids == rendered.head + safe + rendered.tail
    embeds, _, _ = tiny_engine.branch_inputs(prompt, DecodingConfig(method="base"))
    emb = tiny_engine.model.get_input_embeddings()
    assert torch.equal(embeds[0], emb(torch.tensor(ids)))
    assert _prompt_ids(tiny_engine, prompt, "none") == rendered.head + rendered.tail


def test_responses_are_cached_and_never_resampled(
    tiny_engine, small_anchors_path, fast_cfg, tmp_path
):
    anchors = load_anchors("train", small_anchors_path)
    calls = []

    def counting(*args):
        calls.append(1)
        return _sample_batch(*args)

    first, path = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="x", sample_fn=counting
    )
    n_harmful = sum(a.label == "harmful" for a in anchors)
    # One sample per anchor and source, plus one refusal continuation per harmful anchor.
    assert len(first) == len(anchors) * len(fast_cfg.sources) + n_harmful and calls
    assert sum(r["source"] == "refusal" for r in first) == n_harmful

    def refuse(*args):
        raise AssertionError("sampled again despite a complete cache")

    again, path2 = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="x", sample_fn=refuse
    )
    assert again == first and path2 == path
    # Other settings or another anchor set get another cache file.
    _, path3 = generate_responses(
        tiny_engine,
        anchors[:1],
        fast_cfg.replace(seed=1, sources=["none"]),
        tmp_path,
        anchors_hash="x",
    )
    assert path3 != path


def test_a_line_cut_by_a_crash_is_resampled(tiny_engine, small_anchors_path, fast_cfg, tmp_path):
    anchors = load_anchors("train", small_anchors_path)
    full, path = generate_responses(tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="y")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # half-written last line
    resampled = []

    def counting(engine, ids, cfg, seed, *keep):
        resampled.append(len(ids))
        return _sample_batch(engine, ids, cfg, seed, *keep)

    again, _ = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="y", sample_fn=counting
    )
    assert resampled == [1]
    assert len(again) == len(full)


def test_sampling_is_seeded(tiny_engine, small_anchors_path, fast_cfg, tmp_path):
    anchors = load_anchors("train", small_anchors_path)[:2]
    cfg = fast_cfg.replace(sources=["none"])
    a, _ = generate_responses(tiny_engine, anchors, cfg, tmp_path / "a", anchors_hash="z")
    b, _ = generate_responses(tiny_engine, anchors, cfg, tmp_path / "b", anchors_hash="z")
    assert a == b


def _records(anchors, text_for):
    return [
        {
            "anchor_id": a.id,
            "source": "safe",
            "sample": 0,
            "response": text_for(a),
            "finished": True,
        }
        for a in anchors
    ]


def test_splits_drop_benign_refusals_and_fill_missing_refusals(small_anchors_path, fast_cfg):
    anchors = load_anchors("train", small_anchors_path)
    records = _records(
        anchors,
        lambda a: (
            "I'm sorry, I can't help with that." if a.label == "benign" else "Sure, here is how."
        ),
    )
    benign = [a for a in anchors if a.label == "benign"]
    records += [
        {**r, "source": "none", "response": "Here you go."} for r in _records(benign[:1], str)
    ]
    splits = build_splits(anchors, records, get_judge(), fast_cfg.replace(fallback="auto"))
    n_harmful = sum(a.label == "harmful" for a in anchors)
    assert len(splits.ha) == n_harmful
    assert splits.fallback == {"D_HR": n_harmful}
    assert all(e.source == "fallback" for e in splits.hr)
    assert [(e.anchor_id, e.source) for e in splits.s] == [(benign[0].id, "none")]


def test_fallback_refusals_are_deterministic_varied_and_judged_refused():
    judge = get_judge()
    ids = [f"anchor-h-{i:04d}" for i in range(1, 40)]
    assert [fallback_refusal(i) for i in ids] == [fallback_refusal(i) for i in ids]
    assert len({fallback_refusal(i) for i in ids}) > 2
    for text in REFUSAL_TEMPLATES:
        assert judge.judge("x", text) == "refused", text


def test_no_fallback_when_the_model_refuses_enough(small_anchors_path, fast_cfg):
    anchors = load_anchors("train", small_anchors_path)
    records = _records(
        anchors,
        lambda a: (
            "I'm sorry, I can't help with that." if a.label == "harmful" else "Here is a recipe."
        ),
    )
    splits = build_splits(anchors, records, get_judge(), fast_cfg)
    assert splits.fallback.get("D_HR") is None
    assert all(e.source == "safe" for e in splits.hr) and len(splits.s) == 4


def test_empty_benign_split_is_refused_with_a_fix(small_anchors_path, fast_cfg):
    import pytest

    from acd_engine.training.data import OPODataError

    anchors = load_anchors("train", small_anchors_path)
    records = _records(anchors, lambda a: "I'm sorry, I can't help with that.")
    with pytest.raises(OPODataError, match="D_S must not be empty"):
        build_splits(anchors, records, get_judge(), fast_cfg)


def test_random_model_needs_the_refusal_fallback_without_continuations(
    tiny_engine, small_anchors_path, fast_cfg, tmp_path
):
    # The tiny random model emits noise, never a refusal: without refusal continuations
    # D_HR comes only from templates ...
    cfg = fast_cfg.replace(refusal_continuations=False)
    splits = load_or_generate(tiny_engine, cfg, cache_dir=tmp_path, anchors_path=small_anchors_path)
    assert splits.fallback.get("D_HR", 0) >= 1
    assert splits.hr and splits.ha and splits.s
    assert {e.source for e in splits.hr} == {"fallback"}
    # ... and with them (the default), from its own words after a prefilled refusal opening
    # (kept open here: the random model's noise has no sentence end to cut at, see
    # test_refusal_end.py for the default cut).
    cfg = fast_cfg.replace(refusal_end="open")
    splits = load_or_generate(tiny_engine, cfg, cache_dir=tmp_path, anchors_path=small_anchors_path)
    assert not splits.fallback and {e.source for e in splits.hr} == {"refusal"}
    assert all(e.response.startswith(fast_cfg.refusal_openings) for e in splits.hr)
    assert anchor_set_hash(small_anchors_path) != anchor_set_hash()


def _rec(a, source, response, finished=True):
    return {
        "anchor_id": a.id,
        "source": source,
        "sample": 0,
        "response": response,
        "finished": finished,
    }


def test_each_split_prefers_its_own_sources(small_anchors_path, fast_cfg):
    anchors = load_anchors("train", small_anchors_path)
    harmful = [a for a in anchors if a.label == "harmful"]
    benign = [a for a in anchors if a.label == "benign"]
    records = []
    for a in harmful:  # sampled refusal and compliance under every prompt, plus a continuation
        records += [
            _rec(a, "safe", "Sure, a mild overview."),
            _rec(a, "opposite", "Sure, step 1: do it."),
            _rec(a, "none", "I'm sorry, I can't help with that."),
            _rec(a, "refusal", "I'm sorry, but I can't share that."),
        ]
    for a in benign:
        records += [_rec(a, "opposite", "Here you go."), _rec(a, "safe", "Here is a recipe.")]
    splits = build_splits(anchors, records, get_judge(), fast_cfg)
    assert {e.source for e in splits.ha} == {"opposite"}  # not the mild safe-prompt compliance
    assert {e.source for e in splits.hr} == {"refusal"}  # the model's continuation first
    assert {e.source for e in splits.s} == {"safe"}
    assert [e.anchor_id for e in splits.ha] == [a.id for a in harmful]  # one per anchor
    assert splits.stats["sources"]["D_HA"] == {"opposite": len(harmful)}
    # Without its first choice a split falls back to the next source, not to templates.
    fewer = [r for r in records if r["source"] != "refusal"]
    splits = build_splits(anchors, fewer, get_judge(), fast_cfg)
    assert {e.source for e in splits.hr} == {"none"} and not splits.fallback


def test_benign_refusal_openings_are_refusal_starts_only(small_anchors_path, fast_cfg):
    anchors = load_anchors("train", small_anchors_path)
    benign = [a for a in anchors if a.label == "benign"]
    records = [_rec(a, "safe", "Sure, here it is.") for a in anchors]
    records += [
        _rec(benign[0], "none", "I'm sorry, but I can't help with that request."),
        # A real answer that only mentions a refusal phrase late: not an opening to avoid.
        _rec(benign[1], "none", "Here is a long and useful answer. " * 3 + "I cannot say more."),
    ]
    splits = build_splits(anchors, records, get_judge(), fast_cfg)
    by_anchor = {e.anchor_id: e for e in splits.br}
    assert set(by_anchor) == {a.id for a in benign}
    assert by_anchor[benign[0].id].source == "none"
    assert by_anchor[benign[1].id].source == "opening"
    assert by_anchor[benign[1].id].response in fast_cfg.refusal_openings
    assert not any(e.finished for e in splits.br if e.source == "opening")
    assert not build_splits(
        anchors, records, get_judge(), fast_cfg.replace(benign_refusal_weight=0.0)
    ).br  # the term off: no examples to pay for


def test_refusal_templates_end_within_the_default_target(tiny_engine):
    from acd_engine.training.config import TrainConfig

    budget = TrainConfig().target_tokens
    for text in REFUSAL_TEMPLATES:
        n = len(tiny_engine.tokenizer.encode(text, add_special_tokens=False))
        assert n + 1 <= budget, (text, n)  # + EOS: a template must be trained to stop


def test_refusal_continuations_start_with_the_opening_and_change_the_cache_key(
    tiny_engine, small_anchors_path, fast_cfg, tmp_path
):
    anchors = load_anchors("train", small_anchors_path)
    records, path = generate_responses(tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="z")
    cont = [r for r in records if r["source"] == "refusal"]
    assert len(cont) == sum(a.label == "harmful" for a in anchors)
    for r in cont:
        opening = refusal_opening(r["anchor_id"], fast_cfg.refusal_openings)
        assert r["response"].startswith(opening) and len(r["response"]) > len(opening)
    other = fast_cfg.replace(refusal_openings=["I will not"])
    records2, path2 = generate_responses(tiny_engine, anchors, other, tmp_path, anchors_hash="z")
    assert path2 != path
    assert all(r["response"].startswith("I will not") for r in records2 if r["source"] == "refusal")
