"""One OPO run end to end: data (cached), training (resumable), pack and report on disk.

This is what ``acd train`` calls; the sweep script calls it too, so every figure in
docs/opo.md comes from the same code path as a user's run.

Outputs are checked before anything expensive (:func:`check_outputs`), because a run that
trains for an hour and then cannot write its pack has wasted the hour. If the final write
still fails (disk full, folder removed mid-run), the checkpoint already holds the finished
state, and :class:`PackWriteError` says how to write the pack from it without training again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from acd_engine.atomic import atomic_write_json, probe_writable
from acd_engine.errors import ACDError, ConfigError
from acd_engine.eval.judges import Judge, get_judge
from acd_engine.training.anchors import anchor_set_hash, load_anchors
from acd_engine.training.config import TrainConfig
from acd_engine.training.data import load_or_generate
from acd_engine.training.gate_fit import GateFitConfig, fit_pack_gate
from acd_engine.training.trainer import (
    OPOTrainer,
    TrainResult,
    check_checkpoint,
    encode_splits,
    read_checkpoint,
    resume_settings,
)

__all__ = [
    "PackWriteError",
    "check_outputs",
    "checkpoint_path",
    "report_path",
    "train_pack",
]

logger = logging.getLogger(__name__)


class PackWriteError(ACDError, OSError):
    """Training finished but the pack or report could not be written; the checkpoint has it.

    An ``OSError`` (callers that catch those keep working) and an ``ACDError`` (the CLI shows
    one ``error:`` line with the way to recover instead of a traceback).
    """


def checkpoint_path(out: Path) -> Path:
    """``pack.safetensors`` -> ``pack.ckpt.pt`` next to it."""
    return out.with_name(out.stem + ".ckpt.pt")


def report_path(out: Path) -> Path:
    """``pack.safetensors`` -> ``pack.report.json`` next to it."""
    return out.with_name(out.stem + ".report.json")


def _check_file_target(option: str, path: Path) -> None:
    """``path`` must be creatable as a file: not a folder, its folder existing and writable."""
    if path.is_dir():
        raise ConfigError(f"{option} must be a file path, got the existing folder '{path}'")
    folder = path.parent
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "missing"
        raise ConfigError(
            f"{option} must be in an existing folder, got '{path}' (folder '{folder}' is "
            f"{what}); create the folder first"
        )
    _probe_writable(option, path, folder)


def _probe_writable(option: str, path: Path, folder: Path) -> None:
    """Create and delete a temp file in ``folder``: the only honest test of writability."""
    try:
        probe_writable(folder)
    except OSError as exc:
        raise ConfigError(
            f"{option} must be writable, got '{path}' ({exc.strerror or exc})"
        ) from None


def check_outputs(
    out: Path,
    *,
    report: Path | None = None,
    checkpoint: Path | None = None,
    cache_dir: Path | None = None,
    resume: bool = False,
) -> None:
    """Refuse outputs that would fail after training (or overwrite a run's progress).

    Checks that ``out``, the report and the checkpoint are distinct, writable file paths in
    existing folders, that the cache folder can be created and written, and that an existing
    checkpoint is not silently overwritten by a run without ``resume``.

    Raises:
        ConfigError: naming the option and what is wrong with it.
    """
    ckpt = checkpoint or checkpoint_path(out)
    rep = report or report_path(out)
    targets = {"--out": out, "--report": rep, "--checkpoint": ckpt}
    for option, path in targets.items():
        _check_file_target(option, path)
    seen: dict[Path, str] = {}
    for option, path in targets.items():
        key = path.resolve()
        if key in seen:
            raise ConfigError(f"{option} must differ from {seen[key]}, got '{path}' for both")
        seen[key] = option
    if ckpt.exists() and not resume:
        raise ConfigError(
            f"--checkpoint '{ckpt}' must not exist for a new run, got an earlier run's "
            "checkpoint; pass --resume to continue it, or delete it to start over"
        )
    if cache_dir is not None:
        if cache_dir.exists() and not cache_dir.is_dir():
            raise ConfigError(f"--cache-dir must be a folder, got the file '{cache_dir}'")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"--cache-dir must be a folder that can be created, got '{cache_dir}' "
                f"({exc.strerror or exc})"
            ) from None
        _probe_writable("--cache-dir", cache_dir, cache_dir)


def _write_report(path: Path, report: dict[str, Any]) -> OSError | None:
    try:
        atomic_write_json(path, report)
    except OSError as exc:
        return exc
    return None


def train_pack(
    engine: Any,
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    cache_dir: Path | None = None,
    report: Path | None = None,
    judge: Judge | None = None,
    data_progress: Callable[[int], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    anchors_path: Path | None = None,
    checkpoint: Path | None = None,
    gate: GateFitConfig | None = None,
) -> TrainResult:
    """Sample (or reuse) OPO data, train SP/AP, write the pack and the JSON report.

    The pack is written only when training completed (``max_steps`` can stop it early; the
    checkpoint then holds the state for ``resume=True``). The report is written either way.

    Args:
        engine: Target model's engine.
        cfg: Run settings.
        out: Pack path (``.safetensors``).
        resume: Continue from the checkpoint if there is one. Its model, anchors and
            settings must match this run's (checked before any sampling).
        cache_dir: Response cache folder (default ``~/.cache/acd/opo``).
        report: Report path (default ``<out stem>.report.json``).
        judge: Labeller for data and validation (default ``get_judge(cfg.judge)``).
        data_progress: Called with the number of responses sampled per batch.
        progress: Called after each training step (see :meth:`OPOTrainer.train`).
        anchors_path: Your own anchor JSONL (same schema as the packaged set; its ``train``
            split is trained on, its ``val`` split selects the epoch).
        checkpoint: Resumable state (default ``<out stem>.ckpt.pt``). Resuming a finished
            checkpoint trains nothing and just writes the pack and report, which is how a
            run whose final write failed is recovered to another ``out``.
        gate: How to fit the safety gate stored in the pack (:mod:`acd_engine.gate`); None
            writes a pack without one. Its features are the plain rendering's hidden states,
            so it does not depend on SP/AP and is fitted once training completed.

    Raises:
        PackWriteError: Training finished but the pack or report could not be written.
    """
    ckpt = checkpoint or checkpoint_path(out)
    anchors_hash = anchor_set_hash(anchors_path)
    if resume and ckpt.exists():
        # The cheap identity checks first: a mismatch must not cost a sampling pass.
        check_checkpoint(
            ckpt,
            read_checkpoint(ckpt),
            {
                "fingerprint": dict(engine.fingerprint),
                "anchors_hash": anchors_hash,
                "settings": resume_settings(cfg),
            },
        )
    judge = judge or get_judge(cfg.judge)
    t0 = time.perf_counter()
    splits = load_or_generate(
        engine,
        cfg,
        cache_dir=cache_dir,
        judge=judge,
        anchors_path=anchors_path,
        progress=data_progress,
    )
    data_seconds = time.perf_counter() - t0
    examples = encode_splits(engine, splits, cfg)
    info = {
        "split_sizes": splits.sizes(),
        "fallback": splits.fallback,
        "fallback_used": bool(splits.fallback),
        "data_stats": splits.stats,
        "data_seconds": data_seconds,
    }
    trainer = OPOTrainer(
        engine,
        examples,
        cfg,
        splits_info=info,
        judge=judge,
        val_anchors=load_anchors("val", anchors_path),
        anchors_hash=anchors_hash,
    )
    try:
        result = trainer.train(ckpt, resume=resume, progress=progress)
    except OSError as exc:  # a checkpoint write failed mid-run (disk full, folder gone)
        raise PackWriteError(
            f"--checkpoint '{ckpt}' must be writable, got {type(exc).__name__}: "
            f"{exc.strerror or exc}; the last checkpoint written is intact: fix the cause and "
            "rerun the same command with --resume"
        ) from exc
    result.report["pack"] = str(out) if result.completed else None
    where = report or report_path(out)
    recover = (
        f"the trained state is kept in '{ckpt}': rerun the same command with --resume "
        f"--checkpoint '{ckpt}' and a writable --out to write the pack without training again"
    )
    if result.completed and gate is not None:
        t_gate = time.perf_counter()
        fitted, gate_report = fit_pack_gate(engine, gate, anchors_path)
        result.pack = dataclasses.replace(result.pack, gate=fitted)
        result.report["gate"] = {**gate_report, "seconds": time.perf_counter() - t_gate}
    if result.completed:
        try:
            result.pack.save(out)
        except OSError as exc:
            result.report["pack"] = None
            result.report["pack_error"] = str(exc)
            if _write_report(where, result.report) is None:
                recover += f" (report written to '{where}')"
            raise PackWriteError(
                f"--out '{out}' must be writable, got {type(exc).__name__}: "
                f"{exc.strerror or exc}; {recover}"
            ) from exc
        logger.info("wrote %s", out)
    else:
        logger.info("stopped after %d steps; resume with --resume", result.report["steps"])
    failed = _write_report(where, result.report)
    if failed is not None:
        raise PackWriteError(
            f"--report '{where}' must be writable, got {type(failed).__name__}: "
            f"{failed.strerror or failed}; "
            + (f"the pack was written to '{out}'" if result.completed else recover)
        ) from failed
    return result
