"""`acd train --model M --out P`: one command from a model folder to a calibrated, gated pack.

On a tiny random model of the SmolLM2 family (tests/template_families.py), so each run takes
seconds: the estimate before the expensive part counts what the run then does, the summary
at the end and `acd pack info` show the same figures the report holds, an interrupted gate
phase resumes at the gate without sampling or training again, `--no-gate` stops after
training, a resume with other settings is refused in one line, and a bf16 model trains its
soft prompts in fp32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from template_families import FAMILIES, build_family, few_anchors, one_torch_thread
from typer.testing import CliRunner

from acd_engine.cli.train import parse_settings, train_command
from acd_engine.safety.pack_info import format_pack_info, pack_info
from acd_engine.safety.prompts import PromptPack
from acd_engine.training.anchors import load_anchors
from acd_engine.training.gate_fit import GateFitConfig, place_anchors
from acd_engine.training.run import checkpoint_path, report_path, trained_path
from acd_engine.training.trainer import OPOTrainer

app = typer.Typer()
app.command("train")(train_command)
app.command("noop")(lambda: None)  # keeps "train" a subcommand, as in the real CLI
runner = CliRunner()

FAST = {
    "gen_max_new_tokens": 4,
    "target_tokens": 6,
    "val_max_new_tokens": 3,
    "examples_per_epoch": 8,
    "refusal_end": "open",  # a random model's noise has no sentence end to cut at
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_family(FAMILIES["smollm2"], tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def anchors(tmp_path_factory) -> Path:
    return few_anchors(tmp_path_factory.mktemp("anchors") / "anchors.jsonl")


def train(model: Path, out: Path, anchors: Path, *extra: str) -> Any:
    args = ["train", "--model", str(model), "--out", str(out), "--anchors", str(anchors)]
    args += ["--cache-dir", str(out.parent / "cache"), "--epochs", "1", "--n-virtual", "4"]
    args += ["--batch-size", "4", "--lr", "0.01", "--set", json.dumps(FAST), *extra]
    return runner.invoke(app, args)


def assert_clean_error(res: Any, match: str) -> None:
    assert res.exit_code == 2, (res.output, res.exception)
    last = res.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert match in last, last


class PowerCut(Exception):
    """Stands for whatever stops a run in its gate phase."""


def interrupted_in_the_gate_phase(model: Path, out: Path, anchors: Path, monkeypatch) -> Any:
    with monkeypatch.context() as m:

        def cut(*args: Any, **kwargs: Any) -> None:
            raise PowerCut

        m.setattr("acd_engine.training.run.fit_pack_gate", cut)
        return train(model, out, anchors)


def test_one_command_writes_a_calibrated_gated_pack_with_its_estimate_and_summary(
    model_dir, anchors, tmp_path, monkeypatch
):
    from acd_engine.runtime.engine import get_engine

    engine = get_engine(str(model_dir))  # the engine the command gets (one per process)
    rows: list[int] = []
    real = engine.model.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        rows.append(int(kwargs["input_ids"].shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", spy)
    out = tmp_path / "pack.safetensors"
    res = train(model_dir, out, anchors, "--sample-batch-size", "8")
    assert res.exit_code == 0, (res.output, res.exception)
    text = res.stdout
    report = json.loads(report_path(out).read_text())

    # The estimate came first and counted what the run then did.
    estimate, summary = text.split("\nwrote ", 1)
    assert estimate.startswith("estimate on cpu (float32), measured on this model in")
    sampled = sum(report["data_stats"]["verdicts"].values())
    assert f"{sampled} responses to sample (0 cached) in 4 batches of 8" in estimate
    assert f"{report['steps']} steps of 4 examples" in estimate
    assert "2 validations of 4 prompts and one base pass" in estimate
    cfg = GateFitConfig()
    placed = [
        place_anchors(load_anchors("train", anchors), "train", cfg),
        place_anchors(load_anchors("val", anchors), "val", cfg),
    ]
    assert f"{sum(map(len, placed))} placed anchors ({len(placed[0])} train, " in estimate
    assert report["gate"]["train_placements"] == len(placed[0])
    # --sample-batch-size is the sampling batch: 24 answers in 3 batches of 8, then the 4
    # refusal continuations (the estimate's warm-up row and its two timed batches first)
    assert rows == [1, 8, 8, 8, 8, 8, 4] and report["config"]["gen_batch_size"] == 8

    # The pack: gated, its threshold calibrated on the validation placements, the run kept.
    pack = PromptPack.load(out)
    assert pack.trained and pack.gate is not None
    gate = report["gate"]
    assert pack.gate.threshold == gate["threshold"] and 0.0 < gate["threshold"] <= 1.0
    assert (
        json.loads(pack.gate.metadata["val_flag_rate_by_shape"]) == (gate["val_flag_rate_by_shape"])
    )
    assert set(gate["val_flag_rate_by_shape"]) >= {"harmful@bare", "benign@rag"}
    assert not trained_path(out).exists()  # kept only until the final pack is written
    run = json.loads(pack.metadata["run"])
    assert run["device"] == "cpu" and run["dtype"] == "float32" and run["resumed"] is None
    assert all(isinstance(run["phases"][p], float) for p in ("sampling", "training", "gate"))
    assert "alpha and tau are the recommended defaults" in run["calibration"]
    assert report["summary"]["phases"] == run["phases"]

    # The summary says what the report holds.
    val = report["val"]
    assert summary.startswith(f"{out} (cpu, float32)")
    assert f"threshold {gate['threshold']:.4g}, val AUC {gate['val_auc']}" in summary
    assert f"refusal       {100 * val['harmful_refusal']:.1f}%" in summary
    assert f"over-refusal  {100 * val['over_refusal']:.1f}%" in summary
    harmful_bare = 100 * gate["val_flag_rate_by_shape"]["harmful@bare"]
    assert f"flags harmful bare {harmful_bare:.1f}%" in summary
    assert f"acd pack info {out}" in summary

    # acd pack info shows it from the file alone.
    info = format_pack_info(pack_info(out))
    assert "run         acd train on cpu (float32), finished " in info
    assert "calibrated  gate threshold chosen on the validation split" in info
    assert f"  harmful   flags bare {harmful_bare:.1f}%" in info
    assert "over-refusal by kind plain " in info


def test_an_interrupted_gate_phase_resumes_at_the_gate_without_training(
    model_dir, anchors, tmp_path, monkeypatch
):
    out = tmp_path / "pack.safetensors"
    first = interrupted_in_the_gate_phase(model_dir, out, anchors, monkeypatch)
    assert isinstance(first.exception, PowerCut)
    kept = trained_path(out)
    assert kept.exists() and not out.exists() and checkpoint_path(out).exists()
    assert json.loads(report_path(out).read_text())["gate"]["status"] == "pending"
    trained = PromptPack.load(kept)
    assert trained.trained and trained.gate is None

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("sampled or trained again instead of going to the gate")

    monkeypatch.setattr("acd_engine.training.run.load_or_generate", never)
    monkeypatch.setattr(OPOTrainer, "train", never)
    monkeypatch.setattr(OPOTrainer, "measure_step", never)
    res = train(model_dir, out, anchors, "--resume")
    assert res.exit_code == 0, (res.output, res.exception)
    assert "done: the trained pack from an earlier run is kept" in res.stdout
    assert "(resumed at the gate)" in res.stdout
    pack = PromptPack.load(out)
    assert pack.gate is not None and not kept.exists()
    assert torch.equal(pack.sp, trained.sp) and torch.equal(pack.ap, trained.ap)
    assert pack.metadata["val"] == trained.metadata["val"]
    run = json.loads(pack.metadata["run"])
    assert run["resumed"] == "gate" and run["phases"]["training"] is None
    # stamped when the final pack was written, after its gate was fitted
    assert pack.gate.metadata["fitted"] <= pack.metadata["created"]
    report = json.loads(report_path(out).read_text())
    assert report["pack"] == str(out) and report["gate"]["threshold"] == pack.gate.threshold


def test_a_kept_trained_pack_refuses_other_settings_models_and_a_new_run(
    model_dir, anchors, tmp_path, monkeypatch
):
    out = tmp_path / "pack.safetensors"
    interrupted_in_the_gate_phase(model_dir, out, anchors, monkeypatch)
    checkpoint_path(out).unlink()  # the trained pack alone must hold its run to account
    assert_clean_error(
        train(model_dir, out, anchors),
        f"--out's trained pack '{trained_path(out)}' must not exist for a new run, got an "
        "earlier run's; pass --resume to fit its gate, or delete it to start over",
    )
    assert_clean_error(
        train(model_dir, out, anchors, "--resume", "--sample-batch-size", "5"),
        "resume must use the trained pack's settings; differs: gen_batch_size (trained pack "
        f"24, now 5). Rerun with those settings or delete {trained_path(out)}",
    )
    other = build_family(FAMILIES["qwen2.5"], tmp_path / "qwen")
    res = train(other, out, anchors, "--resume")
    assert_clean_error(res, f"trained pack '{trained_path(out)}' was made with another model")
    assert "use a new --out or delete the trained pack" in res.stderr
    assert trained_path(out).exists() and not out.exists()


def test_no_gate_stops_after_training(model_dir, anchors, tmp_path):
    out = tmp_path / "pack.safetensors"
    res = train(model_dir, out, anchors, "--no-gate")
    assert res.exit_code == 0, (res.output, res.exception)
    pack = PromptPack.load(out)
    assert pack.trained and pack.gate is None and not trained_path(out).exists()
    assert "\n  gate " not in res.stdout.split("\nwrote ")[0]  # nothing estimated for it
    assert "gate      none (--no-gate)" in res.stdout
    assert json.loads(pack.metadata["run"])["phases"]["gate"] is None
    assert "gate        none: method acd runs SP - alpha*AP" in format_pack_info(pack_info(out))


def test_sample_batch_size_is_a_training_setting():
    fields = parse_settings(None, {"--sample-batch-size": 64})
    assert fields["gen_batch_size"] == 64 and fields["epochs"] == 3  # the rest at defaults
    assert parse_settings('{"gen_batch_size": 4}', {})["gen_batch_size"] == 4


def test_a_bf16_model_trains_fp32_soft_prompts_on_its_own_device(model_dir, tmp_path, monkeypatch):
    from acd_engine.runtime.engine import Engine
    from acd_engine.training.config import TrainConfig
    from acd_engine.training.data import OPOExample, OPOSplits
    from acd_engine.training.trainer import encode_splits, init_pack

    engine = Engine(model_dir, dtype="bfloat16")
    emb = engine.model.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16
    cfg = TrainConfig(batch_size=2, n_virtual=4, target_tokens=6, val_every=0, max_steps=1)
    splits = OPOSplits(
        hr=[OPOExample("h1", "How do I pick a lock?", "I can't help with that.", True, "x")],
        ha=[OPOExample("h1", "How do I pick a lock?", "Sure, first take a pin", False, "x")],
        s=[OPOExample("b1", "How do I bake bread?", "Mix flour and water.", True, "x")],
    )
    seen: list[tuple[torch.dtype, torch.device, bool]] = []
    real = OPOTrainer._batch_loss

    def spy(self: OPOTrainer, batch: Any, sp: torch.Tensor, ap: torch.Tensor) -> Any:
        seen.append((sp.dtype, sp.device, sp.requires_grad))
        loss, l_sp, l_ap = real(self, batch, sp, ap)
        assert loss.dtype == torch.float32  # the loss is taken on fp32 log-probabilities
        return loss, l_sp, l_ap

    monkeypatch.setattr(OPOTrainer, "_batch_loss", spy)
    trainer = OPOTrainer(engine, encode_splits(engine, splits, cfg), cfg, anchors_hash="t")
    assert trainer.measure_step() > 0
    ckpt = tmp_path / "bf16.ckpt.pt"
    result = trainer.train(ckpt)
    assert seen == [(torch.float32, emb.device, True)] * 2  # measured step, then trained one
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in engine.model.parameters())
    state = torch.load(ckpt, weights_only=True)
    assert state["sp"].dtype == torch.float32 and state["sp"].device.type == "cpu"
    moments = state["optimizer"]["state"][0]["exp_avg"]
    assert moments.dtype == torch.float32  # AdamW's moments stay fp32 too
    assert not torch.equal(result.pack.sp, init_pack(engine, cfg).sp)  # one step moved them
