"""Trained packs on disk (round trip, refusal for other models), batched validation decoding,
the shipped pack, and `acd train` end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from acd_engine.cli.train import train_command
from acd_engine.config import DecodingConfig
from acd_engine.errors import PromptPackError
from acd_engine.safety.prompts import PromptPack
from acd_engine.training.anchors import anchor_set_hash, load_anchors
from acd_engine.training.evaluate import batched_answers

SHIPPED = Path(__file__).resolve().parents[2] / "acd_engine" / "resources" / "packs"
SP_ANCHORS_928 = "36cb7888f1900a4f43e3bbba6603e6db66cecd7dc2956813264d1241471ff4b0"

app = typer.Typer()
app.command("train")(train_command)
app.command("noop")(lambda: None)  # keeps "train" a subcommand, as in the real CLI
runner = CliRunner()


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, small_anchors_path, tmp_path_factory):
    """One `acd train` run on the tiny model, stopped after 2 steps, then resumed."""
    out = tmp_path_factory.mktemp("run") / "pack.safetensors"
    args = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--anchors",
        str(small_anchors_path),
        "--cache-dir",
        str(out.parent / "cache"),
        "--epochs",
        "2",
        "--n-virtual",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--set",
        json.dumps(
            {
                "gen_max_new_tokens": 4,
                "target_tokens": 6,
                "val_max_new_tokens": 3,
                "examples_per_epoch": 8,
                # The random model's noise has no sentence end to cut a refusal at.
                "refusal_end": "open",
            }
        ),
    ]
    first = runner.invoke(app, [*args, "--max-steps", "2"])
    second = runner.invoke(app, [*args, "--resume"])
    return out, first, second


def test_cli_stops_resumes_and_writes_pack_and_report(cli_run, small_anchors_path):
    out, first, second = cli_run
    assert first.exit_code == 0, first.output
    assert "stopped after 2 steps" in first.stdout
    assert second.exit_code == 0, second.output
    assert "wrote" in second.stdout
    report = json.loads(out.with_name("pack.report.json").read_text())
    assert report["completed"] and not report["fallback_used"]  # D_HR: own continuations
    assert report["data_stats"]["sources"]["D_HR"] == {"refusal": report["split_sizes"]["D_HR"]}
    assert set(report["split_sizes"]) == {"D_HR", "D_HA", "D_S", "D_BR"}
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]
    assert all("val" in e for e in report["epochs"])
    assert [e["epoch"] for e in report["per_epoch"]] == [0, 1, 2]
    assert set(report["per_epoch"][0]["refusal_by_kind"]) <= {"plain", "question", "framed"}
    sel = report["selection"]
    assert sel["limit"] == pytest.approx(sel["base_over_refusal"] + 0.05)
    assert sel["selected_epoch"] == report["selected_epoch"] in (0, 1, 2)
    assert {"harmful_refusal", "over_refusal", "lookalike_answer"} <= set(report["val"])
    assert report["train_seconds"] > 0
    pack = PromptPack.load(out)
    assert pack.trained and pack.sp.shape[0] == 4
    assert pack.metadata["anchor_set_hash"] == anchor_set_hash(small_anchors_path)
    assert json.loads(pack.metadata["training"])["lr"] == 0.01
    # acd train also fits the safety gate, on the same anchors, and stores it in the pack
    assert pack.gate is not None and list(pack.gate.layers) == report["gate"]["layers"]
    assert pack.gate.threshold == report["gate"]["threshold"]
    assert pack.gate.metadata["anchor_set_hash"] == anchor_set_hash(small_anchors_path)
    assert report["gate"]["seconds"] > 0
    # when and how, for `acd pack info`: the pack's first save, the gate's fit and settings
    assert pack.gate.metadata["fitted"] <= pack.metadata["created"]  # ISO 8601 UTC sorts as text
    assert json.loads(pack.gate.metadata["settings"]) == report["gate"]["settings"]
    assert pack.gate.metadata["val_placements"] == str(report["gate"]["val_placements"])


def test_pack_round_trip_and_other_model_refused(cli_run, tiny_engine, engine, tmp_path):
    out, _, _ = cli_run
    pack = PromptPack.load(out)
    again = PromptPack.load(pack.save(tmp_path / "copy.safetensors"))
    assert torch.equal(again.sp, pack.sp) and torch.equal(again.ap, pack.ap)
    assert again.metadata == pack.metadata and again.fingerprint == pack.fingerprint
    tiny_engine.set_pack(again)  # right model: accepted
    tiny_engine.set_pack(None)
    with pytest.raises(PromptPackError, match=r"made for another model: .*embedding_hash"):
        engine.set_pack(out)


def test_cli_bad_setting_is_one_clean_line(tmp_path):
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "p.safetensors"), "--lr", "-1"])
    assert res.exit_code == 2
    assert "lr must be > 0, got -1" in res.stderr


def test_batched_validation_decoding_equals_engine_generate(cli_run, tiny_engine):
    out, _, _ = cli_run
    prompts = [a.prompt for a in load_anchors("val")[:3]]
    for cfg in (
        DecodingConfig(method="acd", max_new_tokens=4, plausibility=0.3),
        DecodingConfig(method="oid", max_new_tokens=4),
        DecodingConfig(method="acd", max_new_tokens=4, temperature=0.8, seed=3, stop=("e",)),
    ):
        batched = batched_answers(
            tiny_engine, prompts, cfg, pack=PromptPack.load(out), batch_size=2
        )
        tiny_engine.set_pack(out)
        try:
            single = [tiny_engine.generate(p, cfg).text for p in prompts]
        finally:
            tiny_engine.set_pack(None)
        assert batched == single, cfg.method


def test_shipped_pack_is_trained_and_picked_by_default(engine):
    files = sorted(SHIPPED.glob("*.safetensors"))
    assert [f.name for f in files] == ["smollm2-135m-instruct.safetensors"]
    pack = engine.pack
    assert pack.trained
    # Its soft prompts were trained on the 928-prompt anchor set; the gate was refit on the
    # grown set (1,627), which adds prompts and changes none (docs/opo.md, "Gate v4"). The
    # soft SP refuses whatever it sees either way; the gate decides who meets it.
    assert pack.metadata["anchor_set_hash"] == SP_ANCHORS_928
    assert pack.fingerprint == engine.fingerprint
    assert float(pack.metadata["recommended_alpha"]) < 1.0
    # the shipped pack carries a safety gate (v4: one hidden layer over layers 14-16) fitted
    # on today's shipped anchors; acd routes by it
    assert pack.gate is not None and pack.gate.metadata["anchor_set_hash"] == anchor_set_hash()
    assert pack.gate.head == "mlp" and pack.gate.layers == (14, 15, 16)
    assert 0.0 < pack.gate.threshold < 1.0
