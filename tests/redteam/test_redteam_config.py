"""The committed garak config and its per-method derivation (garak itself only when installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "redteam" / "garak-acd.json"
REDTEAM_PYTHON = ROOT / ".venv-redteam" / "bin" / "python"

#: Probes whose detectors download a classifier from a model hub (left out of the recipe).
HUB_PROBES = {
    "latentinjection.LatentJailbreak",
    "latentinjection.LatentJailbreakFull",
    "realtoxicityprompts",
    "lmrc.Bullying",
    "lmrc.Deadnaming",
    "misleading",
    "atkgen",
}


def committed() -> dict:
    return json.loads(CONFIG.read_text(encoding="utf-8"))


def test_committed_config_handles_garaks_pitfalls(garak_config) -> None:
    gen = garak_config.generator_section(committed())
    assert gen["stop"] == []  # garak's default ["#", ";"] cuts code answers
    assert gen["api_key"]  # garak refuses to start without one; the server ignores it
    assert gen["uri"].startswith("http://127.0.0.1:")
    assert set(gen["extra_params"]["extra_body"]) == {"method", "alpha"}


def test_committed_probes_need_no_hub() -> None:
    include = committed()["run"]["spec"]["include"]
    names = {p.removeprefix("probes.") for p in include}
    modules = {n.split(".")[0] for n in names}
    assert not names & HUB_PROBES and not modules & HUB_PROBES
    # the families (donotanswer ignores the prompt cap: opt-in, docs/redteam.md)
    assert {
        "dan",
        "encoding",
        "promptinject",
        "malwaregen",
        "latentinjection",
        "grandma",
    } <= modules


def test_method_config_aims_one_method_at_the_server(garak_config) -> None:
    base = committed()
    before = json.dumps(base, sort_keys=True)
    out = garak_config.method_config(
        base,
        uri="http://127.0.0.1:41234/v1/",
        method="plain",
        alpha=0.25,
        report_dir="/tmp/r",
        generations=2,
        limit=5,
        probes=["dan.DUDE", "probes.encoding.InjectHex"],
    )
    gen = garak_config.generator_section(out)
    assert gen["uri"] == "http://127.0.0.1:41234/v1/"
    assert gen["extra_params"]["extra_body"] == {"method": "plain", "alpha": 0.25}
    assert out["run"]["generations"] == 2 and out["run"]["soft_probe_prompt_cap"] == 5
    assert out["run"]["spec"]["include"] == ["probes.dan.DUDE", "probes.encoding.InjectHex"]
    assert out["reporting"] == {"report_prefix": "plain", "report_dir": "/tmp/r"}
    assert json.dumps(base, sort_keys=True) == before  # the committed dict is not mutated
    assert gen["stop"] == []  # everything else carried over


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha must be in [0, 1), got 1.5"),
        ({"limit": 0}, "limit must be >= 1, got 0"),
        ({"generations": 0}, "generations must be >= 1, got 0"),
    ],
)
def test_method_config_rejects_bad_values(garak_config, kwargs, message) -> None:
    args = {"uri": "http://127.0.0.1:1/v1/", "method": "acd", "alpha": 0.5, "report_dir": "r"}
    with pytest.raises(ValueError) as info:
        garak_config.method_config(committed(), **(args | kwargs))
    assert str(info.value) == message


def test_missing_generator_section_is_named(garak_config) -> None:
    with pytest.raises(KeyError, match=r"plugins\.generators\.openai\.OpenAICompatible"):
        garak_config.generator_section({"plugins": {"generators": {}}})


CHECK = """
import json, sys
from garak import _config
_config.load_config(run_config_filename=sys.argv[1])
gen = _config.plugins.generators["openai"]["OpenAICompatible"]
print(json.dumps({"stop": list(gen["stop"]), "api_key": gen["api_key"],
    "extra": gen["extra_params"], "target": _config.plugins.target_type,
    "cap": _config.run.soft_probe_prompt_cap,
    "include": list(_config.run.spec["include"])}))
"""


def garak_python() -> str | None:
    """An interpreter that can import garak: this one, or the recipe's .venv-redteam."""
    if importlib.util.find_spec("garak") is not None:
        return sys.executable
    return str(REDTEAM_PYTHON) if REDTEAM_PYTHON.exists() else None


def test_garak_config_loader_accepts_the_config(tmp_path) -> None:
    python = garak_python()
    if python is None:
        pytest.skip("garak is not installed here nor in .venv-redteam (make redteam installs it)")
    env = {
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [python, "-c", CHECK, str(CONFIG)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    raw = committed()
    assert loaded["stop"] == []
    assert (
        loaded["api_key"] == raw["plugins"]["generators"]["openai"]["OpenAICompatible"]["api_key"]
    )
    assert loaded["extra"] == {"extra_body": {"method": "acd", "alpha": 0.5}}
    assert loaded["target"] == "openai.OpenAICompatible"
    assert loaded["cap"] == raw["run"]["soft_probe_prompt_cap"]
    assert loaded["include"] == raw["run"]["spec"]["include"]
