"""Checkpoints and resume: a checkpoint resumes only the run that made it (same anchors,
data, model and data settings; a foreign or older file is refused, before any sampling), a
failed checkpoint write is a typed error, a diverging loss stops before it reaches the
saved prompts, and the outputs of a fresh run and of a resume are checked before it starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from acd_engine.errors import ConfigError
from acd_engine.training.data import OPOSplits, load_or_generate
from acd_engine.training.run import PackWriteError, check_outputs, checkpoint_path, train_pack
from acd_engine.training.trainer import OPOTrainer, encode_splits


@pytest.fixture(scope="module")
def splits(tiny_engine, small_anchors_path, tmp_path_factory) -> OPOSplits:
    from acd_engine.training.config import TrainConfig

    return load_or_generate(
        tiny_engine,
        TrainConfig(gen_max_new_tokens=4, gen_batch_size=8),
        cache_dir=tmp_path_factory.mktemp("cache"),
        anchors_path=small_anchors_path,
    )


def trainer(engine, splits, cfg, anchors_hash="a" * 64, examples=None) -> OPOTrainer:
    return OPOTrainer(
        engine,
        examples if examples is not None else encode_splits(engine, splits, cfg),
        cfg,
        val_anchors=[],
        anchors_hash=anchors_hash,
    )


@pytest.fixture()
def ckpt(tiny_engine, splits, fast_cfg, tmp_path) -> Path:
    """A checkpoint of one step, made with anchors hash 'aaa...'."""
    path = tmp_path / "c.ckpt.pt"
    trainer(tiny_engine, splits, fast_cfg.replace(val_every=0, max_steps=1)).train(path)
    return path


def test_resume_with_other_anchors_is_refused(tiny_engine, splits, fast_cfg, ckpt):
    other = trainer(tiny_engine, splits, fast_cfg.replace(val_every=0), anchors_hash="b" * 64)
    with pytest.raises(
        ConfigError,
        match=r"was made with anchors hash aaaaaaaaaaaa\.\.\., got bbbbbbbbbbbb\.\.\.; use a new "
        r"--out or delete the checkpoint",
    ):
        other.train(ckpt, resume=True)


def test_resume_with_other_data_is_refused(tiny_engine, splits, fast_cfg, ckpt):
    cfg = fast_cfg.replace(val_every=0)
    fewer = encode_splits(tiny_engine, splits, cfg)[:-1]
    with pytest.raises(ConfigError, match=r"was made with training data hash"):
        trainer(tiny_engine, splits, cfg, examples=fewer).train(ckpt, resume=True)


def test_resume_on_another_model_is_refused(tiny_engine, splits, fast_cfg, ckpt):
    state = torch.load(ckpt, weights_only=True)
    fp = json.loads(state["fingerprint"])
    state["fingerprint"] = json.dumps({**fp, "embedding_hash": "0" * 16})
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match=r"made with another model: embedding_hash \(checkpoint"):
        trainer(tiny_engine, splits, fast_cfg.replace(val_every=0)).train(ckpt, resume=True)


def test_resume_with_other_data_settings_is_refused(tiny_engine, splits, fast_cfg, ckpt):
    other = trainer(tiny_engine, splits, fast_cfg.replace(val_every=0, gen_batch_size=3))
    with pytest.raises(ConfigError, match=r"differs: gen_batch_size \(checkpoint 8, now 3\)"):
        other.train(ckpt, resume=True)


def test_checkpoint_from_before_identity_is_refused(tiny_engine, splits, fast_cfg, ckpt):
    state = torch.load(ckpt, weights_only=True)
    for key in ("fingerprint", "anchors_hash", "data_hash"):
        del state[key]
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match=r"model fingerprint \(not recorded\)"):
        trainer(tiny_engine, splits, fast_cfg.replace(val_every=0)).train(ckpt, resume=True)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a checkpoint", r"must be a checkpoint written by acd train, got"),
        (None, r"must hold \['ap', 'optimizer'"),
    ],
)
def test_foreign_checkpoint_files_are_refused(
    tiny_engine, splits, fast_cfg, tmp_path, content, match
):
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"sp": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        trainer(tiny_engine, splits, fast_cfg.replace(val_every=0)).train(path, resume=True)


def test_train_pack_refuses_other_anchors_before_sampling(
    tiny_engine, small_anchors_path, fast_cfg, tmp_path, monkeypatch
):
    out = tmp_path / "p.safetensors"
    cfg = fast_cfg.replace(val_every=0, max_steps=1)
    train_pack(tiny_engine, cfg, out, cache_dir=tmp_path / "cache", anchors_path=small_anchors_path)
    assert checkpoint_path(out).exists()

    def no_sampling(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("sampled before the checkpoint was checked")

    monkeypatch.setattr("acd_engine.training.run.load_or_generate", no_sampling)
    with pytest.raises(ConfigError, match=r"was made with anchors hash .*, got "):
        train_pack(tiny_engine, cfg.replace(max_steps=None), out, resume=True)  # packaged set


def test_checkpoint_write_failure_is_a_typed_error(
    tiny_engine, small_anchors_path, fast_cfg, tmp_path, monkeypatch
):
    def disk_full(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("acd_engine.training.trainer.atomic_write", disk_full)
    with pytest.raises(PackWriteError, match=r"--checkpoint '.*' must be writable, got OSError"):
        train_pack(
            tiny_engine,
            fast_cfg.replace(val_every=0),
            tmp_path / "p.safetensors",
            cache_dir=tmp_path / "cache",
            anchors_path=small_anchors_path,
        )


def test_check_outputs_accepts_a_fresh_run_and_a_resume(tmp_path):
    out = tmp_path / "p.safetensors"
    check_outputs(out, cache_dir=tmp_path / "new" / "cache")
    assert (tmp_path / "new" / "cache").is_dir()
    checkpoint_path(out).write_bytes(b"x")
    check_outputs(out, resume=True)
    with pytest.raises(ConfigError, match="must not exist for a new run"):
        check_outputs(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "p.ckpt.pt"]  # probes removed


def test_a_diverging_loss_stops_before_the_prompts_are_poisoned(
    tiny_engine, splits, fast_cfg, tmp_path, monkeypatch
):
    path = tmp_path / "d.ckpt.pt"
    cfg = fast_cfg.replace(val_every=0)
    t = trainer(tiny_engine, splits, cfg)
    real = OPOTrainer._batch_loss
    calls: list[int] = []

    def nan_on_second(self: OPOTrainer, *args: Any) -> Any:
        calls.append(1)
        loss, l_sp, l_ap = real(self, *args)
        return (loss, l_sp, float("nan")) if len(calls) == 2 else (loss, l_sp, l_ap)

    monkeypatch.setattr(OPOTrainer, "_batch_loss", nan_on_second)
    with pytest.raises(ConfigError, match=r"training loss must be finite, got nan at step 2"):
        t.train(path)
    saved = torch.load(path, weights_only=True)  # checkpoint_every=1: step 1 was saved
    assert json.loads(saved["state"])["step"] == 1 and torch.isfinite(saved["sp"]).all()
