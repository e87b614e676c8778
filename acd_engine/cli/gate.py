"""`acd gate`: add a safety gate to a prompt pack (the fitting lives in ``gate_fit``).

Kept apart from :mod:`acd_engine.training.gate_fit` so that registering the command imports
neither torch nor transformers (``acd --help`` stays instant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from acd_engine.cli.common import ModelOpt, VerboseOpt, setup_logging

__all__ = ["gate_command"]


def gate_command(
    pack: Annotated[Path, typer.Option("--pack", help="The prompt pack to add a gate to.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the gated pack.")],
    model: ModelOpt = None,
    layers: Annotated[
        str | None,
        typer.Option("--layers", help="Comma-separated decoder layers (default: chosen on val)."),
    ] = None,
    max_fpr: Annotated[
        float, typer.Option("--max-fpr", help="Most benign val prompts the gate may flag.")
    ] = 0.05,
    per_kind: Annotated[
        bool,
        typer.Option(
            "--fpr-per-kind/--fpr-pooled",
            help="Hold --max-fpr in each benign kind of the val split (default) or pooled.",
        ),
    ] = True,
    pooling: Annotated[
        str,
        typer.Option(
            "--pooling",
            help="Pool the positions read: 'window' (default: the whole span and every "
            "window, highest score counts), 'mean' or 'last'.",
        ),
    ] = "window",
    scope: Annotated[
        str,
        typer.Option(
            "--scope",
            help="Read the latest user turn ('user_turn', default) or the whole request "
            "after the template's start ('request').",
        ),
    ] = "user_turn",
    window: Annotated[
        int, typer.Option("--window", help="Tokens per long window (and half as many).")
    ] = 32,
    stride: Annotated[int, typer.Option("--stride", help="Tokens between windows.")] = 4,
    pool_penalty: Annotated[
        float,
        typer.Option(
            "--pool-penalty",
            help="Log-odds the score drops per unit of ln(pools read), so a long prompt's "
            "many windows and a short one's few meet one threshold (0 = the highest pool as is).",
        ),
    ] = 0.25,
    contexts: Annotated[
        str | None,
        typer.Option(
            "--contexts",
            help="Comma-separated shapes the anchors are placed in (default: all of "
            "acd_engine.safety.contexts; 'bare' is always one).",
        ),
    ] = None,
    probe: Annotated[
        str,
        typer.Option(
            "--probe", help="The classifier: 'mlp' (one hidden layer, default) or 'linear'."
        ),
    ] = "mlp",
    anchors: Annotated[
        Path | None, typer.Option("--anchors", help="Anchor JSONL (default: the shipped set).")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Fit the safety gate on the anchors' hidden states and write the pack with it."""
    import dataclasses
    import json

    from acd_engine.atomic import atomic_write_json
    from acd_engine.errors import ConfigError
    from acd_engine.runtime.engine import get_engine
    from acd_engine.safety.prompts import PromptPack
    from acd_engine.training.anchors import load_anchors
    from acd_engine.training.gate_fit import GateFitConfig, fit_pack_gate

    setup_logging(verbose)
    try:
        parsed = tuple(int(x) for x in layers.split(",")) if layers else None
    except ValueError:
        raise ConfigError(f"layers must be comma-separated integers, got {layers!r}") from None
    extra = {} if contexts is None else {"contexts": contexts}
    cfg = GateFitConfig(
        layers=parsed,
        max_fpr=max_fpr,
        fpr_per_kind=per_kind,
        pooling=pooling,
        probe=probe,
        scope=scope,
        window=window,
        stride=stride,
        pool_penalty=pool_penalty,
        **extra,
    )
    if out.is_dir() or not out.parent.is_dir():
        raise ConfigError(f"out must be a file path in an existing folder, got '{out}'")
    if anchors is not None:
        load_anchors("all", anchors)  # a bad anchor file fails before the model loads
    source = PromptPack.load(pack)
    engine = get_engine(model)
    source.check_compatible(engine.fingerprint, source=f"prompt pack '{pack}'")
    gate, report = fit_pack_gate(engine, cfg, anchors)
    dataclasses.replace(source, gate=gate).save(out)
    atomic_write_json(out.with_name(out.stem + ".gate.json"), report)
    typer.echo(
        json.dumps(
            {k: report[k] for k in ("layers", "pooling", "scope", "probe", "threshold", "val_auc")}
        )
    )
