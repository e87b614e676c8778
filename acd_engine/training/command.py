"""``acd train``: the typer command function (registered by the CLI as ``train``).

torch and transformers are imported inside the function so ``acd --help`` stays instant.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["train_command"]


def train_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where to write the pack (.safetensors).")
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Local HF model dir or .gguf file (default: embedded SmolLM2)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training data.")] = 1,
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
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling and data order.")] = 0,
    val_alpha: Annotated[
        float, typer.Option("--alpha", help="alpha used for model selection.")
    ] = 0.5,
    val_tau: Annotated[
        float, typer.Option("--plausibility", help="tau used for model selection.")
    ] = 0.3,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after this many steps (resume later).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint next to --out.")
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Response cache (default ~/.cache/acd/opo).")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="JSON report path (default <out>.report.json).")
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
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")
    ] = False,
) -> None:
    """Train the SP/AP soft prompts (Opposite Prompt Optimisation) and write a prompt pack."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    from acd_engine.errors import ACDError

    try:
        import torch
        from tqdm.auto import tqdm

        from acd_engine.engine import get_engine
        from acd_engine.errors import ConfigError
        from acd_engine.training.config import TrainConfig
        from acd_engine.training.run import report_path, train_pack

        try:
            extra: dict[str, Any] = json.loads(settings) if settings else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--set must be a JSON object, got {settings!r}: {exc}") from None
        cfg = TrainConfig(
            epochs=epochs,
            lr=lr,
            n_virtual=n_virtual,
            init=init,
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            val_alpha=val_alpha,
            val_plausibility=val_tau,
            max_steps=max_steps,
            **extra,
        )
        if threads is not None:
            torch.set_num_threads(threads)
        engine = get_engine(model)
        bars: dict[str, Any] = {}

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
            )
        finally:
            for bar in bars.values():
                bar.close()
        rep = result.report
        where = report or report_path(out)
        if result.completed:
            val = rep.get("val") or {}
            typer.echo(
                f"wrote {out} (epoch {rep['selected_epoch']}, {rep['train_seconds']:.0f}s training; "
                f"val refusal {val.get('harmful_refusal')}, over-refusal {val.get('over_refusal')}); "
                f"report {where}"
            )
        else:
            typer.echo(
                f"stopped after {rep['steps']} steps; continue with --resume; report {where}"
            )
    except ACDError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
