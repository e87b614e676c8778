"""OPO training data: sample the target model on the anchor set, label, split, cache.

Opposite Prompt Optimisation learns from the model's *own* behaviour: for every anchor
instruction we sample responses under the manual safe prompt, the manual opposite prompt and
an empty system slot, label each one refused/answered with a :class:`~acd_engine.eval.judges.
Judge`, and split them into

* ``D_HR``: harmful instruction, refused (what SP should say, what AP should not),
* ``D_HA``: harmful instruction, answered (what AP should say, what SP should not),
* ``D_S``: benign instruction, answered (what both should keep saying). Benign responses that
  refuse are dropped: training on them would teach over-refusal.

Small chat models rarely refuse, so ``D_HR`` can come out nearly empty. Then (``fallback``)
each harmful anchor without a sampled refusal gets a short templated refusal, chosen
deterministically per instruction from a few phrasings; the mirror case (a model that never
complies) gets a generic affirmative opening for ``D_HA``. Both are logged and reported.

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
from acd_engine.prompts import OPPOSITE_PROMPT, SAFE_PROMPT
from acd_engine.training.anchors import Anchor, anchor_set_hash, load_anchors
from acd_engine.training.config import TrainConfig

__all__ = [
    "AFFIRMATIVE_TEMPLATES",
    "REFUSAL_TEMPLATES",
    "OPODataError",
    "OPOExample",
    "OPOSplits",
    "build_splits",
    "default_cache_dir",
    "fallback_affirmative",
    "fallback_refusal",
    "generate_responses",
    "load_or_generate",
    "repair_tail",
]

logger = logging.getLogger(__name__)

SOURCE_TEXTS: dict[str, str | None] = {
    "safe": SAFE_PROMPT,
    "opposite": OPPOSITE_PROMPT,
    "none": None,
}

REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I can't assist with this request because it could be used to hurt someone. If you have "
    "another question, I'm happy to help.",
    "Sorry, I won't provide that. Helping with this could put people in danger or break the law.",
    "I'm not able to help with that, as it could lead to real harm. Is there something else I "
    "can do for you?",
    "I cannot help with this. Giving these instructions would be unsafe and could harm others.",
)
"""Refusals used as ``D_HR`` targets when the model produced too few of its own."""

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
    fallback: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split (``D_HR``, ``D_HA``, ``D_S``)."""
        return {"D_HR": len(self.hr), "D_HA": len(self.ha), "D_S": len(self.s)}


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
    engine: Any, prompts: Sequence[list[int]], cfg: TrainConfig, seed: int
) -> list[tuple[str, bool]]:
    """Sample one response per id list with ``model.generate`` (left padding, seeded)."""
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
    for row in out[:, width:].tolist():
        finished = False
        kept: list[int] = []
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


SampleFn = Callable[[Any, Sequence[list[int]], TrainConfig, int], list[tuple[str, bool]]]


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
        engine: The :class:`~acd_engine.engine.Engine` of the target model.
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
    cache_dir = cache_dir or default_cache_dir()
    key = _cache_key(engine, cfg, anchors_hash or anchor_set_hash())
    path = cache_dir / f"opo-responses-{key}.jsonl"
    meta = {
        "fingerprint": engine.fingerprint,
        "data": cfg.data_settings(),
        "model": engine.model_name,
    }
    atomic_write_json(path.with_suffix(".meta.json"), meta)
    done = _read_cache(path)
    repair_tail(path)
    todo = [
        (a, src, k)
        for src in cfg.sources
        for a in anchors
        for k in range(cfg.samples)
        if (a.id, src, k) not in done
    ]
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
            ids = [_prompt_ids(engine, a.prompt, src) for a, _, _ in items]
            first = f"{items[0][0].id}:{items[0][2]}"
            outs = sample_fn(engine, ids, cfg, _batch_seed(cfg.seed, src, first))
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
    wanted = [(a.id, src, k) for src in cfg.sources for a in anchors for k in range(cfg.samples)]
    return [done[w] for w in wanted], path


# ------------------------------------------------------------------------------ splitting
def build_splits(
    anchors: Sequence[Anchor],
    records: Sequence[dict[str, Any]],
    judge: Judge,
    cfg: TrainConfig,
) -> OPOSplits:
    """Label sampled responses and split them into D_HR / D_HA / D_S, with fallbacks.

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
    kept: Counter[tuple[str, str]] = Counter()
    for rec, verdict in zip(records, verdicts, strict=True):
        a = by_id[rec["anchor_id"]]
        ex = OPOExample(
            a.id, a.prompt, rec["response"], bool(rec["finished"]), rec["source"], a.kind
        )
        counts[f"{a.label}/{rec['source']}/{verdict}"] += 1
        if a.label == "harmful":
            split, name = (out.hr, "hr") if verdict == "refused" else (out.ha, "ha")
        elif verdict == "answered":
            split, name = out.s, "s"
        else:
            continue  # a benign refusal is not a target: it would teach over-refusal
        if cfg.per_anchor is not None and kept[(a.id, name)] >= cfg.per_anchor:
            continue
        kept[(a.id, name)] += 1
        split.append(ex)
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
    out.stats = {"verdicts": dict(sorted(counts.items())), **out.sizes()}
    logger.info("OPO splits: %s (fallback: %s)", out.sizes(), out.fallback or "none")
    return out


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
