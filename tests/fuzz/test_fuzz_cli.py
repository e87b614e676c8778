"""Property: whatever arguments ``acd`` gets, it answers or prints ONE ``error:`` line.

Random argument lists for ``acd generate`` run in-process (typer's ``CliRunner``) against the
tiny random model: any Unicode in the prompt and ``--system`` (lone surrogates included, as
Python decodes undecodable argv bytes), out-of-range and malformed numbers, unknown methods
and options. The outcome must be exit code 0 with output, or exit code 2 with exactly one
``error:`` line on stderr: never a traceback, never exit code 1. ``acd eval`` and ``acd train``
get argument lists that are invalid by construction; they must fail that way before any model
is loaded (a loaded model fails the test).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from acd_engine.cli.main import app
from acd_engine.config import METHODS

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
N_GENERATE = 300 if FUZZ else 30
N_VALIDATION = 300 if FUZZ else 40

runner = CliRunner()

surrogates = st.text(st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), min_size=1)
text = st.one_of(
    st.text(max_size=30),
    st.tuples(st.text(max_size=10), surrogates, st.text(max_size=10)).map("".join),
    st.sampled_from(["<|im_start|>system", "\x00", "-", "--", "--json", "é🎉", " "]),
)
number = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["abc", "", "1e400", "-0", "0x10", "½"]),
)
small_int = st.integers(-2, 6).map(str)
unit = st.sampled_from(["0", "0.1", "0.5", "0.99", "1", "1.5", "-0.1", "nan", "inf"])
method = st.one_of(st.sampled_from(METHODS), text)
option = st.one_of(
    st.tuples(st.just("--method"), method),
    st.tuples(st.just("--alpha"), st.one_of(unit, number)),
    st.tuples(st.just("-n"), st.one_of(small_int, number)),
    st.tuples(st.just("--temperature"), st.one_of(unit, number)),
    st.tuples(st.just("--top-p"), st.one_of(unit, number)),
    st.tuples(st.just("--seed"), st.one_of(small_int, number)),
    st.tuples(st.just("--plausibility"), st.one_of(unit, number)),
    st.tuples(st.just("--system"), text),
    st.tuples(st.just("--json")),
    st.tuples(st.sampled_from(["--nope", "-z", "--pack"]), text),
)


def assert_clean(res: Any) -> None:
    """Exit 0 with output, or exit 2 with exactly one ``error:`` line; nothing else."""
    assert "Traceback" not in res.output, res.output
    event(f"exit code {res.exit_code}")
    if res.exit_code == 0:
        assert res.stdout, "a successful command must print its answer"
        return
    assert res.exit_code == 2, (res.exit_code, res.output, repr(res.exception))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr


@settings(max_examples=N_GENERATE, deadline=None)
@given(prompt=text, options=st.lists(option, max_size=5))
def test_generate_answers_or_says_what_is_wrong(
    tiny_model_dir: Path, prompt: str, options: list[tuple[str, ...]]
) -> None:
    args = ["generate", "--model", str(tiny_model_dir), "-n", "3"]
    for opt in options:
        args.extend(opt)
    args += ["--", prompt]  # after "--" a prompt starting with "-" is still the prompt
    assert_clean(runner.invoke(app, args))


def _no_model(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a model was loaded for arguments that should fail validation")


bad_eval = st.one_of(
    st.tuples(
        st.just("--methods"), st.one_of(st.just(","), text.filter(lambda t: t not in METHODS))
    ),
    st.tuples(st.just("--alphas"), st.sampled_from(["1", "-0.5", "nan", "inf", "a", ",", "0.5,2"])),
    st.tuples(st.just("--limit"), st.sampled_from(["0", "-3", "x"])),
    st.tuples(st.just("--batch-size"), st.sampled_from(["0", "-1", "1.5"])),
    st.tuples(st.just("--plausibility"), st.sampled_from(["1", "-1", "nan", "inf"])),
    st.tuples(st.just("-n"), st.sampled_from(["0", "-1", str(2**40)])),
    st.tuples(st.just("--judge"), st.sampled_from(["nope", "openai", "hf", ""])),
    st.tuples(st.just("--benchmarks"), st.sampled_from(["advbnech", ",", "/nonexistent/x.jsonl"])),
    st.tuples(st.just("--out"), st.sampled_from(["/etc/passwd", "/etc/passwd/sub", "/proc/1/x"])),
)
bad_train = st.one_of(
    st.tuples(st.just("--epochs"), st.sampled_from(["0", "-1", "x"])),
    st.tuples(st.just("--lr"), st.sampled_from(["nan", "-1", "inf", "x"])),
    st.tuples(st.just("--init"), text.filter(lambda t: t not in ("manual", "short"))),
    st.tuples(st.just("--set"), st.sampled_from(["{bad", "[1]", '{"nope": 1}', "\udcff"])),
    st.tuples(st.just("--batch-size"), st.sampled_from(["0", "-2"])),
    st.tuples(st.just("--alpha"), st.sampled_from(["1", "nan", "-0.5"])),
)


@settings(max_examples=N_VALIDATION, deadline=None)
@given(command=st.sampled_from(["eval", "train"]), bad=st.data())
def test_eval_and_train_fail_validation_before_any_model(
    tmp_path_factory: pytest.TempPathFactory, command: str, bad: st.DataObject
) -> None:
    out = tmp_path_factory.mktemp("fuzz")
    if command == "eval":
        chosen = bad.draw(st.lists(bad_eval, min_size=1, max_size=3))
        args = ["eval", "--out", str(out / "run"), "--data-dir", str(out)]
    else:
        chosen = bad.draw(st.lists(bad_train, min_size=1, max_size=3))
        args = ["train", "--out", str(out / "pack.safetensors")]
    for opt in chosen:
        args.extend(opt)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("acd_engine.runtime.engine.get_engine", _no_model)
        res = runner.invoke(app, args)
    assert res.exit_code == 2, (args, res.exit_code, res.output, repr(res.exception))
    assert_clean(res)
