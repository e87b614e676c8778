"""``make loadtest --quick`` end to end, on a tiny random model so it takes seconds per phase.

``scripts/load_test.py`` starts ``acd serve`` (here with a 2-layer random Llama: the server,
the admission bound, streaming, disconnects and the kill are the same; only the model is
small), runs every phase of the quick profile and must pass its own checks: only 200s and
429s under load, 429s past 4 x the bound, the slots of clients that left coming back, and
connection errors, not hangs, when the server is killed, then a restart that serves again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
REPO = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.slow, pytest.mark.allow_hosts(["127.0.0.1"])]


@pytest.fixture(scope="module")
def long_tiny_model_dir(tiny_llama):
    """conftest's tiny random Llama with an 8k context: a stream that holds its slot runs
    thousands of tokens, so it outlasts the disconnect and kill phases on any machine."""
    return tiny_llama(8192)


def test_the_quick_profile_passes_and_writes_both_reports(long_tiny_model_dir, tmp_path):
    out_json, out_md = tmp_path / "load.json", tmp_path / "load.md"
    command = [
        *(sys.executable, str(REPO / "scripts" / "load_test.py"), "--quick", "--backends", "torch"),
        *(
            "--model",
            str(long_tiny_model_dir),
            "--json-out",
            str(out_json),
            "--md-out",
            str(out_md),
        ),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["passed"] and report["profile"] == "quick"
    [torch_run] = report["runs"]
    assert torch_run["backend"] == "torch" and torch_run["passed"]
    phases = torch_run["phases"]
    names = [phase["name"].split(" (")[0].split(" ")[0] for phase in phases]
    assert names == ["load", "load", "overload", "disconnects", "kill"]
    load = phases[0]
    assert load["outcomes"] == {"ok": 2} and load["ttft_p50_s"] <= load["latency_p99_s"]
    assert load["tokens_per_s"] > 0
    overload = phases[2]
    assert set(overload["outcomes"]) == {"ok", "429"} and overload["clients"] == 16
    disconnects = phases[3]
    assert disconnects["outcomes"] == {"left_mid_stream": 1, "left_while_queued": 3}
    kill = phases[-1]
    assert set(kill["outcomes"]) - {"ok"} <= {"conn_refused", "conn_closed", "conn_reset"}
    assert all(all(phase["checks"].values()) for phase in phases)
    table = out_md.read_text()
    assert table == run.stdout  # stdout is the Markdown report
    assert "| phase | clients | outcomes | requests/s |" in table and "Result: PASS" in table


def test_a_backend_that_cannot_run_here_is_reported_as_skipped(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", REPO / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "load_test", load_test)  # its dataclasses look it up
    spec.loader.exec_module(load_test)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        load_test.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else real(name, *a),
    )
    assert "llama_cpp is not installed" in load_test.backend_unavailable("llamacpp")
    assert load_test.backend_unavailable("torch") is None
    monkeypatch.setattr(load_test.importlib.util, "find_spec", lambda name, *a: object())
    assert "a .gguf file" in load_test.backend_unavailable("llamacpp", "/models/hf-dir")
    assert load_test.backend_unavailable("llamacpp", "/models/m.gguf") is None
    report = {
        "date": "d",
        "profile": "quick",
        "wall_s": 1,
        "passed": False,
        "machine": {
            "cpu": "c",
            "cores": 2,
            "memory_gib": 1,
            "os": "o",
            "python": "3",
            "load_average": [0, 0, 0],
        },
        "config": {"max_concurrency": 4, "method": "acd", "max_tokens": 8, "requests": 2},
        "runs": [{"backend": "llamacpp", "skipped": "llama_cpp is not installed"}],
    }
    assert "Backend llamacpp: skipped: llama_cpp is not installed." in load_test.markdown(report)
