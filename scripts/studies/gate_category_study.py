"""How the gate does on kinds of harm it was not fitted on: held-out categories.

Why this study exists. Gate v6 flags 86 % of the harmful placements of our val split, but on
the benchmarks (which nothing was fitted on) its verdicts are much weaker, and weakest inside
RAG prompts. Our val anchors are written by the same hands, in the same twelve categories,
as the train anchors: the probe scores most of them near 1, so a change that only moves
borderline scores (the pool-count penalty) looks free on val and is not on new text. A
harmful request of a category the probe has never seen is the closest stand-in for a new
harmful set that our own data gives, and choosing on it stays on our anchors.

What it does (on a states file of ``scripts/studies/gate_v6_study.py``, so no model loads):

1. The twelve harmful categories fall into four folds of three (sorted, in order). For each
   fold, the probe is fitted by ``fit_on_states`` with every train placement except the
   harmful anchors of the fold's categories (all benign anchors stay: a deployed gate has
   seen benign text of every kind).
2. It scores the val placements: the fold's held-out harmful anchors (in all nine shapes)
   and every benign one. Under each pool-count penalty beta, the threshold is chosen on the
   benign val placements by the shipped rule (``worst_group_threshold``: at most 5 % of each
   benign group, kind x shape), and the share of held-out harmful placements flagged is
   counted per shape.
3. The four folds are pooled: each row gives the held-out harmful flagged (all, weakest
   shape, per shape) and the benign flagged, per fit and beta.

Two rules pick a row. The first, fixed before the first run: the highest held-out share in
the weakest shape (within 0.5 points, the earlier row); it picked beta 0.5, which buys the
split shape a few placements with many more in RAG and padded prompts, so it was not
followed (docs/opo.md). The second, fixed after that run and before any other candidate was
scored (``pick``): the highest held-out share over all placements, no shape more than 3
points below gate v6's recipe (24 pools, beta 0.25) in that shape; within 0.5 points, the
incumbent. For each fit the script also compares four benign budgets at beta 0.25
(``budgets``).

Usage (from the repository root)::

    python scripts/studies/gate_category_study.py --states runs/gate-v6-states.pt \\
        [--penalties 0,0.1,0.25,0.5] [--fits 24,48] [--out runs/gate-category.json]

``--fits`` lists ``max_pools`` values (the v6 recipe otherwise); ``--scores`` takes an
earlier ``--out`` and reuses the folds' scores of the fits it holds. Time on a 2-core CPU:
loading the 3.3 GB states file, then about 5 minutes per fold with 24 pools and 9 with 48.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from gate_v6_study import load_states, placement_key  # scripts/studies/ is on sys.path

from acd_engine.atomic import atomic_write_json
from acd_engine.safety.contexts import CONTEXTS
from acd_engine.safety.gate import pool_penalised
from acd_engine.training.anchors import load_anchors
from acd_engine.training.gate_fit import (
    GateFitConfig,
    PlacedStates,
    fit_on_states,
    place_anchors,
    worst_group_threshold,
)
from acd_engine.training.probe import threshold_for

logger = logging.getLogger("gate_category_study")


def load(path: Path, layers: Sequence[int]) -> dict[str, PlacedStates]:
    """The states file's splits with today's placements (checked equal) attached."""
    data = load_states(path)
    if "layers" in data and list(data["layers"]) != list(layers):
        raise SystemExit(f"{path} holds layers {data['layers']}, not {list(layers)}")
    cfg = GateFitConfig(layers=tuple(layers))
    out = {}
    for split in ("train", "val"):
        placed = place_anchors(load_anchors(split), split, cfg)
        if [placement_key(p) for p in data[split].placed] != [placement_key(p) for p in placed]:
            raise SystemExit(f"{path} holds other {split} placements than today's anchors give")
        out[split] = PlacedStates(placed, data[split].states, data[split].requests)
    return out


def subset(states: PlacedStates, keep: Sequence[bool]) -> PlacedStates:
    idx = [i for i, k in enumerate(keep) if k]
    return PlacedStates(
        [states.placed[i] for i in idx],
        [states.states[i] for i in idx],
        [states.requests[i] for i in idx],
    )


def folds_of(categories: Sequence[str], k: int = 4) -> list[list[str]]:
    names = sorted(set(categories))
    size = math.ceil(len(names) / k)
    return [names[i : i + size] for i in range(0, len(names), size)]


INCUMBENT = (24, 0.25)
"""Gate v6's recipe: ``(max_pools, beta)``."""
SHAPE_SLACK = 3.0
"""Points a candidate may lose against the incumbent in any one shape."""


def pick(rows: Sequence[dict[str, Any]], incumbent: dict[str, Any]) -> dict[str, Any]:
    """The rule for the next gate (docs/opo.md, fixed before a candidate was scored by it):
    the highest held-out share over all placements among the rows that lose no shape by more
    than :data:`SHAPE_SLACK` points against the incumbent; within 0.5 points, the incumbent,
    then the earlier row."""
    best = incumbent
    for r in rows:
        worst_loss = max(
            incumbent["held_out_harmful_by_shape"][s] - v
            for s, v in r["held_out_harmful_by_shape"].items()
        )
        if (
            worst_loss <= SHAPE_SLACK
            and r["held_out_harmful_all"] > best["held_out_harmful_all"] + 0.5
        ):
            best = r
    return best


BUDGET_BETA = 0.25
"""The penalty the benign-budget rules are compared at (gate v6's)."""


def budgets(
    fold_scores: Sequence[tuple[list[int], torch.Tensor, torch.Tensor]],
    placed: Sequence[Any],
    beta: float,
) -> list[dict[str, Any]]:
    """The held-out harmful share (all, per kind, bare, RAG, split) and the benign flag rates
    under four ways of choosing the threshold on the benign val placements: the shipped one
    (at most 5 % of each kind x shape group), 5 % of each shape, and 5 % or 2 % of all benign
    placements. The rule sets where on one trade-off curve the gate sits; this shows how far
    each moves it."""
    rules = {
        "5 % per kind x shape (shipped)": ("group", 0.05),
        "5 % per shape": ("shape", 0.05),
        "5 % of all benign": (None, 0.05),
        "2 % of all benign": (None, 0.02),
    }
    out = []
    for name, (by, fpr) in rules.items():
        hits: dict[str, list[bool]] = {}
        benign: dict[str, list[bool]] = {}
        for idx, p_max, pools in fold_scores:
            score = pool_penalised(p_max, pools, beta)
            labels = torch.tensor(
                [1.0 if placed[i].anchor.label == "harmful" else 0.0 for i in idx]
            )
            if by is None:
                thr = threshold_for(score, labels, fpr)
            else:
                keys = [placed[i].group if by == "group" else placed[i].placed.shape for i in idx]
                thr = worst_group_threshold(score, labels, keys, fpr)
            for j, i in enumerate(idx):
                a, shape, hit = placed[i].anchor, placed[i].placed.shape, bool(score[j] >= thr)
                if a.label == "harmful":
                    for key in ("all", f"kind {a.kind}", f"shape {shape}"):
                        hits.setdefault(key, []).append(hit)
                else:
                    for key in (a.kind, f"{a.kind}@{shape}"):
                        benign.setdefault(key, []).append(hit)

        def pct(v: list[bool]) -> float:
            return round(100 * sum(v) / len(v), 1)

        row = {
            "rule": name,
            "held_out_harmful": {
                k: pct(hits[k])
                for k in (
                    "all",
                    "kind plain",
                    "kind question",
                    "kind framed",
                    "shape bare",
                    "shape rag",
                    "shape split",
                )
                if k in hits
            },
            "benign_everyday": pct(benign.get("plain", [])) if benign.get("plain") else None,
            "benign_lookalike": pct(benign["lookalike"]) if benign.get("lookalike") else None,
            "lookalike_worst_shape": max(
                (pct(v) for k, v in benign.items() if k.startswith("lookalike@")), default=None
            ),
        }
        out.append(row)
        logger.info(
            "beta %g, %-31s | held-out harmful %s | benign everyday %s, look-alikes %s "
            "(worst shape %s)",
            beta,
            name,
            " ".join(f"{k} {v}" for k, v in row["held_out_harmful"].items()),
            row["benign_everyday"],
            row["benign_lookalike"],
            row["lookalike_worst_shape"],
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--states", type=Path, required=True)
    parser.add_argument("--layers", default="14,15,16")
    parser.add_argument("--penalties", default="0,0.1,0.25,0.5")
    parser.add_argument("--fits", default="24", help="Comma-separated max_pools values.")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--scores",
        type=Path,
        default=None,
        help="An earlier --out: its folds' scores are reused for the fits it holds (no refit).",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layers = tuple(int(x) for x in args.layers.split(","))
    betas = [float(x) for x in args.penalties.split(",")]
    fits = [int(x) for x in args.fits.split(",")]

    start = time.perf_counter()
    states = load(args.states, layers)
    train, val = states["train"], states["val"]
    logger.info("loaded %s in %.0f s", args.states, time.perf_counter() - start)
    folds = folds_of([p.anchor.category for p in train.placed if p.anchor.label == "harmful"])
    logger.info("folds: %s", folds)

    val_harmful = [p.anchor.label == "harmful" for p in val.placed]
    shapes = [p.placed.shape for p in val.placed]
    groups = [p.group for p in val.placed]
    results: dict[str, Any] = {"folds": folds, "rows": []}
    reused: dict[str, Any] = {}
    if args.scores is not None:
        earlier = json.loads(args.scores.read_text())
        if earlier["folds"] != folds:
            raise SystemExit(f"--scores {args.scores} holds other folds: {earlier['folds']}")
        reused = earlier.get("scores", {})
    for max_pools in fits:
        cfg = GateFitConfig(layers=layers, max_pools=max_pools, pool_penalty=0.0)
        # per val placement: its highest pool probability under the fold that holds it out
        # (harmful) or under every fold (benign: one score per fold)
        fold_scores = []
        for stored in reused.get(str(max_pools), []):  # --scores: no refit
            fold_scores.append(
                (stored["val_index"], torch.tensor(stored["p_max"]), torch.tensor(stored["pools"]))
            )
            results.setdefault("scores", {}).setdefault(str(max_pools), []).append(stored)
        for fold in folds if not fold_scores else []:
            t0 = time.perf_counter()
            keep = [
                not (p.anchor.label == "harmful" and p.anchor.category in fold)
                for p in train.placed
            ]
            gate = fit_on_states(subset(train, keep), layers, cfg)
            held = [
                (not h) or p.anchor.category in fold
                for p, h in zip(val.placed, val_harmful, strict=True)
            ]
            idx = [i for i, k in enumerate(held) if k]
            p_max, pools = [], []
            for i in idx:
                pr = gate.probability(gate.pools(val.states[i]))
                p_max.append(float(pr.max()))
                pools.append(len(pr))
            fold_scores.append((idx, torch.tensor(p_max), torch.tensor(pools)))
            results.setdefault("scores", {}).setdefault(str(max_pools), []).append(
                {"fold": fold, "val_index": idx, "p_max": p_max, "pools": pools}
            )
            logger.info(
                "max_pools %d, fold %s: fitted and scored in %.0f s",
                max_pools,
                fold,
                time.perf_counter() - t0,
            )
        for beta in betas:
            flagged_h: dict[str, list[bool]] = {s: [] for s in CONTEXTS}
            flagged_b: list[bool] = []
            thresholds = []
            for idx, p_max, pools in fold_scores:
                score = pool_penalised(p_max, pools, beta)
                labels = torch.tensor([1.0 if val_harmful[i] else 0.0 for i in idx])
                thr = worst_group_threshold(score, labels, [groups[i] for i in idx], 0.05)
                thresholds.append(round(thr, 4))
                for j, i in enumerate(idx):
                    hit = bool(score[j] >= thr)
                    if val_harmful[i]:
                        flagged_h[shapes[i]].append(hit)
                    else:
                        flagged_b.append(hit)
            per_shape = {s: round(100 * sum(v) / len(v), 1) for s, v in flagged_h.items() if v}
            all_h = [x for v in flagged_h.values() for x in v]
            weakest = min(per_shape, key=lambda s: per_shape[s])
            r = {
                "max_pools": max_pools,
                "beta": beta,
                "thresholds": thresholds,
                "held_out_harmful_all": round(100 * sum(all_h) / len(all_h), 1),
                "weakest_shape": weakest,
                "held_out_harmful_weakest": per_shape[weakest],
                "held_out_harmful_by_shape": per_shape,
                "benign_flagged": round(100 * sum(flagged_b) / len(flagged_b), 1),
            }
            results["rows"].append(r)
            logger.info(
                "max_pools %d beta %-4g thr %s | held-out harmful all %.1f, weakest %.1f (%s) "
                "| %s | benign %.1f",
                max_pools,
                beta,
                thresholds,
                r["held_out_harmful_all"],
                r["held_out_harmful_weakest"],
                weakest,
                " ".join(f"{s} {v}" for s, v in per_shape.items()),
                r["benign_flagged"],
            )
        results.setdefault("budgets", {})[str(max_pools)] = budgets(
            fold_scores, val.placed, BUDGET_BETA
        )
    rows = results["rows"]
    first = rows[0]  # the first rule (before gate v6's held-out figures were seen)
    for r in rows[1:]:
        if r["held_out_harmful_weakest"] > first["held_out_harmful_weakest"] + 0.5:
            first = r
    results["picked_by_weakest_shape"] = {"max_pools": first["max_pools"], "beta": first["beta"]}
    logger.info("weakest-shape rule: max_pools %d, beta %g", first["max_pools"], first["beta"])
    incumbent = next((r for r in rows if (r["max_pools"], r["beta"]) == INCUMBENT), None)
    if incumbent is not None:
        best = pick(rows, incumbent)
        results["picked"] = {"max_pools": best["max_pools"], "beta": best["beta"]}
        logger.info("picked: max_pools %d, beta %g", best["max_pools"], best["beta"])
    if args.out:  # the scores too, so another penalty or threshold rule needs no refit
        atomic_write_json(args.out, results)
        logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
