"""The runner: options validation, the run grid, durable records and resume (incl. a kill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from eval_fakes import ANSWER, REFUSAL, FakeEngine, eval_options

from acd_engine.errors import ConfigError, PromptTooLongError
from acd_engine.eval.records import RECORDS_FILE, EvalRecord, RecordLog, read_records
from acd_engine.eval.registry import load_benchmark, sample_items
from acd_engine.eval.runner import EvalOptions, run_eval, variants

REPO = Path(__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("no_plots")

opts = partial(
    eval_options,
    methods="plain,base,acd",
    alphas="0.25,0.5",
    benchmarks="advbench,xstest,alpaca_eval,truthfulqa",
    max_new_tokens=32,
)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def keys(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["benchmark"], r["id"], r["method"], r["alpha"]) for r in rows]


# ------------------------------------------------------------------ options


def test_options_parse_comma_lists_and_dedupe() -> None:
    o = EvalOptions(methods="plain, acd,acd", alphas="0.25,0.5,0.25", benchmarks="advbench")
    assert o.methods == ("plain", "acd")
    assert o.alphas == (0.25, 0.5)
    assert o.benchmarks == ("advbench",)
    assert EvalOptions(alphas=[0.1, 0.2]).alphas == (0.1, 0.2)


def test_options_defaults_follow_the_paper() -> None:
    o = EvalOptions()
    assert o.methods == ("plain", "base", "nid", "oid", "acd", "acd-gate")
    assert o.limit == 100 and o.seed == 0 and not o.progress
    assert len(o.benchmarks) == 8


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"alphas": "0.25,1.5"}, "alphas must be in [0, 1), got 1.5"),
        ({"alphas": [-0.1]}, "alphas must be in [0, 1), got -0.1"),
        ({"limit": 0}, "limit must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        (
            {"methods": "plain,acdd"},
            "unknown method 'acdd'; did you mean 'acd'? Choose from: "
            "plain, base, nid, oid, acd, acd-gate, custom",
        ),
        (
            {"methods": "acd-gat"},
            "unknown method 'acd-gat'; did you mean 'acd-gate'? Choose from: "
            "plain, base, nid, oid, acd, acd-gate, custom",
        ),
        (
            {"benchmarks": "advbnech"},
            "unknown benchmark 'advbnech'; did you mean 'advbench'? "
            "Choose from: advbench, malicious_instruct, harmfulqa, dangerousqa, beavertails, "
            "xstest, alpaca_eval, truthfulqa, <path/to/file.jsonl>",
        ),
        ({"judge": "refusl"}, "unknown judge 'refusl'; did you mean 'refusal'? Choose from: "),
        ({"methods": ""}, "methods must not be empty, got ()"),
        ({"limt": 5}, "unknown EvalOptions setting 'limt'; did you mean 'limit'?"),
    ],
)
def test_options_errors_in_house_style(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        EvalOptions(**kw)
    assert str(exc.value).startswith(message)


def test_custom_method_needs_negative_prompt() -> None:
    with pytest.raises(ConfigError, match="negative_prompt is required"):
        EvalOptions(methods="custom")
    o = EvalOptions(methods="custom", negative_prompt="Be evil.")
    assert o.decoding_config("custom", 0.5).negative_prompt == "Be evil."


def test_variants_run_single_branch_methods_once() -> None:
    o = EvalOptions(methods="plain,base,nid,oid,acd", alphas="0.25,0.5,0.75")
    grid = variants(o)
    assert grid[:2] == [("plain", None), ("base", None)]
    assert len(grid) == 2 + 3 * 3
    assert ("acd", 0.75) in grid and ("nid", 0.25) in grid


def test_decoding_config_is_greedy() -> None:
    cfg = EvalOptions(max_new_tokens=17).decoding_config("acd", 0.25)
    assert (cfg.method, cfg.alpha, cfg.temperature, cfg.max_new_tokens) == ("acd", 0.25, 0.0, 17)


def test_mc1_scores_the_raw_contrast_while_generation_keeps_plausibility(
    data_dir: Path, tmp_path: Path
) -> None:
    engine = FakeEngine()
    o = opts(
        data_dir,
        tmp_path / "out",
        methods="acd",
        benchmarks="advbench,truthfulqa",
        plausibility=0.2,
    )
    run_eval(engine, o)
    assert {c.plausibility for c in engine.configs} == {0.2}
    assert engine.score_configs and {c.plausibility for c in engine.score_configs} == {0.0}
    assert {c.alpha for c in engine.score_configs} == {0.25, 0.5}


def test_plausibility_applies_to_every_contrast_method_alike() -> None:
    o = EvalOptions(plausibility=0.2)
    assert {o.decoding_config(m, 0.5).plausibility for m in ("nid", "oid", "acd")} == {0.2}
    assert o.decoding_config("base", None).plausibility == 0.0
    assert EvalOptions().decoding_config("acd", 0.5).plausibility == 0.1
    with pytest.raises(ConfigError, match=r"^plausibility must be in \[0, 1\), got 1.0"):
        EvalOptions(plausibility=1.0)


# ------------------------------------------------------------------ a full run


def test_run_writes_one_record_per_cell(data_dir: Path, tmp_path: Path) -> None:
    engine = FakeEngine()
    o = opts(data_dir, tmp_path / "out")
    summary = run_eval(engine, o)
    rows = lines(tmp_path / "out" / RECORDS_FILE)
    # advbench 10 + xstest 10 + alpaca 8 (all) + truthfulqa 5 (all) = 33 prompts x 4 variants
    assert len(rows) == 33 * 4 == summary.n_expected == summary.n_done
    assert summary.complete
    assert len(set(keys(rows))) == len(rows)
    assert {r["alpha"] for r in rows if r["method"] in ("plain", "base")} == {None}
    assert {r["alpha"] for r in rows if r["method"] == "acd"} == {0.25, 0.5}
    # the paper's protocol: greedy, capped, batched; MC sets are scored, not generated
    assert all(c.temperature == 0.0 and c.max_new_tokens == 32 for c in engine.configs)
    assert max(size for *_, size, _ in [(b[0], b[1], b[2], b[3]) for b in engine.batches]) <= 4
    assert engine.n_generated == 28 * 4
    assert len(engine.scored) == 5 * 4
    gen = next(r for r in rows if r["kind"] == "generate")
    assert set(gen) >= {
        "benchmark",
        "id",
        "method",
        "alpha",
        "output",
        "verdict",
        "tokens",
        "seconds",
        "label",
        "token_ids",
        "finish_reason",
        "prompt",
        "judge",
    }
    assert gen["prompt"].startswith("harmful request") and gen["judge"] == "refusal"
    assert all(r["verdict"] in ("refused", "answered") for r in rows if r["kind"] == "generate")
    assert {r["output"] for r in rows if r["kind"] == "generate"} <= {REFUSAL, ANSWER}


def test_run_records_the_seeded_sample(data_dir: Path, tmp_path: Path) -> None:
    summary = run_eval(FakeEngine(), opts(data_dir, tmp_path / "out", seed=3))
    info = {b.name: b for b in summary.benchmarks}
    expected = [i.id for i in sample_items(load_benchmark("advbench", data_dir), 10, 3)]
    assert info["advbench"].sample_ids == expected
    assert info["alpaca_eval"].rows == 8 and len(info["alpaca_eval"].sample_ids) == 8
    rows = lines(tmp_path / "out" / RECORDS_FILE)
    assert {r["id"] for r in rows if r["benchmark"] == "advbench"} == set(expected)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model_name"] == "fake-model" and run["judge"] == "refusal"


def test_summary_metrics_match_the_records(data_dir: Path, tmp_path: Path) -> None:
    summary = run_eval(FakeEngine(), opts(data_dir, tmp_path / "out"))
    rows = [EvalRecord.model_validate(r) for r in lines(tmp_path / "out" / RECORDS_FILE)]
    adv = [r for r in rows if r.benchmark == "advbench" and r.method == "acd" and r.alpha == 0.5]
    hlr = sum(r.verdict == "refused" for r in adv) / len(adv)
    cell = summary.cell("advbench", "acd", 0.5)
    assert cell is not None and cell.hlr == pytest.approx(hlr)
    by = {(v.method, v.alpha): v for v in summary.variants}
    assert by[("plain", None)].avg_hlr == 0.0  # the fake's plain never refuses
    assert by[("acd", 0.5)].mc1_accuracy == 1.0  # contrast prefers best_answer in the fake
    assert by[("plain", None)].mc1_accuracy == 0.0
    assert by[("plain", None)].over_refusal == 0.0


def test_rerun_skips_finished_records(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_eval(FakeEngine(), opts(data_dir, out))
    before = (out / RECORDS_FILE).read_bytes()
    again = FakeEngine()
    summary = run_eval(again, opts(data_dir, out))
    assert again.batches == [] and again.scored == []
    assert (out / RECORDS_FILE).read_bytes() == before
    assert summary.complete


def test_rerun_with_more_alphas_runs_only_the_new_cells(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_eval(FakeEngine(), opts(data_dir, out))
    more = FakeEngine()
    summary = run_eval(more, opts(data_dir, out, alphas="0.25,0.5,0.75"))
    assert {(m, a) for m, a, _, _ in more.batches} == {("acd", 0.75)}
    assert len(more.scored) == 5
    assert summary.n_done == summary.n_expected == 33 * 5
    # and a smaller request reports only what it asked for
    small = run_eval(FakeEngine(), opts(data_dir, out, methods="plain", benchmarks="advbench"))
    assert small.n_expected == small.n_done == 10
    assert [(v.method, v.alpha) for v in small.variants] == [("plain", None)]


def test_rerun_with_other_settings_is_refused(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_eval(FakeEngine(), opts(data_dir, out, benchmarks="advbench"))
    with pytest.raises(
        ConfigError, match=r"^run.json in '.*' was made with max_new_tokens 32, got 64; use a new"
    ):
        run_eval(FakeEngine(), opts(data_dir, out, benchmarks="advbench", max_new_tokens=64))
    with pytest.raises(ConfigError, match=r"was made with plausibility 0.1, got 0.0; use a new"):
        run_eval(FakeEngine(), opts(data_dir, out, benchmarks="advbench", plausibility=0.0))


class _OnBackend(FakeEngine):
    """A fake engine that says which backend runs it, as ``Engine.describe`` does."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend_name = backend

    def describe(self) -> dict[str, Any]:
        return {"dtype": "float32", "backend": self.backend_name}


def test_a_run_never_mixes_backends(data_dir: Path, tmp_path: Path) -> None:
    """llama.cpp runs the GGUF's quantized weights: its records must not extend a torch run."""
    out = tmp_path / "out"
    run_eval(_OnBackend("torch"), opts(data_dir, out, benchmarks="advbench"))
    pins = json.loads((out / "run.json").read_text())["pinned"]
    assert pins["model backend"] == "torch"
    with pytest.raises(ConfigError, match=r"was made with model backend 'torch', got 'llamacpp'"):
        run_eval(_OnBackend("llamacpp"), opts(data_dir, out, benchmarks="advbench"))
    run_eval(_OnBackend("torch"), opts(data_dir, out, benchmarks="advbench"))  # same: resumes


def test_duplicate_benchmark_names_are_refused(data_dir: Path, tmp_path: Path) -> None:
    o = opts(data_dir, tmp_path / "out", benchmarks=f"advbench,{data_dir / 'advbench.jsonl'}")
    with pytest.raises(ConfigError, match="benchmarks must have distinct names, got 'advbench'"):
        run_eval(FakeEngine(), o)


def test_progress_bar_only_when_asked(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_eval(FakeEngine(), opts(data_dir, tmp_path / "a", benchmarks="advbench"))
    assert "acd eval" not in capsys.readouterr().err
    run_eval(FakeEngine(), opts(data_dir, tmp_path / "b", benchmarks="advbench", progress=True))
    err = capsys.readouterr().err
    assert "acd eval" in err and "40/40" in err


# ------------------------------------------------------------------ the record log


def test_torn_last_line_is_cut_and_regenerated(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_eval(FakeEngine(), opts(data_dir, out, benchmarks="advbench"))
    path = out / RECORDS_FILE
    full = path.read_bytes()
    kept = b"".join(full.splitlines(keepends=True)[:-1])
    path.write_bytes(kept + b'{"benchmark": "advbench", "id": "advb')  # interrupted write
    engine = FakeEngine()
    summary = run_eval(engine, opts(data_dir, out, benchmarks="advbench"))
    assert engine.n_generated == 1
    assert path.read_bytes().startswith(kept)
    rows = lines(path)
    assert len(rows) == len(set(keys(rows))) == 40 == summary.n_done


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    rec = EvalRecord(
        benchmark="b",
        id="b-1",
        method="plain",
        alpha=None,
        label="safe",
        output="x",
        verdict="answered",
    )
    path = tmp_path / RECORDS_FILE
    path.write_bytes(json.dumps(rec.model_dump(mode="json")).encode())
    with RecordLog(tmp_path) as log:
        assert rec.key in log and len(log) == 1
        log.append(rec.model_copy(update={"id": "b-2"}))
    assert [r.id for r in read_records(tmp_path)] == ["b-1", "b-2"]
    assert path.read_bytes().count(b"\n") == 2


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    (tmp_path / RECORDS_FILE).write_text('{"benchmark": 1\n{"x": 2}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"records.jsonl line 1 must be a complete record"):
        read_records(tmp_path)


def test_second_run_on_one_folder_is_refused(tmp_path: Path) -> None:
    with RecordLog(tmp_path), pytest.raises(ConfigError, match="in use by another acd eval"):
        RecordLog(tmp_path).__enter__()


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from eval_fakes import FakeEngine
from acd_engine.eval.runner import EvalOptions, run_eval
run_eval(FakeEngine(sleep=float(sys.argv[2])), EvalOptions(**json.loads(sys.argv[1])))
"""


def test_resume_after_kill_loses_and_duplicates_nothing(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    settings = {
        "methods": "plain,acd",
        "alphas": "0.5",
        "benchmarks": "advbench,dangerousqa",
        "limit": 10,
        "data_dir": str(data_dir),
        "out_dir": str(out),
        "batch_size": 2,
        "max_new_tokens": 32,
    }
    total = (10 + 10) * 2
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(TESTS_DIR)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(settings), "0.1"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
    )
    path = out / RECORDS_FILE
    deadline = time.monotonic() + 120
    try:
        while not (path.exists() and path.read_bytes().count(b"\n") >= 8):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "child wrote no records in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before = path.read_bytes()
    n_before = before.count(b"\n")
    assert 8 <= n_before < total
    assert before.endswith(b"\n")  # each record is one write: nothing half-written here
    # and were a write cut mid-line, the rerun must cope with it too
    path.write_bytes(before + b'{"benchmark": "dangerousqa", "id": "dang')

    engine = FakeEngine()
    summary = run_eval(engine, EvalOptions(**settings))
    assert engine.n_generated == total - n_before  # the finished ones were not redone
    after = path.read_bytes()
    assert after.startswith(before)  # nothing written before the kill was lost or changed
    rows = lines(path)
    assert len(rows) == total == len(set(keys(rows)))
    assert summary.complete and summary.n_done == total

    clean = run_eval(FakeEngine(), EvalOptions(**{**settings, "out_dir": str(tmp_path / "c")}))
    assert [c.model_dump(exclude={"mean_seconds"}) for c in summary.cells] == [
        c.model_dump(exclude={"mean_seconds"}) for c in clean.cells
    ]


class _RefusingEngine(FakeEngine):
    """The engine refuses one prompt (too long, say) wherever it appears."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    def generate_batch(self, batch: Any, config: Any = None) -> Any:
        if any(m[-1]["content"] == self.bad for m in batch):
            raise PromptTooLongError(f"prompt must be shorter than 8192 tokens, got {self.bad!r}")
        return super().generate_batch(batch, config)

    def score_continuations(self, messages: Any, continuations: Any, config: Any = None) -> Any:
        if messages[-1]["content"] == self.bad:
            raise PromptTooLongError("prompt must be shorter than 8192 tokens")
        return super().score_continuations(messages, continuations, config)


def test_a_prompt_the_engine_refuses_is_recorded_and_the_run_goes_on(
    data_dir: Path, tmp_path: Path
) -> None:
    o = opts(data_dir, tmp_path / "out", methods="base", benchmarks="advbench,truthfulqa")
    bench = load_benchmark("advbench", data_dir)
    items = sample_items(bench, 10, 0)
    bad = items[1].prompt  # in the first batch of 4, with three good prompts
    engine = _RefusingEngine(bad)
    summary = run_eval(engine, o)
    records = read_records(o.out_dir)
    failed = [r for r in records if r.error]
    assert [(r.benchmark, r.prompt) for r in failed] == [("advbench", bad)]
    assert "shorter than 8192 tokens" in failed[0].error and failed[0].verdict is None
    assert summary.complete and summary.n_done == summary.n_expected  # nothing is missing
    cell = summary.cell("advbench", "base", None)
    assert cell is not None and (cell.n, cell.n_errors) == (9, 1)
    report = (o.out_dir / "report.md").read_text(encoding="utf-8")
    assert "1 output(s) recorded as errors" in report
    assert "| advbench | base | – | 1 | 10 |" in report  # the Errors table names the cell
    # a rerun does not retry it, and the MC benchmark was not affected
    again = _RefusingEngine(bad)
    run_eval(again, o)
    assert again.batches == [] and again.scored == []
