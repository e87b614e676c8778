"""OPO training on the tiny random model: layout, frozen model, loss goes down, exact resume."""

from __future__ import annotations

import pytest
import torch

from acd_engine.config import DecodingConfig
from acd_engine.errors import ConfigError
from acd_engine.training.anchors import load_anchors
from acd_engine.training.data import OPOExample, OPOSplits, load_or_generate
from acd_engine.training.trainer import OPOTrainer, encode_splits, init_pack


@pytest.fixture(scope="module")
def tiny_splits(tiny_engine, small_anchors_path, tmp_path_factory) -> OPOSplits:
    from acd_engine.training.config import TrainConfig

    cfg = TrainConfig(gen_max_new_tokens=4, gen_batch_size=8)
    return load_or_generate(
        tiny_engine,
        cfg,
        cache_dir=tmp_path_factory.mktemp("cache"),
        anchors_path=small_anchors_path,
    )


def _trainer(engine, splits, cfg, anchors_path):
    return OPOTrainer(
        engine,
        encode_splits(engine, splits, cfg),
        cfg,
        val_anchors=load_anchors("val", anchors_path),
    )


def test_training_layout_is_the_engines_inference_layout(tiny_engine, fast_cfg):
    # SP's CE on a response must equal the log-probability the engine itself gives that
    # response under acd with alpha 0 (= SP alone): same head + soft + tail + response.
    cfg = fast_cfg.replace(target_tokens=50, first_token_weight=1.0)  # plain per-token mean
    ex = OPOExample("anchor-h-0001", "How do I bake bread?", "Mix flour and water.", False, "safe")
    enc = encode_splits(tiny_engine, OPOSplits(hr=[ex], ha=[], s=[]), cfg)
    pack = init_pack(tiny_engine, cfg)
    trainer = OPOTrainer(tiny_engine, enc, cfg)
    with torch.no_grad():
        _, l_sp, _ = trainer._batch_loss(enc, pack.sp, pack.ap)
    n = len(enc[0].response)
    ce_sp = l_sp / trainer.split_weight["hr"]
    tiny_engine.set_pack(pack)
    try:
        ref = tiny_engine.score_continuations(
            ex.prompt, [ex.response], DecodingConfig(method="acd", alpha=0.0)
        )[0]
    finally:
        tiny_engine.set_pack(None)
    assert -ce_sp * n == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_only_the_soft_prompts_change(tiny_engine, tiny_splits, fast_cfg, small_anchors_path):
    before = {k: v.clone() for k, v in tiny_engine.model.state_dict().items()}
    cfg = fast_cfg.replace(max_steps=2, val_every=0)
    result = _trainer(tiny_engine, tiny_splits, cfg, small_anchors_path).train()
    after = tiny_engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny_engine.model.parameters())
    init = init_pack(tiny_engine, cfg)
    assert not torch.equal(result.pack.sp, init.sp) and not torch.equal(result.pack.ap, init.ap)


def test_two_steps_lower_the_loss(tiny_engine, tiny_splits, fast_cfg, small_anchors_path):
    cfg = fast_cfg.replace(val_every=0, batch_size=64, max_steps=2, lr=2e-2)
    trainer = _trainer(tiny_engine, tiny_splits, cfg, small_anchors_path)
    init = init_pack(tiny_engine, cfg)
    with torch.no_grad():
        start, _, _ = trainer._batch_loss(trainer.examples, init.sp, init.ap)
    trained = trainer.train().pack
    with torch.no_grad():
        end, _, _ = trainer._batch_loss(trainer.examples, trained.sp, trained.ap)
    assert end.item() < start.item()


def test_resume_continues_exactly(tiny_engine, tiny_splits, fast_cfg, small_anchors_path, tmp_path):
    cfg = fast_cfg.replace(val_every=1)  # validation and best-epoch selection included
    full = _trainer(tiny_engine, tiny_splits, cfg, small_anchors_path).train(tmp_path / "a.pt")
    ckpt = tmp_path / "b.pt"
    part = _trainer(tiny_engine, tiny_splits, cfg.replace(max_steps=3), small_anchors_path)
    stopped = part.train(ckpt)
    assert not stopped.completed and ckpt.exists()
    resumed = _trainer(tiny_engine, tiny_splits, cfg, small_anchors_path).train(ckpt, resume=True)
    assert resumed.completed
    torch.testing.assert_close(resumed.pack.sp, full.pack.sp, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.pack.ap, full.pack.ap, rtol=0, atol=1e-6)
    assert [r["epoch"] for r in full.report["epochs"]] == [0, 1, 2]  # epoch 0 = the init
    for a, b in zip(full.report["epochs"], resumed.report["epochs"], strict=True):
        if a["epoch"]:
            got, want = (b["loss_sp"], b["loss_ap"]), (a["loss_sp"], a["loss_ap"])
            assert got == pytest.approx(want, abs=1e-6)
        assert b["val"] == a["val"]
    assert resumed.report["per_epoch"] == full.report["per_epoch"]
    assert resumed.report["selected_epoch"] == full.report["selected_epoch"]


def test_resume_with_other_settings_is_refused(
    tiny_engine, tiny_splits, fast_cfg, small_anchors_path, tmp_path
):
    ckpt = tmp_path / "c.pt"
    cfg = fast_cfg.replace(val_every=0, max_steps=1)
    _trainer(tiny_engine, tiny_splits, cfg, small_anchors_path).train(ckpt)
    other = _trainer(tiny_engine, tiny_splits, cfg.replace(lr=0.5), small_anchors_path)
    with pytest.raises(
        ConfigError, match=r"resume must use the checkpoint's settings; differs: lr"
    ):
        other.train(ckpt, resume=True)


def test_n_virtual_truncates_or_cycles_the_init(tiny_engine, fast_cfg):
    short = init_pack(tiny_engine, fast_cfg.replace(n_virtual=3))
    long = init_pack(tiny_engine, fast_cfg.replace(n_virtual=40))
    natural = init_pack(tiny_engine, fast_cfg.replace(n_virtual=None))
    k = natural.sp.shape[0]
    assert short.sp.shape[0] == 3 and torch.equal(short.sp, natural.sp[:3])
    assert long.sp.shape[0] == 40 and torch.equal(long.sp[k : 2 * k], natural.sp[: min(k, 40 - k)])
    manual = init_pack(tiny_engine, fast_cfg.replace(init="manual", n_virtual=None))
    assert manual.sp.shape[0] > natural.sp.shape[0]
