"""Engine behaviour: streaming, stop strings, sampling, messages, threads, offline, imports."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from acd_engine import DecodingConfig, MessagesError, PromptTooLongError
from acd_engine.runtime.answer import stop_prefix_overlap

SAMPLE = DecodingConfig(method="oid", temperature=1.0, max_new_tokens=40, seed=7)


def test_stream_concatenation_equals_generate_with_multibyte_bytes(tiny_engine):
    """The random tiny model emits arbitrary byte tokens, so deltas must not split UTF-8."""
    for seed in range(4):
        cfg = SAMPLE.replace(seed=seed)
        result = tiny_engine.generate("hello", cfg)
        deltas = list(tiny_engine.stream("hello", cfg))
        # A delta that ended inside a multi-byte character would show U+FFFD where the final
        # text has the real character, so equality is the check.
        assert "".join(deltas) == result.text
    assert any(
        ord(c) > 127
        for s in range(4)
        for c in tiny_engine.generate("hello", SAMPLE.replace(seed=s)).text
    )


def test_seeded_sampling_is_reproducible_and_seed_matters(tiny_engine):
    a = tiny_engine.generate("hi", SAMPLE).token_ids
    assert a == tiny_engine.generate("hi", SAMPLE).token_ids
    assert a != tiny_engine.generate("hi", SAMPLE.replace(seed=8)).token_ids


def test_stop_string_across_token_boundaries(tiny_engine):
    full = tiny_engine.generate("hi", SAMPLE).text
    assert len(full) > 12
    stop = full[5:9]  # usually spans a token boundary; never returned
    out = tiny_engine.generate("hi", SAMPLE.replace(stop=[stop]))
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    assert "".join(tiny_engine.stream("hi", SAMPLE.replace(stop=[stop]))) == out.text


def teststop_prefix_overlap():
    assert stop_prefix_overlap("abc\n\nUs", ["\n\nUser:"]) == 4
    assert stop_prefix_overlap("abc", ["xyz"]) == 0
    assert stop_prefix_overlap("ab", ["b", "bc"]) == 1


def test_stream_on_real_model_matches_generate(engine):
    cfg = DecodingConfig(method="acd", max_new_tokens=24)
    msgs = "Write one sentence about tea, with an emoji."
    assert "".join(engine.stream(msgs, cfg)) == engine.generate(msgs, cfg).text
    chunks = list(engine.stream_chunks(msgs, cfg))
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].usage is not None


def test_generate_batch_matches_single_calls(tiny_engine):
    cfg = DecodingConfig(method="oid", max_new_tokens=6)
    prompts = ["one", "two, longer prompt here", [{"role": "user", "content": "three"}]]
    batch = tiny_engine.generate_batch(prompts, cfg)
    assert [b.token_ids for b in batch] == [tiny_engine.generate(p, cfg).token_ids for p in prompts]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "messages must be a non-empty list"),
        (
            [{"role": "wizard", "content": "x"}],
            r"messages\[0\].role must be one of system, user, assistant, tool, got 'wizard'",
        ),
        ([{"role": "user"}], r"messages\[0\] must be a dict with 'role' and 'content'"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string, got int"),
    ],
)
def test_bad_messages(tiny_engine, messages, match):
    with pytest.raises(MessagesError, match=match):
        tiny_engine.generate(messages, max_new_tokens=1)


def test_prompt_longer_than_context_names_the_limit(tiny_engine):
    with pytest.raises(PromptTooLongError, match="context window of 512 tokens, got") as info:
        tiny_engine.generate("word " * 600, max_new_tokens=1)
    assert isinstance(info.value, ValueError)


def test_max_new_tokens_is_clamped_to_the_context(tiny_engine):
    n = int(tiny_engine.branch_inputs("x " * 200, DecodingConfig(method="base"))[1].shape[1])
    out = tiny_engine.generate(
        "x " * 200, method="base", max_new_tokens=500, temperature=1.0, seed=1
    )
    assert len(out.token_ids) <= 512 - n


def test_concurrent_calls_do_not_interleave(tiny_engine):
    cfg = DecodingConfig(method="oid", max_new_tokens=12)
    prompts = [f"prompt number {i}" for i in range(6)]
    expected = [tiny_engine.generate(p, cfg).token_ids for p in prompts]
    got: dict[int, list[int]] = {}

    def work(i: int) -> None:
        got[i] = tiny_engine.generate(prompts[i], cfg).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(6)] == expected


def test_engines_share_one_model(engine):
    from acd_engine import Engine, get_engine

    assert get_engine() is engine
    assert Engine().model is engine.model  # process-wide model cache


def _run_py(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_pulls_in_neither_langchain_nor_llama_index():
    code = (
        "import sys, acd_engine, acd_engine.runtime.engine, acd_engine.cli.main, acd_engine.training.anchors\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('langchain', 'langchain_core', 'llama_index')]\n"
        "print(bad); assert not bad"
    )
    proc = _run_py(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_offline_generation_with_sockets_blocked(engine):
    """A fresh process with every socket blocked still loads the default model and generates."""
    code = (
        "import socket\n"
        "def deny(*a, **k): raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = deny; socket.create_connection = deny; socket.getaddrinfo = deny\n"
        "from acd_engine import get_engine\n"
        "r = get_engine().generate('Say hi.', method='acd', max_new_tokens=4)\n"
        "import json; print(json.dumps(r.model_dump()))\n"
    )
    proc = _run_py(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["usage"]["completion_tokens"] >= 1


def test_engine_options_are_validated_in_the_house_style(tiny_engine):
    from acd_engine import ConfigError, EngineOptions

    with pytest.raises(ConfigError, match=r"max_batch_requests must be >= 1, got 0"):
        EngineOptions(max_batch_requests=0)
    with pytest.raises(ConfigError, match=r"did you mean 'fast_path'\?"):
        tiny_engine.set_options(fastpath=False)
    assert tiny_engine.options.fast_path  # a refused change leaves the options as they were


def test_set_options_reaches_the_kernels_and_keeps_the_tokens(tiny_engine):
    cfg = DecodingConfig(method="oid", max_new_tokens=5)
    fast = tiny_engine.generate_batch(["hi", "a longer question here"], cfg)
    tiny_engine.set_options(fast_path=False, max_batch_requests=1)
    try:
        assert not tiny_engine.kernels.use_fast_path()
        assert tiny_engine.options.max_batch_requests == 1
        ref = tiny_engine.generate_batch(["hi", "a longer question here"], cfg)
    finally:
        tiny_engine.set_options(fast_path=True, max_batch_requests=8)
    assert [r.token_ids for r in fast] == [r.token_ids for r in ref]
