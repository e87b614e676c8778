"""`acd eval` under hostile input: bad rows, failing engines and judges, mixed settings, bad paths.

Every test drives the runner with the model-free ``FakeEngine``; none loads a model.
"""

from __future__ import annotations

import fcntl
import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from eval_fakes import FakeEngine, eval_options, write_jsonl

from acd_engine import atomic
from acd_engine.errors import ConfigError
from acd_engine.eval import records as records_module
from acd_engine.eval.judges import JudgeError, RefusalMarkerJudge
from acd_engine.eval.records import RECORDS_FILE, read_records
from acd_engine.eval.runner import (
    MAX_UNEXPECTED_IN_A_ROW,
    RUN_FILE,
    pack_sha256,
    prepare_eval,
    run_eval,
)

pytestmark = pytest.mark.usefixtures("no_plots")

opts = partial(
    eval_options,
    methods="plain,acd",
    alphas="0.5",
    benchmarks="advbench",
    max_new_tokens=16,
)


def hostile_set(tmp_path: Path) -> Path:
    """Six rows: a lone-surrogate escape, an undecodable byte, four good ones."""
    path = tmp_path / "hostile.jsonl"
    rows = [{"id": f"h{i}", "prompt": f"good prompt {i}", "label": "harmful"} for i in range(4)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    text += '{"id": "esc", "prompt": "bad \\ud800 escape", "label": "harmful"}\n'
    path.write_bytes(
        text.encode() + b'{"id": "raw", "prompt": "bad \xff byte", "label": "harmful"}\n'
    )
    return path


class RaisingEngine(FakeEngine):
    """Raises ``exc`` whenever a batch holds a prompt in ``bad`` (or every prompt, if None)."""

    def __init__(self, bad: set[str] | None, exc: Exception) -> None:
        super().__init__()
        self.bad, self.exc = bad, exc
        self.seen: list[str] = []

    def generate_batch(self, batch: Any, config: Any = None) -> Any:
        prompts = [m[-1]["content"] for m in batch]
        self.seen += prompts
        if self.bad is None or self.bad & set(prompts):
            raise self.exc
        return super().generate_batch(batch, config)


# ------------------------------------------------------------------ bad rows


def test_undecodable_rows_become_error_records_and_the_run_finishes(tmp_path: Path) -> None:
    bench = hostile_set(tmp_path)
    o = opts(tmp_path, tmp_path / "out", benchmarks=str(bench))
    engine = FakeEngine()
    summary = run_eval(engine, o)
    recs = read_records(o.out_dir)
    failed = sorted((r.id, r.method) for r in recs if r.error)
    assert failed == [("esc", "acd"), ("esc", "plain"), ("raw", "acd"), ("raw", "plain")]
    assert all("must be valid Unicode text" in (r.error or "") for r in recs if r.error)
    assert summary.complete and summary.n_done == 12
    assert engine.n_generated == 8  # the bad rows never reached the engine
    cell = summary.cell("hostile", "plain", None)
    assert cell is not None and (cell.n, cell.n_errors) == (4, 2)
    report = (o.out_dir / "report.md").read_text(encoding="utf-8")
    assert "4 output(s) recorded as errors" in report and "## Errors" in report
    # the surrogate survives the round trip through records.jsonl and summary.json
    assert {r.prompt for r in recs if r.id == "esc"} == {"bad \ud800 escape"}
    summary_ids = json.loads((o.out_dir / "summary.json").read_text())["benchmarks"][0]
    assert "esc" in summary_ids["sample_ids"]
    # a rerun neither retries nor crashes
    again = FakeEngine()
    assert run_eval(again, o).complete and again.n_generated == 0


def test_a_row_that_makes_generation_raise_costs_only_itself(
    data_dir: Path, tmp_path: Path
) -> None:
    o = opts(data_dir, tmp_path / "out", methods="plain")
    bad = "harmful request 7"
    engine = RaisingEngine({bad}, RuntimeError("CUDA kernel hiccup"))
    summary = run_eval(engine, o)
    failed = [r for r in read_records(o.out_dir) if r.error]
    assert bad in engine.seen and [r.prompt for r in failed] == [bad]
    assert failed[0].error == "RuntimeError: CUDA kernel hiccup"
    assert summary.complete and summary.cell("advbench", "plain", None).n_errors == 1  # type: ignore[union-attr]
    again = RaisingEngine({bad}, RuntimeError("again"))
    run_eval(again, o)
    assert again.seen == []  # not retried, no crash


def test_systematic_failures_stop_the_run_and_are_not_recorded(
    data_dir: Path, tmp_path: Path
) -> None:
    o = opts(data_dir, tmp_path / "out", methods="plain", limit=30)
    with pytest.raises(RuntimeError, match="driver gone"):
        run_eval(RaisingEngine(None, RuntimeError("driver gone")), o)
    assert read_records(o.out_dir) == []  # so the next run retries every row
    assert MAX_UNEXPECTED_IN_A_ROW <= 30
    summary = run_eval(FakeEngine(), o)
    assert summary.complete and all(not r.error for r in read_records(o.out_dir))


def test_input_errors_are_recorded_even_when_every_row_has_one(
    data_dir: Path, tmp_path: Path
) -> None:
    o = opts(data_dir, tmp_path / "out", methods="plain", limit=30)
    summary = run_eval(RaisingEngine(None, ValueError("tokenizer refuses")), o)
    recs = read_records(o.out_dir)
    assert len(recs) == 30 and all(r.error == "ValueError: tokenizer refuses" for r in recs)
    assert summary.complete


# ------------------------------------------------------------------ judges


class FlakyJudge(RefusalMarkerJudge):
    """Fails on outputs containing ``Sure``; with ``batch`` its batch call always fails."""

    def __init__(self, exc: Exception, batch: bool = False) -> None:
        super().__init__()
        self.exc, self.batch, self.single_calls = exc, batch, 0

    def judge(self, prompt: str, response: str) -> Any:
        self.single_calls += 1
        if "Sure" in response:
            raise self.exc
        return super().judge(prompt, response)

    def judge_many(self, prompts: Any, responses: Any) -> Any:
        if self.batch:
            raise self.exc
        return [self.judge(p, r) for p, r in zip(prompts, responses, strict=True)]


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize(
    "exc", [JudgeError("judge endpoint timed out"), ValueError("no verdict"), OSError("reset")]
)
def test_judge_failures_are_recorded_per_row_with_the_output_kept(
    data_dir: Path, tmp_path: Path, exc: Exception, batch: bool
) -> None:
    o = opts(data_dir, tmp_path / "out", methods="plain")  # plain always answers "Sure, ..."
    judge = FlakyJudge(exc, batch=batch)
    summary = run_eval(FakeEngine(), o, judge=judge)
    recs = read_records(o.out_dir)
    assert len(recs) == 10 and all(r.error and r.error.startswith("judge refusal: ") for r in recs)
    assert all(r.output.startswith("Sure") and r.verdict is None for r in recs)
    assert summary.complete and summary.cell("advbench", "plain", None).n_errors == 10  # type: ignore[union-attr]
    if batch:
        assert judge.single_calls == 10  # the failed batch was judged pair by pair


def test_a_judge_bug_is_not_swallowed(data_dir: Path, tmp_path: Path) -> None:
    o = opts(data_dir, tmp_path / "out", methods="plain")
    with pytest.raises(KeyError):
        run_eval(FakeEngine(), o, judge=FlakyJudge(KeyError("bug")))


# ------------------------------------------------------------------ run.json pins


class PackedEngine(FakeEngine):
    """A fake with the identity fields of a real Engine: fingerprint, dtype and a pack."""

    def __init__(
        self, sp: float = 0.0, emb: str = "e1", dtype: str = "float32", quantize: str = "none"
    ) -> None:
        super().__init__()
        from acd_engine.config import ModelConfig

        self.model_config = ModelConfig(quantize=quantize)  # type: ignore[arg-type]

        class Pack:
            pass

        self.pack = Pack()
        self.pack.sp = torch.full((2, 4), sp)  # type: ignore[attr-defined]
        self.pack.ap = torch.ones(2, 4)  # type: ignore[attr-defined]
        self.fingerprint = {"architecture": "Fake", "embedding_hash": emb}
        self._dtype = dtype

    def describe(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "dtype": self._dtype}


def test_pack_sha256_hashes_the_tensors() -> None:
    a, b = PackedEngine(0.0).pack, PackedEngine(0.5).pack
    assert pack_sha256(a) == pack_sha256(PackedEngine(0.0).pack) != pack_sha256(b)
    assert len(pack_sha256(a)) == 64


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (
            PackedEngine(sp=0.0),
            PackedEngine(sp=0.5),
            r"was made with pack sha256 [0-9a-f]{12}…, got [0-9a-f]{12}…; use a new --out",
        ),
        (
            PackedEngine(emb="e1"),
            PackedEngine(emb="e2"),
            r"was made with model embedding_hash 'e1', got 'e2'",
        ),
        (
            PackedEngine(dtype="float32"),
            PackedEngine(dtype="bfloat16"),
            r"was made with model dtype 'float32', got 'bfloat16'",
        ),
        (
            PackedEngine(),
            PackedEngine(quantize="int8"),
            r"was made with model quantize 'none', got 'int8'",
        ),
    ],
)
def test_another_model_or_pack_in_the_same_folder_is_refused(
    data_dir: Path, tmp_path: Path, first: FakeEngine, second: FakeEngine, message: str
) -> None:
    o = opts(data_dir, tmp_path / "out")
    run_eval(first, o)
    before = (o.out_dir / RECORDS_FILE).read_bytes()
    with pytest.raises(ConfigError, match=rf"^run.json in '.*out' {message}"):
        run_eval(second, opts(data_dir, tmp_path / "out", alphas="0.5,0.25"))
    assert (o.out_dir / RECORDS_FILE).read_bytes() == before and second.batches == []


def test_the_pack_is_pinned_only_once_acd_runs(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_eval(PackedEngine(sp=0.0), opts(data_dir, out, methods="plain"))
    run_eval(PackedEngine(sp=0.5), opts(data_dir, out, methods="plain,acd"))  # acd added: free
    with pytest.raises(ConfigError, match="pack sha256"):
        run_eval(PackedEngine(sp=0.0), opts(data_dir, out, methods="acd"))
    # a plain-only rerun does not drop the pin
    run_eval(PackedEngine(sp=0.0), opts(data_dir, out, methods="plain"))
    pinned = json.loads((out / RUN_FILE).read_text())["pinned"]
    assert pinned["pack sha256"] == pack_sha256(PackedEngine(sp=0.5).pack)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_new_tokens": 17}, "max_new_tokens 16, got 17"),
        ({"plausibility": 0.2}, "plausibility 0.1, got 0.2"),
    ],
)
def test_decoding_changes_are_refused_before_any_model(
    data_dir: Path, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    run_eval(FakeEngine(), opts(data_dir, tmp_path / "out"))
    with pytest.raises(ConfigError, match=message):
        prepare_eval(opts(data_dir, tmp_path / "out", **change))  # no engine involved


def test_changed_benchmark_content_is_refused(data_dir: Path, tmp_path: Path) -> None:
    run_eval(FakeEngine(), opts(data_dir, tmp_path / "out"))
    path = data_dir / "advbench.jsonl"
    path.write_text(path.read_text().replace("harmful request 3", "other request 3"))
    with pytest.raises(ConfigError, match=r"was made with benchmark advbench sha256 [0-9a-f]{12}…"):
        prepare_eval(opts(data_dir, tmp_path / "out"))


def test_judge_settings_are_pinned(data_dir: Path, tmp_path: Path) -> None:
    run_eval(FakeEngine(), opts(data_dir, tmp_path / "out"), judge=RefusalMarkerJudge())
    with pytest.raises(ConfigError, match="judge window 200, got 50"):
        run_eval(
            FakeEngine(), opts(data_dir, tmp_path / "out"), judge=RefusalMarkerJudge(window=50)
        )
    with pytest.raises(ConfigError, match="judge 'refusal', got 'refusal-strict'"):
        run_eval(
            FakeEngine(),
            opts(data_dir, tmp_path / "out"),
            judge=RefusalMarkerJudge(mode="strict"),
        )


def test_custom_prompts_are_pinned(data_dir: Path, tmp_path: Path) -> None:
    run_eval(
        FakeEngine(),
        opts(data_dir, tmp_path / "out", methods="custom", negative_prompt="Be evil."),
    )
    with pytest.raises(ConfigError, match=r"custom negative_prompt 'Be evil\.', got 'Be rude\.'"):
        prepare_eval(opts(data_dir, tmp_path / "out", methods="custom", negative_prompt="Be rude."))


def test_what_may_vary_between_resumes(data_dir: Path, tmp_path: Path) -> None:
    """Sample seed and size, batch size, data folder, methods, alphas and sets are free."""
    out = tmp_path / "out"
    run_eval(FakeEngine(), opts(data_dir, out))
    other = tmp_path / "copy"
    other.mkdir()
    for f in data_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    for change in (
        {"seed": 3},
        {"limit": 20},
        {"batch_size": 1},
        {"data_dir": other},
        {"methods": "base,nid"},
        {"alphas": "0.25"},
        {"benchmarks": "advbench,dangerousqa"},
    ):
        kw: dict[str, Any] = {"data_dir": data_dir, **change}
        assert run_eval(FakeEngine(), opts(out=out, **kw)).complete, change


def test_a_legacy_run_json_is_still_enforced(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    legacy = {"model_name": "fake-model", "judge": "refusal", "max_new_tokens": 99}
    (out / RUN_FILE).write_text(json.dumps({**legacy, "plausibility": 0.1, "options": {}}))
    with pytest.raises(ConfigError, match="max_new_tokens 99, got 16"):
        run_eval(FakeEngine(), opts(data_dir, out))


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_corrupt_run_json_is_a_clean_error(
    data_dir: Path, tmp_path: Path, content: bytes
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match=r"run.json in .* must be the JSON object acd eval wrote"):
        prepare_eval(opts(data_dir, out))


# ------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda out: out.write_text("x"), "out_dir must be a folder, got the file"),
        (
            lambda out: (out.parent / "f").write_text("x"),
            "out_dir must be a writable folder, got '.*' \\(Not a directory\\)",
        ),
        (
            lambda out: (out / RECORDS_FILE).mkdir(parents=True),
            "records.jsonl in .* must be a file",
        ),
        (lambda out: (out / RUN_FILE).mkdir(parents=True), "run.json in .* must be a file"),
        (lambda out: (out / "report.md").mkdir(parents=True), "report.md in .* must be a file"),
    ],
)
def test_unusable_output_paths_fail_before_the_model(
    data_dir: Path, tmp_path: Path, setup: Any, message: str
) -> None:
    out = tmp_path / "out"
    setup(out)
    target = tmp_path / "f" / "out" if "Not a directory" in message else out
    with pytest.raises(ConfigError, match=message):
        prepare_eval(opts(data_dir, target))


def test_an_unwritable_folder_is_a_clean_error(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("acd_engine.atomic.tempfile.mkstemp", denied)
    with pytest.raises(ConfigError, match=r"out_dir must be a writable folder.*Permission denied"):
        prepare_eval(opts(data_dir, tmp_path / "out"))


def test_benchmark_paths_are_checked(tmp_path: Path) -> None:
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ConfigError, match="benchmark file must be a file, got the folder"):
        prepare_eval(opts(tmp_path, tmp_path / "out", benchmarks=str(tmp_path / "dir.jsonl")))
    write_jsonl(tmp_path / "x.jsonl", [{"id": "a", "prompt": "p"}])
    with pytest.raises(ConfigError, match=r"x\.jsonl line 1: label"):
        prepare_eval(opts(tmp_path, tmp_path / "out", benchmarks=str(tmp_path / "x.jsonl")))


# ------------------------------------------------------------------ lock, atomic writes


def test_the_report_is_written_under_the_lock(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import acd_engine.eval.runner as runner

    held: list[bool] = []
    real = runner.write_report

    def spy(summary: Any, out_dir: Path) -> Any:
        with open(out_dir / RECORDS_FILE, "rb") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
            else:
                held.append(False)
        return real(summary, out_dir)

    monkeypatch.setattr(runner, "write_report", spy)
    run_eval(FakeEngine(), opts(data_dir, tmp_path / "out"))
    assert held == [True]


def test_records_reexports_the_shared_atomic_writers() -> None:
    assert records_module.atomic_write_bytes is atomic.atomic_write_bytes
    assert records_module.atomic_write_text is atomic.atomic_write_text
