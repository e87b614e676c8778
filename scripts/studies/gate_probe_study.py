"""Which linear probe should the safety gate be? A study on our anchors only.

The shipped gate is an L2-regularised logistic regression on one layer's mean-pooled states
(``GateFitConfig``). It flags ~89 % of the anchors' harmful val prompts but misses much of
what benchmarks phrase as questions. Every candidate here is linear in the concatenated
layer means, so any winner ships in today's pack format (``SafetyGate``) unchanged:

* ``logreg``: the shipped probe at several L2 penalties (a stronger penalty trades fit on
  the anchors' phrasing for a smoother direction).
* ``massmean``: the difference of the class means of the standardised features, with only a
  scale and bias fitted (Marks & Tegmark, "The Geometry of Truth", 2023: mass-mean probes
  generalise out of distribution better than logistic ones).
* ``lda``: shrinkage LDA, ``(S + λI)⁻¹ (μ₁ − μ₀)``, between mass-mean (large λ) and a
  whitened direction (small λ).
* ``band``: the average of per-layer logistic logits over a band of layers (a linear
  ensemble: one weight vector over the band's concatenated means).
* ``mlp``: one hidden GELU layer (``fit_mlp_gate``), the only candidate that is not linear;
  the pack stores its hidden layer as two more tensors.

Each is scored as ``gate_pooling_study.py`` scores: ``val`` (fitted on train, the share of
harmful val prompts flagged at the shipped threshold rule, at most 5 % of each benign kind
flagged) and ``cv`` (grouped cross-validation over harm categories, so a fold's prompts come
from categories the probe never saw), plus ``val_question``, the share of the val split's
question-style harmful prompts flagged. The rule, fixed before the run: the candidate with
the highest ``(val + cv) / 2`` wins, and it replaces the shipped gate only if it beats the
shipped gate's own val share on the same val prompts.

Usage: ``python scripts/studies/gate_probe_study.py [--out study.json]`` (a few minutes on a
2-core CPU: one forward per anchor, features cached in ``runs/gate-probe-features.pt``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gate_pooling_study import FOLDS, flagged_share, fold_of

from acd_engine.runtime.engine import get_engine
from acd_engine.safety.gate import SafetyGate, decoder_layers
from acd_engine.training.anchors import Anchor, anchor_set_hash, load_anchors
from acd_engine.training.gate_fit import anchor_features
from acd_engine.training.probe import fit_gate, fit_mlp_gate, roc_auc

logger = logging.getLogger("gate_probe_study")

CACHE = Path("runs/gate-probe-features.pt")
Fitter = Callable[[torch.Tensor, torch.Tensor], SafetyGate]


def logreg(layers: Sequence[int], l2: float) -> Fitter:
    return lambda x, y: fit_gate(x, y, tuple(layers), l2=l2)


def direction_probe(x: torch.Tensor, y: torch.Tensor, layers: Sequence[int], lam: float | None):
    """A probe along a fixed direction of the standardised features; only scale and bias fit.

    ``lam=None``: the mass-mean direction; else shrinkage LDA with ridge ``lam`` (relative to
    the mean eigenvalue of the within-class covariance)."""
    mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / scale
    d = z[y > 0.5].mean(0) - z[y <= 0.5].mean(0)
    if lam is not None:
        centred = torch.cat([z[y > 0.5] - z[y > 0.5].mean(0), z[y <= 0.5] - z[y <= 0.5].mean(0)])
        cov = centred.T @ centred / len(z)
        ridge = lam * cov.diagonal().mean()
        d = torch.linalg.solve(cov + ridge * torch.eye(len(d)), d)
    d = d / d.norm()
    one = fit_gate((z @ d)[:, None], y, (0,), l2=1e-4)  # a 1-D logistic: scale and bias
    # fold the 1-D probe back into the full feature space: logit = a * ((z·d) - m1) / s1 + b
    a, m1, s1 = float(one.weight[0]), float(one.mean[0]), float(one.scale[0])
    weight = d * a / s1
    bias = one.bias - a * m1 / s1
    return SafetyGate(tuple(layers), weight, bias, mean, scale, 0.5)


def band(layers: Sequence[int], l2: float, hidden: int) -> Fitter:
    def fit(x: torch.Tensor, y: torch.Tensor) -> SafetyGate:
        probes = [
            fit_gate(x[:, i * hidden : (i + 1) * hidden], y, (layer,), l2=l2)
            for i, layer in enumerate(layers)
        ]
        k = len(probes)
        return SafetyGate(
            tuple(layers),
            torch.cat([p.weight / k for p in probes]),
            sum(p.bias for p in probes) / k,
            torch.cat([p.mean for p in probes]),
            torch.cat([p.scale for p in probes]),
            0.5,
        )

    return fit


def score(fitter: Fitter, x: torch.Tensor, anchors: Sequence[Anchor]) -> dict[str, float]:
    y = torch.tensor([1.0 if a.label == "harmful" else 0.0 for a in anchors])
    kinds = [a.kind for a in anchors]
    train = torch.tensor([a.split == "train" for a in anchors])
    p_val = fitter(x[train], y[train]).probability(x[~train])
    val_kinds = [k for k, t in zip(kinds, train.tolist(), strict=True) if not t]
    out = {"val_auc": roc_auc(p_val, y[~train]), "val": flagged_share(p_val, y[~train], val_kinds)}
    out["val_question"] = question_share(p_val, y[~train], val_kinds)
    cv = []
    for seed in (0, 1):
        folds, oof = fold_of(anchors, seed), torch.zeros(len(y))
        for f in range(FOLDS):
            held = folds == f
            oof[held] = fitter(x[~held], y[~held]).probability(x[held])
        cv.append(flagged_share(oof, y, kinds))
    out["cv"] = sum(cv) / len(cv)
    out["mean"] = (out["val"] + out["cv"]) / 2
    return {k: round(v, 4) for k, v in out.items()}


def question_share(p: torch.Tensor, y: torch.Tensor, kinds: Sequence[str]) -> float:
    """Share of the harmful question-kind prompts flagged at the 5 %-per-benign-kind cut."""
    from acd_engine.training.gate_fit import worst_group_threshold

    t = worst_group_threshold(p, y, kinds, 0.05)
    idx = torch.tensor([k == "question" for k in kinds]) & (y > 0.5)
    return float((p[idx] >= t).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", default=None, help="Write the table as JSON here too.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    engine = get_engine(None)
    anchors = load_anchors("all")
    n_layers = len(decoder_layers(engine.model))
    key = anchor_set_hash(None)
    cached = torch.load(CACHE) if CACHE.exists() else None
    if cached is not None and cached["anchors"] == key:
        feats = cached["features"]
    else:
        feats = anchor_features(engine, anchors, range(n_layers), "mean")  # [N, L * H]
        CACHE.parent.mkdir(exist_ok=True)
        torch.save({"anchors": key, "features": feats}, CACHE)
    hidden = feats.shape[1] // n_layers

    def cols(layers: Sequence[int]) -> torch.Tensor:
        return torch.cat([feats[:, i * hidden : (i + 1) * hidden] for i in layers], 1)

    # the shipped gate on the same val prompts
    shipped = engine.pack.gate
    val = [a.split == "val" for a in anchors]
    y = torch.tensor([1.0 if a.label == "harmful" else 0.0 for a in anchors])
    p = shipped.probability(cols(shipped.layers))[torch.tensor(val)]
    val_kinds = [a.kind for a in anchors if a.split == "val"]
    yv = y[torch.tensor(val)]
    shipped_row = {
        "probe": "shipped",
        "layers": list(shipped.layers),
        "val": round(flagged_share(p, yv, val_kinds), 4),
        "val_question": round(question_share(p, yv, val_kinds), 4),
        "val_at_shipped_threshold": round(
            float((p[yv > 0.5] >= shipped.threshold).float().mean()), 4
        ),
    }
    logger.info(json.dumps(shipped_row))
    candidates: list[tuple[dict[str, object], Sequence[int], Fitter]] = []
    for layer in (9, 12, 15, 18, 21):
        for l2 in (1e-2, 1e-1, 1.0, 10.0):
            candidates.append(({"probe": "logreg", "l2": l2}, [layer], logreg([layer], l2)))
        candidates.append(
            (
                {"probe": "massmean"},
                [layer],
                lambda x, y, ls=[layer]: direction_probe(x, y, ls, None),
            )
        )
        for lam in (0.1, 1.0):
            candidates.append(
                (
                    {"probe": "lda", "lam": lam},
                    [layer],
                    lambda x, y, ls=[layer], m=lam: direction_probe(x, y, ls, m),
                )
            )
    for bl in ((12, 15, 18), (9, 12, 15, 18, 21), tuple(range(10, 21, 2))):
        for l2 in (1e-2, 1.0):
            candidates.append(({"probe": "band", "l2": l2}, bl, band(bl, l2, hidden)))
        candidates.append(
            ({"probe": "massmean"}, bl, lambda x, y, ls=bl: direction_probe(x, y, ls, None))
        )
    for ls in ((15,), (14, 15, 16)):
        for width in (32, 128):
            for wd in (0.1, 1.0):
                candidates.append(
                    (
                        {"probe": "mlp", "width": width, "weight_decay": wd},
                        ls,
                        lambda x, y, ls=ls, w=width, d=wd: fit_mlp_gate(
                            x, y, ls, width=w, weight_decay=d
                        ),
                    )
                )
    rows = []
    for spec, layers, fitter in candidates:
        row = {**spec, "layers": list(layers), **score(fitter, cols(layers), anchors)}
        logger.info(json.dumps(row))
        rows.append(row)
    best = max(rows, key=lambda r: r["mean"])
    logger.info("best by (val + cv) / 2: %s", json.dumps(best))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(
                {"anchors": len(anchors), "shipped": shipped_row, "rows": rows, "best": best},
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
