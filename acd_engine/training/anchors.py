"""The project's own OPO anchor set: labelled prompts used to optimise the safety prompts.

Why a hand-written set: Opposite Prompt Optimisation needs examples of requests a model should
refuse and requests it should answer. Every public prompt set we evaluate on (AdvBench, XSTest,
AlpacaEval, ...) is off limits for this (training on the test set would inflate every number
we report), so ``resources/anchors.jsonl`` was written for this project and is checked for
overlap against those sets by ``tests/training/test_anchors.py``, using :func:`normalise` and
:func:`trigram_jaccard` from this module.

The benign half deliberately includes ``kind="lookalike"`` prompts (homonyms such as "kill a
process", fiction, history, safety advice, privacy-protective questions). Without them a
prompt optimised on this set learns the shortcut "refuse anything with a scary word in it".
The harmful half is phrased three ways, recorded as ``kind``: ``plain`` (mostly imperative
requests), ``question`` (how / why / which / what-if questions asking for the same kind of
help) and ``framed`` (role-play, fiction and hypothetical wrappers around a harmful request),
so a prompt or probe trained on it does not learn "harmful = imperative".
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from acd_engine.config import format_errors
from acd_engine.errors import ConfigError

__all__ = [
    "SPLITS",
    "Anchor",
    "anchor_set_hash",
    "extended_anchor_file",
    "load_anchors",
    "near_copies",
    "normalise",
    "shared_runs",
    "shingles",
    "trigram_jaccard",
    "word_runs",
]

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "all"]
SPLITS: tuple[str, ...] = ("train", "val", "all")
"""Values accepted by :func:`load_anchors`; ``all`` means train and val together."""

_RESOURCE = "anchors.jsonl"
_ID_PREFIX = {"harmful": "anchor-h-", "benign": "anchor-b-"}
_HARMFUL_ONLY_KINDS = ("question", "framed")
_PUNCT = re.compile(r"[^\w\s]")


class Anchor(BaseModel):
    """One labelled prompt of the anchor set.

    ``kind`` is ``lookalike`` for benign prompts that merely look risky; it is kept as a field so
    a trainer can report over-refusal on lookalikes separately, which is where a too-eager safety
    prompt shows first. Harmful prompts are ``plain``, ``question`` (question-style requests) or
    ``framed`` (role-play and hypothetical framings); benign ones are ``plain`` or ``lookalike``,
    so ``label == "benign" and kind == "plain"`` stays the ordinary-task group. The id prefix
    encodes the label (``anchor-h-``/``anchor-b-``) so a mislabelled line cannot slip in
    unnoticed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^anchor-[hb]-\d{4}$")
    prompt: str = Field(min_length=1)
    label: Literal["harmful", "benign"]
    category: str = Field(min_length=1)
    split: Literal["train", "val"]
    kind: Literal["plain", "lookalike", "question", "framed"]

    @model_validator(mode="after")
    def _consistent(self) -> Anchor:
        if not self.id.startswith(_ID_PREFIX[self.label]):
            raise ValueError(
                f"id must start with '{_ID_PREFIX[self.label]}' for label '{self.label}', "
                f"got '{self.id}'"
            )
        if self.kind == "lookalike" and self.label != "benign":
            raise ValueError(f"kind 'lookalike' must have label 'benign', got '{self.label}'")
        if self.kind in _HARMFUL_ONLY_KINDS and self.label != "harmful":
            raise ValueError(f"kind '{self.kind}' must have label 'harmful', got '{self.label}'")
        if self.prompt != self.prompt.strip():
            raise ValueError("prompt must not start or end with whitespace")
        return self


def _read_bytes(path: Path | None) -> tuple[bytes, str]:
    """Return the anchor file's bytes and a name for messages (packaged file unless ``path``).

    A user's file may be missing, a folder or unreadable: that is bad input, so it becomes a
    :class:`ConfigError` (the CLI's ``error:`` line), not an ``OSError`` traceback.
    """
    if path is not None:
        try:
            return Path(path).read_bytes(), str(path)
        except OSError as exc:
            raise ConfigError(
                f"anchors file must be a readable file, got '{path}' ({exc.strerror or exc})"
            ) from None
    res = resources.files("acd_engine") / "resources" / _RESOURCE
    return res.read_bytes(), f"acd_engine/resources/{_RESOURCE}"


def load_anchors(split: Split = "all", path: Path | None = None) -> list[Anchor]:
    """Read and validate the anchor set, in file order.

    Args:
        split: ``"train"`` for optimisation, ``"val"`` for early stopping and model selection,
            ``"all"`` for both. Keeping val out of optimisation is what makes its over-refusal
            number an honest estimate.
        path: A JSONL file in the same schema, instead of the packaged set.

    Returns:
        The anchors of that split.

    Raises:
        ConfigError: (a ``ValueError``) for an unknown split, a malformed line, or a repeated
            id or prompt; the message names the file and line.
    """
    if split not in SPLITS:
        choices = ", ".join(f"'{s}'" for s in SPLITS)
        raise ConfigError(f"split must be one of {choices}, got {split!r}")
    data, where = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is harmless
    except UnicodeDecodeError as exc:
        bad_line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{where} must be UTF-8 text, got an invalid byte at line {bad_line} "
            f"(offset {exc.start})"
        ) from None
    anchors: list[Anchor] = []
    seen_ids: set[str] = set()
    seen_prompts: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            anchor = Anchor.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} line {lineno} must be a valid anchor: {exc}") from None
        except ValidationError as exc:
            problems = format_errors(exc, Anchor).replace("\n", "; ")  # one line for the CLI
            raise ConfigError(f"{where} line {lineno} must be a valid anchor: {problems}") from None
        except RecursionError:
            raise ConfigError(
                f"{where} line {lineno} must be a valid anchor, got JSON nested too deeply"
            ) from None
        if anchor.id in seen_ids:
            raise ConfigError(f"{where} line {lineno} must have a unique id, got '{anchor.id}'")
        key = normalise(anchor.prompt)
        if key in seen_prompts:
            raise ConfigError(
                f"{where} line {lineno} must have a unique prompt, got a repeat of "
                f"'{seen_prompts[key]}'"
            )
        seen_ids.add(anchor.id)
        seen_prompts[key] = anchor.id
        anchors.append(anchor)
    if split != "all":
        anchors = [a for a in anchors if a.split == split]
    logger.debug("loaded %d anchors (split=%s) from %s", len(anchors), split, where)
    return anchors


def anchor_set_hash(path: Path | None = None) -> str:
    """Return the sha256 hex digest of the anchor file's bytes.

    Recorded next to every optimised prompt pack so a result can be traced to the exact anchor
    set it was trained on; any edit to the file changes the hash.
    """
    data, _ = _read_bytes(path)
    return hashlib.sha256(data).hexdigest()


def extended_anchor_file(extra: Path, dest: Path) -> Path:
    """Write the packaged anchors followed by ``extra``'s rows to ``dest`` and return it.

    Why: candidate anchors (ids continuing the packaged ones) stay out of the package until a
    gate fitted on them ships, since the shipped gate records the hash of the set it was
    fitted on. A study fits on, and a test checks, the set they would make; this file is that
    set, readable by :func:`load_anchors` and ``acd gate --anchors``. Appended, not merged:
    the packaged rows keep their order, so their placements (drawn in file order) stay the
    same."""
    data, _ = _read_bytes(None)
    extra_data, _ = _read_bytes(extra)
    dest.write_bytes(data + extra_data)
    return dest


def normalise(text: str) -> str:
    """Lower-case, drop punctuation and collapse whitespace, for duplicate detection.

    ``"Don't  DO it!"`` becomes ``"dont do it"``, so trivial edits (case, quotes, a question
    mark) do not hide a copied prompt.
    """
    return " ".join(_PUNCT.sub("", text.lower()).split())


def shingles(text: str) -> frozenset[tuple[str, ...]]:
    """Return the word trigrams of ``normalise(text)``; single words if it has fewer than 3.

    The fallback keeps one- and two-word prompts comparable (they have no trigrams at all).
    """
    words = normalise(text).split()
    if len(words) < 3:
        return frozenset((w,) for w in words)
    return frozenset(zip(words, words[1:], words[2:], strict=False))


def word_runs(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """Every run of ``n`` words of ``normalise(text)``; the whole text as one run if it is
    shorter (so a short text is still compared, by equality).

    A shared run of eight words means a copied phrase rather than a common idiom: the tests
    hold the anchors and the wrapper texts apart from every benchmark prompt with it, where
    a phrase copied into a longer text leaves :func:`trigram_jaccard` low.
    """
    words = normalise(text).split()
    if len(words) < n:
        return frozenset({tuple(words)}) if words else frozenset()
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def trigram_jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the :func:`shingles` of two texts, in ``[0, 1]``.

    Word trigrams catch near-copies (a prompt with a word or two changed scores high) while
    prompts that merely share a topic or an opening like "How do I" score low. Two empty texts
    score 0.0, not 1.0, so blank input never counts as a duplicate.
    """
    sa, sb = shingles(a), shingles(b)
    union = len(sa | sb)
    return len(sa & sb) / union if union else 0.0


def near_copies(
    texts: Sequence[tuple[str, str]], others: Sequence[tuple[str, str]], threshold: float = 0.5
) -> list[tuple[str, str]]:
    """``(where, message)`` for each text, named by ``where``, that equals one of ``others``
    after :func:`normalise` or whose :func:`trigram_jaccard` with one is at least
    ``threshold``.

    Why one function: the anchors' tests, and any study that needs prompts disjoint from the
    evaluation benchmarks, hold their texts apart from the benchmarks by the same rule. An
    inverted index from shingle to ``others`` keeps this linear in practice: only entries
    sharing a trigram with a text are scored (the Jaccard of the two shingle sets, as
    :func:`trigram_jaccard` computes it).
    """
    exact = {normalise(p): oid for oid, p in others}
    other_sh = [shingles(p) for _, p in others]
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, sh in enumerate(other_sh):
        for gram in sh:
            index[gram].append(i)
    hits: list[tuple[str, str]] = []
    for where, text in texts:
        if normalise(text) in exact:
            hits.append((where, f"{where} == {exact[normalise(text)]} (exact): {text!r}"))
        sh = shingles(text)
        shared: Counter[int] = Counter()
        for gram in sh:
            shared.update(index.get(gram, ()))
        for i, n in shared.items():
            jac = n / (len(sh) + len(other_sh[i]) - n)
            if jac >= threshold:
                oid, other = others[i]
                hits.append((where, f"{where} ~ {oid} (J={jac:.2f}): {text!r} vs {other!r}"))
    return hits


def shared_runs(
    texts: Sequence[tuple[str, str]],
    others: Sequence[tuple[str, str]],
    n: int = 8,
    *,
    contained: bool = False,
) -> list[tuple[str, str]]:
    """``(where, message)`` for each run of ``n`` words (:func:`word_runs`) that a text shares
    with one of ``others``.

    A phrase copied into a longer text leaves :func:`near_copies` under its threshold; a
    shared run of eight words catches it. With ``contained``, an ``others`` entry shorter
    than ``n`` words also counts when it appears whole inside a text (a short benchmark
    prompt pasted into a padding paragraph).
    """
    index: dict[tuple[str, ...], str] = {}
    short: dict[str, str] = {}
    for oid, other in others:
        for run in word_runs(other, n):
            index.setdefault(run, oid)
        if contained and 0 < len(normalise(other).split()) < n:
            short.setdefault(f" {normalise(other)} ", oid)
    hits: list[tuple[str, str]] = []
    for where, text in texts:
        hits += [
            (where, f"{where}: {' '.join(r)!r} also in {index[r]}")
            for r in sorted(word_runs(text, n))
            if r in index
        ]
        padded = f" {normalise(text)} "
        hits += [
            (where, f"{where}: contains {s.strip()!r} of {oid}")
            for s, oid in short.items()
            if s in padded
        ]
    return hits
