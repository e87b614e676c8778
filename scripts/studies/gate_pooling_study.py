"""How should the safety gate pool the model's states? A study on our anchors only.

Reproduces the figures behind ``GateFitConfig.pooling`` (docs/opo.md, "Gate v2"). For each
pooling (the mean over the request's tokens, or the last prompt token) and each candidate
set of decoder layers, a logistic probe is scored two ways, both on the anchors alone (the
benchmarks are never read):

* ``val``: fitted on the train split, thresholded on the val split so that at most 5 % of
  each benign kind is flagged (the shipped rule); the share of harmful val prompts flagged.
* ``cv``: grouped cross-validation over categories. Each (label, category) group goes to one
  of six folds, so a fold's prompts come from categories the probe never saw: the closest
  the anchors get to the shift a benchmark brings. Out-of-fold scores are pooled; the share
  of harmful prompts flagged at a 5 %-per-benign-kind threshold, averaged over two fold
  assignments.

Usage: ``python scripts/studies/gate_pooling_study.py [--out study.json]`` (about 10 minutes
on a 2-core CPU with the default model: two forwards per anchor).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Sequence

import torch

from acd_engine.runtime.engine import get_engine
from acd_engine.training.anchors import Anchor, load_anchors
from acd_engine.training.gate_fit import anchor_features, worst_group_threshold
from acd_engine.training.probe import fit_gate, roc_auc

logger = logging.getLogger("gate_pooling_study")

LAYER_SETS: tuple[tuple[int, ...], ...] = ((12,), (15,), (18,), (21,), (15, 22), (9, 15, 21, 27))
FOLDS, MAX_FPR, L2 = 6, 0.05, 1e-2


def flagged_share(p: torch.Tensor, y: torch.Tensor, kinds: Sequence[str]) -> float:
    """Share of harmful prompts at or above the 5 %-per-benign-kind threshold."""
    t = worst_group_threshold(p, y, kinds, MAX_FPR)
    return float((p[y > 0.5] >= t).float().mean())


def fold_of(anchors: Sequence[Anchor], seed: int) -> torch.Tensor:
    groups = sorted({(a.label, a.category) for a in anchors})
    random.Random(seed).shuffle(groups)
    fold = {g: i % FOLDS for i, g in enumerate(groups)}
    return torch.tensor([fold[(a.label, a.category)] for a in anchors])


def score(x: torch.Tensor, anchors: Sequence[Anchor]) -> dict[str, float]:
    y = torch.tensor([1.0 if a.label == "harmful" else 0.0 for a in anchors])
    kinds = [a.kind for a in anchors]
    train = torch.tensor([a.split == "train" for a in anchors])
    probe = fit_gate(x[train], y[train], (0,), l2=L2)
    p_val = probe.probability(x[~train])
    val_kinds = [k for k, t in zip(kinds, train.tolist(), strict=True) if not t]
    out = {
        "val_auc": roc_auc(p_val, y[~train]),
        "val_flagged": flagged_share(p_val, y[~train], val_kinds),
    }
    cv_auc, cv_flagged = [], []
    for seed in (0, 1):
        folds, oof = fold_of(anchors, seed), torch.zeros(len(y))
        for f in range(FOLDS):
            held = folds == f
            oof[held] = fit_gate(x[~held], y[~held], (0,), l2=L2).probability(x[held])
        cv_auc.append(roc_auc(oof, y))
        cv_flagged.append(flagged_share(oof, y, kinds))
    out["cv_auc"] = sum(cv_auc) / len(cv_auc)
    out["cv_flagged"] = sum(cv_flagged) / len(cv_flagged)
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="Write the table as JSON here too.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    engine = get_engine(None)
    anchors = load_anchors("all")
    layers = sorted({layer for s in LAYER_SETS for layer in s})
    rows = []
    for pooling in ("mean", "last"):
        feats = anchor_features(engine, anchors, layers, pooling)  # [N, len(layers) * H]
        hidden = feats.shape[1] // len(layers)
        for chosen in LAYER_SETS:
            cols = [
                feats[:, layers.index(c) * hidden : (layers.index(c) + 1) * hidden] for c in chosen
            ]
            row = {"pooling": pooling, "layers": list(chosen), **score(torch.cat(cols, 1), anchors)}
            logger.info(json.dumps(row))
            rows.append(row)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(
                {"anchors": len(anchors), "l2": L2, "max_fpr": MAX_FPR, "rows": rows}, fh, indent=1
            )


if __name__ == "__main__":
    main()
