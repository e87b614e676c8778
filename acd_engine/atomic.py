"""Atomic, durable file writes: the one helper every long job saves its results through.

A reader (or a resumed run) must see the old file or the new one, never half of either, and
a file that ``os.replace`` made visible must survive a power cut. So the data goes to a temp
file in the same folder, which is flushed and fsynced, renamed over the target, and then the
folder itself is fsynced (the rename lives in the folder's entry, not in the file).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "probe_writable",
]


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames are durable enough
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def probe_writable(folder: str | os.PathLike[str]) -> None:
    """Create and delete a temp file in ``folder``: the only honest test that a long job's
    results can be written there (permissions, read-only mounts, full disks all show).

    Raises:
        OSError: the folder cannot take a new file (the caller words the message).
    """
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".acd-probe-", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)


def atomic_write(
    path: str | os.PathLike[str], writer: Callable[[str], None], mode: int = 0o644
) -> Path:
    """Call ``writer(tmp_path)`` to fill a temp file, then move it over ``path`` durably.

    ``writer`` may write the file any way it likes (``torch.save``, ``safetensors``); it is
    fsynced afterwards. The temp file is removed if anything fails, and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600; results are shareable artefacts
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Pretty JSON (UTF-8, non-ASCII kept) written atomically and durably."""
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
