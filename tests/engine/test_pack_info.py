"""``acd pack info``: what a pack file is for, read from the file alone (no model loads)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from acd_engine import __version__
from acd_engine.cli.main import app
from acd_engine.errors import PromptPackError
from acd_engine.safety.gate import SafetyGate
from acd_engine.safety.pack_info import describe_pack, format_pack_info, pack_info
from acd_engine.safety.prompts import PromptPack

runner = CliRunner()
FP = {"architecture": "TinyForCausalLM", "hidden_size": "8", "vocab_size": "10"}


@pytest.fixture(scope="module")
def shipped() -> Path:
    packs = resources.files("acd_engine") / "resources" / "packs"
    return Path(str(packs / "smollm2-135m-instruct.safetensors"))


def _gate(metadata: dict[str, str]) -> SafetyGate:
    h = 8
    return SafetyGate(
        layers=(1, 2),
        weight=torch.randn(2 * h),
        bias=torch.zeros(1),
        mean=torch.zeros(2 * h),
        scale=torch.ones(2 * h),
        threshold=0.75,
        metadata=metadata,
    )


def test_shipped_pack_info_holds_what_the_file_holds(shipped):
    pack = PromptPack.load(shipped)
    info = pack_info(shipped)
    assert info["id"] == pack.id and info["trained"] is True
    assert info["bytes"] == shipped.stat().st_size
    assert info["model"] == pack.fingerprint
    assert info["methods"]["acd"]["gated"] is True
    assert (info["prompts"]["sp_tokens"], info["prompts"]["ap_tokens"]) == (
        pack.sp.shape[0],
        pack.ap.shape[0],
    )
    assert pack.gate is not None
    gate = info["gate"]
    assert gate["layers"] == list(pack.gate.layers) and gate["threshold"] == pack.gate.threshold
    assert (gate["pooling"], gate["scope"], gate["window"]) == (
        pack.gate.pooling,
        pack.gate.scope,
        pack.gate.window,
    )
    assert gate["stored"]["val_auc"] == float(pack.gate.metadata["val_auc"])
    assert gate["stored"]["fpr_per_kind"] is True  # stored as the string "True"
    assert info["training"]["settings"]["epochs"] == json.loads(pack.metadata["training"])["epochs"]
    assert (
        info["training"]["val"]["harmful_refusal"]
        == json.loads(pack.metadata["val"])["harmful_refusal"]
    )
    assert info["recommended"]["alpha"] == float(pack.metadata["recommended_alpha"])
    # the gate was refitted (gate v6) after packs began to store their creation
    assert info["created"] == pack.metadata["created"]
    assert info["created_with"] == pack.metadata["created_with"]
    assert info["created_with"].startswith("acd")


def test_cli_prints_the_shipped_pack_and_its_json(shipped):
    pack = PromptPack.load(shipped)
    assert pack.gate is not None
    text = runner.invoke(app, ["pack", "info", str(shipped)])
    assert text.exit_code == 0, text.output
    out = text.stdout
    assert f"\nid          {pack.id} (" in out and pack.fingerprint["embedding_hash"] in out
    assert f"layers {','.join(map(str, pack.gate.layers))};" in out
    assert f"threshold {pack.gate.threshold:.4g}" in out
    assert f"AUC {pack.gate.metadata['val_auc']}" in out
    assert f"created     {pack.metadata['created']}" in out and "harmful refusal 100.0%" in out
    as_json = runner.invoke(app, ["pack", "info", str(shipped), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == pack_info(shipped)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "prompt pack must be an existing .safetensors file, got"),
        (lambda p: p.parent, "prompt pack must be an existing .safetensors file, got"),
        (
            lambda p: p.write_text("not a pack") and p,
            "must be a readable safetensors file",
        ),
        (
            lambda p: save_file({"x": torch.zeros(2)}, str(p)) or p,
            "prompt pack format_version must be '1', got None",
        ),
    ],
    ids=["missing", "folder", "text", "not-a-pack"],
)
def test_a_bad_path_or_file_is_one_line_in_house_style(tmp_path, make, message):
    path = make(tmp_path / "p.safetensors")
    res = runner.invoke(app, ["pack", "info", str(path)])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert res.stderr.count("\n") == 1 and res.stdout == ""
    with pytest.raises(PromptPackError, match="prompt pack"):
        pack_info(path)


def test_save_stamps_when_and_by_what_a_pack_was_made_and_keeps_it(tmp_path):
    pack = PromptPack(torch.randn(2, 8), torch.randn(3, 8), FP, {"trained": "true"})
    before = datetime.now(UTC).replace(microsecond=0)
    loaded = PromptPack.load(pack.save(tmp_path / "a.safetensors"))
    created = datetime.fromisoformat(loaded.metadata["created"])
    assert before <= created <= datetime.now(UTC) + timedelta(seconds=1)
    assert loaded.metadata["created_with"] == f"acd {__version__}"
    assert loaded.metadata == pack.metadata  # the object saved says what its file says
    # Saving it again (as `acd gate` does after fitting a gate) keeps the first stamp.
    loaded.metadata["created"] = "2020-01-02T03:04:05+00:00"
    again = PromptPack.load(loaded.save(tmp_path / "b.safetensors"))
    assert again.metadata["created"] == "2020-01-02T03:04:05+00:00"
    info = pack_info(tmp_path / "b.safetensors")
    assert info["created"] == "2020-01-02T03:04:05+00:00"
    assert f"created     2020-01-02T03:04:05+00:00 with acd {__version__}" in format_pack_info(info)


def test_untrained_gateless_pack_says_so():
    pack = PromptPack(torch.randn(2, 8), torch.randn(3, 8), FP, {"trained": "false"})
    text = format_pack_info(describe_pack(pack))
    assert "not trained: soft prompts initialised from the manual prompts (acd = oid)" in text
    assert "gate        none: method acd runs SP - alpha*AP on every request" in text
    assert "in-memory pack" in text


def test_gate_fit_settings_and_time_are_shown_and_unknown_metadata_kept():
    settings = {"max_fpr": 0.05, "contexts": ["bare", "rag"]}
    gate = _gate(
        {
            "fitted": "2025-01-01T00:00:00+00:00",
            "settings": json.dumps(settings),
            "val_auc": "0.9",
            "val_flag_rate_harmful": "0.8",
            "val_flag_rate_benign": "0.02",
            "odd": "not json {",
        }
    )
    pack = PromptPack(torch.randn(2, 8), torch.randn(3, 8), FP, {"mine": "x"}, gate=gate)
    info = describe_pack(pack)
    assert info["gate"]["stored"]["settings"] == settings
    assert info["gate"]["stored"]["odd"] == "not json {"  # a hand-edited value, kept as text
    assert info["gate"]["probe"] == "linear" and info["gate"]["hidden_units"] is None
    assert info["other"] == {"mine": "x"}
    text = format_pack_info(info)
    assert "layers 1,2; mean pooling over request; linear probe; threshold 0.75" in text
    assert "AUC 0.9; flags 80.0% of harmful and 2.0% of benign val anchors" in text
    assert "  fitted    2025-01-01T00:00:00+00:00" in text
    assert "max_fpr=0.05" in text and "mine        x" in text
