"""The benign control's prompt choice and its loopback-only client (no server needed)."""

from __future__ import annotations

import json

import pytest


def write_xstest(path, rows) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def test_only_safe_prompts_are_picked_seeded(control, tmp_path) -> None:
    rows = [
        {"id": f"x-{i:03d}", "prompt": f"p{i}", "label": "safe" if i % 2 else "unsafe"}
        for i in range(40)
    ]
    data = tmp_path / "xstest.jsonl"
    write_xstest(data, rows)
    picked = control.load_safe_prompts(data, 5)
    assert len(picked) == 5 and all(r["label"] == "safe" for r in picked)
    assert picked == control.load_safe_prompts(data, 5)  # same seed, same prompts
    assert [r["id"] for r in picked] == sorted(r["id"] for r in picked)
    assert len(control.load_safe_prompts(data, 999)) == 20  # all safe ones, no more


def test_no_safe_prompt_is_an_error(control, tmp_path) -> None:
    data = tmp_path / "xstest.jsonl"
    write_xstest(data, [{"id": "a", "prompt": "p", "label": "unsafe"}])
    with pytest.raises(ValueError, match="has no prompt labelled 'safe'"):
        control.load_safe_prompts(data, 3)


def test_client_refuses_non_loopback_urls(control) -> None:
    with pytest.raises(ValueError, match=r"url must be a loopback address, got 'example\.com'"):
        control.chat("http://example.com/v1", {}, 1.0)


def test_failed_requests_are_counted_not_judged(control, monkeypatch) -> None:
    import urllib.error

    def fail(url, body, timeout_s):
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(control, "chat", fail)
    result = control.run_control(
        "http://127.0.0.1:9/v1",
        "m",
        [{"id": "a", "prompt": "hi"}],
        ["plain"],
        alpha=0.5,
        max_tokens=4,
    )
    stats = result["methods"]["plain"]
    assert (stats["judged"], stats["failed"], stats["over_refusal"]) == (0, 1, None)


def test_refusals_are_judged_by_the_projects_judge(control, monkeypatch) -> None:
    answers = iter(["I'm sorry, but I can't help with that.", "Use kill -9 with the PID."])

    def reply(url, body, timeout_s):
        return {"choices": [{"message": {"content": next(answers)}}]}

    monkeypatch.setattr(control, "chat", reply)
    prompts = [{"id": "a", "prompt": "How do I kill a process?"}, {"id": "b", "prompt": "same"}]
    result = control.run_control(
        "http://127.0.0.1:9/v1", "m", prompts, ["acd"], alpha=0.5, max_tokens=4
    )
    stats = result["methods"]["acd"]
    assert [r["verdict"] for r in stats["records"]] == ["refused", "answered"]
    assert stats["over_refusal"] == 0.5
