"""Hostile prompt packs: every bad file or value fails at load/compatibility time, typed.

Each case here was once a crash or a silent failure at generate (a tensor error from a wrong
hidden size, empty output from NaN, a ``JSONDecodeError`` from a bad fingerprint). The rule
now: ``PromptPackError`` with a ``<thing> must be <rule>, got <value>`` message, raised before
any decoding, and the engine keeps the pack it had.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from acd_engine.config import DecodingConfig
from acd_engine.errors import PromptPackError
from acd_engine.safety.prompts import PACK_FORMAT_VERSION, PromptPack

ACD2 = DecodingConfig(method="acd", max_new_tokens=2)


def write_pack(
    path: Path,
    tensors: dict[str, torch.Tensor],
    fingerprint: Any = None,
    *,
    raw_fingerprint: str | None = None,
    extra_meta: dict[str, str] | None = None,
    format_version: str | None = PACK_FORMAT_VERSION,
) -> Path:
    """A pack file written directly with safetensors, bypassing every PromptPack check."""
    meta: dict[str, str] = dict(extra_meta or {})
    if format_version is not None:
        meta["format_version"] = format_version
    if raw_fingerprint is not None:
        meta["fingerprint"] = raw_fingerprint
    elif fingerprint is not None:
        meta["fingerprint"] = json.dumps(fingerprint)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def good_tensors(hidden: int, n: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"sp": torch.randn(n, hidden) * 0.02, "ap": torch.randn(n + 1, hidden) * 0.02}


@pytest.fixture()
def fp(tiny_engine) -> dict[str, str]:
    return dict(tiny_engine.fingerprint)


@pytest.fixture()
def hidden(tiny_engine) -> int:
    return int(tiny_engine.model.config.hidden_size)


def assert_refused(tiny_engine, path: Path, match: str) -> None:
    """set_pack must raise a typed error naming the rule, and leave the current pack alone."""
    before = tiny_engine.pack.id
    with pytest.raises(PromptPackError, match=match) as info:
        tiny_engine.set_pack(path)
    assert str(path) in str(info.value) or "prompt pack" in str(info.value)
    assert tiny_engine.pack.id == before


# ------------------------------------------------------------------ shapes and sizes
def test_wrong_hidden_size_with_matching_fingerprint_fails_at_load(tmp_path, tiny_engine, fp):
    # The audit's case: the fingerprint was copied from the right model, the tensors were not.
    path = write_pack(tmp_path / "p.safetensors", good_tensors(32), fp)
    assert_refused(
        tiny_engine, path, r"tensors must have the fingerprint's hidden size 64, got 32 in '"
    )


@pytest.mark.parametrize(
    ("sp", "match"),
    [
        (torch.zeros(64), r"sp must be a 2-D tensor \[tokens, hidden\], got shape \(64,\)"),
        (torch.zeros(1, 2, 64), r"sp must be a 2-D tensor .* got shape \(1, 2, 64\)"),
        (torch.zeros(0, 64), r"sp must have >= 1 token and hidden size >= 1, got shape \(0, 64\)"),
    ],
)
def test_bad_shapes_are_refused(tmp_path, tiny_engine, fp, sp, match):
    path = write_pack(tmp_path / "p.safetensors", {"sp": sp, "ap": torch.zeros(2, 64)}, fp)
    assert_refused(tiny_engine, path, match)


def test_sp_and_ap_of_different_widths_are_refused():
    with pytest.raises(PromptPackError, match=r"same hidden size, got 8 and 9"):
        PromptPack(torch.zeros(2, 8), torch.zeros(2, 9), {})


def test_check_compatible_uses_the_models_hidden_size(tiny_engine, fp, hidden):
    pack = PromptPack(torch.zeros(2, hidden), torch.zeros(2, hidden), fp)
    pack.check_compatible(fp)  # the engine's call signature still works
    pack.check_compatible(fp, source="x", hidden_size=hidden)
    with pytest.raises(PromptPackError, match=r"x tensors must have the model's hidden size 65"):
        pack.check_compatible(fp, source="x", hidden_size=hidden + 1)
    # A pack whose fingerprint has no hidden size is still checked against the model's.
    bare = {k: v for k, v in fp.items() if k != "hidden_size"}
    narrow = PromptPack(torch.zeros(2, 8), torch.zeros(2, 8), bare)
    with pytest.raises(PromptPackError, match=r"made for another model: hidden_size"):
        narrow.check_compatible(fp)
    with pytest.raises(PromptPackError, match=r"hidden size 64, got 8"):
        narrow.check_compatible(bare, hidden_size=hidden)


# ------------------------------------------------------------------ values and dtypes
@pytest.mark.parametrize(
    ("value", "match"),
    [
        (math.nan, r"sp must hold only finite values, got 1 NaN/inf"),
        (math.inf, r"sp must hold only finite values, got 1 NaN/inf"),
        (-math.inf, r"sp must hold only finite values"),
        (1e6, r"sp values must be within \+-65504 \(fp16 range\), got 1e\+06"),
    ],
)
def test_non_finite_or_huge_values_are_refused(tmp_path, tiny_engine, fp, value, match):
    t = good_tensors(64)
    t["sp"][1, 5] = value
    assert_refused(tiny_engine, write_pack(tmp_path / "p.safetensors", t, fp), match)


def test_fp64_value_that_overflows_fp32_is_refused(tmp_path, tiny_engine, fp):
    t = {k: v.double() for k, v in good_tensors(64).items()}
    t["ap"][0, 0] = 1e300  # finite in fp64, inf once the pack is stored as fp32
    assert_refused(
        tiny_engine, write_pack(tmp_path / "p.safetensors", t, fp), r"ap must hold only finite"
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8])
def test_non_float_dtypes_are_refused(tmp_path, tiny_engine, fp, dtype):
    t = {"sp": torch.ones(2, 64, dtype=dtype), "ap": torch.ones(2, 64, dtype=dtype)}
    assert_refused(
        tiny_engine,
        write_pack(tmp_path / "p.safetensors", t, fp),
        rf"sp must be a floating-point tensor, got dtype {dtype}",
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_as_fp32_and_generate(tmp_path, tiny_engine, fp, dtype):
    t = {k: v.to(dtype) for k, v in good_tensors(64).items()}
    pack = PromptPack.load(write_pack(tmp_path / "p.safetensors", t, fp))
    assert pack.sp.dtype == torch.float32 and pack.ap.dtype == torch.float32
    tiny_engine.set_pack(pack)
    try:
        out = tiny_engine.generate("hi", ACD2)
        score = tiny_engine.score_continuations("hi", [" ok"], ACD2)[0]
    finally:
        tiny_engine.set_pack(None)
    assert len(out.token_ids) >= 1 and math.isfinite(score)


# ------------------------------------------------------------------ metadata and fingerprint
@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("{not json", r"fingerprint must be a JSON object of strings, got '\{not json'"),
        ("[1, 2]", r"fingerprint must be a JSON object of strings, got '\[1, 2\]'"),
        ("null", r"fingerprint must be a JSON object of strings, got 'null'"),
        ("42", r"fingerprint must be a JSON object"),
        ('{"hidden_size": 64}', r"fingerprint must map strings to strings, got 'hidden_size': 64"),
        ('{"hidden_size": "wide"}', r"fingerprint hidden_size must be a positive integer"),
        ('{"hidden_size": "0"}', r"fingerprint hidden_size must be a positive integer, got '0'"),
    ],
)
def test_bad_fingerprint_json_is_refused(tmp_path, tiny_engine, raw, match):
    path = write_pack(tmp_path / "p.safetensors", good_tensors(64), raw_fingerprint=raw)
    assert_refused(tiny_engine, path, match)


def test_missing_fingerprint_is_refused(tmp_path, tiny_engine):
    path = write_pack(tmp_path / "p.safetensors", good_tensors(64))
    assert_refused(tiny_engine, path, r"fingerprint must be a JSON object of strings, got None")


@pytest.mark.parametrize(
    ("version", "match"), [(None, r"got None"), ("2", r"got '2'"), ("", r"got ''")]
)
def test_wrong_format_version_is_refused(tmp_path, tiny_engine, fp, version, match):
    path = write_pack(tmp_path / "p.safetensors", good_tensors(64), fp, format_version=version)
    assert_refused(tiny_engine, path, r"format_version must be '1', " + match)


def test_metadata_using_a_reserved_key_is_refused(fp):
    with pytest.raises(PromptPackError, match=r"must not use the reserved keys"):
        PromptPack(torch.zeros(1, 64), torch.zeros(1, 64), fp, {"fingerprint": "{}"})


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"trained": True}, r"metadata must map strings to strings, got 'trained': True"),
        ({1: "x"}, r"metadata must map strings to strings, got 1: 'x'"),
        ({"note": "\ud800"}, r"metadata must be valid UTF-8 text"),
        (["trained"], r"metadata must be a dict of strings, got list"),
    ],
)
def test_constructor_refuses_non_string_metadata(fp, metadata, match):
    with pytest.raises(PromptPackError, match=match):
        PromptPack(torch.zeros(1, 64), torch.zeros(1, 64), fp, metadata)


def test_constructor_refuses_non_tensors_and_bad_fingerprints(fp):
    with pytest.raises(PromptPackError, match=r"sp must be a torch.Tensor, got list"):
        PromptPack([[0.0]], torch.zeros(1, 1), fp)  # type: ignore[arg-type]
    with pytest.raises(PromptPackError, match=r"fingerprint must be a dict of strings, got str"):
        PromptPack(torch.zeros(1, 64), torch.zeros(1, 64), "fp")  # type: ignore[arg-type]


def test_from_manual_prompts_refuses_an_empty_text(tiny_engine):
    with pytest.raises(PromptPackError, match=r"sp text must encode to >= 1 token, got ''"):
        PromptPack.from_manual_prompts(tiny_engine.model, tiny_engine.tokenizer, safe_text="")


# ------------------------------------------------------------------ files
def test_missing_tensor_and_unreadable_files(tmp_path, tiny_engine, fp):
    only_sp = write_pack(tmp_path / "a.safetensors", {"sp": torch.zeros(2, 64)}, fp)
    assert_refused(tiny_engine, only_sp, r"tensors must include 'sp' and 'ap', got \['sp'\]")
    garbage = tmp_path / "b.safetensors"
    garbage.write_bytes(b"\x00\xff" * 10)
    assert_refused(tiny_engine, garbage, r"must be a readable safetensors file")
    good = write_pack(tmp_path / "c.safetensors", good_tensors(64), fp)
    torn = tmp_path / "d.safetensors"
    torn.write_bytes(good.read_bytes()[:-7])
    assert_refused(tiny_engine, torn, r"must be a readable safetensors file")
    assert_refused(tiny_engine, tmp_path, r"must be an existing .safetensors file")


def test_non_string_metadata_in_the_header_is_refused(tmp_path, tiny_engine):
    header = {
        "__metadata__": {"format_version": "1", "fingerprint": {"a": 1}},
        "sp": {"dtype": "F32", "shape": [1, 64], "data_offsets": [0, 256]},
        "ap": {"dtype": "F32", "shape": [1, 64], "data_offsets": [256, 512]},
    }
    blob = json.dumps(header).encode()
    path = tmp_path / "p.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 512)
    assert_refused(tiny_engine, path, r"must be a readable safetensors file")


def test_extra_tensors_are_ignored_and_the_pack_generates(tmp_path, tiny_engine, fp, caplog):
    t = {**good_tensors(64), "gate": torch.full((3,), math.nan)}
    path = write_pack(tmp_path / "p.safetensors", t, fp)
    with caplog.at_level("WARNING", logger="acd_engine.safety.prompts"):
        tiny_engine.set_pack(path)
    try:
        assert "ignoring unknown tensors ['gate']" in caplog.text
        assert math.isfinite(tiny_engine.score_continuations("hi", [" ok"], ACD2)[0])
    finally:
        tiny_engine.set_pack(None)


def test_save_round_trip_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, fp, monkeypatch):
    pack = PromptPack(torch.randn(2, 64), torch.randn(3, 64), fp, {"note": "ünïcode"})
    path = pack.save(tmp_path / "sub" / "p.safetensors")
    again = PromptPack.load(path)
    assert torch.equal(again.sp, pack.sp) and again.metadata == pack.metadata
    assert (path.stat().st_mode & 0o777) == 0o644
    before = path.read_bytes()

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("acd_engine.safety.prompts.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        PromptPack(torch.zeros(1, 64), torch.zeros(1, 64), fp).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.safetensors"]
