"""`acd bench` runs end to end and reports its schema (on a tiny random model; no timing
is asserted: speed is what the benchmark measures, not what a test can check)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from acd_engine.cli.bench import CPU_FLAGS_OF_NOTE, ROWS, BenchSettings, bench_command, run_bench

ROW_KEYS = {
    "name",
    "tokens_per_s",
    "decode_tokens_per_s",
    "ttft_s",
    "peak_mem_mib",
    "ratio_vs_hf_plain",
}

app = typer.Typer()
app.command("bench")(bench_command)
app.command("noop")(lambda: None)  # two commands, so "bench" stays a subcommand
runner = CliRunner()


def test_all_rows_in_process_report_the_schema(engine):
    settings = BenchSettings(
        model="random:tiny", new_tokens=3, reps=2, warmup=1, batch=2, isolate=False
    )
    result = run_bench(settings)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["hf_plain", "hf_cfg", "acd_plain", "acd", "acd_batch2"]
    for r in rows.values():
        assert set(r) >= ROW_KEYS
        assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["peak_mem_mib"] > 0
        assert r["decode_tokens_per_s"] > 0
        assert r["new_tokens_per_request"] == 3
    assert rows["hf_plain"]["ratio_vs_hf_plain"] == 1.0
    assert rows["acd_batch2"]["requests"] == 2 and rows["acd_batch2"]["ratio_vs_acd"] > 0
    assert rows["acd"]["positive_branch_equals_hf_prompt"] is True
    assert isinstance(rows["acd"]["same_tokens_as"]["hf_cfg"], bool)
    assert rows["acd"]["fast_path"] is True
    for name in ("acd", "acd_batch2"):  # the kernels the engine measured and used
        assert set(rows[name]["kernels"]) == {
            "skinny_rows", "skinny_pad_block", "prepack_rows", "prepacked",
        }  # fmt: skip
    assert rows["acd"]["kernels"]["prepacked"] is False  # one request never packs
    s = result["settings"]
    assert s["device"] == "cpu" and s["guidance_scale"] == 2.0 and len(s["load_avg_before"]) == 3
    # the machine is named next to its figures: the CPU model and the flags that pick kernels
    assert s["cpu_model"] and set(s["cpu_flags"]) <= set(CPU_FLAGS_OF_NOTE)


def test_command_json_with_rows_in_fresh_processes():
    res = runner.invoke(
        app,
        [
            *("bench", "--model", "random:tiny", "-n", "2", "--reps", "1", "--warmup", "0"),
            *("--rows", "hf_plain,acd", "--json"),
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["name"] for r in out["rows"]] == ["hf_plain", "acd"]
    assert all(set(r) >= ROW_KEYS and r["peak_mem_delta_mib"] >= 0 for r in out["rows"])
    assert out["settings"]["isolate"] is True


def test_bad_settings_fail_in_the_house_style():
    res = runner.invoke(app, ["bench", "--alpha", "1.5"])
    assert res.exit_code == 2 and "alpha must be in [0, 1), got 1.5" in res.stderr
    res = runner.invoke(app, ["bench", "--rows", "hf_plain,warp"])
    assert res.exit_code == 2 and f"rows must be among {', '.join(ROWS)}" in res.stderr
    res = runner.invoke(app, ["bench", "--model", "random:llama9-1t"])
    assert res.exit_code == 2
    assert "model random:<preset> must name one of llama3-8b, " in res.stderr
    assert "got 'random:llama9-1t'" in res.stderr


def test_random_models_take_a_tokenizer_directory(engine, tmp_path, monkeypatch):
    """Machines without the embedded model (a GPU box, say) bring the tokenizer as files."""
    import acd_engine.loading.models

    engine.tokenizer.save_pretrained(str(tmp_path))

    def no_default_model():
        raise acd_engine.loading.models.ModelNotFoundError("the embedded model is not installed")

    monkeypatch.setattr(acd_engine.loading.models, "default_model_path", no_default_model)
    settings = BenchSettings(
        model="random:tiny",
        tokenizer=str(tmp_path),
        new_tokens=2,
        reps=1,
        warmup=0,
        rows=("acd",),
        isolate=False,
    )
    (row,) = run_bench(settings)["rows"]
    assert row["name"] == "acd" and row["new_tokens_per_request"] == 2
    res = runner.invoke(app, ["bench", "--tokenizer", str(tmp_path)])
    assert res.exit_code == 2 and "tokenizer needs --model random:<preset>" in res.stderr
    missing = tmp_path / "missing"
    res = runner.invoke(app, ["bench", "--model", "random:tiny", "--tokenizer", str(missing)])
    assert res.exit_code == 2
    assert "tokenizer must be a local directory holding tokenizer files" in res.stderr
    assert f"got '{missing}'" in res.stderr


def test_importing_the_command_stays_light():
    code = "import sys, acd_engine.cli.bench; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_force_length_masks_eos_and_unknown_ids_with_one_cached_mask():
    import torch

    from acd_engine.cli import bench

    clock: list[float] = []
    procs = bench.force_length([2, 5], vocab=8, clock=clock)
    before = len(bench._BANNED)
    scores = torch.zeros(1, 10)
    first = procs(torch.zeros(1, 3, dtype=torch.long), scores)
    second = procs(torch.zeros(1, 4, dtype=torch.long), scores)
    banned = [i for i in range(10) if first[0, i] == float("-inf")]
    assert banned == [2, 5, 8, 9]
    assert torch.equal(first, second) and torch.equal(scores, torch.zeros(1, 10))
    assert len(clock) == 2 and clock[0] <= clock[1]
    assert len(bench._BANNED) == before + 1  # built once, reused on the next step


def test_quantized_random_model_rows_agree_with_hf_on_the_same_weights(engine):
    """A quantized random model is built layer by layer (never whole in fp32); the engine's
    plain row still reproduces HF generate's tokens on those weights, and hf_plain_fp32
    runs on the float weights as the yardstick."""
    pytest.importorskip("torchao", reason="quantization needs the [quant] extra (torchao)")
    from acd_engine.config import ModelConfig
    from acd_engine.loading.models import cache_dir, load_model
    from acd_engine.loading.quantize import is_quantized

    settings = BenchSettings(
        model="random:tiny",
        quantize="int8",
        new_tokens=3,
        reps=1,
        warmup=0,
        rows=("hf_plain_fp32", "hf_plain", "acd_plain"),
        isolate=False,
    )
    rows = {r["name"]: r for r in run_bench(settings)["rows"]}
    assert rows["acd_plain"]["same_tokens_as"] == {"hf_plain": True}
    assert rows["hf_plain_fp32"]["ratio_vs_hf_plain_fp32"] == 1.0
    assert rows["acd_plain"]["ratio_vs_hf_plain_fp32"] > 0
    folder = cache_dir() / "bench" / "random-tiny"  # the bench registers its model there
    model = load_model(ModelConfig(model=str(folder), quantize="int8")).model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_quantized(m.weight) for m in linears)
    assert torch.isfinite(model.get_input_embeddings().weight).all()


def test_llamacpp_rows_need_a_gguf_model():
    res = runner.invoke(app, ["bench", "--model", "random:tiny", "--rows", "llamacpp_plain"])
    assert res.exit_code == 2
    assert "rows llamacpp rows need a .gguf model" in res.stderr
    assert "got 'random:tiny'" in res.stderr


def test_llamacpp_rows_run_on_the_default_gguf(engine):
    pytest.importorskip("llama_cpp", reason="the llama.cpp rows need the [llamacpp] extra")
    settings = BenchSettings(
        new_tokens=4,
        reps=1,
        warmup=0,
        batch=3,
        rows=("llamacpp_plain", "llamacpp_acd", "llamacpp_batch"),
        isolate=False,
    )
    rows = {r["name"]: r for r in run_bench(settings)["rows"]}
    for r in rows.values():
        assert r["new_tokens_per_request"] == 4 and r["tokens_per_s"] > 0
        assert r["gguf"].endswith(".gguf") and r["backend"] == "llamacpp"
        assert r["llama_cpp_n_ctx"] > 0
    assert rows["llamacpp_acd"]["ratio_vs_llamacpp_plain"] > 0
    # three requests stepping together as llama.cpp sequences, reported with their aggregate
    assert rows["llamacpp_batch3"]["requests"] == 3
    assert rows["llamacpp_batch3"]["ratio_vs_llamacpp_acd"] > 0
