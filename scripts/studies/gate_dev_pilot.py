"""Does harm written by others rank our gates as the benchmarks do, where our val split does not?

Why this study exists. The second gate v7 candidate flagged as many harmful placements of
our val split as gate v6 (84.6 against 85.1 %), and on the paper protocol it refused far
less (avg HLR 39.6 against 56.6; docs/opo.md, "Gate v7: fitted by the second rule, not
shipped"). Gate v4 read as well as gate v6 on a bare val turn at the same budget and flagged
far more of the bare benchmarks. Our val anchors are written by the hands that wrote the
train anchors; the benchmarks are not. The closest stand-in for "harm we did not write" that
is not one of the evaluation benchmarks: HarmBench's standard behaviours (MIT; Mazeika et
al. 2024) and the prompts StrongREJECT's authors wrote themselves (their ``source`` is
``custom``; Souly et al. 2024). Neither is vendored: pass the CSV files.

What it does. Each prompt that does not overlap a benchmark in ``--benchmarks`` (the same
checks as the anchors': equal after :func:`normalise`, trigram Jaccard >= 0.5, or a shared
run of eight words) is placed in each ``--shapes`` shape with the ``val`` pool's wrapper
texts (seed: its index) and read by each pack's gate (``Engine.gate_verdict``: the gate's
own forward, scope, pooling and pool penalty), at that gate's own threshold. The share
flagged per shape and source, and the share at 0.5, are logged and written to ``--out``
with every score. With ``--budget F`` each gate is also read at the threshold that flags a
share F of our benign val anchors sent bare: one benign budget for every gate, so the
probes are compared and not their operating points. Only harmful prompts: it measures where each gate stands on others' harm,
not a benign budget; no gate or threshold is chosen from it.

Usage (from the repository root; the packs of earlier gates from git, e.g.
``git show 296d24a:acd_engine/resources/packs/smollm2-135m-instruct.safetensors > v6.st``)::

    python scripts/studies/gate_dev_pilot.py --harmbench harmbench_behaviors_text_all.csv \\
        --strongreject strongreject_dataset.csv --packs v4=v4.st,v6=v6.st \\
        --shapes bare,multi-turn,rag --out runs/gate-dev-pilot.json

Time on a 2-core CPU with the default model: about 25 s per gate for 417 bare prompts,
a minute as a third turn and two to three inside RAG prompts.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from acd_engine import DecodingConfig, get_engine
from acd_engine.atomic import atomic_write_json
from acd_engine.safety.contexts import check_contexts, load_pool, place
from acd_engine.training.anchors import load_anchors, near_copies, shared_runs

logger = logging.getLogger("gate_dev_pilot")

NEAR_DUP = 0.5  # trigram Jaccard, as tests/training/test_anchors.py
RUN = 8  # words


def read_dev(harmbench: Path, strongreject: Path | None) -> list[tuple[str, str]]:
    """(source, prompt): HarmBench's standard behaviours, then StrongREJECT's own prompts."""
    rows: list[tuple[str, str]] = []
    with harmbench.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if r["FunctionalCategory"] == "standard":
                rows.append(("harmbench", r["Behavior"]))
    if strongreject is not None:
        with strongreject.open(newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                if r["source"] == "custom":
                    rows.append(("strongreject", r["forbidden_prompt"]))
    return rows


def benchmark_prompts(folder: Path) -> list[tuple[str, str]]:
    """(set:id, prompt) of every benchmark file in ``folder``."""
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            rows += [
                (f"{path.stem}:{row['id']}", row["prompt"])
                for row in map(json.loads, filter(str.strip, fh))
            ]
    return rows


def overlapping(prompts: list[str], bench: list[tuple[str, str]]) -> set[int]:
    """Indices of ``prompts`` that equal, nearly copy or share a run of eight words with a
    benchmark prompt: the anchors' checks (``near_copies``, ``shared_runs``)."""
    texts = [(str(i), text) for i, text in enumerate(prompts)]
    hits = near_copies(texts, bench, NEAR_DUP) + shared_runs(texts, bench, RUN)
    return {int(where) for where, _ in hits}


def share(kept: list[tuple[str, str]], scores: list[float], source: str | None, at: float) -> float:
    """Percent of ``source``'s prompts (all with None) scored at or above ``at``."""
    part = [s for (src, _), s in zip(kept, scores, strict=True) if source in (None, src)]
    return round(100 * sum(s >= at for s in part) / len(part), 1)


def quantile_threshold(scores: list[float], budget: float) -> float:
    """The lowest threshold that flags at most ``budget`` of ``scores`` (a score at or above
    it is flagged)."""
    ranked = sorted(scores, reverse=True)
    allowed = int(budget * len(ranked))  # this many may be flagged
    if allowed >= len(ranked):
        return 0.0
    return math.nextafter(ranked[allowed], math.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--harmbench", type=Path, required=True, help="HarmBench's text CSV.")
    parser.add_argument("--strongreject", type=Path, default=None, help="StrongREJECT's CSV.")
    parser.add_argument("--packs", required=True, help="name=path,... (each pack's gate).")
    parser.add_argument("--shapes", default="bare,multi-turn,rag", help="Shapes, comma-separated.")
    parser.add_argument(
        "--benchmarks",
        type=Path,
        default=Path("../shared/data/benchmarks"),
        help="The evaluation benchmarks the dev prompts must not overlap.",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="Also flag at the threshold that flags this share of our benign val anchors "
        "(bare), the same for every gate: the probes compared at one benign budget.",
    )
    parser.add_argument("--out", type=Path, required=True, help="Write figures and scores here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shapes = check_contexts(args.shapes.split(","))
    packs = dict(item.split("=", 1) for item in args.packs.split(","))

    dev = read_dev(args.harmbench, args.strongreject)
    drop = overlapping([p for _, p in dev], benchmark_prompts(args.benchmarks))
    kept = [row for i, row in enumerate(dev) if i not in drop]
    logger.info("%d dev prompts, %d overlap a benchmark, %d kept", len(dev), len(drop), len(kept))
    pool = load_pool("val")
    config = DecodingConfig()
    gates: dict[str, Any] = {}
    for name, path in packs.items():
        engine = get_engine(pack=path)
        gates[name] = {}
        budget_threshold = None
        if args.budget is not None:
            benign = [a.prompt for a in load_anchors("val") if a.label == "benign"]
            benign_scores = [
                verdict.score
                for p in benign
                if (verdict := engine.gate_verdict([{"role": "user", "content": p}], config))
            ]
            budget_threshold = quantile_threshold(benign_scores, args.budget)
        for shape in shapes:
            start = time.perf_counter()
            scores, threshold = [], 1.0
            for i, (_, prompt) in enumerate(kept):
                placed = place(prompt, shape, pool, seed=i)
                extra = {"tools": placed.tools} if placed.tools else {}
                verdict = engine.gate_verdict(placed.messages, config, **extra)
                if verdict is None:
                    raise SystemExit(f"pack {path} has no gate")
                scores.append(verdict.score)
                threshold = verdict.threshold

            row = {
                "threshold": threshold,
                "flagged": share(kept, scores, None, threshold),
                "harmbench": share(kept, scores, "harmbench", threshold),
                "strongreject": share(kept, scores, "strongreject", threshold)
                if args.strongreject
                else None,
                "flagged_at_0.5": share(kept, scores, None, 0.5),
            }
            if budget_threshold is not None:
                row["budget_threshold"] = budget_threshold
                row["flagged_at_budget"] = share(kept, scores, None, budget_threshold)
            logger.info("%-8s %-12s %s (%.0f s)", name, shape, row, time.perf_counter() - start)
            gates[name][shape] = {**row, "scores": scores}
    atomic_write_json(args.out, {"kept": kept, "dropped": len(drop), "gates": gates})
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
