"""Derive one garak run's config from the committed ``redteam/garak-acd.json``.

garak reads one config file per run, but the recipe runs garak once per decoding method
against a server on a port chosen at run time. Rather than patching garak's CLI overrides
(``--generator_options`` replaces whole generator sections, not single keys), the script
writes a derived copy per method next to the results: the committed file stays the single
source of every other setting, and each run's exact config is kept with its report.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

__all__ = ["GENERATOR_PATH", "main", "method_config"]

#: Where the OpenAI-compatible generator's options live in a garak config.
GENERATOR_PATH: tuple[str, ...] = ("plugins", "generators", "openai", "OpenAICompatible")


def generator_section(config: dict[str, Any]) -> dict[str, Any]:
    """The ``OpenAICompatible`` options of ``config`` (a ``KeyError`` names a missing level)."""
    section: Any = config
    for key in GENERATOR_PATH:
        if not isinstance(section, dict) or key not in section:
            raise KeyError(f"garak config has no {'.'.join(GENERATOR_PATH)} section (at {key!r})")
        section = section[key]
    return section  # type: ignore[no-any-return]


def method_config(
    base: dict[str, Any],
    *,
    uri: str,
    method: str,
    alpha: float,
    report_dir: str,
    generations: int | None = None,
    limit: int | None = None,
    probes: list[str] | None = None,
) -> dict[str, Any]:
    """A copy of ``base`` aimed at ``uri`` with ``method``/``alpha`` in every request's body.

    ``extra_params.extra_body`` is what garak's generator hands to the ``openai`` SDK as
    ``extra_body``; the SDK merges it into the JSON body, where ``acd serve`` reads the ACD
    fields per request. ``limit`` is garak's ``soft_probe_prompt_cap`` (prompts per probe);
    ``probes`` are ``module.Class`` names (``dan.Dan_11_0``) and replace the committed list.
    """
    if generations is not None and generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    config = copy.deepcopy(base)
    gen = generator_section(config)
    gen["uri"] = uri
    extra = gen.setdefault("extra_params", {}).setdefault("extra_body", {})
    extra["method"] = method
    extra["alpha"] = alpha
    run = config.setdefault("run", {})
    if generations is not None:
        run["generations"] = generations
    if limit is not None:
        run["soft_probe_prompt_cap"] = limit
    if probes:
        run["spec"] = {
            "include": [f"probes.{p.removeprefix('probes.')}" for p in probes],
            "exclude": [],
        }
    reporting = config.setdefault("reporting", {})
    reporting["report_dir"] = report_dir
    reporting["report_prefix"] = method
    return config


def main(argv: list[str] | None = None) -> None:
    """``python redteam/garak_config.py BASE OUT --uri ... --method ...`` (used by the script)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--alpha", type=float, required=True)
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--generations", type=int)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--probes", default="", help="comma-separated module.Class names")
    args = parser.parse_args(argv)
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    config = method_config(
        json.loads(args.base.read_text(encoding="utf-8")),
        uri=args.uri,
        method=args.method,
        alpha=args.alpha,
        report_dir=args.report_dir,
        generations=args.generations,
        limit=args.limit,
        probes=probes or None,
    )
    args.out.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
