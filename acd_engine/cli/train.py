"""``acd train``: the typer command function (registered by the CLI as ``train``).

One command from a model folder to a pack with its gate: it samples the model's own
responses, trains SP/AP, fits the safety gate and calibrates its threshold on the validation
split (:func:`~acd_engine.training.run.train_pack`). Before the expensive part it prints how
long each phase will take, measured on the model and device at hand, and at the end what
the pack is worth (:mod:`acd_engine.training.summary`). ``--no-gate`` stops after training;
``acd gate`` refits only the gate.

torch and transformers are imported inside the function so ``acd --help`` stays instant.

Every input is checked before the model loads (:func:`check_inputs`): a bad ``--set``, an
unreadable anchor file or an ``--out`` that cannot be written must cost a second, not a
training run, and must print one ``error:`` line, not a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from acd_engine.cli.common import ModelOpt, VerboseOpt, fail, setup_logging

__all__ = ["OPTION_FIELDS", "check_inputs", "parse_settings", "train_command"]

# `acd train` options that are also TrainConfig fields: option -> (field, default). A --set
# key may override one only while the option is left at its default (else: ambiguous).
OPTION_FIELDS: dict[str, tuple[str, Any]] = {
    "--epochs": ("epochs", 3),
    "--lr": ("lr", 3e-3),
    "--n-virtual": ("n_virtual", None),
    "--init": ("init", "short"),
    "--samples": ("samples", 1),
    "--sample-batch-size": ("gen_batch_size", 24),
    "--batch-size": ("batch_size", 8),
    "--seed": ("seed", 0),
    "--alpha": ("val_alpha", 0.5),
    "--plausibility": ("val_plausibility", 0.0),
    "--max-steps": ("max_steps", None),
}


def _find_surrogate(value: Any) -> str | None:
    """The first string in a JSON value that UTF-8 cannot hold (a lone surrogate), if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return None
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for k, v in items:
        for part in (k, v) if isinstance(value, dict) else (v,):
            bad = _find_surrogate(part)
            if bad is not None:
                return bad
    return None


def parse_settings(settings: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """``--set`` JSON -> TrainConfig fields merged over the options' values.

    Args:
        settings: The ``--set`` text (``None``: no extra settings).
        options: The command's values keyed by option name (``"--epochs"``: 1, ...); an
            option left out counts as given at its default.

    Raises:
        ConfigError: For text that is not a JSON object, strings UTF-8 cannot hold, or a key
            that an explicitly given option also sets.
    """
    from acd_engine.errors import ConfigError

    given = {opt: options.get(opt, default) for opt, (_, default) in OPTION_FIELDS.items()}
    fields = {field: given[opt] for opt, (field, _) in OPTION_FIELDS.items()}
    if not settings:
        return fields
    try:
        extra = json.loads(settings)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"--set must be a JSON object, got {settings[:200]!r}: {exc}") from None
    if not isinstance(extra, dict):
        raise ConfigError(
            f"--set must be a JSON object, got {type(extra).__name__} {settings[:200]!r}"
        )
    try:
        bad = _find_surrogate(extra)
    except RecursionError:
        raise ConfigError("--set must be a JSON object, got one nested too deeply") from None
    if bad is not None:
        raise ConfigError(f"--set must hold valid Unicode text, got {bad[:80]!r}")
    for opt, (field, default) in OPTION_FIELDS.items():
        if field in extra and given[opt] != default:
            raise ConfigError(
                f"--set {field} must not repeat {opt}, got both {extra[field]!r} and "
                f"{given[opt]!r}; give it once"
            )
    return {**fields, **extra}


def check_inputs(anchors: Path | None, judge: str) -> None:
    """The anchor file and judge must be usable before a model is loaded for them.

    Raises:
        ConfigError: For an unreadable, non-UTF-8 or malformed anchor file, one whose train
            split lacks a harmful or a benign anchor (OPO needs both), or an unknown judge.
    """
    from acd_engine.errors import ConfigError
    from acd_engine.eval.judges import available_judges
    from acd_engine.training.anchors import load_anchors

    if judge not in available_judges():
        from acd_engine.eval.judges import get_judge

        get_judge(judge)  # raises the registry's did-you-mean ConfigError
    if anchors is None:
        return
    train = load_anchors("train", anchors)
    labels = {a.label for a in train}
    missing = sorted({"harmful", "benign"} - labels)
    if missing:
        raise ConfigError(
            f"--anchors train split must have harmful and benign anchors, got none "
            f"{' or '.join(missing)} in '{anchors}' ({len(train)} train anchors)"
        )


def train_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where to write the pack (.safetensors).")
    ],
    model: ModelOpt = None,
    epochs: Annotated[
        int, typer.Option("--epochs", help="Training epochs (each validated, see docs/opo.md).")
    ] = 3,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate.")] = 3e-3,
    n_virtual: Annotated[
        int | None,
        typer.Option("--n-virtual", help="Virtual tokens per prompt (default: init text length)."),
    ] = None,
    init: Annotated[
        str, typer.Option("--init", help="manual | short: initial prompt texts.")
    ] = "short",
    samples: Annotated[
        int, typer.Option("--samples", help="Responses per instruction and prompt.")
    ] = 1,
    sample_batch_size: Annotated[
        int,
        typer.Option(
            "--sample-batch-size",
            help="Conversations sampled together (raise it on a GPU; part of the data's "
            "identity, so a resume must keep it).",
        ),
    ] = 24,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling and data order.")] = 0,
    val_alpha: Annotated[
        float, typer.Option("--alpha", help="alpha used for model selection.")
    ] = 0.5,
    val_tau: Annotated[
        float, typer.Option("--plausibility", help="tau used for model selection.")
    ] = 0.0,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after this many steps (resume later).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint (--checkpoint).")
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Response cache (default ~/.cache/acd/opo).")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="JSON report path (default <out>.report.json).")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Resumable state (default <out>.ckpt.pt). With --resume and a finished "
            "checkpoint, only the pack and report are written.",
        ),
    ] = None,
    anchors: Annotated[
        Path | None,
        typer.Option("--anchors", help="Your own anchor JSONL (default: the packaged set)."),
    ] = None,
    settings: Annotated[
        str | None,
        typer.Option("--set", help="More TrainConfig fields as JSON, e.g. '{\"ul_weight\": 0.5}'."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto | cpu | cuda | mps (auto: CUDA when present).")
    ] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA, else float32); "
            "the soft prompts train in float32 whatever the model's dtype.",
        ),
    ] = "auto",
    gate: Annotated[
        bool,
        typer.Option(
            "--gate/--no-gate",
            help="Fit the safety gate on the anchors, calibrate its threshold on the "
            "validation split and store it in the pack (default on; acd gate refits it).",
        ),
    ] = True,
    gate_max_fpr: Annotated[
        float,
        typer.Option("--gate-max-fpr", help="Most benign val anchors the gate may flag."),
    ] = 0.05,
    verbose: VerboseOpt = False,
) -> None:
    """Train the SP/AP soft prompts (Opposite Prompt Optimisation) and the safety gate for a
    model, and write its prompt pack: one command from a model folder to a pack."""
    setup_logging(verbose)

    from acd_engine.errors import ACDError

    try:
        import torch
        from tqdm.auto import tqdm

        from acd_engine.config import ModelConfig
        from acd_engine.errors import ConfigError
        from acd_engine.runtime.engine import get_engine
        from acd_engine.training.config import TrainConfig
        from acd_engine.training.data import default_cache_dir
        from acd_engine.training.estimate import RunEstimate, format_estimate
        from acd_engine.training.gate_fit import GateFitConfig
        from acd_engine.training.run import check_outputs, report_path, train_pack, trained_path
        from acd_engine.training.summary import format_summary

        values = parse_settings(
            settings,
            {
                "--epochs": epochs,
                "--lr": lr,
                "--n-virtual": n_virtual,
                "--init": init,
                "--samples": samples,
                "--sample-batch-size": sample_batch_size,
                "--batch-size": batch_size,
                "--seed": seed,
                "--alpha": val_alpha,
                "--plausibility": val_tau,
                "--max-steps": max_steps,
            },
        )
        cfg = TrainConfig(**values)
        gate_cfg = GateFitConfig(max_fpr=gate_max_fpr) if gate else None
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        ModelConfig(model=model, device=device, dtype=dtype)  # a bad --device fails here
        check_inputs(anchors, cfg.judge)
        check_outputs(
            out,
            report=report,
            checkpoint=checkpoint,
            cache_dir=cache_dir or default_cache_dir(),
            resume=resume,
            trained=trained_path(out) if gate else None,
        )
        if threads is not None:
            torch.set_num_threads(threads)
        engine = get_engine(model, device=device, dtype=dtype)
        bars: dict[str, Any] = {}

        def on_estimate(estimate: RunEstimate) -> None:
            typer.echo(format_estimate(estimate))

        def on_gate(n: int) -> None:
            if "gate" not in bars:
                bars["gate"] = tqdm(desc="gate: reading", unit="placement", file=sys.stderr)
            bars["gate"].update(n)

        def on_data(n: int) -> None:
            if "data" not in bars:
                bars["data"] = tqdm(desc="sampling", unit="resp", file=sys.stderr)
            bars["data"].update(n)

        def on_step(info: dict[str, Any]) -> None:
            if "train" not in bars:
                bars["train"] = tqdm(
                    total=info["steps_total"],
                    initial=info["step"] - 1,
                    desc="training",
                    unit="step",
                    file=sys.stderr,
                )
            bars["train"].set_postfix(epoch=info["epoch"], loss=f"{info['loss']:.3f}")
            bars["train"].update(1)

        try:
            result = train_pack(
                engine,
                cfg,
                out,
                resume=resume,
                cache_dir=cache_dir,
                report=report,
                data_progress=on_data,
                progress=on_step,
                anchors_path=anchors,
                checkpoint=checkpoint,
                gate=gate_cfg,
                gate_progress=on_gate,
                estimate=on_estimate,
            )
        finally:
            for bar in bars.values():
                bar.close()
        rep = result.report
        where = report or report_path(out)
        if result.completed:
            typer.echo(format_summary(rep["summary"]))
            typer.echo(f"report {where}; acd pack info {out} shows the pack")
        else:
            typer.echo(
                f"stopped after {rep['steps']} steps; continue with --resume; report {where}"
            )
    except ACDError as exc:
        fail(exc)
