"""One OPO run end to end: data (cached), training (resumable), pack and report on disk.

This is what ``acd train`` calls; the sweep script calls it too, so every figure in
docs/opo.md comes from the same code path as a user's run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from acd_engine.eval.judges import Judge, get_judge
from acd_engine.training.anchors import anchor_set_hash, load_anchors
from acd_engine.training.config import TrainConfig
from acd_engine.training.data import load_or_generate
from acd_engine.training.trainer import OPOTrainer, TrainResult, encode_splits, write_json_atomic

__all__ = ["checkpoint_path", "report_path", "train_pack"]

logger = logging.getLogger(__name__)


def checkpoint_path(out: Path) -> Path:
    """``pack.safetensors`` -> ``pack.ckpt.pt`` next to it."""
    return out.with_name(out.stem + ".ckpt.pt")


def report_path(out: Path) -> Path:
    """``pack.safetensors`` -> ``pack.report.json`` next to it."""
    return out.with_name(out.stem + ".report.json")


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
) -> TrainResult:
    """Sample (or reuse) OPO data, train SP/AP, write the pack and the JSON report.

    The pack is written only when training completed (``max_steps`` can stop it early; the
    checkpoint then holds the state for ``resume=True``). The report is written either way.

    Args:
        engine: Target model's engine.
        cfg: Run settings.
        out: Pack path (``.safetensors``).
        resume: Continue from the checkpoint next to ``out`` if there is one.
        cache_dir: Response cache folder (default ``~/.cache/acd/opo``).
        report: Report path (default ``<out stem>.report.json``).
        judge: Labeller for data and validation (default ``get_judge(cfg.judge)``).
        data_progress: Called with the number of responses sampled per batch.
        progress: Called after each training step (see :meth:`OPOTrainer.train`).
        anchors_path: Your own anchor JSONL (same schema as the packaged set; its ``train``
            split is trained on, its ``val`` split selects the epoch).
    """
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
    result = trainer.train(checkpoint_path(out), resume=resume, progress=progress)
    result.report["pack"] = str(out) if result.completed else None
    if result.completed:
        result.pack.save(out)
        logger.info("wrote %s", out)
    else:
        logger.info("stopped after %d steps; resume with --resume", result.report["steps"])
    write_json_atomic(report or report_path(out), result.report)
    return result
