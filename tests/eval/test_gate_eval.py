"""acd vs acd-gate in eval: configs, records, pins, the gate's report sections and the
counterfactual threshold sweep (checked by hand on made-up records)."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from eval_fakes import FakeEngine, eval_options, fake_gate_score, make_gate
from typer.testing import CliRunner

from acd_engine.errors import ConfigError
from acd_engine.eval.metrics import gate_checks, gate_flag_rates, gate_sweep
from acd_engine.eval.records import RECORDS_FILE, EvalRecord, read_records
from acd_engine.eval.report import PLOT_FILES, REPORT_FILE, render_markdown
from acd_engine.eval.runner import (
    GATELESS_PACK,
    RUN_FILE,
    EvalOptions,
    check_pack_file,
    run_eval,
    variants,
)

opts = partial(
    eval_options,
    methods="plain,base,acd,acd-gate",
    alphas="0.5",
    benchmarks="advbench,xstest,alpaca_eval",
    max_new_tokens=16,
)


# ------------------------------------------------------------------ method mapping


def test_acd_is_ungated_and_acd_gate_is_gated_acd() -> None:
    o = EvalOptions(methods="acd,acd-gate", alphas="0.25,0.5", plausibility=0.2)
    acd, gated = o.decoding_config("acd", 0.5), o.decoding_config("acd-gate", 0.25)
    assert (acd.method, acd.gate, acd.alpha, acd.plausibility) == ("acd", False, 0.5, 0.2)
    assert (gated.method, gated.gate, gated.alpha, gated.plausibility) == ("acd", True, 0.25, 0.2)
    assert gated.temperature == 0.0 and gated.gate_threshold is None  # the pack's threshold
    # a contrast method: swept over every alpha
    assert variants(o) == [("acd", 0.25), ("acd", 0.5), ("acd-gate", 0.25), ("acd-gate", 0.5)]


def test_a_run_sends_gate_false_for_acd_and_true_for_acd_gate(
    data_dir: Path, tmp_path: Path, no_plots: None
) -> None:
    engine = FakeEngine(gate=make_gate(0.5))
    run_eval(engine, opts(data_dir, tmp_path / "out", benchmarks="advbench,truthfulqa"))
    gates = {(c.method, c.gate) for c in engine.configs if c.method == "acd"}
    assert gates == {("acd", False), ("acd", True)}
    assert {c.gate for c in engine.score_configs if c.method == "acd"} == {False, True}
    rows = read_records(tmp_path / "out")
    assert {r.method for r in rows} == {"plain", "base", "acd", "acd-gate"}  # eval names kept


# ------------------------------------------------------------------ records


def test_records_carry_the_gate_reading(data_dir: Path, tmp_path: Path, no_plots: None) -> None:
    run_eval(
        FakeEngine(gate=make_gate(0.5)),
        opts(data_dir, tmp_path / "out", benchmarks="advbench,truthfulqa"),
    )
    rows = read_records(tmp_path / "out")
    gated = [r for r in rows if r.method == "acd-gate" and r.kind == "generate"]
    assert len(gated) == 10
    for r in gated:
        assert r.gate_score == pytest.approx(fake_gate_score(r.prompt))
        assert r.gate_flagged == (fake_gate_score(r.prompt) >= 0.5)
    assert {r.gate_flagged for r in gated} == {True, False}  # the sample hits both routes
    # the routed output: flagged prompts answer as ungated acd, the rest as base (the
    # engine's gate_passed_method)
    by = {(r.method, r.id): r for r in rows if r.kind == "generate"}
    for r in gated:
        twin = by[("acd", r.id)] if r.gate_flagged else by[("base", r.id)]
        assert r.output == twin.output
    # results without the fields (ungated methods, the fake's FakeResult) and MC1 rows: None
    others = [r for r in rows if r.method != "acd-gate" or r.kind == "mc1"]
    assert others and all(r.gate_score is None and r.gate_flagged is None for r in others)
    line = json.loads((tmp_path / "out" / RECORDS_FILE).read_text().splitlines()[0])
    assert "gate_score" in line and "gate_flagged" in line


# ------------------------------------------------------------------ the gateless pack


@pytest.mark.parametrize("engine", [FakeEngine(pack=True), FakeEngine()])
def test_acd_gate_with_a_gateless_pack_fails_before_generating(
    data_dir: Path, tmp_path: Path, engine: FakeEngine
) -> None:
    with pytest.raises(ConfigError) as exc:
        run_eval(engine, opts(data_dir, tmp_path / "out"))
    assert str(exc.value) == (
        "acd-gate needs a prompt pack with a safety gate; fit one with "
        "acd gate --pack ... --out ..."
    )
    assert engine.batches == [] and engine.scored == []
    assert not (tmp_path / "out" / RUN_FILE).exists()
    # without acd-gate the same engine runs
    run_eval(engine, opts(data_dir, tmp_path / "out", methods="plain,acd"))
    assert engine.batches


def _save_pack(path: Path, gate: Any) -> Path:
    import torch

    from acd_engine.safety.prompts import PromptPack

    PromptPack(torch.zeros(2, 4), torch.ones(2, 4), {"hidden_size": "4"}, gate=gate).save(path)
    return path


def test_a_gateless_pack_file_is_refused_before_the_model(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateless = _save_pack(tmp_path / "nogate.safetensors", None)
    gated = _save_pack(tmp_path / "gate.safetensors", make_gate(0.4))
    o = opts(data_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^acd-gate needs a prompt pack with a safety gate"):
        check_pack_file(o, gateless)
    check_pack_file(o, gated)
    check_pack_file(o, None)  # the model's own pack: checked once the engine is up
    check_pack_file(opts(data_dir, tmp_path / "out", methods="acd"), gateless)

    res = _eval_cli_before_any_model(
        monkeypatch, data_dir, tmp_path / "cli", "--pack", str(gateless)
    )
    assert res.exit_code == 2, (res.output, res.exception)
    assert GATELESS_PACK in res.stderr


def _eval_cli_before_any_model(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path, out: Path, *extra: str
) -> Any:
    """``acd eval --methods plain,acd-gate --benchmarks advbench`` with ``extra``, where
    loading a model fails the test: bad input must be refused before any model loads."""
    from acd_engine.cli.main import app

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("acd_engine.runtime.engine.get_engine", refuse)
    return CliRunner().invoke(
        app,
        [
            *("eval", "--methods", "plain,acd-gate", "--benchmarks", "advbench"),
            *("--data-dir", str(data_dir), "--out", str(out), *extra),
        ],
    )


# ------------------------------------------------------------------ run.json pins


def test_the_gate_is_pinned_once_acd_gate_runs(
    data_dir: Path, tmp_path: Path, no_plots: None
) -> None:
    out = tmp_path / "out"
    o = opts(data_dir, out, benchmarks="advbench")
    run_eval(FakeEngine(gate=make_gate(0.5)), opts(data_dir, out, benchmarks="advbench"))
    pinned = json.loads((out / RUN_FILE).read_text())["pinned"]
    assert pinned["pack gate threshold"] == 0.5 and len(pinned["pack gate sha256"]) == 64
    assert pinned["decoding gate"] is False  # eval's acd is the ungated one
    assert "pack sha256" in pinned
    # only the threshold changed: refused, naming it (sp/ap are the same)
    with pytest.raises(ConfigError, match=r"was made with pack gate sha256 [0-9a-f]{12}…, got"):
        run_eval(FakeEngine(gate=make_gate(0.6)), o)
    # only the gate's weights changed: refused too
    with pytest.raises(ConfigError, match="pack gate sha256"):
        run_eval(FakeEngine(gate=make_gate(0.5, weight=2.0)), o)
    # only the gate's pooling changed (same tensors, other features): refused too
    last = dataclasses.replace(make_gate(0.5), pooling="last")
    with pytest.raises(ConfigError, match="pack gate sha256"):
        run_eval(FakeEngine(gate=last), o)
    # the same gate again resumes
    run_eval(FakeEngine(gate=make_gate(0.5)), o)


def test_gate_threshold_decodes_acd_gate_at_it_and_is_pinned(
    data_dir: Path, tmp_path: Path, no_plots: None
) -> None:
    """--gate-threshold: acd-gate's requests are flagged at it (not the pack's), the report
    marks it as the run's threshold, and a folder refuses another."""
    out = tmp_path / "out"
    o = opts(data_dir, out, benchmarks="advbench,xstest", gate_threshold=0.8)
    assert o.decoding_config("acd-gate", 0.5).gate_threshold == 0.8
    assert o.decoding_config("acd", 0.5).gate_threshold is None  # ungated acd is untouched
    summary = run_eval(FakeEngine(gate=make_gate(0.5)), o)
    gated = [r for r in read_records(out) if r.method == "acd-gate"]
    assert gated and all(r.gate_flagged == (fake_gate_score(r.prompt) >= 0.8) for r in gated)
    assert any(0.5 <= fake_gate_score(r.prompt) < 0.8 for r in gated)  # the two would differ
    assert summary.gate_threshold == 0.8
    assert [p.threshold for p in summary.gate_sweep if p.shipped] == [0.8]
    md = (out / REPORT_FILE).read_text(encoding="utf-8")
    assert "- gate threshold: 0.8 (set by --gate-threshold, not the pack's)" in md
    assert "| **0.8 (--gate-threshold)** |" in md and "(shipped)" not in md
    assert json.loads((out / RUN_FILE).read_text())["pinned"]["decoding gate_threshold"] == 0.8
    with pytest.raises(ConfigError, match=r"was made with decoding gate_threshold 0.8, got 0.7"):
        run_eval(FakeEngine(gate=make_gate(0.5)), opts(data_dir, out, gate_threshold=0.7))
    with pytest.raises(ConfigError, match=r"decoding gate_threshold 0.8, got None"):
        run_eval(FakeEngine(gate=make_gate(0.5)), opts(data_dir, out))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"gate_threshold": 1.5}, r"^gate_threshold must be in \(0, 1\) or None, got 1.5$"),
        (
            {"gate_threshold": 0.5, "methods": "plain,acd"},
            r"^gate_threshold applies to acd-gate only; add it to methods, got plain,acd$",
        ),
    ],
)
def test_gate_threshold_errors_in_house_style(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EvalOptions(**{"methods": "acd-gate", **changes})


def test_cli_gate_threshold_is_checked_before_any_model(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = _eval_cli_before_any_model(
        monkeypatch, data_dir, tmp_path / "cli", "--gate-threshold", "1.5"
    )
    assert res.exit_code == 2, (res.output, res.exception)
    assert "gate_threshold must be in (0, 1) or None, got 1.5" in res.stderr


def test_ungated_runs_do_not_pin_the_gate(data_dir: Path, tmp_path: Path, no_plots: None) -> None:
    out = tmp_path / "out"
    run_eval(FakeEngine(gate=make_gate(0.5)), opts(data_dir, out, methods="plain,acd"))
    pinned = json.loads((out / RUN_FILE).read_text())["pinned"]
    assert "pack gate sha256" not in pinned
    # a refitted gate does not change ungated acd, so the folder stays usable for it
    run_eval(FakeEngine(gate=make_gate(0.7)), opts(data_dir, out, methods="plain,acd"))
    # and acd-gate added later pins the gate from then on
    run_eval(FakeEngine(gate=make_gate(0.7)), opts(data_dir, out))
    pinned = json.loads((out / RUN_FILE).read_text())["pinned"]
    assert pinned["pack gate threshold"] == 0.7


def test_acd_gate_alone_pins_the_pack(data_dir: Path, tmp_path: Path, no_plots: None) -> None:
    out = tmp_path / "out"
    engine = FakeEngine(gate=make_gate(0.5))
    run_eval(engine, opts(data_dir, out, methods="acd-gate", benchmarks="advbench"))
    other = FakeEngine(gate=make_gate(0.5))
    other.pack.sp = other.pack.sp + 1.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="was made with pack sha256"):
        run_eval(other, opts(data_dir, out, methods="acd-gate", benchmarks="advbench"))


def test_an_acd_folder_from_a_gated_default_is_refused(
    data_dir: Path, tmp_path: Path, no_plots: None
) -> None:
    """Folders pinned while eval's acd still ran with the engine's default gate=True hold
    (possibly) gated acd records: adding to them would mix the two."""
    out = tmp_path / "out"
    run_eval(FakeEngine(), opts(data_dir, out, methods="plain,acd"))
    doc = json.loads((out / RUN_FILE).read_text())
    doc["pinned"]["decoding gate"] = True
    (out / RUN_FILE).write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="was made with decoding gate True, got False"):
        run_eval(FakeEngine(), opts(data_dir, out, methods="plain,acd"))
    run_eval(FakeEngine(), opts(data_dir, out, methods="plain"))  # plain never reads it


# ------------------------------------------------------------------ hand-made records


def rec(
    benchmark: str,
    i: int,
    label: str,
    method: str,
    verdict: str,
    *,
    alpha: float | None = 0.5,
    score: float | None = None,
    flagged: bool | None = None,
    output: str | None = None,
) -> EvalRecord:
    return EvalRecord(
        benchmark=benchmark,
        id=f"{benchmark}-{i}",
        method=method,
        alpha=None if method == "plain" else alpha,
        label=label,  # type: ignore[arg-type]
        verdict=verdict,  # type: ignore[arg-type]
        output=output or f"{verdict} {i} " + "word " * 3 + benchmark,
        token_ids=list(range(10)),
        tokens=10,
        gate_score=score,
        gate_flagged=flagged,
    )


ROLES: dict[str, Any] = {"advbench": "harmful", "dangerousqa": "harmful", "alpaca_eval": "safe"}
# prompt: (benchmark, i, label, plain verdict, acd verdict at 0.5, gate score)
PROMPTS = [
    ("advbench", 1, "harmful", "answered", "refused", 0.9),
    ("advbench", 2, "harmful", "answered", "refused", 0.4),
    ("dangerousqa", 1, "harmful", "answered", "answered", 0.8),
    ("alpaca_eval", 1, "safe", "answered", "refused", 0.3),
    ("alpaca_eval", 2, "safe", "answered", "answered", 0.1),
]


def hand_records() -> list[EvalRecord]:
    out: list[EvalRecord] = []
    for bench, i, label, plain, acd, score in PROMPTS:
        out.append(rec(bench, i, label, "plain", plain))
        out.append(rec(bench, i, label, "acd", acd))
        # acd at 0.25 refuses everything; acd-gate ran only at 0.5, at threshold 0.35, and
        # its records copy acd's answer whatever the route (gate_checks counts the mismatch)
        out.append(rec(bench, i, label, "acd", "refused", alpha=0.25))
        out.append(rec(bench, i, label, "acd-gate", acd, score=score, flagged=score >= 0.35))
    # a prompt without a plain record cannot be swept and must not enter
    out.append(rec("advbench", 3, "harmful", "acd", "refused"))
    out.append(rec("advbench", 3, "harmful", "acd-gate", "refused", score=0.99, flagged=True))
    return out


def test_threshold_sweep_by_hand() -> None:
    points, notes = gate_sweep(
        hand_records(), ROLES, thresholds=(0.2, 0.5, 0.95), shipped=0.35, passed="plain"
    )
    assert notes == []
    got = {
        (p.alpha, p.threshold): (p.avg_hlr, p.over_refusal, p.n, p.n_flagged, p.shipped)
        for p in points
    }
    # α=0.5. t=0.2: advbench 1-2 and dangerousqa 1 and alpaca 1 go to acd. advbench HLR 1,
    # dangerousqa 0 -> avg (macro over sets) 0.5; alpaca 1 refused under acd -> 1/2.
    assert got[(0.5, 0.2)] == (0.5, 0.5, 5, 4, False)
    # t=0.35 (shipped): alpaca 1 (0.3) stays plain -> no over-refusal.
    assert got[(0.5, 0.35)] == (0.5, 0.0, 5, 3, True)
    # t=0.5: advbench 2 (0.4) falls back to plain: advbench 1/2, dangerousqa 0 -> 0.25.
    assert got[(0.5, 0.5)] == (0.25, 0.0, 5, 2, False)
    # t=0.95: everything plain.
    assert got[(0.5, 0.95)] == (0.0, 0.0, 5, 0, False)
    # α=0.25 has no acd-gate record but the same gate scores serve it (the gate reads the
    # prompt only): at t=0.35 every harmful prompt goes to acd (refused), alpaca stays plain.
    assert got[(0.25, 0.35)] == (1.0, 0.0, 5, 3, True)
    assert got[(0.25, 0.2)] == (1.0, 0.5, 5, 4, False)
    assert [p.threshold for p in points if p.alpha == 0.5] == [0.2, 0.35, 0.5, 0.95]


def test_threshold_sweep_skips_with_a_note_when_a_method_is_missing() -> None:
    records = [r for r in hand_records() if r.method != "plain"]
    points, notes = gate_sweep(records, ROLES, passed="plain")
    assert points == []
    assert notes == [
        "No threshold sweep: it needs generations of plain, acd and acd-gate (for the gate "
        "scores); missing: plain."
    ]
    no_scores = [r for r in hand_records() if r.method != "acd-gate"]
    assert "missing: acd-gate gate scores" in gate_sweep(no_scores, ROLES, passed="plain")[1][0]
    # the shipped route reads base records, which these hand records do not have
    assert "missing: base." in gate_sweep(hand_records(), ROLES)[1][0]


def test_threshold_sweep_reads_the_passed_methods_records() -> None:
    """The same answers under the name base give the same sweep with passed='base'."""
    as_base = [
        r.model_copy(update={"method": "base"}) if r.method == "plain" else r
        for r in hand_records()
    ]
    plain_points, _ = gate_sweep(hand_records(), ROLES, passed="plain")
    base_points, notes = gate_sweep(as_base, ROLES)
    assert notes == [] and base_points == plain_points
    assert gate_checks(as_base) == gate_checks(hand_records(), "plain")


def test_flag_rates_by_hand() -> None:
    records = [
        rec("advbench", 1, "harmful", "acd-gate", "refused", score=0.9, flagged=True),
        rec("advbench", 2, "harmful", "acd-gate", "answered", score=0.2, flagged=False),
        # the same prompt at another alpha is one reading, not two
        rec("advbench", 1, "harmful", "acd-gate", "refused", alpha=0.25, score=0.9, flagged=True),
        rec("xstest", 1, "harmful", "acd-gate", "refused", score=0.7, flagged=True),
        rec("xstest", 2, "safe", "acd-gate", "answered", score=0.1, flagged=False),
        rec("xstest", 3, "safe", "acd-gate", "refused", score=0.6, flagged=True),
        rec("xstest", 4, "safe", "acd", "answered"),  # not gated: not counted
    ]
    roles: dict[str, Any] = {"advbench": "harmful", "xstest": "mixed"}
    rates = gate_flag_rates(records, roles, ["xstest", "advbench"])
    assert [(f.benchmark, f.role, f.label, f.n, f.n_flagged, f.flag_rate) for f in rates] == [
        ("xstest", "mixed", "harmful", 1, 1, 1.0),
        ("xstest", "mixed", "safe", 2, 1, 0.5),
        ("advbench", "harmful", "harmful", 2, 1, 0.5),
    ]


def test_gate_checks_count_routed_outputs_that_match() -> None:
    # advbench 2 is flagged (0.4 >= 0.35), so its output should equal acd's; make it differ
    records = [
        r.model_copy(update={"output": "something else"})
        if (r.method, r.id) == ("acd-gate", "advbench-2")
        else r
        for r in hand_records()
    ]
    (check,) = gate_checks(records, "plain")
    # the acd-gate records were built as copies of acd's (output and verdict), so the
    # unflagged ones match plain only where plain and acd agree (alpaca 2, not alpaca 1)
    assert (check.alpha, check.n) == (0.5, 6)
    by = {r.id: r for r in records if r.method == "acd-gate"}
    assert by["alpaca_eval-1"].gate_flagged is False
    # same outputs: advbench 1, dangerousqa 1, advbench 3 (flagged, built like acd's);
    # alpaca 2 (unflagged, plain and acd both 'answered' -> same text)
    assert check.n_same_output == 4
    # same verdicts: all but alpaca 1 (acd-gate says refused, plain answered)
    assert check.n_same_verdict == 5


# ------------------------------------------------------------------ the report


def test_report_sections_from_a_gated_run(data_dir: Path, tmp_path: Path) -> None:
    engine = FakeEngine(gate=make_gate(0.5), safe_prompts=frozenset())
    o = opts(data_dir, tmp_path / "out", methods="plain,base,acd,acd-gate", alphas="0.25,0.5")
    summary = run_eval(engine, o)
    md = (tmp_path / "out" / REPORT_FILE).read_text(encoding="utf-8")
    assert "## Safety gate as a classifier" in md
    assert "at the run's threshold (0.5)" in md
    for flag in summary.gate_flags:
        row = f"| {flag.benchmark} | {flag.label} {'↑' if flag.label == 'harmful' else '↓'} "
        assert f"{row}| {flag.n} | {100 * (flag.flag_rate or 0):.1f} |" in md
    assert {(f.benchmark, f.label) for f in summary.gate_flags} == {
        ("advbench", "harmful"),
        ("xstest", "harmful"),
        ("xstest", "safe"),
        ("alpaca_eval", "safe"),
    }
    assert "## Trade-off: harmless rate vs over-refusal" in md
    assert "### Gated ACD over the gate threshold (counterfactual)" in md
    assert "oracle-tested" in md
    assert "| 0.5 | **0.5 (shipped)** |" in md
    # the counterfactual at the shipped threshold is the measured acd-gate variant
    by = {(v.method, v.alpha): v for v in summary.variants}
    for alpha in (0.25, 0.5):
        (point,) = [p for p in summary.gate_sweep if p.alpha == alpha and p.shipped]
        measured = by[("acd-gate", alpha)]
        assert (point.avg_hlr, point.over_refusal) == (measured.avg_hlr, measured.over_refusal)
    assert [(c.alpha, c.n_same_output == c.n) for c in summary.gate_checks] == [
        (0.25, True),
        (0.5, True),
    ]
    assert "Check, α=0.5: 28/28 acd-gate outputs equal" in md
    assert len(summary.gate_sweep) == 2 * 19  # 0.05 ... 0.95, the shipped 0.5 among them
    # the measured points table lists every variant with its trade-off
    assert "| acd-gate | 0.25 |" in md and "| base | – |" in md
    raw = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert raw["gate_threshold"] == 0.5 and len(raw["gate_sweep"]) == 38
    png = (tmp_path / "out" / PLOT_FILES["tradeoff"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_gate_records_says_why(data_dir: Path, tmp_path: Path) -> None:
    summary = run_eval(
        FakeEngine(), opts(data_dir, tmp_path / "out", methods="plain,acd"), judge=None
    )
    md = render_markdown(summary)
    assert "No acd-gate generations with a gate score, so the gate was not measured." in md
    assert "Note: No threshold sweep: it needs generations of base, acd and acd-gate" in md
    assert "missing: base, acd-gate gate scores" in md
    assert "### Gated ACD over the gate threshold" not in md
    assert summary.gate_flags == [] and summary.gate_sweep == []
