"""The response cache survives a crash: a torn last line costs that one record (it is
sampled again, and the next append never glues onto it), a whole record without its newline
is kept, and good files are left alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from acd_engine.training.anchors import load_anchors
from acd_engine.training.data import generate_responses, repair_tail


def fake_sampler(
    engine: Any, ids: list[list[int]], cfg: Any, seed: int, keep: Any = None
) -> list[tuple[str, bool]]:
    """Deterministic multi-byte responses (a tear can cut a character in half)."""
    return [(f"réponse ✓ {seed % 997} {len(p)}", i % 2 == 0) for i, p in enumerate(ids)]


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the cache must be one whole JSON record."""
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


@pytest.mark.parametrize("cut", [3, 17, -1])
def test_torn_cache_line_is_cut_before_the_next_append(
    tiny_engine, small_anchors_path, fast_cfg, tmp_path, cut
):
    anchors = load_anchors("train", small_anchors_path)
    full, path = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="t", sample_fn=fake_sampler
    )
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    last = data[last_start:].rstrip(b"\n")
    # cut=-1 tears inside the multi-byte "✓", the others at a byte offset into the record.
    at = last.index("✓".encode()) + 1 if cut == -1 else cut
    path.write_bytes(data[: last_start + at])
    called: list[int] = []

    def counting(*args: Any) -> list[tuple[str, bool]]:
        called.append(len(args[1]))
        return fake_sampler(*args)

    again, _ = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="t", sample_fn=counting
    )
    assert called == [1]  # only the torn record was sampled again
    torn = json.loads(last)
    key = (torn["anchor_id"], torn["source"], torn["sample"])
    kept = [r for r in full if (r["anchor_id"], r["source"], r["sample"]) != key]
    assert len(kept) == len(full) - 1
    assert [r for r in again if (r["anchor_id"], r["source"], r["sample"]) != key] == kept
    on_disk = read_lines(path)  # raises if the append was glued onto the torn line
    assert len(on_disk) == len(full)
    assert sorted(json.dumps(r, sort_keys=True) for r in on_disk) == sorted(
        json.dumps(r, sort_keys=True) for r in again
    )


def test_whole_last_record_without_newline_is_kept(
    tiny_engine, small_anchors_path, fast_cfg, tmp_path
):
    anchors = load_anchors("train", small_anchors_path)
    full, path = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="n", sample_fn=fake_sampler
    )
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # crash between record and newline

    def refuse(*args: Any) -> list[tuple[str, bool]]:
        raise AssertionError("a complete record was sampled again")

    again, _ = generate_responses(
        tiny_engine, anchors, fast_cfg, tmp_path, anchors_hash="n", sample_fn=refuse
    )
    assert again == full and path.read_bytes().endswith(b"\n")
    assert len(read_lines(path)) == len(full)


def test_repair_tail_leaves_good_files_alone(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    repair_tail(empty)
    repair_tail(tmp_path / "missing.jsonl")
    assert empty.read_bytes() == b"" and not (tmp_path / "missing.jsonl").exists()
    good = tmp_path / "g.jsonl"
    good.write_bytes(b'{"a": 1}\n')
    repair_tail(good)
    assert good.read_bytes() == b'{"a": 1}\n'
    only_torn = tmp_path / "t.jsonl"
    only_torn.write_bytes(b'{"anchor_id": "x", "sou')
    repair_tail(only_torn)
    assert only_torn.read_bytes() == b""
