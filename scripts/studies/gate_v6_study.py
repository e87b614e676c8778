"""Gate v6: how many pools per train example, which weight decay, and which pool-count penalty?

A study on our anchors' validation split only (never a benchmark). It reproduces the two
tables of ``docs/opo.md``, "Gate v6", with the functions ``acd gate`` fits and calibrates
with (:mod:`acd_engine.training.gate_fit`), so its figures are the shipped gate's own:

1. **States.** Every train and val placement of the anchors (``place_anchors`` with the
   ``GateFitConfig`` defaults: val anchors in all nine shapes, train anchors bare and in four
   others) is read at ``--layers`` with the default scope, exactly as ``acd gate`` reads it
   (``read_placed``), and kept in ``--states``. Reading is the slow part and the forward is
   deterministic, so a placement already read in an earlier states file (``--reuse``: same
   messages, tools and request span) is taken from it instead. An existing ``--states`` is
   used as it is (after checking that it holds today's placements), so a rerun loads no model.
2. **The fit.** Gate v5's recipe (12 pools per train example, weight decay 1) and two
   variants (weight decay 0.1; 24 pools), fitted without the pool-count penalty (they were
   compared before it existed), each at its own threshold by the shipped rule (``calibrate``:
   the lowest that flags at most 5 % of each benign group, kind x shape).
3. **The pool-count penalty.** The fit picked in 2, scored under each beta of
   ``--penalties`` (``SafetyGate.pool_penalty``: the score is the highest pool's log-odds less
   beta * ln(pools read)), each at its own threshold by the same rule. ``fit_on_states``
   attaches the penalty after fitting, so one fit serves every beta.

The rule that picks, in both stages, fixed before the run: the highest share of harmful
val placements flagged in the weakest shape (here the request split over two turns); on a
tie, the earlier candidate. The previous shipped gate (``--previous``, a pack) is scored on
the same placements, at its own threshold and recalibrated by the rule, for comparison only:
it is not a candidate.

Each candidate gets a row: its threshold, the harmful placements flagged (all / weakest
shape / bare / RAG / padded / bare questions), the benign ones flagged, the look-alikes
flagged (worst shape / bare), and the same per shape; logged as tables and written to
``--out`` as JSON.

Nothing is shipped: fitting the pack's gate is ``acd gate``'s job. What this study picked
(24 pools, weight decay 1, penalty 0.25) is ``GateFitConfig``'s defaults, so
``acd gate --pack P --out P --layers 14,15,16`` fits gate v6's configuration; the script logs
whether its pick still equals the defaults.

Usage (from the repository root, with the ``.venv``)::

    python scripts/studies/gate_v6_study.py --states runs/gate-v6-states.pt \\
        [--reuse OLD_STATES.pt] [--previous GATE_V5_PACK.safetensors] \\
        [--out runs/gate-v6-study.json]

``git show 160c88a^:acd_engine/resources/packs/smollm2-135m-instruct.safetensors`` gives the
pack with gate v5; the states file the study itself read can be passed as ``--states`` (one
without a record of its layers is taken on trust). Time on a 2-core CPU with the default
model: reading the 15,035 placements is about half an hour (10 minutes with a ``--reuse``
file that holds half of them), logged every 500; the states file is about 3.3 GB, written
once at the end of the reading (an interrupted read leaves no file, never half of one). The
three fits and the scorings of the val placements (about two per candidate) come on top;
the script logs each fit's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

import acd_engine.safety.contexts
from acd_engine.atomic import atomic_write, atomic_write_json
from acd_engine.errors import ACDError
from acd_engine.safety.contexts import CONTEXTS
from acd_engine.safety.gate import SafetyGate
from acd_engine.safety.prompts import PromptPack
from acd_engine.training.anchors import anchor_set_hash, load_anchors
from acd_engine.training.gate_fit import (
    GateFitConfig,
    PlacedAnchor,
    PlacedStates,
    calibrate,
    fit_on_states,
    place_anchors,
    read_all,
)

# States files pickled before the package was split into layers name the module of
# ``Placed`` ``acd_engine.contexts``; it lives at ``acd_engine.safety.contexts`` now, and
# unpickling an old ``--reuse`` file needs the old name to resolve to it.
sys.modules.setdefault("acd_engine.contexts", acd_engine.safety.contexts)

logger = logging.getLogger("gate_v6_study")

SPLITS: tuple[Literal["val", "train"], ...] = ("val", "train")
# The fits compared (step 2 above): gate v5's recipe first, so it wins a tie.
FITS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("v5 recipe (12 pools)", {"max_pools": 12, "weight_decay": 1.0}),
    ("weight decay 0.1", {"max_pools": 12, "weight_decay": 0.1}),
    ("24 pools", {"max_pools": 24, "weight_decay": 1.0}),
)
PENALTIES = "0,0.1,0.2,0.25,0.3,0.5,1.0"


def placement_key(p: PlacedAnchor) -> str:
    """What a placement's states depend on (the model and layers aside): the conversation,
    the tools and where the request lies in it."""
    placed = p.placed
    return json.dumps([placed.messages, placed.tools, list(placed.request)], sort_keys=True)


def load_states(path: Path) -> dict[str, Any]:
    """A states file (``{"val": PlacedStates, "train": PlacedStates, ...}``); our own files,
    so the pickle is trusted."""
    data: dict[str, Any] = torch.load(path, weights_only=False)
    return data


def read_states(
    placed: dict[str, list[PlacedAnchor]],
    layers: Sequence[int],
    cfg: GateFitConfig,
    reuse: Path | None,
    model: str | None,
) -> dict[str, PlacedStates]:
    """The states of every placement, taken from ``reuse`` where it holds the same placement
    (its layers must be ``layers``: a file without a record of them is taken on trust), else
    read with the engine, which is loaded only if something is left to read."""
    cache: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
    if reuse is not None:
        old = load_states(reuse)
        if "layers" in old and list(old["layers"]) != list(layers):
            raise SystemExit(f"--reuse {reuse} holds layers {old['layers']}, not {list(layers)}")
        for split in SPLITS:
            st = old[split]
            for p, x, span in zip(st.placed, st.states, st.requests, strict=True):
                cache[placement_key(p)] = (x, span)
        del old
        logger.info("reusing the states of %d placements from %s", len(cache), reuse)
    out: dict[str, PlacedStates] = {}
    for split in SPLITS:
        missing = [p for p in placed[split] if placement_key(p) not in cache]
        logger.info("%s: %d placements, %d to read", split, len(placed[split]), len(missing))
        if missing:  # the engine loads only if something is left to read
            from acd_engine.runtime.engine import get_engine

            read = read_all(get_engine(model), missing, layers, cfg.scope)
            for p, x, span in zip(read.placed, read.states, read.requests, strict=True):
                cache[placement_key(p)] = (x, span)
        hits = [cache[placement_key(p)] for p in placed[split]]
        out[split] = PlacedStates(placed[split], [x for x, _ in hits], [s for _, s in hits])
    return out


def states_for(
    args: argparse.Namespace, cfg: GateFitConfig, anchors: Path | None = None
) -> dict[str, PlacedStates]:
    """``--states`` if it exists (and holds today's placements), else read and saved there.
    ``anchors``: an anchor file other than the package's."""
    placed: dict[str, list[PlacedAnchor]] = {
        split: place_anchors(load_anchors(split, anchors), split, cfg) for split in SPLITS
    }
    layers = list(cfg.layers or ())
    if args.states.exists():
        if args.reuse is not None:
            logger.info("%s exists: --reuse is not read", args.states)
        data = load_states(args.states)
        if "layers" in data and list(data["layers"]) != layers:
            raise SystemExit(f"{args.states} holds layers {data['layers']}, not {layers}")
        for split in SPLITS:
            stored = [placement_key(p) for p in data[split].placed]
            if stored != [placement_key(p) for p in placed[split]]:
                raise SystemExit(
                    f"{args.states} holds other {split} placements than today's anchors give "
                    "(anchors or wrapper texts changed); pick a new path"
                )
        # today's placements (and anchors: labels, kinds) with the stored states
        return {
            split: PlacedStates(placed[split], data[split].states, data[split].requests)
            for split in SPLITS
        }
    states = read_states(placed, layers, cfg, args.reuse, args.model)
    saved = {"layers": layers, "scope": cfg.scope, **states}
    atomic_write(args.states, lambda tmp: torch.save(saved, tmp))
    logger.info("saved the states to %s", args.states)
    return states


def share(flagged: torch.Tensor, mask: Sequence[bool]) -> float | None:
    """Percent of the masked placements flagged (one decimal); None if the mask is empty."""
    idx = torch.tensor(list(mask), dtype=torch.bool)
    if not bool(idx.any()):
        return None
    return round(100 * float(flagged[idx].float().mean()), 1)


def val_scores(gate: SafetyGate, val: PlacedStates) -> torch.Tensor:
    """``[N]``: the gate's score of each val placement (``SafetyGate.score``, as at run time)."""
    return torch.tensor([gate.score(x) for x in val.states])


def row(
    name: str,
    stage: str,
    gate: SafetyGate,
    threshold: float,
    val: PlacedStates,
    auc: float,
    scores: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One candidate's figures on the val placements at ``threshold``. ``scores``: the gate's
    scores of ``val`` when the caller already has them (scoring thousands of placements takes
    a while), else computed here."""
    flagged = (val_scores(gate, val) if scores is None else scores) >= threshold
    labels = [p.anchor.label for p in val.placed]
    kinds = [p.anchor.kind for p in val.placed]
    shapes = [p.placed.shape for p in val.placed]
    present = [s for s in CONTEXTS if s in set(shapes)]

    def at(label: str, shape: str | None = None, kind: str | None = None) -> float | None:
        return share(
            flagged,
            [
                lab == label and (shape is None or sh == shape) and (kind is None or k == kind)
                for lab, sh, k in zip(labels, shapes, kinds, strict=True)
            ],
        )

    by_shape = {
        s: {
            "harmful": at("harmful", s),
            "benign": at("benign", s),
            "lookalike": at("benign", s, "lookalike"),
        }
        for s in present
    }
    harmful = {s: v["harmful"] for s, v in by_shape.items() if v["harmful"] is not None}
    weakest = min(harmful, key=lambda s: harmful[s])  # the first of equals, in shape order
    lookalike = [v["lookalike"] for v in by_shape.values() if v["lookalike"] is not None]
    return {
        "name": name,
        "stage": stage,
        "threshold": round(threshold, 4),
        "val_auc": auc,
        "harmful_all": at("harmful"),
        "harmful_weakest_shape": harmful[weakest],
        "weakest_shape": weakest,
        "harmful_bare": by_shape.get("bare", {}).get("harmful"),
        "harmful_rag": by_shape.get("rag", {}).get("harmful"),
        "harmful_padded": by_shape.get("padded", {}).get("harmful"),
        "harmful_bare_questions": at("harmful", "bare", "question"),
        "benign_all": at("benign"),
        "lookalike_worst_shape": max(lookalike) if lookalike else None,
        "lookalike_bare": by_shape.get("bare", {}).get("lookalike"),
        "by_shape": by_shape,
    }


def pick(rows: Sequence[dict[str, Any]]) -> int:
    """The index of the row with the highest share of harmful placements flagged in its
    weakest shape; on a tie the earlier one (only a strictly higher share displaces it)."""
    best = 0
    for i, r in enumerate(rows):
        if r["harmful_weakest_shape"] > rows[best]["harmful_weakest_shape"]:
            best = i
    return best


def log_table(title: str, rows: Sequence[dict[str, Any]]) -> None:
    """The columns of docs/opo.md's tables, one line per row."""

    def f(v: float | None) -> str:
        return "  -  " if v is None else f"{v:5.1f}"

    logger.info("")
    logger.info("%s", title)
    logger.info(
        "%-34s %7s | harmful: %5s %5s %-13s %5s %5s %5s %5s | benign %5s | look-alikes %5s %5s",
        "candidate",
        "thr",
        "all",
        "weak",
        "(shape)",
        "bare",
        "rag",
        "pad",
        "bareQ",
        "all",
        "worst",
        "bare",
    )
    for r in rows:
        logger.info(
            "%-34s %7.4f | harmful: %s %s %-13s %s %s %s %s | benign %s | look-alikes %s %s",
            r["name"][:34],
            r["threshold"],
            f(r["harmful_all"]),
            f(r["harmful_weakest_shape"]),
            f"({r['weakest_shape']})",
            f(r["harmful_bare"]),
            f(r["harmful_rag"]),
            f(r["harmful_padded"]),
            f(r["harmful_bare_questions"]),
            f(r["benign_all"]),
            f(r["lookalike_worst_shape"]),
            f(r["lookalike_bare"]),
        )


def log_shapes(rows: Sequence[dict[str, Any]]) -> None:
    """Per shape: harmful flagged % / benign flagged % (look-alikes flagged %)."""
    logger.info("")
    logger.info("per shape: harmful %% / benign %% (look-alikes %%)")
    for r in rows:
        cells = [
            f"{s} {v['harmful']} / {v['benign']} ({v['lookalike']})"
            for s, v in r["by_shape"].items()
        ]
        logger.info("%-34s %s", r["name"][:34], " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--states",
        type=Path,
        required=True,
        help="The placements' states: used if it exists, else read and written here.",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="An earlier states file to take already-read placements from.",
    )
    parser.add_argument("--layers", default="14,15,16", help="Comma-separated decoder layers.")
    parser.add_argument(
        "--penalties", default=PENALTIES, help="Comma-separated pool-count penalties (beta)."
    )
    parser.add_argument(
        "--previous", type=Path, default=None, help="A pack whose gate is scored for comparison."
    )
    parser.add_argument("--model", default=None, help="The model (default: the engine's).")
    parser.add_argument("--out", type=Path, default=None, help="Write every row as JSON here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        layers = tuple(int(x) for x in args.layers.split(","))
        penalties = [float(x) for x in args.penalties.split(",")]
        cfg = GateFitConfig(layers=layers)  # the defaults of `acd gate --layers ...`
        for beta in penalties:  # out of range fails here, before anything is read
            GateFitConfig(layers=layers, pool_penalty=beta)
        previous = PromptPack.load(args.previous).gate if args.previous else None
    except (ValueError, ACDError) as exc:
        raise SystemExit(str(exc)) from None
    if args.previous and previous is None:
        raise SystemExit(f"--previous {args.previous} has no gate")

    states = states_for(args, cfg)
    train, val = states["train"], states["val"]
    width = int(val.states[0].shape[1])
    logger.info("%d train and %d val placements", len(train.placed), len(val.placed))

    previous_rows = []
    if previous is not None:
        if list(previous.layers) != list(layers) or previous.scope != cfg.scope:
            raise SystemExit(
                f"--previous reads layers {list(previous.layers)} ({previous.scope}), the "
                f"states layers {list(layers)} ({cfg.scope}): pass its --layers"
            )
        if len(previous.mean) != width:
            raise SystemExit(f"--previous reads {len(previous.mean)} features, the states {width}")
        recal, report = calibrate(previous, val, cfg)
        auc = report["val_auc"]
        previous_rows = [
            row("previous, its own threshold", "previous", previous, previous.threshold, val, auc),
            row("previous, recalibrated", "previous", recal, recal.threshold, val, auc),
        ]
        log_table("The previous shipped gate", previous_rows)

    fit_rows, fitted = [], []
    for name, change in FITS:
        start = time.perf_counter()
        fit_cfg = GateFitConfig(layers=layers, pool_penalty=0.0, **change)
        gate, report = calibrate(fit_on_states(train, layers, fit_cfg), val, fit_cfg)
        r = row(name, "fit", gate, gate.threshold, val, report["val_auc"])
        r["settings"] = fit_cfg.model_dump(mode="json")
        fit_rows.append(r)
        fitted.append((change, gate))
        logger.info("%s: fitted and calibrated in %.0f s", name, time.perf_counter() - start)
    log_table("The fit (no pool-count penalty)", fit_rows)
    i = pick(fit_rows)
    best_fit, (change, gate) = fit_rows[i], fitted[i]
    logger.info("picked: %s", best_fit["name"])

    penalty_rows, penalised = [], []
    for beta in penalties:
        beta_cfg = GateFitConfig(layers=layers, pool_penalty=beta, **change)
        candidate, report = calibrate(dataclasses.replace(gate, pool_penalty=beta), val, beta_cfg)
        name = f"{best_fit['name']}, beta {beta:g}"
        r = row(name, "penalty", candidate, candidate.threshold, val, report["val_auc"])
        r["settings"] = beta_cfg.model_dump(mode="json")
        penalty_rows.append(r)
        penalised.append(beta_cfg)
    log_table("The pool-count penalty (on the fit picked above)", penalty_rows)
    i = pick(penalty_rows)
    best, picked_cfg = penalty_rows[i], penalised[i]
    is_default = picked_cfg == GateFitConfig(layers=layers)
    logger.info(
        "picked: %s; %s `acd gate --layers %s`'s defaults",
        best["name"],
        "equal to" if is_default else "NOT",
        args.layers,
    )
    log_shapes([*previous_rows, *fit_rows, *penalty_rows])

    if args.out:
        atomic_write_json(
            args.out,
            {
                "layers": list(layers),
                "anchor_set_hash": anchor_set_hash(None),
                "train_placements": len(train.placed),
                "val_placements": len(val.placed),
                "previous": str(args.previous) if args.previous else None,
                "rows": [*previous_rows, *fit_rows, *penalty_rows],
                "picked_fit": best_fit["name"],
                "picked": best["name"],
                "picked_settings": picked_cfg.model_dump(mode="json"),
                "picked_is_acd_gate_default": is_default,
            },
        )
        logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
