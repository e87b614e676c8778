"""Hostile input to OPO training: torn caches, mismatched resumes, bad `acd train` arguments.

Every bad input must end in one typed error (a ``ConfigError``; the CLI's ``error:`` line,
exit 2) before the model loads, and nothing a run produced may be lost: a torn cache line
costs one record, a failed final write leaves a checkpoint that writes the pack on resume.
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

from acd_engine.errors import ConfigError
from acd_engine.prompts import PromptPack
from acd_engine.training.anchors import load_anchors
from acd_engine.training.command import parse_settings, train_command
from acd_engine.training.data import OPOSplits, generate_responses, load_or_generate, repair_tail
from acd_engine.training.run import PackWriteError, check_outputs, checkpoint_path, train_pack
from acd_engine.training.trainer import OPOTrainer, encode_splits

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


def fake_sampler(
    engine: Any, ids: list[list[int]], cfg: Any, seed: int, keep: Any = None
) -> list[tuple[str, bool]]:
    """Deterministic multi-byte responses (a tear can cut a character in half)."""
    return [(f"réponse ✓ {seed % 997} {len(p)}", i % 2 == 0) for i, p in enumerate(ids)]


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the cache must be one whole JSON record."""
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


# ------------------------------------------------------------------ response cache
@pytest.mark.parametrize("cut", [3, 17, -1])
def test_torn_cache_line_is_cut_before_the_next_append(
    tiny_engine, small_anchors_path, fast_cfg, tmp_path, cut
):
    anchors = load_anchors("train", small_anchors_path)
    full, path = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="t", sample_fn=fake_sampler
    )
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    last = data[last_start:].rstrip(b"\n")
    # cut=-1 tears inside the multi-byte "✓", the others at a byte offset into the record.
    at = last.index("✓".encode()) + 1 if cut == -1 else cut
    path.write_bytes(data[: last_start + at])
    called: list[int] = []

    def counting(*args: Any) -> list[tuple[str, bool]]:
        called.append(len(args[1]))
        return fake_sampler(*args)

    again, _ = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="t", sample_fn=counting
    )
    assert called == [1]  # only the torn record was sampled again
    torn = json.loads(last)
    key = (torn["anchor_id"], torn["source"], torn["sample"])
    kept = [r for r in full if (r["anchor_id"], r["source"], r["sample"]) != key]
    assert len(kept) == len(full) - 1
    assert [r for r in again if (r["anchor_id"], r["source"], r["sample"]) != key] == kept
    on_disk = read_lines(path)  # raises if the append was glued onto the torn line
    assert len(on_disk) == len(full)
    assert sorted(json.dumps(r, sort_keys=True) for r in on_disk) == sorted(
        json.dumps(r, sort_keys=True) for r in again
    )


def test_whole_last_record_without_newline_is_kept(
    tiny_engine, small_anchors_path, fast_cfg, tmp_path
):
    anchors = load_anchors("train", small_anchors_path)
    full, path = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="n", sample_fn=fake_sampler
    )
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # crash between record and newline

    def refuse(*args: Any) -> list[tuple[str, bool]]:
        raise AssertionError("a complete record was sampled again")

    again, _ = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="n", sample_fn=refuse
    )
    assert again == full and path.read_bytes().endswith(b"\n")
    assert len(read_lines(path)) == len(full)


def test_repair_tail_leaves_good_files_alone(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    repair_tail(empty)
    repair_tail(tmp_path / "missing.jsonl")
    assert empty.read_bytes() == b"" and not (tmp_path / "missing.jsonl").exists()
    good = tmp_path / "g.jsonl"
    good.write_bytes(b'{"a": 1}\n')
    repair_tail(good)
    assert good.read_bytes() == b'{"a": 1}\n'
    only_torn = tmp_path / "t.jsonl"
    only_torn.write_bytes(b'{"anchor_id": "x", "sou')
    repair_tail(only_torn)
    assert only_torn.read_bytes() == b""


# ------------------------------------------------------------------ resume
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


# ------------------------------------------------------------------ acd train arguments
@pytest.fixture()
def no_model(monkeypatch, tmp_path):
    """Fail the test if `acd train` loads a model (validation must come first)."""
    monkeypatch.setenv("ACD_CACHE", str(tmp_path / "acd-cache"))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("acd_engine.engine.get_engine", refuse)


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


# ------------------------------------------------------------------ final write
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
        m.setattr("acd_engine.prompts.save_file", disk_full)
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


def test_option_defaults_table_matches_the_command():
    # parse_settings lets --set override an option only at its default: the table of
    # defaults must be the command's own, or an explicit option would be silently dropped.
    import inspect
    import typing

    from acd_engine.training.command import OPTION_FIELDS

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
