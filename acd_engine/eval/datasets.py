"""`acd data`: fetch the public benchmark sets from their sources, verified, in eval's layout.

No benchmark ships with the package (several are CC BY-NC or unlicensed, see
:mod:`acd_engine.eval.registry`), so a user downloads them. The package holds, for each set,
where its raw file was published (a pinned commit, so the bytes never move), the file's
size and sha256, and the sha256 of the ``<name>.jsonl`` converted from it
(``resources/datasets.json``). ``acd data fetch`` then:

1. downloads the raw file into a temp file in ``<dir>/raw/``, checking size and sha256 as the
   bytes arrive, and renames it into place only when both match;
2. converts it to ``<dir>/<name>.jsonl`` in the shared schema (the converters below reproduce
   the shared data's files byte for byte), checks that file's sha256, and writes it
   atomically.

So a bad checksum, a cut-off or interrupted download, or a crash mid-write never leaves a
``<name>.jsonl`` that ``acd eval`` would read: the only files it reads appear by ``os.replace``
of a verified file. Temp files are hidden (``.<file>.*.tmp``) and never end in ``.jsonl``.
A rerun skips every set whose ``<name>.jsonl`` is already there and verified, and reuses a
verified raw file instead of downloading it again.

HTTP is the standard library's (``urllib``), with a timeout, so fetching needs no extra.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from acd_engine.atomic import atomic_write, atomic_write_text, probe_writable
from acd_engine.config import comma_list, did_you_mean
from acd_engine.errors import ConfigError, DownloadError
from acd_engine.eval.registry import BENCHMARKS, choose_data_dir, fetch_hint

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EVAL_ONLY",
    "DatasetSource",
    "FetchResult",
    "SetStatus",
    "convert",
    "data_status",
    "describe_fetch",
    "describe_status",
    "fetch_datasets",
    "fetch_set",
    "load_manifest",
    "select_sets",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
RAW_SUBDIR = "raw"
_CHUNK = 64 * 1024
_SCHEMES = ("http://", "https://", "file://")


class DatasetSource(BaseModel):
    """Where one benchmark's raw file comes from and what it must hash to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(description="The raw file's name as its source names it.")
    url: str = Field(description="Where it is published, pinned to a commit.")
    size: int = Field(ge=1, description="Its size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Its sha256.")
    jsonl_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="sha256 of the <name>.jsonl converted from it."
    )
    source: str = Field(description="repo @ commit : path, for the record.")
    upstream: str | None = Field(default=None, description="The original, where this is a copy.")

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # The name becomes a path under <dir>/raw/: nothing may climb out of it or hide.
        if not v or v != Path(v).name or v.startswith(".") or "\\" in v:
            raise ValueError(f"must be a plain file name, got {v!r}")
        return v


def load_manifest(path: Path | None = None) -> dict[str, DatasetSource]:
    """The package's ``resources/datasets.json``, or another file of that shape (tests,
    mirrors), keyed by registered benchmark name.

    Raises:
        ConfigError: a malformed file or a set that is not a registered benchmark.
    """
    if path is None:
        text = (resources.files("acd_engine") / "resources" / "datasets.json").read_text("utf-8")
        where = "resources/datasets.json"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    try:
        sets = json.loads(text)["sets"]
        manifest = {name: DatasetSource.model_validate(entry) for name, entry in sets.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{where} must be a manifest of benchmark sources, got {exc}") from None
    unknown = sorted(set(manifest) - set(BENCHMARKS))
    if unknown:
        raise ConfigError(did_you_mean(unknown[0], list(BENCHMARKS), f"benchmark in {where}"))
    return manifest


def select_sets(sets: str | Iterable[str] | None, manifest: dict[str, DatasetSource]) -> list[str]:
    """The sets named by ``--sets`` (comma-separated; ``None`` or ``all``: every one), in
    the order given.

    Raises:
        ConfigError: an unknown name, with a did-you-mean.
    """
    names = comma_list(sets) if sets is not None else ("all",)
    if not names or names == ("all",):
        return list(manifest)
    for name in names:
        if name not in manifest:
            raise ConfigError(did_you_mean(name, [*manifest, "all"], "benchmark set"))
    return list(names)


# --- conversion: raw file -> rows of the shared schema (shared/data/README.md) ------------


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _harmful(prompt: str, category: str | None = None) -> dict[str, Any]:
    return {"prompt": prompt.strip(), "label": "harmful", "category": category}


def _advbench(text: str) -> list[dict[str, Any]]:
    return [_harmful(row["goal"]) for row in _csv_rows(text)]


def _malicious_instruct(text: str) -> list[dict[str, Any]]:
    return [_harmful(line) for line in text.splitlines() if line.strip()]


def _harmfulqa(text: str) -> list[dict[str, Any]]:
    return [
        _harmful(question, f"{topic} / {subtopic}")
        for topic, subtopics in json.loads(text).items()
        for subtopic, questions in subtopics.items()
        for question in questions
    ]


def _dangerousqa(text: str) -> list[dict[str, Any]]:
    return [_harmful(question) for question in json.loads(text)]


def _beavertails(text: str) -> list[dict[str, Any]]:
    return [_harmful(row["prompt"], row["category"]) for row in _csv_rows(text)]


def _xstest(text: str) -> list[dict[str, Any]]:
    rows = []
    for n, row in enumerate(_csv_rows(text), start=1):
        # The contrast_* types are the unsafe prompts; the source's own label must agree.
        harmful = row["type"].startswith("contrast_")
        if row["label"] != ("unsafe" if harmful else "safe"):
            raise ConfigError(
                f"xstest row {n}: label must agree with type {row['type']!r}, got {row['label']!r}"
            )
        label = "harmful" if harmful else "safe"
        rows.append({"prompt": row["prompt"].strip(), "label": label, "category": row["type"]})
    return rows


def _alpaca_eval(text: str) -> list[dict[str, Any]]:
    # The reference is text-davinci-003's output, kept as is (two are empty in the source).
    return [
        {
            "prompt": row["instruction"].strip(),
            "label": "safe",
            "category": row["dataset"],
            "reference": row["output"],
        }
        for row in json.loads(text)
    ]


def _answers(cell: str) -> list[str]:
    return [part.strip() for part in cell.split(";") if part.strip()]


def _truthfulqa(text: str) -> list[dict[str, Any]]:
    return [
        {
            "prompt": row["Question"].strip(),
            "label": "safe",
            "category": row["Category"],
            "best_answer": row["Best Answer"],
            "correct_answers": _answers(row["Correct Answers"]),
            "incorrect_answers": _answers(row["Incorrect Answers"]),
        }
        for row in _csv_rows(text)
    ]


_CONVERTERS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "advbench": _advbench,
    "malicious_instruct": _malicious_instruct,
    "harmfulqa": _harmfulqa,
    "dangerousqa": _dangerousqa,
    "beavertails": _beavertails,
    "xstest": _xstest,
    "alpaca_eval": _alpaca_eval,
    "truthfulqa": _truthfulqa,
}


def convert(name: str, raw: bytes) -> str:
    """The ``<name>.jsonl`` text of a raw file: ids ``<name>-NNNN`` in source order, one
    JSON object a line, UTF-8 with non-ASCII kept (a leading BOM, as TruthfulQA's, is dropped).

    Raises:
        ConfigError: an unknown set, a source row that contradicts itself, or an empty prompt.
    """
    if name not in _CONVERTERS:
        raise ConfigError(did_you_mean(name, list(_CONVERTERS), "benchmark set"))
    rows = _CONVERTERS[name](raw.decode("utf-8-sig"))
    lines = []
    for n, row in enumerate(rows, start=1):
        if not row["prompt"]:
            raise ConfigError(f"{name} row {n}: prompt must not be empty, got ''")
        lines.append(json.dumps({"id": f"{name}-{n:04d}", **row}, ensure_ascii=False) + "\n")
    return "".join(lines)


# --- status -------------------------------------------------------------------------------


State = Literal["present", "missing", "corrupt"]


@dataclass(frozen=True)
class SetStatus:
    """One set in a data folder: whether ``acd eval`` would read the verified file."""

    name: str
    state: State
    path: Path
    license: str
    detail: str = ""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _status(name: str, source: DatasetSource, folder: Path) -> SetStatus:
    path = folder / f"{name}.jsonl"
    license_ = BENCHMARKS[name].license
    if not path.is_file():
        return SetStatus(name, "missing", path, license_)
    try:
        digest = _sha256_file(path)
    except OSError as exc:
        return SetStatus(name, "corrupt", path, license_, f"unreadable: {exc.strerror or exc}")
    if digest != source.jsonl_sha256:
        return SetStatus(name, "corrupt", path, license_, "sha256 does not match")
    return SetStatus(name, "present", path, license_)


def data_status(
    data_dir: Path | None = None, manifest: dict[str, DatasetSource] | None = None
) -> tuple[Path, str, list[SetStatus]]:
    """Every set's state in the folder ``acd eval`` would read (``data_dir``, else its
    default): ``(folder, where that choice came from, statuses)``. The folder need not exist.
    """
    manifest = load_manifest() if manifest is None else manifest
    folder, how = choose_data_dir(data_dir)
    return folder, how, [_status(name, src, folder) for name, src in manifest.items()]


# --- fetching -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    """What fetching one set did: ``present`` (already there, verified; nothing written),
    ``converted`` (a verified raw file was already there) or ``downloaded``."""

    name: str
    action: Literal["present", "converted", "downloaded"]
    path: Path
    rows: int
    license: str
    url: str


def _url(source: DatasetSource, mirror: str | None) -> str:
    return f"{mirror.rstrip('/')}/{source.file}" if mirror else source.url


def _check_mirror(mirror: str | None) -> None:
    if mirror is not None and not mirror.startswith(_SCHEMES):
        raise ConfigError(
            f"mirror must be an http://, https:// or file:// URL of a folder, got {mirror!r}"
        )


def _download(name: str, source: DatasetSource, url: str, tmp: str, timeout: float) -> None:
    """Stream ``url`` into ``tmp``, failing unless exactly ``source.size`` bytes with
    ``source.sha256`` arrive (a server that sends more is cut off at one byte over)."""
    digest, got = hashlib.sha256(), 0
    request = urllib.request.Request(url, headers={"User-Agent": "acd-data-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as fh:
            while chunk := resp.read(min(_CHUNK, source.size + 1 - got)):
                got += len(chunk)
                digest.update(chunk)
                fh.write(chunk)
                if got > source.size:
                    break
    except urllib.error.HTTPError as exc:
        raise DownloadError(
            f"{name}: download from {url} must succeed, got HTTP {exc.code} {exc.reason}"
        ) from None
    except urllib.error.URLError as exc:
        raise DownloadError(
            f"{name}: download from {url} must succeed, got {exc.reason}; "
            "check the network (or pass --mirror)"
        ) from None
    except (http.client.HTTPException, OSError) as exc:  # cut off mid-body, timeout, reset
        reason = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
        raise DownloadError(
            f"{name}: download from {url} must complete, got {reason} after {got} bytes; "
            "nothing was kept, run the command again"
        ) from None
    if got != source.size:
        more = "more" if got > source.size else f"{got} (the download was cut off)"
        raise DownloadError(
            f"{name}: {source.file} from {url} must be {source.size} bytes, got {more}; "
            "nothing was kept, run the command again"
        )
    if digest.hexdigest() != source.sha256:
        raise DownloadError(
            f"{name}: {source.file} from {url} must have sha256 {source.sha256}, got "
            f"{digest.hexdigest()}; nothing was kept (the file at that address changed)"
        )


def _verified_raw(path: Path, source: DatasetSource) -> bytes | None:
    """The raw file's bytes if it is there and matches its checksum, else ``None``."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) == source.size and hashlib.sha256(data).hexdigest() == source.sha256:
        return data
    logger.warning("%s does not match its checksum; downloading it again", path)
    return None


def fetch_set(
    name: str,
    folder: Path,
    source: DatasetSource,
    *,
    mirror: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> FetchResult:
    """Make ``folder/<name>.jsonl`` the verified conversion of the set's published raw file.

    Raises:
        DownloadError: the network failed, or a file did not match its checksum; the message
            names the set and the URL. Nothing that ``acd eval`` reads was written then.
    """
    _check_mirror(mirror)
    url = _url(source, mirror)
    license_ = BENCHMARKS[name].license
    status = _status(name, source, folder)
    if status.state == "present":
        rows = status.path.read_bytes().count(b"\n")
        return FetchResult(name, "present", status.path, rows, license_, url)
    if status.state == "corrupt":
        logger.warning("%s: replacing %s (%s)", name, status.path, status.detail)
    raw_path = folder / RAW_SUBDIR / source.file
    raw = _verified_raw(raw_path, source) if raw_path.exists() else None
    action: Literal["converted", "downloaded"] = "converted"
    if raw is None:
        logger.info("%s: downloading %s", name, url)
        atomic_write(raw_path, lambda tmp: _download(name, source, url, tmp, timeout))
        raw, action = raw_path.read_bytes(), "downloaded"
    text = convert(name, raw)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != source.jsonl_sha256:
        raise DownloadError(
            f"{name}: {status.path.name} converted from {raw_path} must have sha256 "
            f"{source.jsonl_sha256}, got {digest}; nothing was written (a bug: please report it)"
        )
    atomic_write_text(status.path, text)
    logger.info("%s: wrote %s", name, status.path)
    return FetchResult(name, action, status.path, text.count("\n"), license_, url)


def fetch_datasets(
    sets: str | Iterable[str] | None = None,
    data_dir: Path | None = None,
    *,
    manifest: dict[str, DatasetSource] | None = None,
    mirror: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Iterator[FetchResult]:
    """Fetch ``sets`` (default: all) into ``data_dir`` (default: the folder ``acd eval``
    reads), yielding each set's result as it is done; stops at the first failure (a rerun
    skips what is done).

    Raises:
        ConfigError: an unknown set, a bad mirror or timeout, or a folder that cannot be
            written (checked only when something is missing).
        DownloadError: see :func:`fetch_set`.
    """
    manifest = load_manifest() if manifest is None else manifest
    names = select_sets(sets, manifest)
    _check_mirror(mirror)
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"timeout must be a finite number of seconds > 0, got {timeout}")
    folder, _ = choose_data_dir(data_dir)
    if any(_status(n, manifest[n], folder).state != "present" for n in names):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe_writable(folder)
        except OSError as exc:
            raise ConfigError(
                f"dir must be a folder that can be written, got '{folder}' "
                f"({exc.strerror or exc}); pass --dir"
            ) from None
    for name in names:
        yield fetch_set(name, folder, manifest[name], mirror=mirror, timeout=timeout)


# --- what the CLI prints ------------------------------------------------------------------

EVAL_ONLY = (
    "These are public test sets: evaluate on them, never train, calibrate or tune on them. "
    "Each keeps its own licence; BeaverTails and AlpacaEval are CC BY-NC 4.0 (non-commercial) "
    "and MaliciousInstruct has none: do not redistribute those."
)
_ACTIONS = {
    "present": "present, verified",
    "converted": "converted from raw/",
    "downloaded": "downloaded, verified",
}


def describe_fetch(result: FetchResult) -> str:
    """One line per fetched set: rows, what was done, and its licence and source."""
    spec = BENCHMARKS[result.name]
    return (
        f"{result.name:<19}{result.rows:>5} rows  {_ACTIONS[result.action]:<21} "
        f"licence: {result.license} ({spec.source})"
    )


def describe_status(folder: Path, how: str, statuses: list[SetStatus]) -> list[str]:
    """The lines of ``acd data list``: the folder, one line per set, and the command that
    fetches whatever is missing or corrupt."""
    lines = [f"data folder: {folder} (from {how})"]
    width = max(len(s.license) for s in statuses) if statuses else 0
    for s in statuses:
        note = f" ({s.detail})" if s.detail else ""
        lines.append(f"{s.name:<19}{s.state:<9}{s.license:<{width}}  {s.path}{note}")
    todo = [s.name for s in statuses if s.state != "present"]
    if todo:
        lines.append(fetch_hint(folder, None if len(todo) == len(statuses) else todo))
    return lines
