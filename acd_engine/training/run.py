"""One OPO run end to end: data (cached), training (resumable), the gate, pack and report.

This is what ``acd train`` calls, so every figure in docs/opo.md comes from the same code
path as a user's run. Three phases, each resumable: sampling (the response cache), training
(the checkpoint) and the gate (the trained pack is kept before its gate is fitted, in
``<stem>.trained.safetensors``, so a rerun with ``--resume`` after an interruption there goes
straight to the gate). The final pack is written atomically, once, with its gate.

Outputs are checked before anything expensive (:func:`check_outputs`), because a run that
trains for an hour and then cannot write its pack has wasted the hour. If the final write
still fails (disk full, folder removed mid-run), the checkpoint already holds the finished
state, and :class:`PackWriteError` says how to write the pack from it without training again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from acd_engine.atomic import atomic_write_json, probe_writable
from acd_engine.errors import ACDError, ConfigError
from acd_engine.eval.judges import Judge, get_judge
from acd_engine.safety.prompts import PromptPack
from acd_engine.training.anchors import anchor_set_hash, load_anchors
from acd_engine.training.config import TrainConfig
from acd_engine.training.data import load_or_generate
from acd_engine.training.estimate import RunEstimate, estimate_run
from acd_engine.training.gate_fit import GateFitConfig, fit_pack_gate
from acd_engine.training.summary import pack_run_metadata, run_summary
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
    "trained_path",
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


def trained_path(out: Path) -> Path:
    """``pack.safetensors`` -> ``pack.trained.safetensors``: the trained pack before its gate
    is fitted, kept until the final pack is written so an interrupted gate phase resumes
    without training again."""
    return out.with_name(out.stem + ".trained.safetensors")


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
    trained: Path | None = None,
) -> None:
    """Refuse outputs that would fail after training (or overwrite a run's progress).

    Checks that ``out``, the report, the checkpoint and the trained pack kept for the gate
    phase (``trained``, if the run fits a gate) are distinct, writable file paths in existing
    folders, that the cache folder can be created and written, and that an existing
    checkpoint or trained pack is not silently overwritten by a run without ``resume``.

    Raises:
        ConfigError: naming the option and what is wrong with it.
    """
    ckpt = checkpoint or checkpoint_path(out)
    rep = report or report_path(out)
    targets = {"--out": out, "--report": rep, "--checkpoint": ckpt}
    if trained is not None:
        targets["--out's trained pack"] = trained
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
    if trained is not None and trained.exists() and not resume:
        raise ConfigError(
            f"--out's trained pack '{trained}' must not exist for a new run, got an earlier "
            "run's; pass --resume to fit its gate, or delete it to start over"
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


# Stopping rules: a trained pack made with other values is not what this run would train
# (a resume with more epochs trains on from the checkpoint), but nothing is mixed either.
_STOPPING = ("epochs", "patience")


def _kept_trained_pack(
    path: Path, engine: Any, cfg: TrainConfig, anchors_hash: str
) -> PromptPack | None:
    """The trained pack an interrupted run kept for its gate phase, if it is this run's.

    Refused, as a checkpoint is (:func:`check_checkpoint`), when it was made for another
    model, other anchors or with settings that change the result; None (train on) when only
    the stopping rules differ. Its ``created`` stamp is dropped, so the final pack is stamped
    when it is written, after its gate is fitted, as a pack written in one go is.
    """
    pack = PromptPack.load(path)
    try:
        training = json.loads(pack.metadata["training"])
        if not isinstance(training, dict):
            raise TypeError(type(training).__name__)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"trained pack '{path}' must hold the settings acd train wrote with it, got "
            f"{type(exc).__name__}: {exc}; delete it to train again"
        ) from None
    ours = resume_settings(cfg)
    check_checkpoint(
        path,
        {
            "fingerprint": json.dumps(pack.fingerprint),
            "anchors_hash": pack.metadata.get("anchor_set_hash"),
            "settings": json.dumps({k: training.get(k) for k in ours}),
        },
        {"fingerprint": dict(engine.fingerprint), "anchors_hash": anchors_hash, "settings": ours},
        what="trained pack",
    )
    changed = [k for k in _STOPPING if training.get(k) != getattr(cfg, k)]
    if changed:
        logger.info(
            "trained pack %s was made with other %s: training on from the checkpoint",
            path,
            " and ".join(changed),
        )
        return None
    pack.metadata.pop("created", None)
    pack.metadata.pop("created_with", None)
    return pack


def _kept_report(path: Path, pack: PromptPack) -> dict[str, Any]:
    """The report written when the kept trained pack was, or what the pack itself holds."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    training = json.loads(pack.metadata["training"])
    if isinstance(report, dict) and report.get("completed") and report.get("config") == training:
        return report
    val = json.loads(pack.metadata["val"]) if "val" in pack.metadata else None
    epoch = pack.metadata.get("selected_epoch")
    return {
        "completed": True,
        "config": training,
        "fingerprint": pack.fingerprint,
        "anchor_set_hash": pack.metadata.get("anchor_set_hash"),
        "selected_epoch": int(epoch) if epoch and epoch.isdigit() else None,
        "val": val,
    }


def _checkpoint_state(saved: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's progress (steps, validations) for the estimate; None if unreadable
    (the trainer refuses such a checkpoint itself, with its message)."""
    try:
        state = json.loads(saved["state"])
    except (KeyError, TypeError, ValueError):
        return None
    return state if isinstance(state, dict) else None


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
    gate_progress: Callable[[int], None] | None = None,
    estimate: Callable[[RunEstimate], None] | None = None,
) -> TrainResult:
    """Sample (or reuse) OPO data, train SP/AP, fit the gate, write the pack and the report.

    The pack is written only when training completed (``max_steps`` can stop it early; the
    checkpoint then holds the state for ``resume=True``). The report is written either way;
    a completed run's report holds a ``summary`` (:func:`~acd_engine.training.summary.
    run_summary`), whose run part the pack keeps in its metadata (``run``).

    Args:
        engine: Target model's engine.
        cfg: Run settings.
        out: Pack path (``.safetensors``).
        resume: Continue from the checkpoint if there is one. Its model, anchors and
            settings must match this run's (checked before any sampling). With a gate, a
            trained pack kept by an interrupted gate phase (:func:`trained_path`) is checked
            the same way and its gate fitted without sampling or training again.
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
        gate: How to fit the safety gate stored in the pack (:mod:`acd_engine.safety.gate`); None
            writes a pack without one. Its features are the plain rendering's hidden states,
            so it does not depend on SP/AP and is fitted once training completed; its
            threshold is calibrated on the anchors' validation split.
        gate_progress: Called with 1 after each placed anchor the gate phase reads.
        estimate: Called, before anything expensive, with the time each phase left will
            take, measured on ``engine`` (:func:`~acd_engine.training.estimate.
            estimate_run`); None measures nothing.

    Raises:
        PackWriteError: Training finished but the pack or report could not be written.
    """
    ckpt = checkpoint or checkpoint_path(out)
    where = report or report_path(out)
    staged = trained_path(out) if gate is not None else None
    anchors_hash = anchor_set_hash(anchors_path)
    state: dict[str, Any] | None = None
    if resume and ckpt.exists():
        # The cheap identity checks first: a mismatch must not cost a sampling pass.
        saved = read_checkpoint(ckpt)
        check_checkpoint(
            ckpt,
            saved,
            {
                "fingerprint": dict(engine.fingerprint),
                "anchors_hash": anchors_hash,
                "settings": resume_settings(cfg),
            },
        )
        state = _checkpoint_state(saved)
    kept = None
    if resume and staged is not None and staged.exists():
        kept = _kept_trained_pack(staged, engine, cfg, anchors_hash)
    if estimate is not None:
        estimate(
            estimate_run(
                engine,
                cfg,
                anchors_path=anchors_path,
                cache_dir=cache_dir,
                gate=gate,
                train_state=state,
                trained=kept is not None,
            )
        )
    phases: dict[str, float | None] = {"sampling": None, "training": None, "gate": None}
    recover = (
        f"the trained state is kept in '{ckpt}': rerun the same command with --resume "
        f"--checkpoint '{ckpt}' and a writable --out to write the pack without training again"
    )
    if kept is not None:
        logger.info("kept trained pack %s: fitting its gate without training again", staged)
        result = TrainResult(pack=kept, report=_kept_report(where, kept), completed=True)
        resumed: str | None = "gate"
    else:
        result = _train(
            engine, cfg, ckpt, resume, cache_dir, judge, data_progress, progress, anchors_path
        )
        phases["sampling"] = result.report.get("data_seconds")
        phases["training"] = result.report.pop("wall_seconds", None)
        resumed = "training" if state is not None else None
    result.report["pack"] = str(out) if result.completed else None
    if result.completed and staged is not None and kept is None:
        # The trained pack before its gate: a gate phase cut short resumes from here.
        _save_or_raise(PromptPack(**_fields(result.pack)), staged, out, where, result, recover)
        result.report["gate"] = {"status": "pending", "trained_pack": str(staged)}
        failed = _write_report(where, result.report)
        if failed is not None:
            raise PackWriteError(
                f"--report '{where}' must be writable, got {type(failed).__name__}: "
                f"{failed.strerror or failed}; {recover}"
            ) from failed
    if result.completed and gate is not None:
        recover = (
            f"the trained pack is kept in '{staged}': rerun the same command with --resume to "
            "fit its gate and write the pack without training again"
        )
        t_gate = time.perf_counter()
        fitted, gate_report = fit_pack_gate(engine, gate, anchors_path, gate_progress)
        phases["gate"] = time.perf_counter() - t_gate
        result.pack = dataclasses.replace(result.pack, gate=fitted)
        result.report["gate"] = {**gate_report, "seconds": phases["gate"]}
    if result.completed:
        weight = engine.model.get_input_embeddings().weight
        summary = run_summary(
            result.report,
            cfg=cfg,
            phases=phases,
            device=str(weight.device),
            dtype=str(weight.dtype).replace("torch.", ""),
            out=out,
            resumed=resumed,
        )
        result.report["summary"] = summary
        result.pack.metadata["run"] = pack_run_metadata(summary)
        _save_or_raise(result.pack, out, out, where, result, recover)
        logger.info("wrote %s", out)
        if staged is not None:
            staged.unlink(missing_ok=True)
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


def _fields(pack: PromptPack) -> dict[str, Any]:
    """A pack's fields for a copy whose metadata the copy's save may stamp on its own."""
    return {
        "sp": pack.sp,
        "ap": pack.ap,
        "fingerprint": pack.fingerprint,
        "metadata": dict(pack.metadata),
        "gate": pack.gate,
    }


def _save_or_raise(
    pack: PromptPack, path: Path, out: Path, where: Path, result: TrainResult, recover: str
) -> None:
    """``pack.save(path)``, or the report saying why not and a :class:`PackWriteError`
    saying how to write the pack without training again."""
    try:
        pack.save(path)
    except OSError as exc:
        result.report["pack"] = None
        result.report["pack_error"] = str(exc)
        if _write_report(where, result.report) is None:
            recover += f" (report written to '{where}')"
        kept = "" if path == out else f" (the trained pack before its gate, '{path}')"
        raise PackWriteError(
            f"--out '{out}' must be writable{kept}, got {type(exc).__name__}: "
            f"{exc.strerror or exc}; {recover}"
        ) from exc


def _train(
    engine: Any,
    cfg: TrainConfig,
    ckpt: Path,
    resume: bool,
    cache_dir: Path | None,
    judge: Judge | None,
    data_progress: Callable[[int], None] | None,
    progress: Callable[[dict[str, Any]], None] | None,
    anchors_path: Path | None,
) -> TrainResult:
    """The sampling and training phases (:func:`train_pack`'s first two); the report's
    ``data_seconds`` and ``wall_seconds`` are their wall times in this call."""
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
        anchors_hash=anchor_set_hash(anchors_path),
    )
    t1 = time.perf_counter()
    try:
        result = trainer.train(ckpt, resume=resume, progress=progress)
    except OSError as exc:  # a checkpoint write failed mid-run (disk full, folder gone)
        raise PackWriteError(
            f"--checkpoint '{ckpt}' must be writable, got {type(exc).__name__}: "
            f"{exc.strerror or exc}; the last checkpoint written is intact: fix the cause and "
            "rerun the same command with --resume"
        ) from exc
    result.report["wall_seconds"] = time.perf_counter() - t1
    return result
