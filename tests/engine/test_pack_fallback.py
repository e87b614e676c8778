"""Honest fallbacks: a model without a trained pack says so, once, and can be refused.

The no-pack cases run on the tiny random model (no shipped pack matches it); the shipped
case on the session's default model, whose pack and gate ship with the package. Each
warning test builds an engine of its own, since the warning is once per engine.
"""

from __future__ import annotations

import json
import logging
import re

import pytest

from acd_engine import Engine
from acd_engine.errors import PromptPackError
from acd_engine.safety.prompts import PromptPack

ENGINE_LOG = "acd_engine.runtime.engine"
FIX = "acd train --model PATH --out PACK"
REFUSAL = (
    "pack must be a trained prompt pack for method 'acd' when require_pack is set, got "
    "none (manual prompts)"
)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ENGINE_LOG and "prompt pack" in r.message]


def _trained_pack(engine: Engine) -> PromptPack:
    """The manual-prompt pack marked as trained (what OPO writes), no gate."""
    base = PromptPack.from_manual_prompts(engine.model, engine.tokenizer)
    return PromptPack(base.sp, base.ap, base.fingerprint, {**base.metadata, "trained": "true"})


def test_no_pack_warns_once_per_engine_at_warning_with_the_fix(tiny_model_dir, caplog):
    eng = Engine(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        first = eng.generate("Hi", method="acd", max_new_tokens=2)
        eng.generate("Hello", method="acd", max_new_tokens=2)
        "".join(eng.stream("Hey", method="acd", max_new_tokens=2))
        eng.generate_batch(["a", "b"], method="acd", max_new_tokens=2)
        eng.score_continuations("Hi", [" ok"], method="acd")
    (record,) = _warnings(caplog)
    assert record.levelno == logging.WARNING
    assert "method 'acd' has no trained prompt pack" in record.message
    assert "the same as method 'oid'" in record.message and "no safety gate" in record.message
    assert FIX in record.message and "--require-pack" in record.message
    assert (first.pack, first.gate) == ("none (manual prompts)", "none")
    # A second engine over the same weights warns for its own users.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        Engine(tiny_model_dir).generate("Hi", method="acd", max_new_tokens=1)
    assert len(_warnings(caplog)) == 1


def test_methods_that_read_no_pack_do_not_warn(tiny_model_dir, caplog):
    eng = Engine(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        for method in ("plain", "base", "nid", "oid"):
            out = eng.generate("Hi", method=method, max_new_tokens=1)
            assert (out.pack, out.gate) == ("unused", "none"), method
    assert _warnings(caplog) == []


def test_set_pack_arms_the_warning_again(tiny_model_dir, caplog):
    eng = Engine(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        eng.generate("Hi", max_new_tokens=1)
        eng.set_pack(None)
        eng.generate("Hi", max_new_tokens=1)
    assert len(_warnings(caplog)) == 2


def test_an_untrained_pack_file_is_warned_about_like_no_pack(tiny_model_dir, tmp_path, caplog):
    eng = Engine(tiny_model_dir)
    path = PromptPack.from_manual_prompts(eng.model, eng.tokenizer).save(tmp_path / "u.safetensors")
    eng.set_pack(path)
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        out = eng.generate("Hi", max_new_tokens=1)
    assert len(_warnings(caplog)) == 1
    assert out.pack == "none (manual prompts)"


def test_a_pack_object_of_the_callers_own_is_not_warned_about_but_still_refused(
    tiny_model_dir, caplog
):
    eng = Engine(tiny_model_dir)
    eng.set_pack(PromptPack.from_manual_prompts(eng.model, eng.tokenizer))
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        out = eng.generate("Hi", max_new_tokens=1)  # how `acd train` validates candidates
    assert _warnings(caplog) == []
    assert out.pack == "none (manual prompts)"
    with pytest.raises(PromptPackError, match=re.escape(REFUSAL)):
        eng.pack_for(eng.defaults.replace(method="acd"), require=True)


def test_require_pack_refuses_every_path_of_acd_and_serves_the_rest(tiny_model_dir, caplog):
    eng = Engine(tiny_model_dir, require_pack=True)
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        assert eng.generate("Hi", method="base", max_new_tokens=1).pack == "unused"
        assert eng.generate("Hi", method="oid", max_new_tokens=1).finish_reason
        calls = {
            "generate": lambda: eng.generate("Hi", max_new_tokens=1),
            "stream": lambda: "".join(eng.stream("Hi", max_new_tokens=1)),
            "batch": lambda: eng.generate_batch(["a", "b"], max_new_tokens=1),
            "score": lambda: eng.score_continuations("Hi", [" ok"]),
            "count_tokens": lambda: eng.count_tokens("Hi"),
            "reference path": lambda: eng.generate("Hi", max_new_tokens=1, method="acd"),
        }
        for name, call in calls.items():
            if name == "reference path":
                eng.set_options(fast_path=False)
            with pytest.raises(PromptPackError) as err:
                call()
            message = str(err.value)
            assert message.startswith(REFUSAL), name
            assert FIX in message and eng.model_name in message, name
    assert _warnings(caplog) == []  # refused, not warned


def test_require_pack_accepts_a_trained_pack_and_names_it(tiny_model_dir, tmp_path, caplog):
    eng = Engine(tiny_model_dir)
    pack = _trained_pack(eng)
    path = pack.save(tmp_path / "mine.safetensors")
    strict = Engine(tiny_model_dir, pack=path, require_pack=True)
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        out = strict.generate("Hi", max_new_tokens=2)
    assert _warnings(caplog) == []
    assert out.pack == f"mine.safetensors (id {pack.id})"
    assert out.gate == "none"  # trained soft prompts, but no gate fitted
    same = strict.generate("Hi", method="oid", max_new_tokens=2)
    assert same.pack == "unused"
    # A pack built in memory has no file name to report.
    strict.set_pack(pack)
    assert strict.generate("Hi", max_new_tokens=1).pack == f"in-memory pack (id {pack.id})"


def test_the_shipped_pack_is_named_with_its_gate_and_never_warned_about(engine, caplog):
    gate = engine.pack.gate
    assert gate is not None and engine.pack.trained
    layers = ",".join(map(str, gate.layers))
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        out = engine.generate("Hi", method="acd", max_new_tokens=1)
        overridden = engine.generate("Hi", method="acd", gate_threshold=0.5, max_new_tokens=1)
        ungated = engine.generate("Hi", method="acd", gate=False, max_new_tokens=1)
    assert _warnings(caplog) == []
    assert out.pack == f"smollm2-135m-instruct.safetensors (id {engine.pack.id})"
    assert out.gate == f"layers {layers}, threshold {gate.threshold:.4g}"
    assert out.gate_score is not None  # the gate named is the one that routed it
    assert overridden.gate == f"layers {layers}, threshold 0.5"
    assert (ungated.pack, ungated.gate) == (out.pack, "none")
    assert engine.require_pack is False


def test_pack_report_is_what_results_carry(engine, tiny_model_dir):
    cfg = engine.defaults.replace(method="acd", max_new_tokens=1)
    out = engine.generate("Hi", cfg)
    assert engine.pack_report(cfg) == {"pack": out.pack, "gate": out.gate, "backend": "torch"}
    assert out.backend == "torch"
    tiny = Engine(tiny_model_dir)
    no_pack = {"pack": "none (manual prompts)", "gate": "none", "backend": "torch"}
    assert tiny.pack_report(cfg) == no_pack
    unused = {"pack": "unused", "gate": "none", "backend": "torch"}
    assert tiny.pack_report(cfg.replace(method="base")) == unused


def test_cli_require_pack_refuses_in_one_line_and_json_says_no_pack(tiny_model_dir):
    from typer.testing import CliRunner

    from acd_engine.cli.main import app

    runner = CliRunner()
    model = ["--model", str(tiny_model_dir), "-n", "2"]
    refused = runner.invoke(app, ["generate", "Hi", *model, "--require-pack"])
    assert refused.exit_code == 2 and refused.stdout == ""
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {REFUSAL}")  # one line, no trace
    assert "Traceback" not in refused.stderr
    based = runner.invoke(app, ["generate", "Hi", *model, "--require-pack", "-m", "base"])
    assert based.exit_code == 0, based.output
    loose = runner.invoke(app, ["generate", "Hi", *model, "--json"])
    assert loose.exit_code == 0, loose.output
    out = json.loads(loose.stdout.strip().splitlines()[-1])
    assert (out["pack"], out["gate"]) == ("none (manual prompts)", "none")
    compared = runner.invoke(app, ["compare", "Hi", "--methods", "oid,acd", *model])
    assert compared.exit_code == 0, compared.output
    assert compared.stdout.count("pack none (manual prompts)") == 1  # the acd row only
