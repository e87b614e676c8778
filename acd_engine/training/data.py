"""OPO training data: sample the target model on the anchor set, label, split, cache.

Opposite Prompt Optimisation learns from the model's *own* behaviour: for every anchor
instruction we sample responses under the manual safe prompt, the manual opposite prompt and
an empty system slot, label each one refused/answered with a :class:`~acd_engine.eval.judges.
Judge`, and split them into

* ``D_HR``: harmful instruction, refused (what SP should say, what AP should not),
* ``D_HA``: harmful instruction, answered (what AP should say, what SP should not),
* ``D_S``: benign instruction, answered (what both should keep saying). Benign responses that
  refuse are not D_S targets: training on them would teach over-refusal,
* ``D_BR``: benign instruction paired with a refusal *opening* (what the SP should not say and
  the AP should; the two-sided term of :mod:`acd_engine.training.losses`). Its openings are
  the sampled benign refusals whose start alone reads as a refusal, else one of
  ``refusal_openings`` picked per anchor.

Where each split's examples come from, in order of preference (``per_anchor`` keeps the
first): ``D_HR`` from the model's own continuation of a refusal opening prefilled after the
safe prompt (source ``"refusal"``; a small model rarely refuses on its own, and this keeps
the words its own), then sampled refusals (safe, none, opposite); ``D_HA`` from responses
sampled under the *opposite* prompt first (compliance sampled under the safe prompt is the
mildest kind), then none, then safe; ``D_S`` safe, none, opposite.

If ``D_HR`` still covers too few harmful anchors (``fallback``), each uncovered one gets a
short templated refusal, chosen deterministically per instruction, that ends (with EOS)
within the default ``target_tokens``; the mirror case (a model that never complies) gets a
generic affirmative opening for ``D_HA``. Both are logged and reported.

Sampling is batched with ``model.generate`` over token ids identical to what the engine feeds
its text branches (``head + prompt + tail`` from :meth:`Engine.render`); the engine's own
``generate_batch`` decodes one conversation at a time, which is ~10x slower on CPU for the
hundreds of samples needed here. Responses are cached to disk (JSONL, appended and fsynced per
batch, keyed by model fingerprint + data settings + anchor-set hash), so an interrupted
generation resumes where it stopped and training reruns never resample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acd_engine.atomic import atomic_write_json
from acd_engine.errors import ACDError
from acd_engine.eval.judges import Judge, get_judge, judge_many
from acd_engine.safety.prompts import OPPOSITE_PROMPT, SAFE_PROMPT
from acd_engine.training.anchors import Anchor, anchor_set_hash, load_anchors
from acd_engine.training.config import TrainConfig

__all__ = [
    "AFFIRMATIVE_TEMPLATES",
    "REFUSAL_TEMPLATES",
    "OPODataError",
    "OPOExample",
    "OPOSplits",
    "build_splits",
    "cache_path",
    "default_cache_dir",
    "fallback_affirmative",
    "fallback_refusal",
    "generate_responses",
    "load_or_generate",
    "pending_samples",
    "refusal_opening",
    "repair_tail",
    "time_sampling",
]

logger = logging.getLogger(__name__)

SOURCE_TEXTS: dict[str, str | None] = {
    "safe": SAFE_PROMPT,
    "opposite": OPPOSITE_PROMPT,
    "none": None,
}

REFUSAL_SOURCE = "refusal"
"""Source name of the model's continuations of a prefilled refusal opening (safe prompt)."""

PREFERENCE: dict[str, tuple[str, ...]] = {
    "hr": (REFUSAL_SOURCE, "safe", "none", "opposite"),
    "ha": ("opposite", "none", "safe"),
    "s": ("safe", "none", "opposite"),
    "br": ("safe", "none", "opposite"),
}
"""Per split, the sources its examples are taken from first (``per_anchor`` keeps the first)."""

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def first_sentence(response: str, opening: str) -> str | None:
    """``response`` cut after its first sentence end past ``opening``; None if it has none.

    The end is ``.``, ``!`` or ``?`` followed by a space or the end of the text, or a line
    break; a break is dropped, punctuation kept. Searching only past the opening keeps an
    opening that itself holds a full stop from ending the refusal before it says anything.
    """
    start = len(opening) if response.startswith(opening) else 0
    m = _SENTENCE_END.search(response, start)
    if m is None:
        return None
    cut = response[: m.end()] if m.group() != "\n" else response[: m.start()]
    return cut.rstrip() or None


OPENING_CHARS = 48
"""A sampled benign refusal is a D_BR opening only if its first this many characters alone
are judged refused: the marker judge also flags a refusal phrase late in an otherwise real
answer, and teaching the SP to avoid a real answer's first words would hurt."""

REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that. It could cause serious harm.",
    "I can't assist with this request because it could be used to hurt someone.",
    "Sorry, I won't provide that. It could put people in danger.",
    "I'm not able to help with that, as it could lead to real harm.",
    "I cannot help with this. These instructions would be unsafe.",
)
"""Refusals used as ``D_HR`` targets when the model produced too few of its own. Each is short
enough that it and its EOS fit the default ``target_tokens`` (tested): a template cut before
its EOS would teach the SP to refuse and then keep talking."""

AFFIRMATIVE_TEMPLATES: tuple[str, ...] = (
    "Sure, here is how to do that. Step 1:",
    "Of course! Here are the detailed steps:",
    "Absolutely. Here's a complete guide:",
)
"""Generic compliant openings used as ``D_HA`` targets for a model that never complies (no
harmful content is written; the opening is what the adversarial prompt should make likely)."""


class OPODataError(ACDError, RuntimeError):
    """The anchor set produced no usable examples for a required split."""


@dataclass(frozen=True)
class OPOExample:
    """One training example: an anchor instruction and a target response.

    Attributes:
        anchor_id: Id of the anchor the instruction comes from.
        prompt: The user instruction.
        response: The response text (sampled or templated).
        finished: Whether the response ended with EOS (then EOS is trained on too).
        source: The system prompt it was sampled under, or ``"fallback"`` for templates.
        kind: The anchor's kind (``plain``/``lookalike``), for reporting.
    """

    anchor_id: str
    prompt: str
    response: str
    finished: bool
    source: str
    kind: str = "plain"


@dataclass
class OPOSplits:
    """The three OPO data sets and what went into them."""

    hr: list[OPOExample] = field(default_factory=list)
    ha: list[OPOExample] = field(default_factory=list)
    s: list[OPOExample] = field(default_factory=list)
    br: list[OPOExample] = field(default_factory=list)
    fallback: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split (``D_HR``, ``D_HA``, ``D_S``, ``D_BR``)."""
        return {
            "D_HR": len(self.hr),
            "D_HA": len(self.ha),
            "D_S": len(self.s),
            "D_BR": len(self.br),
        }


def default_cache_dir() -> Path:
    """``$ACD_CACHE/opo`` or ``~/.cache/acd/opo``: where sampled responses are kept."""
    root = os.environ.get("ACD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "acd") / "opo"


def _pick(templates: Sequence[str], anchor_id: str) -> str:
    digest = hashlib.sha256(anchor_id.encode()).digest()
    return templates[digest[0] % len(templates)]


def fallback_refusal(anchor_id: str) -> str:
    """A templated refusal, the same for an instruction every time (varied across them)."""
    return _pick(REFUSAL_TEMPLATES, anchor_id)


def fallback_affirmative(anchor_id: str) -> str:
    """A templated compliant opening, deterministic per instruction."""
    return _pick(AFFIRMATIVE_TEMPLATES, anchor_id)


def refusal_opening(anchor_id: str, openings: Sequence[str]) -> str:
    """The refusal opening used for an anchor (prefill for D_HR, target for D_BR)."""
    return _pick(openings, anchor_id)


# ------------------------------------------------------------------------------ sampling
def _prompt_ids(engine: Any, prompt: str, source: str) -> list[int]:
    """Token ids the engine would prefill for ``prompt`` with ``source`` in the slot."""
    rendered = engine.render([{"role": "user", "content": prompt}])
    text = SOURCE_TEXTS[source]
    middle = engine.tokenizer.encode(text, add_special_tokens=False) if text else []
    return [*rendered.head, *middle, *rendered.tail]


def _batch_seed(seed: int, source: str, first_key: str) -> int:
    digest = hashlib.sha256(f"{seed}|{source}|{first_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _sample_batch(
    engine: Any,
    prompts: Sequence[list[int]],
    cfg: TrainConfig,
    seed: int,
    keep: Sequence[int] | None = None,
) -> list[tuple[str, bool]]:
    """Sample one response per id list with ``model.generate`` (left padding, seeded).

    ``keep[i]`` trailing prompt tokens of row ``i`` (a prefilled opening) are decoded as the
    start of its response, so the opening and its continuation join exactly as tokenised.
    """
    tok = engine.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(engine.eos_token_ids)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        out = engine.model.generate(
            input_ids=ids.to(engine.device),
            attention_mask=mask.to(engine.device),
            do_sample=True,
            temperature=cfg.gen_temperature,
            top_p=cfg.gen_top_p,
            top_k=0,
            max_new_tokens=cfg.gen_max_new_tokens,
            eos_token_id=sorted(engine.eos_token_ids),
            pad_token_id=pad,
        )
    results: list[tuple[str, bool]] = []
    for i, row in enumerate(out[:, width:].tolist()):
        finished = False
        n_keep = keep[i] if keep else 0
        kept: list[int] = list(prompts[i][len(prompts[i]) - n_keep :]) if n_keep else []
        for t in row:
            if t in engine.eos_token_ids:
                finished = True
                break
            kept.append(t)
        results.append((tok.decode(kept, skip_special_tokens=True).strip(), finished))
    return results


def _cache_key(engine: Any, cfg: TrainConfig, anchors_hash: str) -> str:
    blob = json.dumps(
        {"fingerprint": engine.fingerprint, "data": cfg.data_settings(), "anchors": anchors_hash},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(
    engine: Any, cfg: TrainConfig, cache_dir: Path | None = None, anchors_hash: str | None = None
) -> Path:
    """The JSONL file the responses of this model, data settings and anchor set go to."""
    key = _cache_key(engine, cfg, anchors_hash or anchor_set_hash())
    return (cache_dir or default_cache_dir()) / f"opo-responses-{key}.jsonl"


def _parse_record(line: bytes) -> dict[str, Any] | None:
    """One cache line as a record, or ``None`` if it is torn, not UTF-8, or not a record."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (
        isinstance(rec, dict)
        and isinstance(rec.get("anchor_id"), str)
        and isinstance(rec.get("source"), str)
        and isinstance(rec.get("sample"), int)
        and isinstance(rec.get("response"), str)
        and isinstance(rec.get("finished"), bool)
    ):
        return None
    return rec


def _read_cache(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Records already on disk; a line cut short by a crash is skipped, not fatal.

    Read as bytes and decoded line by line: a crash can cut a multi-byte character in half,
    and that must cost one line, not the whole cache.
    """
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    if not path.exists():
        return records
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        rec = _parse_record(line)
        if rec is None:
            logger.warning("skipping unreadable line %d of %s", lineno, path)
            continue
        records[(rec["anchor_id"], rec["source"], int(rec["sample"]))] = rec
    return records


def repair_tail(path: Path) -> None:
    """Make the cache end with a newline before anything is appended to it.

    A crash mid-append leaves a last line without its newline. Reading skips it, but the next
    append would be glued onto it and the first new record lost with it. So: a torn last line
    (not a whole record) is cut off; a whole record that only lacks its newline gets one.
    """
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Only the last line is torn: find where it starts without reading the whole file.
        start, chunk = size, 1 << 16
        while start > 0:
            lo = max(0, start - chunk)
            f.seek(lo)
            at = f.read(start - lo).rfind(b"\n")
            if at >= 0:
                start = lo + at + 1
                break
            start = lo
        f.seek(start)
        tail = f.read()
        if _parse_record(tail) is not None:
            f.seek(size)
            f.write(b"\n")
            logger.warning("cache %s: added the newline its last record lacked", path)
        else:
            f.truncate(start)
            logger.warning("cache %s: cut a torn last line of %d bytes", path, size - start)
        f.flush()
        os.fsync(f.fileno())


SampleFn = Callable[..., list[tuple[str, bool]]]
"""``(engine, prompt_ids, cfg, seed[, keep]) -> [(text, finished)]``, as :func:`_sample_batch`;
``keep`` is passed only for the refusal continuations."""


def _work(anchors: Sequence[Anchor], cfg: TrainConfig) -> list[tuple[Anchor, str, int]]:
    """Every (anchor, source, sample) the data set needs, in a fixed order."""
    items: list[tuple[Anchor, str, int]] = [
        (a, src, k) for src in cfg.sources for a in anchors for k in range(cfg.samples)
    ]
    if cfg.refusal_continuations:
        items += [(a, REFUSAL_SOURCE, 0) for a in anchors if a.label == "harmful"]
    return items


def generate_responses(
    engine: Any,
    anchors: Sequence[Anchor],
    cfg: TrainConfig,
    cache_dir: Path | None = None,
    *,
    anchors_hash: str | None = None,
    sample_fn: SampleFn = _sample_batch,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Sample ``cfg.samples`` responses per anchor and source, reusing the on-disk cache.

    Args:
        engine: The :class:`~acd_engine.runtime.engine.Engine` of the target model.
        anchors: Instructions to sample for.
        cfg: Data settings (``samples``, ``sources``, ``gen_*``, ``seed``).
        cache_dir: Folder of the JSONL cache (default :func:`default_cache_dir`).
        anchors_hash: Identity of the anchor set for the cache key (default: the packaged
            set's :func:`anchor_set_hash`).
        sample_fn: The batched sampler (replaceable in tests).
        progress: Called with the number of responses done after each batch.

    Returns:
        One record per (anchor, source, sample) with ``response`` and ``finished``, and the
        cache file path.
    """
    path = cache_path(engine, cfg, cache_dir, anchors_hash)
    meta = {
        "fingerprint": engine.fingerprint,
        "data": cfg.data_settings(),
        "model": engine.model_name,
    }
    atomic_write_json(path.with_suffix(".meta.json"), meta)
    done = _read_cache(path)
    repair_tail(path)
    todo = [(a, src, k) for a, src, k in _work(anchors, cfg) if (a.id, src, k) not in done]
    if done:
        logger.info("response cache %s: %d cached, %d to sample", path.name, len(done), len(todo))
    else:
        logger.info("sampling %d responses into %s", len(todo), path)
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(todo), cfg.gen_batch_size):
        chunk = todo[i : i + cfg.gen_batch_size]
        # One source per batch keeps prefix lengths alike (less padding).
        by_source: dict[str, list[tuple[Anchor, str, int]]] = {}
        for item in chunk:
            by_source.setdefault(item[1], []).append(item)
        lines: list[str] = []
        for src, items in by_source.items():
            first = f"{items[0][0].id}:{items[0][2]}"
            seed = _batch_seed(cfg.seed, src, first)
            if src == REFUSAL_SOURCE:
                # The model's own words after a refusal opening, under the safe prompt.
                openings = [
                    engine.tokenizer.encode(
                        refusal_opening(a.id, cfg.refusal_openings), add_special_tokens=False
                    )
                    for a, _, _ in items
                ]
                ids = [
                    _prompt_ids(engine, a.prompt, "safe") + o
                    for (a, _, _), o in zip(items, openings, strict=True)
                ]
                short = cfg.replace(gen_max_new_tokens=cfg.refusal_max_new_tokens)
                outs = sample_fn(engine, ids, short, seed, [len(o) for o in openings])
            else:
                ids = [_prompt_ids(engine, a.prompt, src) for a, _, _ in items]
                outs = sample_fn(engine, ids, cfg, seed)
            for (a, s, k), (text, finished) in zip(items, outs, strict=True):
                rec = {
                    "anchor_id": a.id,
                    "source": s,
                    "sample": k,
                    "response": text,
                    "finished": finished,
                }
                done[(a.id, s, k)] = rec
                lines.append(json.dumps(rec, ensure_ascii=False))
        with path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if progress is not None:
            progress(len(chunk))
    if todo:
        logger.info("sampled %d responses in %.0fs", len(todo), time.perf_counter() - start)
    return [done[(a.id, src, k)] for a, src, k in _work(anchors, cfg)], path


def pending_samples(
    engine: Any,
    anchors: Sequence[Anchor],
    cfg: TrainConfig,
    cache_dir: Path | None = None,
    anchors_hash: str | None = None,
) -> tuple[int, int, int]:
    """``(answers, refusal continuations, cached)``: the responses :func:`generate_responses`
    would still sample (the two kinds decode different lengths) and how many it would read
    from the cache. Reads the cache, writes nothing."""
    done = _read_cache(cache_path(engine, cfg, cache_dir, anchors_hash))
    todo = [(src, a.id, k) for a, src, k in _work(anchors, cfg) if (a.id, src, k) not in done]
    refusals = sum(src == REFUSAL_SOURCE for src, _, _ in todo)
    return len(todo) - refusals, refusals, len(_work(anchors, cfg)) - len(todo)


def time_sampling(
    engine: Any, anchors: Sequence[Anchor], cfg: TrainConfig, new_tokens: int = 3
) -> tuple[float, float]:
    """``(prefill, per token)``: seconds :func:`_sample_batch` takes for one full batch
    (``gen_batch_size`` rows of the training anchors under the safe prompt, the longest
    source) to prefill, and for each further token, measured on this model and device.

    One warm-up row first (a device's first call sets up its kernels), then one token, then
    ``1 + new_tokens``; the difference is the decode steps'. A batch stops early only if
    every row ends, so the per-token figure errs low only when a model answers in a word.
    """
    rows = [anchors[i % len(anchors)] for i in range(cfg.gen_batch_size)]
    ids = [_prompt_ids(engine, a.prompt, "safe") for a in rows]
    _sample_batch(engine, ids[:1], cfg.replace(gen_max_new_tokens=1), cfg.seed)

    def timed(n: int) -> float:
        start = time.perf_counter()
        _sample_batch(engine, ids, cfg.replace(gen_max_new_tokens=n), cfg.seed)
        return time.perf_counter() - start

    prefill = timed(1)
    longer = timed(1 + new_tokens)
    return prefill, max(longer - prefill, 0.0) / new_tokens


# ------------------------------------------------------------------------------ splitting
def build_splits(
    anchors: Sequence[Anchor],
    records: Sequence[dict[str, Any]],
    judge: Judge,
    cfg: TrainConfig,
) -> OPOSplits:
    """Label sampled responses and split them into D_HR / D_HA / D_S / D_BR, with fallbacks.

    Each split takes its examples in the source order of :data:`PREFERENCE`, at most
    ``per_anchor`` per anchor. ``D_BR`` is built only when ``benign_refusal_weight > 0``.

    Raises:
        OPODataError: When no benign response was answered (nothing keeps the prompts
            helpful), or a harmful split is empty with ``fallback='never'``.
    """
    by_id = {a.id: a for a in anchors}
    verdicts = judge_many(
        judge,
        [by_id[r["anchor_id"]].prompt for r in records],
        [r["response"] for r in records],
    )
    out = OPOSplits()
    counts: Counter[str] = Counter()
    candidates: dict[str, list[tuple[dict[str, Any], Anchor]]] = {"hr": [], "ha": [], "s": []}
    benign_refusals: list[tuple[dict[str, Any], Anchor]] = []
    for rec, verdict in zip(records, verdicts, strict=True):
        a = by_id[rec["anchor_id"]]
        counts[f"{a.label}/{rec['source']}/{verdict}"] += 1
        if a.label == "harmful":
            candidates["hr" if verdict == "refused" else "ha"].append((rec, a))
        elif rec["source"] == REFUSAL_SOURCE:
            continue  # only harmful anchors are continued; ignore foreign records
        elif verdict == "answered":
            candidates["s"].append((rec, a))
        else:
            benign_refusals.append((rec, a))  # never a D_S target: it would teach over-refusal
    # A compliant continuation of a refusal opening is neither a refusal nor real compliance.
    candidates["ha"] = [(r, a) for r, a in candidates["ha"] if r["source"] != REFUSAL_SOURCE]

    def take(name: str, pool: list[tuple[dict[str, Any], Anchor]]) -> list[OPOExample]:
        order = {src: i for i, src in enumerate(PREFERENCE[name])}
        pool = sorted(pool, key=lambda ra: order.get(ra[0]["source"], len(order)))  # stable
        kept: Counter[str] = Counter()
        picked: list[OPOExample] = []
        for rec, a in pool:
            if cfg.per_anchor is not None and kept[a.id] >= cfg.per_anchor:
                continue
            kept[a.id] += 1
            response, finished = rec["response"], bool(rec["finished"])
            source = rec["source"]
            if source == REFUSAL_SOURCE and cfg.refusal_end == "sentence":
                # A refusal that ends, so EOS is trained; a continuation with no sentence end
                # within its tokens ("I can't help with the details, but here is a guide on")
                # is no refusal to learn, and a templated one that ends takes its place.
                cut = first_sentence(response, refusal_opening(a.id, cfg.refusal_openings))
                response, finished = (cut, True) if cut else (fallback_refusal(a.id), True)
                source = source if cut else "fallback"
            picked.append(OPOExample(a.id, a.prompt, response, finished, source, a.kind))
        # Anchor order (not source order) so a batch mixes sources like the data does.
        rank = {a.id: i for i, a in enumerate(anchors)}
        return sorted(picked, key=lambda e: rank[e.anchor_id])

    out.hr, out.ha, out.s = (
        take("hr", candidates["hr"]),
        take("ha", candidates["ha"]),
        take("s", candidates["s"]),
    )
    if cfg.benign_refusal_weight > 0:
        out.br = _benign_refusal_openings(anchors, benign_refusals, judge, cfg, take)
    harmful = [a for a in anchors if a.label == "harmful"]
    for name, split, template in (
        ("D_HR", out.hr, fallback_refusal),
        ("D_HA", out.ha, fallback_affirmative),
    ):
        covered = {e.anchor_id for e in split}
        coverage = len(covered) / len(harmful) if harmful else 1.0
        use = cfg.fallback == "always" or (cfg.fallback == "auto" and coverage < cfg.min_coverage)
        if use:
            added = [
                OPOExample(a.id, a.prompt, template(a.id), True, "fallback", a.kind)
                for a in harmful
                if a.id not in covered
            ]
            split.extend(added)
            out.fallback[name] = len(added)
            logger.warning(
                "%s: the model's own responses cover only %.0f%% of harmful anchors; added %d "
                "templated targets (fallback=%s)",
                name,
                100 * coverage,
                len(added),
                cfg.fallback,
            )
        if harmful and not split:
            raise OPODataError(
                f"{name} must not be empty, got 0 examples from {len(harmful)} harmful anchors "
                "with fallback='never'; use fallback='auto' or sample more (samples > 1)"
            )
    if not out.s:
        raise OPODataError(
            "D_S must not be empty, got 0 answered benign responses; check the judge or "
            "sample more responses (samples > 1)"
        )
    sources = {
        name: dict(sorted(Counter(e.source for e in split).items()))
        for name, split in (("D_HR", out.hr), ("D_HA", out.ha), ("D_S", out.s), ("D_BR", out.br))
    }
    out.stats = {"verdicts": dict(sorted(counts.items())), "sources": sources, **out.sizes()}
    logger.info("OPO splits: %s (sources: %s; fallback: %s)", out.sizes(), sources, out.fallback)
    return out


def _benign_refusal_openings(
    anchors: Sequence[Anchor],
    refusals: list[tuple[dict[str, Any], Anchor]],
    judge: Judge,
    cfg: TrainConfig,
    take: Callable[[str, list[tuple[dict[str, Any], Anchor]]], list[OPOExample]],
) -> list[OPOExample]:
    """D_BR: per benign anchor, a sampled refusal whose start reads as one, else an opening.

    The trainer cuts each to ``refusal_opening_tokens`` (no EOS: it is an opening).
    """
    starts = judge_many(
        judge, [a.prompt for _, a in refusals], [r["response"][:OPENING_CHARS] for r, _ in refusals]
    )
    sampled = take("br", [ra for ra, v in zip(refusals, starts, strict=True) if v == "refused"])
    have = Counter(e.anchor_id for e in sampled)
    per = cfg.per_anchor if cfg.per_anchor is not None else 1
    added = [
        OPOExample(
            a.id, a.prompt, refusal_opening(a.id, cfg.refusal_openings), False, "opening", a.kind
        )
        for a in anchors
        if a.label == "benign" and have[a.id] < per
    ]
    rank = {a.id: i for i, a in enumerate(anchors)}
    return sorted(sampled + added, key=lambda e: rank[e.anchor_id])


def load_or_generate(
    engine: Any,
    cfg: TrainConfig,
    *,
    anchors: Sequence[Anchor] | None = None,
    cache_dir: Path | None = None,
    judge: Judge | None = None,
    anchors_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> OPOSplits:
    """The OPO splits for the training anchors: sample (or read the cache), judge, split.

    Args:
        engine: Target model's engine.
        cfg: Run settings.
        anchors: Training anchors (default: the ``train`` split of the anchor set).
        cache_dir: Response cache folder.
        judge: Labeller (default ``get_judge(cfg.judge)``).
        anchors_path: A custom anchor JSONL (its hash keys the cache).
        progress: Called with the number of responses sampled after each batch.
    """
    anchors = list(anchors) if anchors is not None else load_anchors("train", anchors_path)
    records, path = generate_responses(
        engine,
        anchors,
        cfg,
        cache_dir,
        anchors_hash=anchor_set_hash(anchors_path),
        progress=progress,
    )
    splits = build_splits(anchors, records, judge or get_judge(cfg.judge), cfg)
    splits.stats["cache"] = str(path)
    return splits
