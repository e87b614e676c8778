"""Model selection and epoch composition: the rule, the validation subset, the epoch draw."""

from __future__ import annotations

import pytest
import torch

from acd_engine.errors import ConfigError
from acd_engine.training.anchors import load_anchors
from acd_engine.training.config import TrainConfig
from acd_engine.training.data import OPOExample, OPOSplits
from acd_engine.training.evaluate import selection_key, validation_subset
from acd_engine.training.trainer import EncodedExample, OPOTrainer, encode_splits, init_pack


def _pick(candidates: list[dict], limit: float) -> int:
    """The epoch the trainer keeps: replace only on a strictly better key (earlier wins ties)."""
    best = candidates[0]
    for c in candidates[1:]:
        if selection_key(c, limit) > selection_key(best, limit):
            best = c
    return best["epoch"]


def test_most_refusal_within_the_over_refusal_limit_wins():
    epochs = [
        {"epoch": 0, "harmful_refusal": 0.20, "over_refusal": 0.02},
        {"epoch": 1, "harmful_refusal": 0.70, "over_refusal": 0.20},  # refuses most, too eager
        {"epoch": 2, "harmful_refusal": 0.45, "over_refusal": 0.07},  # within base 0.02 + 0.05
        {"epoch": 3, "harmful_refusal": 0.45, "over_refusal": 0.04},  # same refusal, fewer FPs
    ]
    assert _pick(epochs, limit=0.02 + 0.05) == 3
    assert _pick(epochs, limit=0.25) == 1  # a looser limit admits the eager epoch
    tie = [{"epoch": 0, "harmful_refusal": 0.3, "over_refusal": 0.0}, {**epochs[0], "epoch": 1}]
    assert _pick([tie[0], {"epoch": 1, "harmful_refusal": 0.3, "over_refusal": 0.0}], 0.1) == 0


def test_when_no_epoch_meets_the_limit_the_least_over_refusing_is_kept():
    epochs = [
        {"epoch": 0, "harmful_refusal": 0.9, "over_refusal": 0.30},
        {"epoch": 1, "harmful_refusal": 0.5, "over_refusal": 0.12},
        {"epoch": 2, "harmful_refusal": 0.8, "over_refusal": 0.12},
    ]
    assert _pick(epochs, limit=0.05) == 2
    assert selection_key(epochs[1], 0.05)[0] == 0
    # Any epoch within the limit beats every epoch above it, whatever their refusal.
    assert _pick([*epochs, {"epoch": 3, "harmful_refusal": 0.0, "over_refusal": 0.05}], 0.05) == 3


def test_validation_subset_is_stratified_by_label_and_kind():
    val = load_anchors("val")
    sub = validation_subset(val, 5)
    groups: dict[tuple[str, str], int] = {}
    for a in sub:
        groups[(a.label, a.kind)] = groups.get((a.label, a.kind), 0) + 1
    assert groups == {
        ("harmful", "plain"): 5,
        ("harmful", "question"): 5,
        ("harmful", "framed"): 5,
        ("benign", "plain"): 5,
        ("benign", "lookalike"): 5,
    }
    assert sub == [a for a in val if a in sub]  # file order kept
    assert validation_subset(val, None) == val


def _examples(n_per_split: dict[str, int]) -> list:
    return [
        EncodedExample((1,), (2, i), (3, 4), split)  # type: ignore[arg-type]
        for split, n in n_per_split.items()
        for i in range(n)
    ]


def test_an_epoch_draws_equal_shares_without_repeats_and_moves_on(tiny_engine):
    examples = _examples({"hr": 10, "ha": 30, "s": 40, "br": 40})
    cfg = TrainConfig(examples_per_epoch=20, batch_size=4)
    trainer = OPOTrainer(tiny_engine, examples, cfg, val_anchors=[])
    assert trainer.quota == {"hr": 5, "ha": 5, "s": 5, "br": 5}
    assert all(w == pytest.approx(1.0) for w in trainer.split_weight.values())
    e0, e1 = trainer.epoch_order(0), trainer.epoch_order(1)
    assert len(e0) == len(set(e0)) == 20
    assert [examples[i].split for i in e0].count("hr") == 5
    assert trainer.epoch_order(0) == e0  # a pure function of (seed, epoch): exact resume
    hr0 = {i for i in e0 if examples[i].split == "hr"}
    hr1 = {i for i in e1 if examples[i].split == "hr"}
    assert not hr0 & hr1  # the next epoch continues through the split's shuffle
    # A share never exceeds its split; the weights make up for it.
    small = OPOTrainer(tiny_engine, _examples({"hr": 2, "s": 40}), cfg, val_anchors=[])
    assert small.quota == {"hr": 2, "s": 10}
    assert small.split_weight["hr"] == pytest.approx(12 / (2 * 2))
    whole = OPOTrainer(tiny_engine, examples, cfg.replace(examples_per_epoch=None), val_anchors=[])
    assert sorted(whole.epoch_order(0)) == list(range(len(examples)))


def test_the_benign_term_pushes_the_contrasted_refusal_opening_down(tiny_engine):
    # Train on D_BR alone: the SP must make the opening less likely, the AP more, so the
    # contrast SP - alpha * AP lowers the opening's score on benign prompts on both counts.
    cfg = TrainConfig(n_virtual=4, lr=5e-2, batch_size=4, max_steps=4, val_every=0)
    prompt = "How do I reverse a list in Python?"
    ex = OPOExample("anchor-b-0001", prompt, "I'm sorry, but I can't", False, "opening", "plain")
    enc = encode_splits(tiny_engine, OPOSplits(br=[ex]), cfg)
    assert len(enc[0].response) == min(cfg.refusal_opening_tokens, cfg.target_tokens)
    assert enc[0].response[-1] != tiny_engine.tokenizer.eos_token_id  # an opening, no EOS
    trainer = OPOTrainer(tiny_engine, enc, cfg)
    init = init_pack(tiny_engine, cfg)

    as_hr = EncodedExample(enc[0].head, enc[0].tail, enc[0].response, "hr")
    probe = OPOTrainer(tiny_engine, [as_hr], cfg.replace(first_token_weight=1.0))

    def logprob(soft: torch.Tensor) -> float:
        """Mean log-probability of the opening under one soft prompt (the SP row's CE)."""
        with torch.no_grad():
            _, ce, _ = probe._batch_loss([as_hr], soft, soft)
        return -ce / probe.split_weight["hr"]

    trained = trainer.train().pack
    assert logprob(trained.sp) < logprob(init.sp)  # SP: refusal opening less likely
    assert logprob(trained.ap) > logprob(init.ap)  # AP: more likely (it is subtracted)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("refusal_openings", [], "refusal_openings must be a non-empty list"),
        ("refusal_openings", ["  "], "refusal_openings must be a non-empty list"),
        ("overrefusal_margin", 1.5, r"overrefusal_margin must be in \[0, 1\], got 1.5"),
        ("first_token_weight", 0.5, "first_token_weight must be >= 1"),
        ("examples_per_epoch", 0, "examples_per_epoch must be >= 1"),
    ],
)
def test_new_settings_are_validated(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{field: value})


def test_training_keeps_the_epoch_the_rule_picks_epoch_zero_included(
    tiny_engine, monkeypatch, tmp_path
):
    cfg = TrainConfig(n_virtual=4, lr=5e-2, batch_size=4, epochs=3, patience=5)
    examples = encode_splits(
        tiny_engine,
        OPOSplits(
            hr=[OPOExample("anchor-h-0001", "Do harm.", "I can't.", True, "refusal")],
            s=[OPOExample("anchor-b-0001", "Bake bread.", "Mix flour.", True, "safe")],
        ),
        cfg,
    )
    scripted = iter(
        [
            {"harmful_refusal": 0.30, "over_refusal": 0.05},  # epoch 0: the init, within limit
            {"harmful_refusal": 0.90, "over_refusal": 0.40},  # epoch 1: over-refuses
            {"harmful_refusal": 0.20, "over_refusal": 0.00},  # epoch 2: refuses less
            {"harmful_refusal": 0.60, "over_refusal": 0.40},  # epoch 3: over-refuses
        ]
    )
    calls = []
    monkeypatch.setattr(OPOTrainer, "_validate", lambda self, sp, ap, base: dict(next(scripted)))
    monkeypatch.setattr(
        OPOTrainer, "base_over_refusal", lambda self: calls.append(1) or {"over_refusal": 0.02}
    )
    result = OPOTrainer(tiny_engine, examples, cfg, val_anchors=[]).train(tmp_path / "c.pt")
    assert result.report["selected_epoch"] == 0 and calls == [1]  # base measured once
    init = init_pack(tiny_engine, cfg)
    assert torch.equal(result.pack.sp, init.sp) and torch.equal(result.pack.ap, init.ap)
    sel = result.report["selection"]
    assert sel["constraint_met"] and sel["limit"] == pytest.approx(0.07)
    assert [e["within_limit"] for e in result.report["per_epoch"]] == [True, False, True, False]
    assert result.report["per_epoch"][1]["loss_sp"] is not None
