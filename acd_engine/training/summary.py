"""What one ``acd train`` run did and what its pack is worth, in one place.

Before trusting a pack for a model of one's own, a user needs a handful of numbers: how the
trained prompts refuse and over-refuse on the validation split (per kind of anchor), how
well the gate separates harmful from benign requests (its AUC, its flag rate in every
application shape, its threshold), how long each phase took and what was calibrated. They
are all in the run's report already, spread over it; :func:`run_summary` collects them once,
the command prints them (:func:`format_summary`) and the pack keeps the run's part
(:func:`pack_run_metadata`), which ``acd pack info`` shows (:mod:`acd_engine.safety.pack_info`).

Nothing is measured here: the validation figures are the trainer's own evaluation of the
selected epoch (ungated ``acd`` at the selection's alpha and tau), the gate's come from its
calibration on the validation placements (:func:`acd_engine.training.gate_fit.calibrate`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from acd_engine.safety.pack_info import format_phases, shape_rates
from acd_engine.training.config import TrainConfig

__all__ = [
    "CALIBRATION",
    "format_summary",
    "pack_run_metadata",
    "run_summary",
]

CALIBRATION = (
    "gate threshold chosen on the validation split; alpha and tau are the recommended "
    "defaults (the settings epochs were selected at), not tuned"
)
"""What ``acd train`` calibrates. There is no validation-based choice of alpha and tau in
the project: the pack recommends the settings its epoch was selected at."""

PHASES = ("sampling", "training", "gate")


def _over_refusal_by_kind(val: dict[str, Any]) -> dict[str, float]:
    """Benign kinds' over-refusal (1 - answer rate), from the trainer's answer rates."""
    out = {}
    for kind in ("plain", "lookalike"):
        answered = val.get(f"{kind}_answer")
        if isinstance(answered, int | float):
            out[kind] = round(1.0 - answered, 4)
    return out


def run_summary(
    report: dict[str, Any],
    *,
    cfg: TrainConfig,
    phases: dict[str, float | None],
    device: str,
    dtype: str,
    out: Path,
    resumed: str | None = None,
) -> dict[str, Any]:
    """The summary of a completed run from its report.

    Args:
        report: The run's report (the trainer's, with ``gate`` when a gate was fitted).
        cfg: The run's settings (the alpha and tau the figures were measured at).
        phases: Wall seconds of each phase this invocation ran (None: done by an earlier
            one, or not run).
        device: Where the model ran (``cuda:0``, ``cpu``).
        dtype: The model's dtype (``bfloat16``).
        out: The pack written.
        resumed: ``"training"`` when a checkpoint was continued, ``"gate"`` when a trained
            pack was kept and only its gate fitted, None for a fresh run.
    """
    val = report.get("val") or {}
    summary: dict[str, Any] = {
        "out": str(out),
        "device": device,
        "dtype": dtype,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "resumed": resumed,
        "phases": {name: phases.get(name) for name in PHASES},
        "val": {
            "method": "acd ungated",
            "alpha": cfg.val_alpha,
            "plausibility": cfg.val_plausibility,
            "selected_epoch": report.get("selected_epoch"),
            "harmful_refusal": val.get("harmful_refusal"),
            "refusal_by_kind": val.get("refusal_by_kind") or {},
            "over_refusal": val.get("over_refusal"),
            "over_refusal_by_kind": _over_refusal_by_kind(val),
            "n_harmful": val.get("n_harmful"),
            "n_benign": val.get("n_benign"),
        },
        "gate": None,
        "calibration": CALIBRATION,
    }
    gate = report.get("gate")
    if isinstance(gate, dict) and "threshold" in gate:
        summary["gate"] = {
            "threshold": gate["threshold"],
            "val_auc": gate.get("val_auc"),
            "max_fpr": (gate.get("settings") or {}).get("max_fpr"),
            "flag_rate_harmful": gate.get("val_flag_rate_harmful"),
            "flag_rate_benign": gate.get("val_flag_rate_benign"),
            "flag_rate_by_shape": gate.get("val_flag_rate_by_shape") or {},
            "layers": gate.get("layers"),
        }
    return summary


def pack_run_metadata(summary: dict[str, Any]) -> str:
    """The part of the summary a pack keeps (metadata ``run``): how and where it was made.

    The validation figures are in the pack's ``val`` and the gate's own metadata already,
    and a later ``acd gate`` replaces the gate, so neither is copied here; nor is the path,
    which a pack does not keep when it is moved."""
    keep = ("device", "dtype", "finished", "resumed", "phases", "calibration")
    return json.dumps({"command": "acd train", **{k: summary[k] for k in keep}}, sort_keys=True)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "n/a"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as ``acd train`` prints it at the end."""
    lines = [f"wrote {summary['out']} ({summary['device']}, {summary['dtype']})"]
    resumed = {"gate": " (resumed at the gate)", "training": " (resumed training)"}
    lines.append(
        f"  time      {format_phases({n: summary['phases'].get(n) for n in PHASES})}{resumed.get(summary['resumed'] or '', '')}"
    )
    v = summary["val"]
    lines.append(
        f"  val       {v['method']} at alpha {v['alpha']:g}, tau {v['plausibility']:g}, "
        f"selected epoch {v['selected_epoch']}; {v['n_harmful']} harmful / {v['n_benign']} benign prompts"
    )
    by_kind = ", ".join(f"{k} {_pct(x)}" for k, x in v["refusal_by_kind"].items())
    lines.append(
        f"    refusal       {_pct(v['harmful_refusal'])}" + (f" ({by_kind})" if by_kind else "")
    )
    over = ", ".join(f"{k} {_pct(x)}" for k, x in v["over_refusal_by_kind"].items())
    lines.append(f"    over-refusal  {_pct(v['over_refusal'])}" + (f" ({over})" if over else ""))
    g = summary["gate"]
    if g is None:
        lines.append("  gate      none (--no-gate): acd runs SP - alpha*AP on every request")
    else:
        lines.append(
            f"  gate      threshold {g['threshold']:.4g}, val AUC {g['val_auc']}; flags "
            f"{_pct(g['flag_rate_harmful'])} of harmful and {_pct(g['flag_rate_benign'])} of "
            "benign val placements"
        )
        for label, shapes in shape_rates(g["flag_rate_by_shape"]).items():
            lines.append(f"    {label:<14}{shapes}")
    lines.append(f"  calibrated {summary['calibration']}")
    return "\n".join(lines)
