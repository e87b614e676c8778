"""What a prompt pack is, in words: the labels a result carries and ``acd pack info``.

Two readers need the same facts about a pack. A result (the Python SDK's
:class:`~acd_engine.runtime.answer.GenerationResult`, the adapters' metadata, the server's ``acd``
field) says which pack and gate decoded it, so a user running their own model sees
``pack: none (manual prompts)`` and ``gate: none`` instead of believing they have ACD with
a safety gate. ``acd pack info`` says what a pack file is for: the model it was made for,
its soft prompts, its gate and the figures stored when it was trained and fitted. Both are
written here, once, from the pack itself (:class:`~acd_engine.safety.prompts.PromptPack`); the
engine (:meth:`~acd_engine.runtime.engine.Engine.pack_report`) and the CLI only call them.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

from acd_engine.methods import METHOD_REGISTRY
from acd_engine.safety.gate import SafetyGate
from acd_engine.safety.prompts import PromptPack

__all__ = [
    "NO_GATE",
    "NO_PACK",
    "UNUSED_PACK",
    "describe_pack",
    "format_duration",
    "format_pack_info",
    "format_phases",
    "gate_label",
    "pack_info",
    "pack_label",
    "pack_report",
    "shape_rates",
]

NO_PACK = "none (manual prompts)"
"""The pack label when no trained pack exists: ``acd`` runs on soft prompts initialised
from the manual prompts (numerically ``oid``), with no safety gate."""
NO_GATE = "none"
"""The gate label when no gate routed the request."""
UNUSED_PACK = "unused"
"""The pack label of a method that reads no pack (``plain``, ``base``, ``nid``, ...)."""


def pack_label(pack: PromptPack) -> str:
    """``smollm2-135m-instruct.safetensors (id 1a2b...)`` for a trained pack, else
    :data:`NO_PACK`. The id is the content hash ``acd pack info`` shows too."""
    if not pack.trained:
        return NO_PACK
    return f"{pack.origin or 'in-memory pack'} (id {pack.id})"


def _number(value: float) -> str:
    return f"{value:.4g}"


def gate_label(gate: SafetyGate | None, threshold: float | None = None) -> str:
    """``layers 14,15,16, threshold 0.9806``, or :data:`NO_GATE`. ``threshold``: a
    request's own override (``DecodingConfig.gate_threshold``), which replaces the gate's."""
    if gate is None:
        return NO_GATE
    cut = gate.threshold if threshold is None else threshold
    return f"layers {','.join(map(str, gate.layers))}, threshold {_number(cut)}"


def pack_report(
    pack: PromptPack | None,
    gate: SafetyGate | None,
    threshold: float | None = None,
    *,
    backend: str,
) -> dict[str, str]:
    """``{"pack": ..., "gate": ..., "backend": ...}``: what a result reports about how it
    was decoded (every front end shows these three, from here).

    Args:
        pack: The pack the request's method read, or None for a method that reads none.
        gate: The gate that routed the request, or None (no gate, ``gate=False``, a method
            the gate does not route).
        threshold: The request's own ``gate_threshold``, if it set one.
        backend: The backend that ran its forwards (``torch`` or ``llamacpp``).
    """
    return {
        "pack": UNUSED_PACK if pack is None else pack_label(pack),
        "gate": gate_label(gate, threshold),
        "backend": backend,
    }


# ---------------------------------------------------------------------- acd pack info
_KNOWN_METADATA = (
    "trained",
    "created",
    "created_with",
    "init",
    "safe_prompt",
    "opposite_prompt",
    "training",
    "val",
    "selected_epoch",
    "anchor_set_hash",
    "recommended_alpha",
    "recommended_plausibility",
    "run",
)


def _value(text: str) -> Any:
    """A metadata string as the value it stands for: JSON (numbers, objects, booleans
    written by ``str(bool)``) when it parses, else the string itself. Pack metadata is
    untrusted, so nothing here may fail on a hand-edited file."""
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except ValueError:
        return text


def describe_pack(pack: PromptPack, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Everything a pack says about itself, as plain JSON values (``acd pack info --json``).

    Keys: ``file``, ``bytes``, ``id``, ``trained``, ``created``, ``created_with`` (None in
    packs written before they were stored), ``model`` (the fingerprint), ``methods`` (the
    registered methods that read it), ``prompts`` (SP/AP sizes, init, manual texts),
    ``recommended`` (alpha, plausibility), ``gate`` (None, or its reading and stored
    figures), ``training`` (settings, selected epoch, anchor hash, validation figures),
    ``run`` (None in packs written before it was stored: how ``acd train`` made the pack,
    its device, dtype, each phase's wall seconds and what it calibrated) and ``other``
    (metadata this version does not know).
    """
    meta = dict(pack.metadata)
    gate: dict[str, Any] | None = None
    if pack.gate is not None:
        g = pack.gate
        gate = {
            "layers": list(g.layers),
            "threshold": g.threshold,
            "pooling": g.pooling,
            "scope": g.scope,
            "window": g.window,
            "stride": g.stride,
            "pool_penalty": g.pool_penalty,
            "probe": g.head,
            "hidden_units": None if g.hidden_weight is None else int(g.hidden_weight.shape[0]),
            "stored": {k: _value(v) for k, v in sorted(g.metadata.items())},
        }
    file = Path(path) if path is not None else None
    return {
        "file": str(file) if file is not None else pack.origin,
        "bytes": file.stat().st_size if file is not None and file.is_file() else None,
        "id": pack.id,
        "trained": pack.trained,
        "created": meta.get("created"),
        "created_with": meta.get("created_with"),
        "model": dict(sorted(pack.fingerprint.items())),
        "methods": {
            m.name: {"description": m.description, "gated": m.gated}
            for m in METHOD_REGISTRY.values()
            if m.uses_pack
        },
        "prompts": {
            "sp_tokens": int(pack.sp.shape[0]),
            "ap_tokens": int(pack.ap.shape[0]),
            "hidden_size": int(pack.sp.shape[1]),
            "init": meta.get("init"),
            "safe_prompt": meta.get("safe_prompt"),
            "opposite_prompt": meta.get("opposite_prompt"),
        },
        "recommended": {
            "alpha": _value(meta["recommended_alpha"]) if "recommended_alpha" in meta else None,
            "plausibility": _value(meta["recommended_plausibility"])
            if "recommended_plausibility" in meta
            else None,
        },
        "gate": gate,
        "training": {
            "settings": _value(meta["training"]) if "training" in meta else None,
            "selected_epoch": _value(meta["selected_epoch"]) if "selected_epoch" in meta else None,
            "anchor_set_hash": meta.get("anchor_set_hash"),
            "val": _value(meta["val"]) if "val" in meta else None,
        },
        "run": _value(meta["run"]) if "run" in meta else None,
        "other": {k: v for k, v in sorted(meta.items()) if k not in _KNOWN_METADATA},
    }


def pack_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`describe_pack` of the pack file at ``path``, loaded and checked as an engine
    would load it (:meth:`PromptPack.load`): a missing file, or one that is not a pack,
    raises :class:`~acd_engine.errors.PromptPackError` in the house style."""
    return describe_pack(PromptPack.load(path), path)


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "n/a"


def format_duration(seconds: float) -> str:
    """``"<1 s"``, ``"42 s"``, ``"7.5 min"``, ``"2.1 h"``: how ``acd train`` and ``acd pack
    info`` write a phase's wall time."""
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def shape_rates(by_shape: Any) -> dict[str, str]:
    """A gate's validation flag rate per shape (``{"harmful@bare": 0.9, "benign@rag":
    0.02, ...}``) as one line per label: ``{"flags harmful": "bare 90.0%, ...", ...}``.
    Anything else (a hand-edited value) gives no line."""
    if not isinstance(by_shape, dict):
        return {}
    out: dict[str, list[str]] = {}
    for key, rate in by_shape.items():
        label, _, shape = str(key).partition("@")
        out.setdefault(f"flags {label}", []).append(f"{shape} {_percent(rate)}")
    return {label: ", ".join(parts) for label, parts in out.items()}


def format_phases(phases: Any) -> str:
    """``sampling 11.2 min, training 6.1 min, gate not run``: a run's wall time per phase
    (None: not run by the invocation that wrote the pack)."""
    if not isinstance(phases, dict):
        return "not recorded"
    order = ["sampling", "training", "gate"]
    parts = []
    for name in sorted(phases, key=lambda n: (order.index(n) if n in order else 3, n)):
        seconds = phases[name]
        took = format_duration(seconds) if isinstance(seconds, int | float) else "not run"
        parts.append(f"{name} {took}")
    return ", ".join(parts)


def _wrap(label: str, text: str) -> list[str]:
    """``label`` in a 12-wide column, ``text`` wrapped beside it."""
    lines = textwrap.wrap(text, width=88, break_on_hyphens=False) or [""]
    return [f"{label:<12}{lines[0]}", *(f"{'':<12}{line}" for line in lines[1:])]


def format_pack_info(info: dict[str, Any]) -> str:
    """:func:`describe_pack`'s dict as the text ``acd pack info`` prints."""
    out: list[str] = []
    out.append(f"{'pack':<12}{info['file'] or 'in-memory pack'}")  # a path is never wrapped
    size = f" ({info['bytes'] / 1024:.0f} KiB)" if info.get("bytes") else ""
    out += _wrap("id", f"{info['id']}{size}")
    if info["trained"]:
        state = "trained"
        if info["training"]["selected_epoch"] is not None:
            state += f", selected epoch {info['training']['selected_epoch']}"
    else:
        state = "not trained: soft prompts initialised from the manual prompts (acd = oid)"
    out += _wrap("state", state)
    when = info["created"] or "not recorded (written before packs stored it)"
    if info["created_with"]:
        when += f" with {info['created_with']}"
    out += _wrap("created", when)
    model = info["model"]
    out += _wrap(
        "model",
        ", ".join(f"{k} {v}" for k, v in model.items()) or "no fingerprint",
    )
    methods = [
        f"{name}: {m['description'].rstrip('.')}{', routed by the gate' if m['gated'] else ''}"
        for name, m in info["methods"].items()
    ]
    out += _wrap("methods", "; ".join(methods) or "none registered reads a pack")
    p = info["prompts"]
    prompts = f"SP {p['sp_tokens']} tokens, AP {p['ap_tokens']} tokens, hidden {p['hidden_size']}"
    if p["init"]:
        prompts += f", initialised from the {p['init']} manual prompts"
    out += _wrap("prompts", prompts)
    if p["safe_prompt"]:
        out += _wrap("  safe", str(p["safe_prompt"]))
    if p["opposite_prompt"]:
        out += _wrap("  opposite", str(p["opposite_prompt"]))
    rec = info["recommended"]
    if rec["alpha"] is not None or rec["plausibility"] is not None:
        out += _wrap("recommended", f"alpha {rec['alpha']}, plausibility {rec['plausibility']}")
    gate = info["gate"]
    if gate is None:
        out += _wrap("gate", "none: method acd runs SP - alpha*AP on every request")
    else:
        cut = f"threshold {_number(gate['threshold'])}"
        reading = f"layers {','.join(map(str, gate['layers']))}; {gate['pooling']} pooling"
        if gate["pooling"] == "window":
            reading += f" (window {gate['window']}, stride {gate['stride']}"
            if gate["pool_penalty"]:
                reading += f", pool penalty {_number(gate['pool_penalty'])}"
            reading += ")"
        units = f" ({gate['hidden_units']} units)" if gate["hidden_units"] else ""
        out += _wrap("gate", f"{reading} over {gate['scope']}; {gate['probe']} probe{units}; {cut}")
        stored = dict(gate["stored"])
        figures = []
        if "val_auc" in stored:
            figures.append(f"AUC {stored.pop('val_auc')}")
        if "val_flag_rate_harmful" in stored or "val_flag_rate_benign" in stored:
            figures.append(
                f"flags {_percent(stored.pop('val_flag_rate_harmful', None))} of harmful and "
                f"{_percent(stored.pop('val_flag_rate_benign', None))} of benign val anchors"
            )
        if "max_fpr" in stored:
            per = " per kind and shape" if stored.pop("fpr_per_kind", False) else ""
            figures.append(f"benign budget {_percent(stored.pop('max_fpr'))}{per}")
        if figures:
            out += _wrap("  val", "; ".join(figures))
        for label, rates in shape_rates(stored.pop("val_flag_rate_by_shape", None)).items():
            out += _wrap(f"  {label.removeprefix('flags ')}", f"flags {rates}")
        if "fitted" in stored:
            out += _wrap("  fitted", str(stored.pop("fitted")))
        settings = stored.pop("settings", None)
        stored.pop("probe", None)  # the probe's form, read from the gate itself above
        if stored:
            out += _wrap("  stored", ", ".join(f"{k} {v}" for k, v in stored.items()))
        if isinstance(settings, dict):
            out += _wrap("  settings", ", ".join(f"{k}={v}" for k, v in settings.items()))
    training = info["training"]
    val = training["val"]
    if isinstance(val, dict):
        figures = [
            f"harmful refusal {_percent(val.get('harmful_refusal'))}",
            f"over-refusal {_percent(val.get('over_refusal'))}",
        ]
        by_kind = val.get("refusal_by_kind")
        if isinstance(by_kind, dict) and by_kind:
            figures.append(
                "refusal by kind " + ", ".join(f"{k} {_percent(v)}" for k, v in by_kind.items())
            )
        over = [
            f"{kind} {_percent(1.0 - val[f'{kind}_answer'])}"
            for kind in ("plain", "lookalike")
            if isinstance(val.get(f"{kind}_answer"), int | float)
        ]
        if over:
            figures.append("over-refusal by kind " + ", ".join(over))
        if "n_harmful" in val or "n_benign" in val:
            figures.append(f"{val.get('n_harmful')} harmful / {val.get('n_benign')} benign")
        out += _wrap("val", "acd ungated on the anchors' val split: " + "; ".join(figures))
    settings = training["settings"]
    if isinstance(settings, dict):
        out += _wrap("training", ", ".join(f"{k}={v}" for k, v in settings.items()))
    if training["anchor_set_hash"]:
        out += _wrap("anchor set", str(training["anchor_set_hash"]))
    run = info.get("run")
    if isinstance(run, dict):
        where = f"{run.get('command', 'acd train')} on {run.get('device')} ({run.get('dtype')})"
        if run.get("finished"):
            where += f", finished {run['finished']}"
        resumed = {"gate": "; resumed at the gate", "training": "; resumed training"}
        took = format_phases(run.get("phases")) + resumed.get(str(run.get("resumed")), "")
        out += _wrap("run", f"{where}: {took}")
        if run.get("calibration"):
            out += _wrap("calibrated", str(run["calibration"]))
    for key, value in info["other"].items():
        out += _wrap(key, str(value))
    return "\n".join(out)
