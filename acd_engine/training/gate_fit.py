"""Fit the safety gate (:mod:`acd_engine.gate`) on our anchors and attach it to a pack.

The features are what the engine captures at prefill: each decoder layer's output at the
last prompt token of the plain rendering. One forward per anchor records every layer at
once, so choosing the layers costs no extra forwards.

Everything that is tuned is tuned on the anchors' validation split, never on a benchmark:

* **Layers.** A linear probe is fitted on the train split for every single layer and ranked
  by validation AUC. The ``mlp`` probe (shipped) reads the best layer and its two
  neighbours: adjacent middle layers carry the same signal a little differently, and on our
  anchors the three together beat any one (docs/opo.md, "Gate v4"). The ``linear`` probe
  tries the two best layers together too, and the better of "best single layer" and "that
  pair" wins (the single layer on a tie: fewer features, less to overfit).
* **Threshold.** The lowest probability whose false-positive rate is at most ``max_fpr`` in
  *every* kind of benign validation prompt (everyday tasks, look-alikes), not only pooled:
  a flagged benign request decodes with the safeguarding prompt, so this bounds the
  over-refusal the gate can add. Pooled, the many everyday tasks dilute the look-alikes (the
  hard group): the 928-row set's pooled 5 % budget let the gate flag 13 % of look-alikes
  against 2 % of everyday tasks. ``fpr_per_kind=False`` gives the pooled rule.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from acd_engine.config import Settings
from acd_engine.gate import (
    GatePooling,
    SafetyGate,
    decoder_layers,
    fit_mlp_gate,
    roc_auc,
    threshold_for,
)
from acd_engine.gate import fit_gate as fit_probe
from acd_engine.training.anchors import Anchor, anchor_set_hash, load_anchors

__all__ = ["GateFitConfig", "anchor_features", "fit_pack_gate", "worst_group_threshold"]

logger = logging.getLogger(__name__)


class GateFitConfig(Settings):
    """How the gate is fitted (stored with the gate, so a pack says how its gate was made)."""

    layers: tuple[int, ...] | None = Field(
        default=None,
        description="Decoder layers to read; None chooses by validation AUC (see the module).",
    )
    max_fpr: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="Most benign validation prompts the gate may flag (its threshold).",
    )
    fpr_per_kind: bool = Field(
        default=True,
        description="Hold max_fpr in each benign kind of the validation split (plain, "
        "lookalike) rather than pooled over all benign prompts, so the largest group cannot "
        "hide the hardest one.",
    )
    probe: Literal["mlp", "linear"] = Field(
        default="mlp",
        description="The classifier: one hidden GELU layer ('mlp') or a logistic regression "
        "('linear', the gates before v4). The mlp flags more harmful val prompts at the same "
        "benign budget on our anchors (docs/opo.md, 'Gate v4').",
    )
    width: int = Field(default=128, ge=1, le=4096, description="The mlp probe's hidden units.")
    weight_decay: float = Field(
        default=1.0, ge=0.0, description="AdamW weight decay of the mlp probe."
    )
    l2: float = Field(default=1e-2, gt=0.0, description="L2 penalty of the logistic regression.")
    pooling: GatePooling = Field(
        default="mean",
        description="Pool each layer's states over the request's tokens by their mean, or "
        "read the last prompt token alone ('last'). The mean generalises better to prompt "
        "kinds the anchors lack (docs/opo.md: grouped cross-validation over categories).",
    )


def worst_group_threshold(
    probabilities: torch.Tensor, labels: torch.Tensor, groups: Sequence[str], max_fpr: float
) -> float:
    """The lowest threshold that keeps the false-positive rate of every benign group at
    most ``max_fpr``: the highest of the per-group thresholds (:func:`threshold_for`)."""
    names = sorted({g for g, y in zip(groups, labels.tolist(), strict=True) if y <= 0.5})
    if not names:
        return threshold_for(probabilities, labels, max_fpr)
    cuts = []
    for name in names:
        idx = torch.tensor([g == name for g in groups])
        cuts.append(threshold_for(probabilities[idx], labels[idx], max_fpr))
    return max(cuts)


def anchor_features(
    engine: Any, anchors: Sequence[Anchor], layers: Sequence[int], pooling: GatePooling = "mean"
) -> torch.Tensor:
    """``[N, len(layers) * H]``: the gate's features of each anchor, exactly as the engine
    reads them for a request (:meth:`~acd_engine.engine.Engine.gate_features`)."""
    return torch.cat([engine.gate_features(a.prompt, layers, pooling) for a in anchors])


def _labels(anchors: Sequence[Anchor]) -> torch.Tensor:
    return torch.tensor([1.0 if a.label == "harmful" else 0.0 for a in anchors])


def _layer_slice(x: torch.Tensor, index: Sequence[int], hidden: int) -> torch.Tensor:
    return torch.cat([x[:, i * hidden : (i + 1) * hidden] for i in index], dim=1)


def fit_pack_gate(
    engine: Any, config: GateFitConfig | None = None, anchors_path: Path | None = None
) -> tuple[SafetyGate, dict[str, Any]]:
    """Fit the gate for ``engine``'s model on the anchors; return it and a report."""
    cfg = config or GateFitConfig()
    start = time.perf_counter()
    train = load_anchors("train", anchors_path)
    val = load_anchors("val", anchors_path)
    n_layers = len(decoder_layers(engine.model))
    candidates = list(cfg.layers) if cfg.layers is not None else list(range(n_layers))
    x_train = anchor_features(engine, train, candidates, cfg.pooling)
    x_val = anchor_features(engine, val, candidates, cfg.pooling)
    y_train, y_val = _labels(train), _labels(val)
    hidden = x_train.shape[1] // len(candidates)

    def val_auc(index: Sequence[int], probe: str = "linear") -> tuple[float, SafetyGate]:
        """Fit ``probe`` on the train split's columns of layers ``index``; its val AUC."""
        layers = tuple(candidates[i] for i in index)
        x = _layer_slice(x_train, index, hidden)
        if probe == "linear":
            gate = fit_probe(x, y_train, layers, l2=cfg.l2, pooling=cfg.pooling)
        else:
            gate = fit_mlp_gate(
                x,
                y_train,
                layers,
                width=cfg.width,
                weight_decay=cfg.weight_decay,
                pooling=cfg.pooling,
            )
        return roc_auc(gate.probability(_layer_slice(x_val, index, hidden)), y_val), gate

    per_layer = {}
    if cfg.layers is not None:
        chosen = list(range(len(candidates)))
    else:
        per_layer = {candidates[i]: val_auc([i])[0] for i in range(len(candidates))}
        ranked = sorted(range(len(candidates)), key=lambda i: -per_layer[candidates[i]])
        if cfg.probe == "mlp":
            best = ranked[0]
            chosen = [i for i in (best - 1, best, best + 1) if 0 <= i < len(candidates)]
        else:
            single, pair = ranked[:1], sorted(ranked[:2])
            chosen = pair if val_auc(pair)[0] > val_auc(single)[0] + 0.002 else single
    auc, gate = val_auc(chosen, cfg.probe)
    p_val = gate.probability(_layer_slice(x_val, chosen, hidden))
    if cfg.fpr_per_kind:
        threshold = worst_group_threshold(p_val, y_val, [a.kind for a in val], cfg.max_fpr)
    else:
        threshold = threshold_for(p_val, y_val, cfg.max_fpr)
    flagged = p_val >= threshold
    by_kind = {}
    for group in sorted({f"{a.label}/{a.kind}" for a in val}):
        idx = torch.tensor([f"{a.label}/{a.kind}" == group for a in val])
        by_kind[group] = round(float(flagged[idx].float().mean()), 4)
    report: dict[str, Any] = {
        "layers": list(gate.layers),
        "pooling": gate.pooling,
        "probe": gate.head,
        "threshold": threshold,
        "val_auc": round(auc, 4),
        "val_flag_rate_by_kind": by_kind,
        "val_flag_rate_harmful": round(float(flagged[y_val > 0.5].float().mean()), 4),
        "val_flag_rate_benign": round(float(flagged[y_val <= 0.5].float().mean()), 4),
        "per_layer_val_auc": {str(k): round(v, 4) for k, v in per_layer.items()},
        "train_anchors": len(train),
        "val_anchors": len(val),
        "anchor_set_hash": anchor_set_hash(anchors_path),
        "settings": cfg.model_dump(mode="json"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    meta = {
        "val_auc": str(report["val_auc"]),
        "val_flag_rate_harmful": str(report["val_flag_rate_harmful"]),
        "val_flag_rate_benign": str(report["val_flag_rate_benign"]),
        "max_fpr": str(cfg.max_fpr),
        "probe": gate.head,
        "fpr_per_kind": str(cfg.fpr_per_kind),
        "anchor_set_hash": report["anchor_set_hash"],
    }
    gate = dataclasses.replace(gate, threshold=threshold, metadata=meta)
    logger.info(
        "gate: layers %s, val AUC %.3f, flags %.0f%% harmful / %.0f%% benign val at p >= %.3f",
        list(gate.layers),
        auc,
        100 * report["val_flag_rate_harmful"],
        100 * report["val_flag_rate_benign"],
        threshold,
    )
    return gate, report
