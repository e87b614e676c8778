"""`acd train` on bad input: every bad argument, anchor file or ``--set`` ends in one typed
error (the CLI's ``error:`` line, exit 2) before the model loads; and a run whose final write
fails keeps its checkpoint, which writes the pack on resume without training again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from acd_engine.cli.train import parse_settings, train_command
from acd_engine.safety.prompts import PromptPack
from acd_engine.training.run import checkpoint_path
from acd_engine.training.trainer import OPOTrainer

app = typer.Typer()
app.command("train")(train_command)
app.command("noop")(lambda: None)
runner = CliRunner()

FAST_SET = {
    "gen_max_new_tokens": 4,
    "target_tokens": 6,
    "val_max_new_tokens": 3,
    "examples_per_epoch": 8,
}


@pytest.fixture()
def no_model(monkeypatch, tmp_path):
    """Fail the test if `acd train` loads a model (validation must come first)."""
    monkeypatch.setenv("ACD_CACHE", str(tmp_path / "acd-cache"))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("acd_engine.runtime.engine.get_engine", refuse)


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["train", *args])


def assert_clean_error(res: Any, match: str) -> None:
    assert res.exit_code == 2, (res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception  # no traceback
    last = res.stderr.splitlines()[-1]  # progress bars may come before it
    assert last.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert match in last, res.stderr


def write_anchor_file(path: Path, lines: list[str] | bytes) -> Path:
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def anchor_line(i: int, label: str = "benign", split: str = "train", prompt: str = "") -> str:
    tag = "h" if label == "harmful" else "b"
    return json.dumps(
        {
            "id": f"anchor-{tag}-{i:04d}",
            "prompt": prompt or f"Question number {i}?",
            "label": label,
            "category": "x",
            "split": split,
            "kind": "plain",
        }
    )


BAD_OUT = [
    ("dir", r"--out must be a file path, got the existing folder"),
    ("missing/pack.safetensors", r"--out must be in an existing folder"),
    ("file.txt/pack.safetensors", r"(folder '{tmp}/file.txt' is a file, not a folder)"),
    ("/proc/pack.safetensors", r"--out must be writable, got '/proc/pack.safetensors'"),
]


@pytest.mark.parametrize(("out", "match"), BAD_OUT)
def test_bad_out_fails_before_the_model_loads(no_model, tmp_path, out, match):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    target = out if out.startswith("/") else str(tmp_path / out)
    assert_clean_error(invoke("--out", target), match.replace("{tmp}", str(tmp_path)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_out_in_a_read_only_folder_fails_first(no_model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert_clean_error(invoke("--out", str(ro / "p.safetensors")), "--out must be writable")


def test_outputs_that_collide_or_would_overwrite_progress_fail_first(no_model, tmp_path):
    out = tmp_path / "p.safetensors"
    assert_clean_error(
        invoke("--out", str(out), "--report", str(out)),
        "--report must differ from --out, got",
    )
    assert_clean_error(
        invoke("--out", str(out), "--checkpoint", str(tmp_path / "p.report.json")),
        "--checkpoint must differ from --report",
    )
    checkpoint_path(out).write_bytes(b"earlier progress")
    assert_clean_error(invoke("--out", str(out)), "pass --resume to continue it")
    assert checkpoint_path(out).read_bytes() == b"earlier progress"
    cache_file = tmp_path / "cache-file"
    cache_file.write_text("x")
    assert_clean_error(
        invoke("--out", str(tmp_path / "q.safetensors"), "--cache-dir", str(cache_file)),
        "--cache-dir must be a folder, got the file",
    )


BAD_ANCHORS: list[tuple[str, list[str] | bytes | None, str]] = [
    ("missing", None, "anchors file must be a readable file, got '"),
    ("not utf-8", b'{"id": "anchor-b-0001", "prompt": "caf\xe9"}\n', "must be UTF-8 text, got an"),
    ("not json", ["{oops"], "line 1 must be a valid anchor"),
    ("json list", ["[1, 2]"], "line 1 must be a valid anchor"),
    ("deep json", ["[" * 100_000], "line 1 must be a valid anchor"),
    (
        "lone surrogate",
        [anchor_line(1, prompt="bad \ud800 text")],
        "prompt must be a valid string, unable to parse raw data as a unicode string, got",
    ),
    ("no harmful", [anchor_line(1), anchor_line(2)], "got none harmful in"),
    ("empty", [""], "got none benign or harmful in"),
]


@pytest.mark.parametrize(("name", "content", "match"), BAD_ANCHORS, ids=[c[0] for c in BAD_ANCHORS])
def test_bad_anchor_files_fail_before_the_model_loads(no_model, tmp_path, name, content, match):
    path = tmp_path / "anchors.jsonl"
    if content is not None:
        write_anchor_file(path, content)
    res = invoke("--out", str(tmp_path / "p.safetensors"), "--anchors", str(path))
    assert_clean_error(res, match)


def test_anchor_folder_is_refused(no_model, tmp_path):
    res = invoke("--out", str(tmp_path / "p.safetensors"), "--anchors", str(tmp_path))
    assert_clean_error(res, "anchors file must be a readable file, got")


BAD_SET = [
    ("[1, 2]", "--set must be a JSON object, got list '[1, 2]'"),
    ('"lr"', "--set must be a JSON object, got str"),
    ("3", "--set must be a JSON object, got int"),
    ("null", "--set must be a JSON object, got NoneType"),
    ("{lr: 1}", "--set must be a JSON object, got '{lr: 1}': Expecting property name"),
    ('{"judge": "\\ud800"}', "--set must hold valid Unicode text, got '\\ud800'"),
    ('{"sources": ["none", "\\udcff"]}', "--set must hold valid Unicode text"),
    ('{"no_such_field": 1}', "no_such_field"),
    ('{"judge": "nope"}', "unknown judge 'nope'"),
    ('{"lr": "fast"}', "lr"),
]


@pytest.mark.parametrize(("value", "match"), BAD_SET)
def test_bad_set_values_fail_before_the_model_loads(no_model, tmp_path, value, match):
    assert_clean_error(invoke("--out", str(tmp_path / "p.safetensors"), "--set", value), match)


def test_set_may_not_contradict_an_explicit_option(no_model, tmp_path):
    res = invoke(
        "--out", str(tmp_path / "p.safetensors"), "--epochs", "5", "--set", '{"epochs": 2}'
    )
    assert_clean_error(res, "--set epochs must not repeat --epochs, got both 2 and 5")


def test_zero_threads_fail_before_the_model_loads(no_model, tmp_path):
    res = invoke("--out", str(tmp_path / "p.safetensors"), "--threads", "0")
    assert_clean_error(res, "--threads must be >= 1, got 0")


def test_parse_settings_merges_over_defaults_only():
    options = {
        "--epochs": 3,
        "--lr": 3e-3,
        "--n-virtual": None,
        "--init": "short",
        "--samples": 1,
        "--batch-size": 8,
        "--seed": 0,
        "--alpha": 0.5,
        "--plausibility": 0.0,
        "--max-steps": None,
    }
    merged = parse_settings('{"epochs": 4, "ul_weight": 0.2}', options)
    assert merged["epochs"] == 4 and merged["ul_weight"] == 0.2 and merged["lr"] == 3e-3
    assert parse_settings(None, options)["val_alpha"] == 0.5


def test_failed_final_write_keeps_the_checkpoint_and_resume_writes_the_pack(
    tiny_model_dir, small_anchors_path, tmp_path, monkeypatch
):
    out = tmp_path / "p.safetensors"
    args = [
        "--model",
        str(tiny_model_dir),
        "--anchors",
        str(small_anchors_path),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--n-virtual",
        "4",
        "--batch-size",
        "4",
        "--set",
        json.dumps({**FAST_SET, "val_every": 0}),
    ]

    def disk_full(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("acd_engine.safety.prompts.save_file", disk_full)
        res = invoke("--out", str(out), *args)
    ckpt = checkpoint_path(out)
    assert_clean_error(res, "--out '")
    assert "No space left on device" in res.stderr
    assert f"--resume --checkpoint '{ckpt}'" in res.stderr
    assert ckpt.exists() and not out.exists()
    report = json.loads(out.with_name("p.report.json").read_text())
    assert report["completed"] and report["pack"] is None and "No space" in report["pack_error"]

    # Recovery: another --out, the same checkpoint; no training step may run.
    def no_training(*a: Any, **k: Any) -> None:
        raise AssertionError("trained again instead of writing the finished state")

    monkeypatch.setattr(OPOTrainer, "_batch_loss", no_training)
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    res = invoke(
        "--out", str(elsewhere / "p.safetensors"), "--resume", "--checkpoint", str(ckpt), *args
    )
    assert res.exit_code == 0, (res.output, res.exception)
    pack = PromptPack.load(elsewhere / "p.safetensors")
    state = torch.load(ckpt, weights_only=True)
    assert pack.trained and torch.equal(pack.sp, state["sp"]) and torch.equal(pack.ap, state["ap"])


def test_option_defaults_table_matches_the_command():
    # parse_settings lets --set override an option only at its default: the table of
    # defaults must be the command's own, or an explicit option would be silently dropped.
    import inspect
    import typing

    from acd_engine.cli.train import OPTION_FIELDS

    hints = typing.get_type_hints(train_command, include_extras=True)
    defaults = {}
    for name, param in inspect.signature(train_command).parameters.items():
        info = typing.get_args(hints[name])[1]
        # typer takes the first positional of an Annotated Option as its name.
        for decl in (info.default, *info.param_decls):
            defaults[decl] = param.default
    assert {opt: d for opt, (_, d) in OPTION_FIELDS.items()} == {
        opt: defaults[opt] for opt in OPTION_FIELDS
    }


def test_deeply_nested_set_is_a_clean_error(no_model, tmp_path):
    deep = '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}"
    assert_clean_error(
        invoke("--out", str(tmp_path / "p.safetensors"), "--set", deep), "--set must be a JSON"
    )
