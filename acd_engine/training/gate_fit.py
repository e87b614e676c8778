"""Fit the safety gate (:mod:`acd_engine.safety.gate`) on our anchors and attach it to a pack.

The features are the engine's own hidden states over the plain rendering of a request, read
where the gate will read them at run time. Requests arrive as applications send them, so
the anchors are placed in those shapes (:mod:`acd_engine.safety.contexts`: app system prompts,
earlier turns, RAG prompts, agent turns with tools, padding, a refused earlier turn, a
request split over two turns); the train anchors with the ``train`` pool of wrapper texts,
the val anchors with the ``val`` pool, so no anchor and no wrapper text crosses the split.

A ``window`` gate reads the latest user turn and scores its whole mean and every window of
a few tokens, the highest score counting (:meth:`~acd_engine.safety.gate.SafetyGate.pool_bounds`).
It is fitted on pools, not requests: a pool of a harmful request is a positive when it
mostly covers the request's own tokens, a negative when it lies wholly before them (the
retrieved passages or padding in front of it are benign text), and left out otherwise; every
pool of a benign request is a negative. So the probe learns what a harmful request looks
like inside a conversation, and what benign context (news of a robbery in a RAG passage, an
earlier refused turn) looks like, instead of an average over both.

Everything that is tuned is tuned on the anchors' validation split, never on a benchmark:

* **Layers.** A linear probe is fitted on the train split's bare anchors for every single
  layer and ranked by validation AUC. The ``mlp`` probe (shipped) reads the best layer and
  its two neighbours: adjacent middle layers carry the same signal a little differently, and
  on our anchors the three together beat any one (docs/opo.md, "Gate v4"). The ``linear``
  probe tries the two best layers together too, and the better of "best single layer" and
  "that pair" wins (the single layer on a tie: fewer features, less to overfit).
* **Threshold.** The lowest probability whose false-positive rate is at most ``max_fpr`` in
  *every* group of benign validation prompts (each kind, everyday task or look-alike, in
  each shape), not only pooled: a flagged benign request decodes with the safeguarding
  prompt, so this bounds the over-refusal the gate can add wherever the request sits.
  ``fpr_per_kind=False`` gives the pooled rule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from acd_engine.config import Settings, comma_list
from acd_engine.rendering import template_kwargs
from acd_engine.safety.contexts import CONTEXTS, Placed, load_pool, place
from acd_engine.safety.gate import GatePooling, GateScope, SafetyGate, decoder_layers, pool_bounds
from acd_engine.training.anchors import Anchor, anchor_set_hash, load_anchors
from acd_engine.training.probe import fit_gate as fit_probe
from acd_engine.training.probe import fit_mlp_gate, roc_auc, threshold_for

__all__ = [
    "GateFitConfig",
    "PlacedAnchor",
    "PlacedStates",
    "anchor_features",
    "calibrate",
    "fit_on_states",
    "fit_pack_gate",
    "place_anchors",
    "pool_examples",
    "read_placed",
    "worst_group_threshold",
]

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
        description="Hold max_fpr in each benign group of the validation split (kind x "
        "shape) rather than pooled over all benign prompts, so the largest group cannot "
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
        default="window",
        description="'window' (default): score the mean of the positions read and of every "
        "window of `window` tokens, the highest counting; 'mean': one mean; 'last': the "
        "last position alone.",
    )
    scope: GateScope = Field(
        default="user_turn",
        description="Read the latest user turn ('user_turn', default) or every token after "
        "the template's start ('request', the gates before contexts).",
    )
    window: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Tokens per long window (windows of half as many are read too); 32 "
        "flagged more harmful val placements in the weakest shape than 16 or 48 (docs/opo.md).",
    )
    stride: int = Field(default=4, ge=1, le=4096, description="Tokens between window starts.")
    pool_penalty: float = Field(
        default=0.25,
        ge=0.0,
        le=4.0,
        description="Log-odds the score drops per unit of ln(pools read) "
        "(SafetyGate.pool_penalty), applied before the threshold is chosen. 0.25 flagged the "
        "most harmful val placements in the weakest shape of 0 to 1.5 (docs/opo.md, 'Gate v6').",
    )
    contexts: tuple[str, ...] = Field(
        default=CONTEXTS,
        description="Shapes the anchors are placed in (acd_engine.safety.contexts); 'bare' is "
        "always among them.",
    )
    shapes_per_anchor: int = Field(
        default=4,
        ge=0,
        description="Train anchors: placed bare and in this many other shapes, drawn per "
        "anchor (val anchors are placed in every shape).",
    )
    max_pools: int = Field(
        default=24,
        ge=1,
        description="Most pools kept per train example (drawn, seeded). 24 flagged more "
        "harmful val placements in the weakest shape than 12 at the same benign budget "
        "(docs/opo.md, 'Gate v6').",
    )
    seed: int = Field(default=0, description="Seeds placements, pool draws and the probe.")

    @field_validator("contexts", mode="before")
    @classmethod
    def _contexts(cls, value: Any) -> Any:
        value = comma_list(value)
        bad = [v for v in value if v not in CONTEXTS]
        if bad:
            raise ValueError(f"must name shapes from {', '.join(CONTEXTS)}; {bad[0]!r} is none")
        return ("bare", *[v for v in value if v != "bare"])


@dataclass(frozen=True)
class PlacedAnchor:
    """An anchor placed in one application shape (:func:`acd_engine.safety.contexts.place`)."""

    anchor: Anchor
    placed: Placed

    @property
    def group(self) -> str:
        """``label/kind@shape``: the group whose flag rate the report and threshold use."""
        return f"{self.anchor.label}/{self.anchor.kind}@{self.placed.shape}"


def place_anchors(
    anchors: Sequence[Anchor], split: Literal["train", "val"], cfg: GateFitConfig
) -> list[PlacedAnchor]:
    """``anchors`` of one split placed in shapes with that split's pool of wrapper texts.

    Val anchors go into every shape of ``cfg.contexts``; train anchors bare and into
    ``cfg.shapes_per_anchor`` others drawn per anchor. An ``after-refusal`` placement's
    earlier, refused request is another harmful anchor of the same split."""
    pool = load_pool(split)
    harmful = [a.prompt for a in anchors if a.label == "harmful"]
    others = [c for c in cfg.contexts if c != "bare"]
    rng = random.Random(f"{cfg.seed}|{split}")
    out = []
    for a in anchors:
        if split == "val":
            shapes = list(cfg.contexts)
        else:
            shapes = ["bare", *rng.sample(others, min(cfg.shapes_per_anchor, len(others)))]
        earlier = [p for p in harmful if p != a.prompt]
        for shape in shapes:
            placed = place(
                a.prompt, shape, pool, seed=f"{cfg.seed}|{a.id}", earlier_harmful=earlier
            )
            out.append(PlacedAnchor(a, placed))
    return out


def read_placed(
    engine: Any, placed: Placed, layers: Sequence[int], scope: GateScope
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``([T, F] states, (start, stop))``: the gate's layers at the positions a ``scope``
    gate reads (exactly as the engine reads a request), and where the request's own tokens
    lie among them (clipped; ``start == stop`` when none are read)."""
    kwargs = template_kwargs(placed.tools)
    rendered = engine.render(placed.messages, **kwargs)
    assert rendered.plain is not None
    states, span = engine.read_gate(rendered, layers, scope, kwargs)
    first = len(rendered.plain) - span.trail - span.length  # the span's first position
    content = placed.messages[-1]["content"]
    where = rendered.user_span[0] if rendered.user_span else first
    a, b = placed.request
    encode = engine.renderer.encode_data
    lo = where + (len(encode(content[:a])) if a else 0) - first
    hi = where + len(encode(content[:b])) - first
    lo, hi = max(0, min(lo, span.length)), max(0, min(hi, span.length))
    # Kept on the CPU: thousands of placements are held at once (gigabytes for a large
    # model), and the probe is fitted there anyway (training/probe.py).
    return states.to("cpu", torch.float16), (lo, max(lo, hi))


def pool_examples(
    bounds: Sequence[tuple[int, int]], request: tuple[int, int], harmful: bool
) -> list[tuple[int, int, float]]:
    """``(start, stop, label)`` of each pool of one example that the probe is fitted on.

    A harmful example gives the mean over its request's own tokens as a positive, and each
    pool that is mostly request and holds most of it (three quarters of the request, half
    of the pool) as well; a pool that ends before the request starts is a negative (benign
    context), and the rest are left out: a window over a role-play frame alone, or a long
    span that dilutes the request, is neither. Every pool of a benign example is a
    negative."""
    lo, hi = request
    if not harmful:
        return [(a, b, 0.0) for a, b in bounds]
    out = [(lo, hi, 1.0)] if hi > lo else []
    for a, b in bounds:
        overlap = max(0, min(b, hi) - max(a, lo))
        if hi > lo and overlap >= 0.75 * (hi - lo) and overlap >= 0.5 * (b - a):
            if (a, b) != (lo, hi):
                out.append((a, b, 1.0))
        elif b <= lo:
            out.append((a, b, 0.0))
    return out


def anchor_features(
    engine: Any, anchors: Sequence[Anchor], layers: Sequence[int], pooling: GatePooling = "mean"
) -> torch.Tensor:
    """``[N, len(layers) * H]``: each bare anchor's states over the request, pooled by one
    mean (or the last position): the features the layers are ranked by."""
    rows = []
    for a in anchors:
        x = engine.gate_states(a.prompt, layers, "request")  # [T, F]
        rows.append((x[-1] if pooling == "last" else x.mean(0)).cpu())
    return torch.stack(rows)


def _labels(anchors: Sequence[Anchor]) -> torch.Tensor:
    return torch.tensor([1.0 if a.label == "harmful" else 0.0 for a in anchors])


def _layer_slice(x: torch.Tensor, index: Sequence[int], hidden: int) -> torch.Tensor:
    return torch.cat([x[:, i * hidden : (i + 1) * hidden] for i in index], dim=1)


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


def choose_layers(
    engine: Any, cfg: GateFitConfig, train: Sequence[Anchor], val: Sequence[Anchor]
) -> tuple[tuple[int, ...], dict[int, float]]:
    """The layers the gate reads (``cfg.layers``, or chosen by validation AUC of a linear
    probe per layer on the bare anchors' means) and the per-layer AUCs."""
    if cfg.layers is not None:
        return tuple(cfg.layers), {}
    candidates = list(range(len(decoder_layers(engine.model))))
    x_train = anchor_features(engine, train, candidates)
    x_val = anchor_features(engine, val, candidates)
    y_train, y_val = _labels(train), _labels(val)
    hidden = x_train.shape[1] // len(candidates)

    def val_auc(index: Sequence[int]) -> float:
        x = _layer_slice(x_train, index, hidden)
        gate = fit_probe(x, y_train, [candidates[i] for i in index], l2=cfg.l2)
        return roc_auc(gate.probability(_layer_slice(x_val, index, hidden)), y_val)

    per_layer = {candidates[i]: val_auc([i]) for i in range(len(candidates))}
    ranked = sorted(range(len(candidates)), key=lambda i: -per_layer[candidates[i]])
    if cfg.probe == "mlp":
        best = ranked[0]
        chosen = [i for i in (best - 1, best, best + 1) if 0 <= i < len(candidates)]
    else:
        single, pair = ranked[:1], sorted(ranked[:2])
        chosen = pair if val_auc(pair) > val_auc(single) + 0.002 else single
    return tuple(candidates[i] for i in chosen), per_layer


@dataclass
class PlacedStates:
    """The states of placed anchors, read once and fitted on as often as wanted."""

    placed: list[PlacedAnchor]
    states: list[torch.Tensor]  # [T_i, F] fp16 each
    requests: list[tuple[int, int]]

    @property
    def labels(self) -> torch.Tensor:
        return _labels([p.anchor for p in self.placed])


def read_all(
    engine: Any,
    placed: Sequence[PlacedAnchor],
    layers: Sequence[int],
    scope: GateScope,
    progress: Callable[[int], None] | None = None,
) -> PlacedStates:
    """:func:`read_placed` for every placed anchor, logged as it goes (minutes on a CPU);
    ``progress`` is called with 1 after each."""
    states, requests = [], []
    start = time.perf_counter()
    for i, p in enumerate(placed):
        x, span = read_placed(engine, p.placed, layers, scope)
        states.append(x)
        requests.append(span)
        if progress is not None:
            progress(1)
        if (i + 1) % 500 == 0:
            logger.info(
                "gate: read %d/%d placed anchors (%.0f s)",
                i + 1,
                len(placed),
                time.perf_counter() - start,
            )
    return PlacedStates(list(placed), states, requests)


def fit_on_states(train: PlacedStates, layers: Sequence[int], cfg: GateFitConfig) -> SafetyGate:
    """The probe fitted on the pools of the train split's placed anchors (no threshold yet)."""
    rng = random.Random(cfg.seed)
    rows: list[torch.Tensor] = []
    labels: list[float] = []
    for p, x, request in zip(train.placed, train.states, train.requests, strict=True):
        bounds = pool_bounds(cfg.pooling, len(x), cfg.window, cfg.stride)
        harmful = p.anchor.label == "harmful"
        pools = pool_examples(bounds, request, harmful)
        if len(pools) > cfg.max_pools:  # a harmful example keeps its request's own mean
            keep = 1 if harmful and pools[0][2] == 1.0 else 0
            pools = pools[:keep] + rng.sample(pools[keep:], cfg.max_pools - keep)
        for a, b, label in pools:
            rows.append(x[a:b].float().mean(0))
            labels.append(label)
    features, y = torch.stack(rows), torch.tensor(labels)
    logger.info("gate: fitting on %d pools (%d positive)", len(y), int(y.sum()))
    if cfg.probe == "linear":
        gate = fit_probe(features, y, layers, l2=cfg.l2, pooling=cfg.pooling)
    else:
        gate = fit_mlp_gate(
            features,
            y,
            layers,
            width=cfg.width,
            weight_decay=cfg.weight_decay,
            pooling=cfg.pooling,
            seed=cfg.seed,
        )
    return dataclasses.replace(
        gate,
        scope=cfg.scope,
        window=cfg.window,
        stride=cfg.stride,
        pool_penalty=cfg.pool_penalty if cfg.pooling == "window" else 0.0,
    )


def calibrate(
    gate: SafetyGate, val: PlacedStates, cfg: GateFitConfig
) -> tuple[SafetyGate, dict[str, Any]]:
    """``gate`` with its threshold chosen on the val split's placed anchors, and the
    validation figures: AUC, and the flag rate per group (label/kind@shape) and per shape."""
    p_val = torch.tensor([gate.score(x) for x in val.states])
    y_val = val.labels
    groups = [p.group for p in val.placed]
    if cfg.fpr_per_kind:
        threshold = worst_group_threshold(p_val, y_val, groups, cfg.max_fpr)
    else:
        threshold = threshold_for(p_val, y_val, cfg.max_fpr)
    flagged = p_val >= threshold
    by_group = {}
    for group in sorted(set(groups)):
        idx = torch.tensor([g == group for g in groups])
        by_group[group] = round(float(flagged[idx].float().mean()), 4)
    by_shape = {}
    for shape in cfg.contexts:
        for label, y in (("harmful", 1.0), ("benign", 0.0)):
            idx = torch.tensor(
                [
                    p.placed.shape == shape and t == y
                    for p, t in zip(val.placed, y_val.tolist(), strict=True)
                ]
            )
            if bool(idx.any()):
                by_shape[f"{label}@{shape}"] = round(float(flagged[idx].float().mean()), 4)
    report = {
        "threshold": threshold,
        "val_auc": round(roc_auc(p_val, y_val), 4),
        "val_flag_rate_by_group": by_group,
        "val_flag_rate_by_shape": by_shape,
        "val_flag_rate_harmful": round(float(flagged[y_val > 0.5].float().mean()), 4),
        "val_flag_rate_benign": round(float(flagged[y_val <= 0.5].float().mean()), 4),
    }
    return dataclasses.replace(gate, threshold=threshold), report


def fit_pack_gate(
    engine: Any,
    config: GateFitConfig | None = None,
    anchors_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[SafetyGate, dict[str, Any]]:
    """Fit the gate for ``engine``'s model on the anchors placed in application shapes;
    return it and a report. ``progress`` is called with 1 after each placement is read.

    The report's ``read_seconds`` is the part spent reading hidden states (the layer search
    and every placement), the part :mod:`acd_engine.training.estimate` predicts."""
    cfg = config or GateFitConfig()
    start = time.perf_counter()
    train = load_anchors("train", anchors_path)
    val = load_anchors("val", anchors_path)
    layers, per_layer = choose_layers(engine, cfg, train, val)
    placed_train = place_anchors(train, "train", cfg)
    placed_val = place_anchors(val, "val", cfg)
    logger.info(
        "gate: reading layers %s of %d train and %d val placements",
        list(layers),
        len(placed_train),
        len(placed_val),
    )
    train_states = read_all(engine, placed_train, layers, cfg.scope, progress)
    val_states = read_all(engine, placed_val, layers, cfg.scope, progress)
    read_seconds = time.perf_counter() - start
    gate = fit_on_states(train_states, layers, cfg)
    gate, figures = calibrate(gate, val_states, cfg)
    report: dict[str, Any] = {
        "layers": list(gate.layers),
        "pooling": gate.pooling,
        "scope": gate.scope,
        "window": gate.window,
        "stride": gate.stride,
        "probe": gate.head,
        **figures,
        "per_layer_val_auc": {str(k): round(v, 4) for k, v in per_layer.items()},
        "train_anchors": len(train),
        "val_anchors": len(val),
        "train_placements": len(placed_train),
        "val_placements": len(placed_val),
        "anchor_set_hash": anchor_set_hash(anchors_path),
        "settings": cfg.model_dump(mode="json"),
        "read_seconds": round(read_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }
    meta = {
        "val_auc": str(report["val_auc"]),
        "val_flag_rate_harmful": str(report["val_flag_rate_harmful"]),
        "val_flag_rate_benign": str(report["val_flag_rate_benign"]),
        "max_fpr": str(cfg.max_fpr),
        "probe": gate.head,
        "fpr_per_kind": str(cfg.fpr_per_kind),
        "contexts": ",".join(cfg.contexts),
        "anchor_set_hash": report["anchor_set_hash"],
        # When and how it was fitted, for `acd pack info`: packs fitted before these were
        # stored simply lack them.
        "fitted": datetime.now(UTC).isoformat(timespec="seconds"),
        "val_placements": str(report["val_placements"]),
        "settings": json.dumps(report["settings"], sort_keys=True),
        # The flag rate in each application shape (harmful@rag, benign@agent, ...): where
        # the one threshold holds and where it is weakest, for `acd pack info`.
        "val_flag_rate_by_shape": json.dumps(report["val_flag_rate_by_shape"]),
    }
    gate = dataclasses.replace(gate, metadata=meta)
    logger.info(
        "gate: layers %s, val AUC %.3f, flags %.0f%% harmful / %.0f%% benign val at p >= %.3f",
        list(gate.layers),
        report["val_auc"],
        100 * report["val_flag_rate_harmful"],
        100 * report["val_flag_rate_benign"],
        gate.threshold,
    )
    return gate, report
