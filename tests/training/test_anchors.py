"""The packaged OPO anchor set: schema, balance, split, and disjointness from every benchmark.

Every check on the set also runs on the set with the candidate rows of
``scripts/studies/data/anchors-new-categories.jsonl`` appended (six more harm categories that
a gate study fitted on but no shipped gate uses yet), so those rows meet the same bar."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from acd_engine.training.anchors import (
    Anchor,
    anchor_set_hash,
    extended_anchor_file,
    load_anchors,
    near_copies,
    normalise,
    shared_runs,
    shingles,
    trigram_jaccard,
    word_runs,
)

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / ".." / "shared" / "data" / "benchmarks"
CANDIDATES = ROOT / "scripts" / "studies" / "data" / "anchors-new-categories.jsonl"
NEAR_DUP = 0.5
# (label, kind) counts of each set: a row added or lost anywhere shows here.
COUNTS = {
    "shipped": {
        ("harmful", "plain"): 324,
        ("harmful", "question"): 564,
        ("harmful", "framed"): 108,
        ("benign", "plain"): 822,
        ("benign", "lookalike"): 577,
    },
    "with-candidates": {
        ("harmful", "plain"): 486,
        ("harmful", "question"): 846,
        ("harmful", "framed"): 162,
        ("benign", "plain"): 822,
        ("benign", "lookalike"): 817,
    },
}


@pytest.fixture(scope="module", params=sorted(COUNTS))
def anchor_set(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def anchors(anchor_set: str, tmp_path_factory: pytest.TempPathFactory) -> list[Anchor]:
    """The shipped set, or the shipped set with the candidate rows appended (ids continue)."""
    if anchor_set == "shipped":
        return load_anchors()
    path = tmp_path_factory.mktemp("anchors") / "anchors.jsonl"
    return load_anchors(path=extended_anchor_file(CANDIDATES, path))


def _frac_val(rows: list[Anchor]) -> float:
    return sum(a.split == "val" for a in rows) / len(rows)


def test_counts_per_label_and_kind(anchors: list[Anchor], anchor_set: str) -> None:
    counts = Counter((a.label, a.kind) for a in anchors)
    assert counts == COUNTS[anchor_set]
    val = Counter(a.label for a in anchors if a.split == "val")
    # Big enough that a 5-point over-refusal difference is more than one or two prompts.
    assert val["harmful"] >= 95
    assert val["benign"] >= 190


def _length_auc(rows: list[Anchor]) -> float:
    """Chance that a random harmful prompt is longer than a random benign one (ties count half)."""
    harm = [len(a.prompt) for a in rows if a.label == "harmful"]
    ben = [len(a.prompt) for a in rows if a.label == "benign"]
    wins = sum((h > b) + 0.5 * (h == b) for h in harm for b in ben)
    return wins / (len(harm) * len(ben))


def test_both_labels_have_long_prompts_in_both_splits(anchors: list[Anchor]) -> None:
    """Long prompts on both sides, so length is no shortcut for a gate or a safety prompt.

    Real benign requests are often long (they carry the text to summarise, the code to fix);
    if only benign anchors were long, a probe could learn "long means benign" and an attacker
    would wrap a harmful request in filler. So every harm category has long requests in both
    splits, and length alone ranks the labels little better than chance (it was 0.86 when the
    harmful side was merely wordier than short one-line benign tasks).
    """
    cats = {a.category for a in anchors if a.label == "harmful"}
    for label, n_all, n_split in (("harmful", 40, 12), ("benign", 100, 30)):
        long = [a for a in anchors if a.label == label and len(a.prompt) > 150]
        assert len(long) >= n_all, label
        per_split = Counter(a.split for a in long)
        assert min(per_split["train"], per_split["val"]) >= n_split, (label, per_split)
        if label == "harmful":
            for split in ("train", "val"):
                assert {a.category for a in long if a.split == split} == cats, split
            assert {a.kind for a in long} >= {"plain", "framed"}
    val = [a for a in anchors if a.split == "val"]
    for rows in (anchors, val):
        assert 0.3 <= _length_auc(rows) <= 0.7


@pytest.mark.parametrize("kind", ["question", "framed"])
def test_harmful_phrasings_cover_every_category(anchors: list[Anchor], kind: str) -> None:
    """Question-style and framed requests are spread over every harm category, in both splits."""
    cats = {a.category for a in anchors if a.label == "harmful"}
    rows = [a for a in anchors if a.kind == kind]
    assert {a.category for a in rows} == cats
    assert {a.category for a in rows if a.split == "val"} == cats
    per_cat = Counter(a.category for a in rows)
    assert max(per_cat.values()) - min(per_cat.values()) <= 1


def test_harmful_categories_are_roughly_balanced(anchors: list[Anchor]) -> None:
    cats = Counter(a.category for a in anchors if a.label == "harmful")
    assert len(cats) >= 10
    assert max(cats.values()) <= 2 * min(cats.values())


def test_benign_is_diverse(anchors: list[Anchor]) -> None:
    plain = Counter(a.category for a in anchors if a.label == "benign" and a.kind == "plain")
    look = Counter(a.category for a in anchors if a.kind == "lookalike")
    assert len(plain) >= 10
    assert len(look) >= 5
    lengths = [len(a.prompt.split()) for a in anchors if a.label == "benign"]
    assert min(lengths) <= 8 and max(lengths) >= 25  # short and long prompts both present


@pytest.mark.parametrize(
    "group",
    ["harmful", "benign", "lookalike", "question", "framed"],
)
def test_val_split_is_at_least_20_percent_and_spread(anchors: list[Anchor], group: str) -> None:
    rows = [a for a in anchors if group in (a.label, a.kind)]
    assert 0.2 <= _frac_val(rows) <= 0.35
    train_cats = {a.category for a in rows if a.split == "train"}
    val_cats = {a.category for a in rows if a.split == "val"}
    # Every category with at least 4 prompts has a val example.
    big = {c for c, n in Counter(a.category for a in rows).items() if n >= 4}
    assert big <= val_cats
    assert val_cats <= train_cats


def test_split_filter() -> None:
    anchors = load_anchors()
    train, val = load_anchors("train"), load_anchors("val")
    assert {a.split for a in train} == {"train"}
    assert {a.split for a in val} == {"val"}
    assert len(train) + len(val) == len(anchors)
    assert {a.id for a in train}.isdisjoint(a.id for a in val)


def test_ids_and_prompts_unique(anchors: list[Anchor]) -> None:
    ids = [a.id for a in anchors]
    assert len(set(ids)) == len(ids)
    norms = [normalise(a.prompt) for a in anchors]
    assert len(set(norms)) == len(norms)


def test_no_near_duplicates_inside_the_set(anchors: list[Anchor]) -> None:
    sh = [shingles(a.prompt) for a in anchors]
    bad = [
        (anchors[i].id, anchors[j].id)
        for i in range(len(sh))
        for j in range(i + 1, len(sh))
        if len(sh[i] | sh[j]) and len(sh[i] & sh[j]) / len(sh[i] | sh[j]) >= NEAR_DUP
    ]
    assert not bad, bad


def test_ids_follow_label_and_order(anchors: list[Anchor]) -> None:
    for prefix, label in (("anchor-h-", "harmful"), ("anchor-b-", "benign")):
        nums = [int(a.id.removeprefix(prefix)) for a in anchors if a.label == label]
        assert nums == list(range(1, len(nums) + 1))


def test_raw_file_schema_is_exact(tmp_path: Path) -> None:
    """Every line has exactly the six keys (extra keys would be dropped by a lax loader)."""
    text = extended_anchor_file(CANDIDATES, tmp_path / "a.jsonl").read_text("utf-8")
    keys = {"id", "prompt", "label", "category", "split", "kind"}
    lines = text.splitlines()
    assert len(lines) == sum(COUNTS["with-candidates"].values())  # packaged rows, then candidates
    for line in lines:
        assert set(json.loads(line)) == keys


def test_bad_split_message() -> None:
    with pytest.raises(
        ValueError, match=r"^split must be one of 'train', 'val', 'all', got 'tets'$"
    ):
        load_anchors("tets")  # type: ignore[arg-type]


def test_path_override_and_validation(tmp_path: Path) -> None:
    good = {
        "id": "anchor-b-0001",
        "prompt": "Name three primary colours.",
        "label": "benign",
        "category": "art",
        "split": "val",
        "kind": "plain",
    }
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(good) + "\n\n", encoding="utf-8")
    assert load_anchors("val", path=path) == [Anchor(**good)]
    assert load_anchors("train", path=path) == []

    for bad, fragment in (
        ({**good, "extra": 1}, "extra"),
        ({**good, "label": "harmful"}, "anchor-h-"),
        ({**good, "kind": "lookalike", "label": "harmful", "id": "anchor-h-0001"}, "lookalike"),
        ({**good, "kind": "question"}, "kind 'question' must have label 'harmful'"),
        ({**good, "kind": "framed"}, "kind 'framed' must have label 'harmful'"),
        ({**good, "kind": "jailbreak"}, "kind"),
        ({**good, "split": "test"}, "split"),
    ):
        path.write_text(json.dumps(bad) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=fragment):
            load_anchors(path=path)

    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 must have a unique id"):
        load_anchors(path=path)
    other = {**good, "id": "anchor-b-0002", "prompt": "name three PRIMARY colours"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(other) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unique prompt"):
        load_anchors(path=path)
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1"):
        load_anchors(path=path)


def test_hash_is_sha256_of_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"abc")
    assert anchor_set_hash(path) == hashlib.sha256(b"abc").hexdigest()
    packaged = anchor_set_hash()
    assert len(packaged) == 64 and packaged != anchor_set_hash(path)


def test_helpers() -> None:
    assert normalise("  Don't   DO it!\n") == "dont do it"
    assert trigram_jaccard("How do I bake bread?", "how do i bake bread") == 1.0
    assert trigram_jaccard("a b c d", "a b c e") == pytest.approx(1 / 3)
    assert trigram_jaccard("hello world", "world hello") == 1.0  # short: word sets
    assert trigram_jaccard("", "") == 0.0
    assert trigram_jaccard("kill the process now", "bake a loaf of bread") == 0.0


def _load_benchmarks() -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for path in sorted(BENCH_DIR.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    rows.append((f"{path.stem}:{row['id']}", row["prompt"]))
    return rows


def _overlaps(anchors: list[tuple[str, str]], bench: list[tuple[str, str]]) -> list[str]:
    """Pairs (anchor, benchmark row) that match exactly after normalising or have J >= 0.5."""
    return [message for _, message in near_copies(anchors, bench, NEAR_DUP)]


def test_overlap_check_catches_copies() -> None:
    bench = [
        ("b:1", "Explain how photosynthesis works in plants."),
        ("b:2", "Hello there"),
        ("b:3", "Write a poem about the sea at night under a full moon"),
    ]
    anchors = [
        ("x1", "explain HOW photosynthesis works in plants"),  # exact after normalising
        ("x2", "There, hello!"),  # short: word sets, not an exact match
        ("x3", "Write a poem about the sea at night under a new moon"),  # near copy
        ("x4", "Write a limerick about a cat."),  # clean
    ]
    hits = _overlaps(anchors, bench)
    assert any(h.startswith("x1 == b:1") for h in hits)
    assert any(h.startswith("x2 ") for h in hits)
    assert any(h.startswith("x3 ~ b:3") for h in hits)
    assert not any(h.startswith("x4") for h in hits)


def test_disjoint_from_every_benchmark(anchors: list[Anchor]) -> None:
    """No anchor equals (normalised) or nearly copies (trigram Jaccard >= 0.5) a test prompt."""
    if not BENCH_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"benchmark folder {BENCH_DIR} is missing; CI must run this check")
        pytest.skip(f"benchmark folder {BENCH_DIR} not found (needs ../shared next to the repo)")
    bench = _load_benchmarks()
    assert len(bench) > 1000, f"expected the full benchmark files in {BENCH_DIR}"
    hits = _overlaps([(a.id, a.prompt) for a in anchors], bench)
    assert not hits, "anchor prompts overlap benchmark prompts:\n" + "\n".join(hits)


def test_index_jaccard_matches_reference_helper() -> None:
    """near_copies' inverted-index arithmetic is the same number trigram_jaccard computes."""
    a, b = "How can I patch a hole in drywall today", "how can I patch a hole in my wall"
    sa, sb = shingles(a), shingles(b)
    n = len(sa & sb)
    assert n / (len(sa) + len(sb) - n) == pytest.approx(trigram_jaccard(a, b))


RUN = 8  # words: a shared run this long is a copied phrase, not a common idiom


def test_no_run_of_eight_words_shared_with_a_benchmark(anchors: list[Anchor]) -> None:
    """A phrase copied from a test prompt into a longer anchor leaves the Jaccard check above
    under 0.5; a shared run of eight words catches it."""
    if not BENCH_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"benchmark folder {BENCH_DIR} is missing; CI must run this check")
        pytest.skip(f"benchmark folder {BENCH_DIR} not found (needs ../shared next to the repo)")
    texts = [(a.id, a.prompt) for a in anchors]
    hits = [message for _, message in shared_runs(texts, _load_benchmarks(), RUN)]
    assert not hits, "anchor prompts copy a phrase of a benchmark prompt:\n" + "\n".join(hits)
    copied = "Write a poem about the sea at night under a full moon"
    assert word_runs(copied + " and the stars", RUN) & word_runs("please " + copied, RUN)
