"""Benchmark registry: names, where their files live, how they are read and sampled.

No data set ships with the package (several are CC BY-NC or unlicensed, see
``shared/data/README.md``); every benchmark is read at run time from a ``data_dir`` holding
``<name>.jsonl`` files in the shared schema, or from any JSONL file in that schema given by path.
``acd data fetch`` (:mod:`acd_engine.eval.datasets`) fills such a folder from the sets' sources.

Sampling follows the paper's protocol (a fixed, seeded sample of 100 prompts per set) with one
twist that makes runs extendable: the sample is the first ``limit`` items of a seeded
permutation, so ``--limit 200`` with the same seed contains every item of ``--limit 100`` and a
resumed run with a larger limit reuses all finished records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from acd_engine.config import did_you_mean, format_errors, unicode_problem
from acd_engine.errors import ConfigError

__all__ = [
    "BENCHMARKS",
    "DATA_DIR_ENV",
    "Benchmark",
    "BenchmarkItem",
    "BenchmarkSpec",
    "Role",
    "check_benchmark_data",
    "check_benchmark_name",
    "choose_data_dir",
    "fetch_hint",
    "load_benchmark",
    "resolve_data_dir",
    "sample_items",
    "user_data_dir",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "ACD_DATA_DIR"
# Where the shared data lives when `acd eval` is run from the repository root.
_DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "benchmarks"

Role = Literal["harmful", "safe", "mixed", "mc"]
"""How a benchmark is scored, derived from its rows (so files given by path work too).

``harmful``: every row should be refused, scored by harmless rate (HLR) and averaged with the
other harmful sets. ``safe``: every row should be answered, scored by over-refusal. ``mixed``:
both labels (XSTest), scored per label. ``mc``: rows carry ``best_answer`` and
``incorrect_answers`` (TruthfulQA), scored judge-free by MC1 log-likelihood accuracy.
"""


@dataclass(frozen=True)
class BenchmarkSpec:
    """One registered benchmark: what the paper used it for and its licence, for the report."""

    name: str
    description: str
    license: str
    source: str


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "advbench",
            "harmful behaviours (Zou et al., 2023)",
            "MIT",
            "llm-attacks harmful_behaviors.csv",
        ),
        BenchmarkSpec(
            "malicious_instruct",
            "malicious instructions, 10 intents (Huang et al., 2023)",
            "none (not redistributable)",
            "Princeton-SysML/Jailbreak_LLM",
        ),
        BenchmarkSpec(
            "harmfulqa",
            "harmful questions by topic (Bhardwaj & Poria, 2023)",
            "Apache-2.0",
            "declare-lab/red-instruct",
        ),
        BenchmarkSpec(
            "dangerousqa",
            "dangerous questions (Shaikh et al., 2023)",
            "Apache-2.0",
            "declare-lab/red-instruct",
        ),
        BenchmarkSpec(
            "beavertails",
            "harmful prompts, 14 categories (Ji et al., 2023)",
            "CC BY-NC 4.0",
            "PKU-Alignment/BeaverTails-Evaluation",
        ),
        BenchmarkSpec(
            "xstest",
            "exaggerated safety: 250 safe, 200 unsafe contrast prompts (Röttger et al., 2024)",
            "CC BY 4.0",
            "paul-rottger/exaggerated-safety",
        ),
        BenchmarkSpec(
            "alpaca_eval",
            "benign instructions, over-refusal (Li et al., 2023)",
            "CC BY-NC 4.0 (data)",
            "tatsu-lab/alpaca_eval",
        ),
        BenchmarkSpec(
            "truthfulqa",
            "truthfulness, MC1 log-likelihood (Lin et al., 2022)",
            "Apache-2.0",
            "sylinrl/TruthfulQA",
        ),
    )
}


class BenchmarkItem(BaseModel):
    """One row of the shared JSONL schema (``shared/data/README.md``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    prompt: str
    label: Literal["harmful", "safe"]
    category: str | None = None
    reference: str | None = None
    best_answer: str | None = None
    correct_answers: tuple[str, ...] | None = None
    incorrect_answers: tuple[str, ...] | None = None

    @property
    def is_mc(self) -> bool:
        """Whether the row can be scored as a multiple-choice (MC1) question."""
        return bool(self.best_answer) and bool(self.incorrect_answers)


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its rows in file order plus what the report needs to cite it."""

    name: str
    path: Path
    items: tuple[BenchmarkItem, ...]
    sha256: str

    @property
    def role(self) -> Role:
        """How the set is scored; see :data:`Role`."""
        if all(item.is_mc for item in self.items):
            return "mc"
        labels = {item.label for item in self.items}
        if labels == {"harmful"}:
            return "harmful"
        if labels == {"safe"}:
            return "safe"
        return "mixed"


def _is_path(name: str) -> bool:
    return name.endswith(".jsonl") or "/" in name or os.sep in name


def check_benchmark_name(name: str) -> None:
    """Fail early, with a did-you-mean, on a benchmark that is neither registered nor a path.

    Raises:
        ConfigError: ``unknown benchmark 'advbnech'; did you mean 'advbench'? Choose from: ...``.
    """
    if not _is_path(name) and name not in BENCHMARKS:
        choices = [*BENCHMARKS, "<path/to/file.jsonl>"]
        raise ConfigError(did_you_mean(name, choices, "benchmark"))


def user_data_dir() -> Path:
    """Where ``acd data fetch`` puts the benchmarks by default outside a checkout:
    ``$XDG_DATA_HOME/acd/benchmarks``, else ``~/.local/share/acd/benchmarks``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "acd" / "benchmarks"


def choose_data_dir(data_dir: Path | None = None) -> tuple[Path, str]:
    """The folder of benchmark files and where that choice came from, unchecked: the
    argument, else ``$ACD_DATA_DIR``, else the shared folder next to a checkout
    (``../shared/data/benchmarks`` from the cwd) when it is there, else :func:`user_data_dir`.

    ``acd eval``, ``acd data fetch`` and ``acd data list`` all choose through this, so a
    fetch without ``--dir`` fills the folder a later eval without ``--data-dir`` reads.
    """
    if data_dir is not None:
        return Path(data_dir), "--data-dir"
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    if _DEFAULT_DATA_DIR.is_dir():
        return _DEFAULT_DATA_DIR, "the default"
    return user_data_dir(), "the default"


def fetch_hint(folder: Path, names: Iterable[str] | None = None) -> str:
    """``run: acd data fetch --sets a,b --dir FOLDER``: the command that fills ``folder``
    (every set when ``names`` is ``None``), quoted so it can be pasted into a shell."""
    sets = f" --sets {','.join(names)}" if names is not None else ""
    return f"run: acd data fetch{sets} --dir {shlex.quote(str(folder))}"


def resolve_data_dir(data_dir: Path | None = None, names: Iterable[str] | None = None) -> Path:
    """The folder of benchmark files (see :func:`choose_data_dir`), which must exist.

    Raises:
        ConfigError: when the chosen folder does not exist, naming the command that fills
            it (with ``names``, the sets to fetch) and how to pass another one.
    """
    where, how = choose_data_dir(data_dir)
    if not where.is_dir():
        raise ConfigError(
            f"data_dir must be a folder of benchmark .jsonl files, got '{where}' (from {how}); "
            f"{fetch_hint(where, names)}, or pass --data-dir /path/to/benchmarks or set "
            f"{DATA_DIR_ENV}"
        )
    return where.resolve()


def check_benchmark_data(names: Iterable[str], data_dir: Path | None = None) -> None:
    """Fail once, naming every missing set and the command that fetches them, when a
    registered benchmark among ``names`` has no file in the data folder (paths are left to
    :func:`load_benchmark`; with none registered the folder is not needed at all).

    Raises:
        ConfigError: ``benchmark files must be in 'DIR', got advbench, xstest missing; run:
            acd data fetch --sets advbench,xstest --dir DIR``.
    """
    registered = [n for n in names if not _is_path(n) and n in BENCHMARKS]
    if not registered:
        return
    folder = resolve_data_dir(data_dir, registered)
    missing = [n for n in registered if not (folder / f"{n}.jsonl").exists()]
    if missing:
        raise ConfigError(
            f"benchmark files must be in '{folder}', got {', '.join(missing)} missing; "
            f"{fetch_hint(folder, missing)}"
        )


def load_benchmark(name: str, data_dir: Path | None = None) -> Benchmark:
    """Load a registered benchmark from ``data_dir`` or any JSONL file in the shared schema.

    A file given by path is named after its stem (``my_set.jsonl`` -> ``my_set``), which is
    the ``benchmark`` key of its records.

    Raises:
        ConfigError: unknown name (with did-you-mean), missing file, or a malformed row (the
            message names the file and line).
    """
    check_benchmark_name(name)
    if _is_path(name):
        path = Path(name)
        hint = ""
    else:
        folder = resolve_data_dir(data_dir, [name])
        path = folder / f"{name}.jsonl"
        hint = f"; {fetch_hint(folder, [name])}"
    if path.is_dir():
        raise ConfigError(f"benchmark file must be a file, got the folder '{path}'")
    if not path.is_file():
        raise ConfigError(f"benchmark file must exist, got '{path}'{hint}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"benchmark file must be readable, got '{path}' ({exc.strerror or exc})"
        ) from None
    items: list[BenchmarkItem] = []
    seen: set[str] = set()
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        # Undecodable bytes become lone surrogates instead of refusing the whole set: the row
        # is kept, and the runner records it as an error (see ``EvalRecord.error``), so one
        # bad row costs one record, not the run.
        line = line_bytes.decode("utf-8", errors="surrogateescape")
        if not line.strip():
            continue
        where = f"{path.name} line {lineno}"
        if unicode_problem(line) is not None:
            logger.warning("%s is not valid UTF-8; its row will be recorded as an error", where)
        try:
            item = BenchmarkItem.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} must be a JSON object, got {exc.msg}") from None
        except ValidationError as exc:
            raise ConfigError(f"{where}: {format_errors(exc, BenchmarkItem)}") from None
        if not item.prompt.strip():
            raise ConfigError(f"{where}: prompt must not be empty, got {item.prompt!r}")
        if item.id in seen:
            raise ConfigError(f"{where}: id must be unique, got {item.id!r} twice")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ConfigError(f"benchmark file must hold at least one row, got '{path}' empty")
    bench = Benchmark(path.stem, path, tuple(items), hashlib.sha256(raw).hexdigest())
    logger.debug("loaded %s: %d rows, role %s, from %s", bench.name, len(items), bench.role, path)
    return bench


def sample_items(bench: Benchmark, limit: int | None, seed: int) -> tuple[BenchmarkItem, ...]:
    """The paper's seeded sample: the first ``limit`` items of a seeded permutation.

    The permutation is seeded by ``f"{seed}:{bench.name}"`` (string seeds hash through SHA-512
    in :class:`random.Random`, so it does not depend on ``PYTHONHASHSEED`` or the platform), so
    each set gets its own order and a larger limit extends a smaller one. ``limit=None`` or a
    limit at least the set size takes every row in file order.
    """
    if limit is None or limit >= len(bench.items):
        return bench.items
    order = list(range(len(bench.items)))
    random.Random(f"{seed}:{bench.name}").shuffle(order)
    return tuple(bench.items[i] for i in order[:limit])
