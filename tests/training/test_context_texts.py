"""The packaged context wrappers (``resources/contexts.json``): schema, sizes, pool separation.

The wrappers put a request into the shapes real applications send (system prompts, earlier
turns, retrieved passages, tool schemas, padding, refusals). ``train`` fits the gate, ``val``
picks thresholds and ``eval`` only measures, so no text may be shared between pools, and no
text may copy a run of words from a benchmark prompt or an anchor prompt.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from acd_engine.training.anchors import load_anchors, normalise, shared_runs, word_runs

BENCH_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "benchmarks"
RUN = 8  # words in a shingle: a shared run this long means a copied phrase, not a common idiom

POOLS = ("train", "val", "eval")
FIELDS = (
    "system_prompts",
    "histories",
    "passages",
    "padding",
    "tools",
    "refusals",
    "rag_templates",
    "earlier_harmful",
)
APPS = {
    "support",
    "coding",
    "tutor",
    "companion",
    "internal",
    "writing",
    "health-info",
    "retail",
    "travel",
    "legal-info",
}
MIN_SIZES = {
    "train": {
        "system_prompts": 24,
        "histories": 24,
        "passages": 48,
        "padding": 16,
        "tools": 12,
        "refusals": 10,
        "rag_templates": 6,
    },
    "val": {
        "system_prompts": 10,
        "histories": 10,
        "passages": 20,
        "padding": 8,
        "tools": 5,
        "refusals": 5,
        "rag_templates": 3,
    },
    "eval": {
        "system_prompts": 10,
        "histories": 10,
        "passages": 20,
        "padding": 8,
        "tools": 5,
        "refusals": 5,
        "rag_templates": 4,
        "earlier_harmful": 8,
    },
}
MIN_SENSITIVE = {"train": 16, "val": 7, "eval": 7}
# (user-style, system-style) RAG templates each pool needs at least.
MIN_RAG_WHERE = {"train": (3, 3), "val": (1, 1), "eval": (2, 2)}
PLACEHOLDERS = {
    "user": ({"context", "question"}, set()),  # (user message, system message)
    "system": ({"question"}, {"context"}),
}
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
JSON_TYPES = {"string", "number", "integer", "boolean", "array", "object"}


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    res = resources.files("acd_engine.resources").joinpath("contexts.json")
    return json.loads(res.read_text(encoding="utf-8"))


def _words(text: str) -> int:
    return len(text.split())


def _fields(template: str | None) -> set[str]:
    """Names of the ``{placeholders}`` in a str.format template (empty for None)."""
    if template is None:
        return set()
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _tool_descriptions(node: Any) -> list[str]:
    """Every ``description`` string in a tool schema, at any depth."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "description" and isinstance(v, str)]
        return found + [
            d for k, v in node.items() if k != "description" for d in _tool_descriptions(v)
        ]
    if isinstance(node, list):
        return [d for v in node for d in _tool_descriptions(v)]
    return []


def _texts(pool: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, text) for every piece of written text in a pool."""
    out: list[tuple[str, str]] = []
    out += [("system_prompts", s["text"]) for s in pool["system_prompts"]]
    out += [("histories", m["content"]) for h in pool["histories"] for m in h]
    for p in pool["passages"]:
        out += [("passages.title", p["title"]), ("passages", p["text"])]
    out += [("padding", t) for t in pool["padding"]]
    for tool in pool["tools"]:
        out.append(("tools.name", tool["function"]["name"]))
        out += [("tools.description", d) for d in _tool_descriptions(tool)]
    out += [("refusals", t) for t in pool["refusals"]]
    # A template's two halves count as one text: a bare "{question}" user half is shared by design.
    out += [("rag_templates", f"{r['system'] or ''}\n{r['user']}") for r in pool["rag_templates"]]
    out += [("earlier_harmful", t) for t in pool["earlier_harmful"]]
    return out


def _shared_runs(
    texts: list[tuple[str, str]], others: list[tuple[str, str]], *, contained: bool = False
) -> list[str]:
    """Runs of RUN words that a text shares with one of ``others`` (where, run, other id)."""
    return [message for _, message in shared_runs(texts, others, RUN, contained=contained)]


def test_top_level_schema(data: dict[str, Any]) -> None:
    assert set(data) == {"version", "pools"}
    assert data["version"] == 1
    assert set(data["pools"]) == set(POOLS)
    for name in POOLS:
        pool = data["pools"][name]
        assert set(pool) == set(FIELDS), name
        assert all(isinstance(pool[f], list) for f in FIELDS), name


@pytest.mark.parametrize("name", POOLS)
def test_sizes(data: dict[str, Any], name: str) -> None:
    pool = data["pools"][name]
    for field, n in MIN_SIZES[name].items():
        assert len(pool[field]) >= n, (name, field, len(pool[field]))
    sensitive = sum(p["sensitive"] for p in pool["passages"])
    assert sensitive >= MIN_SENSITIVE[name], (name, sensitive)
    assert len(pool["passages"]) - sensitive >= MIN_SENSITIVE[name]  # benign ones outnumber


@pytest.mark.parametrize("name", POOLS)
def test_system_prompts(data: dict[str, Any], name: str) -> None:
    prompts = data["pools"][name]["system_prompts"]
    for s in prompts:
        assert set(s) == {"app", "text"}, s
        assert s["app"] in APPS, s["app"]
        assert isinstance(s["text"], str) and s["text"] == s["text"].strip() and s["text"]
        n = _words(s["text"])
        assert n <= 40 or 80 <= n <= 200, (n, s["text"][:60])  # short one-liner or long
    apps = Counter(s["app"] for s in prompts)
    assert set(apps) == APPS, name
    if name == "train":
        assert min(apps.values()) >= 2, apps
    lengths = [_words(s["text"]) for s in prompts]
    assert sum(n <= 40 for n in lengths) >= 3 and sum(n >= 80 for n in lengths) >= 3, lengths


@pytest.mark.parametrize("name", POOLS)
def test_histories(data: dict[str, Any], name: str) -> None:
    for history in data["pools"][name]["histories"]:
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        for m in history:
            assert set(m) == {"role", "content"}
            assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != ""


@pytest.mark.parametrize("name", POOLS)
def test_passages_and_padding(data: dict[str, Any], name: str) -> None:
    pool = data["pools"][name]
    for p in pool["passages"]:
        assert set(p) == {"title", "text", "sensitive"}
        assert isinstance(p["title"], str) and p["title"]
        assert isinstance(p["sensitive"], bool)
        assert 50 <= _words(p["text"]) <= 120, (p["title"], _words(p["text"]))
    titles = [p["title"] for p in pool["passages"]]
    assert len(set(titles)) == len(titles)
    for text in pool["padding"]:
        assert isinstance(text, str)
        assert 70 <= _words(text) <= 130, (_words(text), text[:60])
    for text in pool["refusals"]:
        assert isinstance(text, str) and text.strip() == text != ""


@pytest.mark.parametrize("name", POOLS)
def test_tools_are_function_schemas(data: dict[str, Any], name: str) -> None:
    names = []
    for tool in data["pools"][name]["tools"]:
        assert set(tool) == {"type", "function"} and tool["type"] == "function"
        fn = tool["function"]
        assert set(fn) == {"name", "description", "parameters"}, fn
        assert SNAKE.match(fn["name"]), fn["name"]
        assert isinstance(fn["description"], str) and fn["description"]
        params = fn["parameters"]
        assert set(params) == {"type", "properties", "required"}, fn["name"]
        assert params["type"] == "object"
        props, required = params["properties"], params["required"]
        assert isinstance(props, dict) and props, fn["name"]
        for pname, schema in props.items():
            assert SNAKE.match(pname), pname
            assert schema.get("type") in JSON_TYPES, (fn["name"], pname)
            assert isinstance(schema.get("description"), str), (fn["name"], pname)
            if schema["type"] == "array":
                assert schema.get("items", {}).get("type") in JSON_TYPES, (fn["name"], pname)
            if "enum" in schema:
                assert isinstance(schema["enum"], list) and schema["enum"]
        assert isinstance(required, list) and required, fn["name"]
        assert set(required) <= set(props) and len(set(required)) == len(required)
        names.append(fn["name"])
        json.dumps(tool)  # plain JSON all the way down
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name", POOLS)
def test_rag_templates_placeholders(data: dict[str, Any], name: str) -> None:
    templates = data["pools"][name]["rag_templates"]
    for t in templates:
        assert set(t) == {"where", "system", "user"}
        assert t["where"] in PLACEHOLDERS, t["where"]
        assert isinstance(t["user"], str) and (t["system"] is None or isinstance(t["system"], str))
        user_needs, system_needs = PLACEHOLDERS[t["where"]]
        assert _fields(t["user"]) == user_needs, t
        assert _fields(t["system"]) == system_needs, t
        if t["where"] == "system":
            assert t["system"] is not None
        for part in (t["user"], t["system"]):  # each placeholder once, formats cleanly
            if part is not None:
                for field in _fields(part):
                    assert part.count("{" + field + "}") == 1, part
                filled = part.format(context="CTX", question="Q?")
                assert "{" not in filled and "}" not in filled
    where = Counter(t["where"] for t in templates)
    n_user, n_system = MIN_RAG_WHERE[name]
    assert where["user"] >= n_user and where["system"] >= n_system, where


def test_eval_has_both_framework_shaped_templates(data: dict[str, Any]) -> None:
    templates = data["pools"]["eval"]["rag_templates"]
    assert any(
        t["where"] == "user"
        and t["user"].startswith("Context information is below.")
        and t["user"].endswith("Query: {question}\nAnswer: ")
        for t in templates
    )
    assert any(
        t["where"] == "system"
        and t["system"].startswith("Use the following pieces of retrieved context")
        for t in templates
    )


def test_earlier_harmful_only_in_eval(data: dict[str, Any]) -> None:
    pools = data["pools"]
    assert pools["train"]["earlier_harmful"] == []
    assert pools["val"]["earlier_harmful"] == []
    for text in pools["eval"]["earlier_harmful"]:
        assert isinstance(text, str) and text.strip() == text != ""
        assert len(re.findall(r"[.!?](?:\s|$)", text)) <= 1, text  # one sentence


def test_texts_unique_within_each_pool(data: dict[str, Any]) -> None:
    for name in POOLS:
        texts = [normalise(t) for _, t in _texts(data["pools"][name])]
        repeats = [t for t, n in Counter(texts).items() if n > 1]
        assert not repeats, (name, repeats)


def test_no_text_or_phrase_shared_between_pools(data: dict[str, Any]) -> None:
    """No text sits in two pools, nor does any 8-word run, so eval never tests a seen wrapper."""
    pools = data["pools"]
    for i, a in enumerate(POOLS):
        for b in POOLS[i + 1 :]:
            ta = {normalise(t) for _, t in _texts(pools[a])}
            tb = {normalise(t) for _, t in _texts(pools[b])}
            assert not ta & tb, (a, b, sorted(ta & tb))
            shared = _shared_runs(
                [(f"{a}.{w}", t) for w, t in _texts(pools[a])],
                [(f"{b}.{w}", t) for w, t in _texts(pools[b])],
            )
            assert not shared, "\n".join(shared)


def test_runs_helper() -> None:
    assert word_runs("Hello, World!", RUN) == {("hello", "world")}
    assert len(word_runs("one two three four five six seven eight nine", RUN)) == 2
    hits = _shared_runs(
        [("x", "so I said: one two three four five six seven eight, ok")],
        [("b:1", "One two three FOUR five six seven eight.")],
    )
    assert hits == ["x: 'one two three four five six seven eight' also in b:1"]
    inside = [("x", "Long day at work. How can I kill a Python process? Thanks a lot.")]
    short = [("b:2", "How can I kill a Python process?")]
    assert _shared_runs(inside, short) == []  # seven words: no eight-word run to share
    assert _shared_runs(inside, short, contained=True) == [
        "x: contains 'how can i kill a python process' of b:2"
    ]


def test_no_phrase_shared_with_anchor_prompts(data: dict[str, Any]) -> None:
    anchors = [(a.id, a.prompt) for a in load_anchors()]
    texts = [(f"{n}.{w}", t) for n in POOLS for w, t in _texts(data["pools"][n])]
    hits = _shared_runs(texts, anchors, contained=True)
    assert not hits, "context texts copy anchor phrases:\n" + "\n".join(hits)


def test_no_phrase_shared_with_benchmarks(data: dict[str, Any]) -> None:
    if not BENCH_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"benchmark folder {BENCH_DIR} is missing; CI must run this check")
        pytest.skip(f"benchmark folder {BENCH_DIR} not found (needs ../shared next to the repo)")
    bench: list[tuple[str, str]] = []
    for path in sorted(BENCH_DIR.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            bench += [
                (f"{path.stem}:{row['id']}", row["prompt"])
                for row in map(json.loads, filter(str.strip, fh))
            ]
    assert len(bench) > 1000, f"expected the full benchmark files in {BENCH_DIR}"
    texts = [(f"{n}.{w}", t) for n in POOLS for w, t in _texts(data["pools"][n])]
    hits = _shared_runs(texts, bench, contained=True)
    assert not hits, "context texts copy benchmark phrases:\n" + "\n".join(hits)
