"""Fixtures for the OPO tests: a small anchor file and fast settings for the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acd_engine.training.anchors import load_anchors
from acd_engine.training.config import TrainConfig


@pytest.fixture(scope="session")
def small_anchors_path(tmp_path_factory) -> Path:
    """4 harmful + 4 benign train anchors and 2 + 2 val anchors from the packaged set."""
    every = load_anchors("all")
    picked = []
    for label in ("harmful", "benign"):
        for split, n in (("train", 4), ("val", 2)):
            picked += [a for a in every if a.label == label and a.split == split][:n]
    path = tmp_path_factory.mktemp("anchors") / "anchors.jsonl"
    path.write_text("".join(json.dumps(a.model_dump()) + "\n" for a in picked), encoding="utf-8")
    return path


@pytest.fixture()
def fast_cfg() -> TrainConfig:
    """Settings that make a full run on the tiny model take seconds."""
    return TrainConfig(
        gen_max_new_tokens=4,
        gen_batch_size=8,
        epochs=2,
        examples_per_epoch=8,
        batch_size=4,
        n_virtual=4,
        target_tokens=6,
        lr=1e-2,
        val_max_new_tokens=3,
        checkpoint_every=1,
    )
