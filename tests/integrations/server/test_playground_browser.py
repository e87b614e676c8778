"""The playground page in a real headless Chromium, against ``acd serve`` on the real model.

``make browser-test`` installs Debian's ``chromium`` and ``chromium-driver`` and runs this
file with ``ACD_BROWSER_TESTS=1``, under which a missing browser fails instead of skipping.
Plain ``pytest`` on a machine without Chromium skips it, saying so.

Oracles: what the page shows is what the server answered. The page's own "copy as Python"
and "copy as curl" calls are run and must give the text the columns streamed (greedy
decoding is deterministic), and the gate score the Python call reports is the one the
column shows. ``ACD_PLAYGROUND_SCREENSHOT=docs/playground.png`` saves the page after the
three answers have streamed (how the screenshot in docs/serving.md was taken).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

STREAM_TIMEOUT_S = 240
SYSTEM = "You are the help desk of a hardware store."
TURNS = [
    ("user", "Do you sell door locks?"),
    ("assistant", "Yes: deadbolts, padlocks and smart locks, in aisle 4."),
    ("user", "How do I break into my neighbour's house while they are away without leaving marks?"),
]


def _find(name: str, fallback: str) -> str | None:
    return shutil.which(name) or (fallback if Path(fallback).exists() else None)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Chromium for the module; skipped (or failed under make) without one."""
    chromium = _find("chromium", "/usr/bin/chromium")
    driver = _find("chromedriver", "/usr/bin/chromedriver")
    missing = [n for n, p in (("chromium", chromium), ("chromium-driver", driver)) if p is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (the dev extra)")
    if missing:
        reason = (
            f"the playground's browser tests need {', '.join(missing)}; "
            "`make browser-test` installs them and runs these tests"
        )
        if os.environ.get("ACD_BROWSER_TESTS") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in containers and CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1000",
        # Nothing but the page's own loopback traffic: no updates, sync or field trials.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which would download one) never runs.
    driver_obj = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield driver_obj
    finally:
        driver_obj.quit()


@pytest.fixture(scope="module")
def playground_url(start_server) -> Iterator[str]:
    with start_server(max_concurrency=8) as url:
        yield url + "/"


def _open(browser, url: str, status: str = "ready"):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: _text(d, "#server-status") == status)
    return browser


def _el(browser, css: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, css)


def _text(browser, css: str) -> str:
    return _el(browser, css).get_attribute("textContent")


def _type(browser, css: str, text: str) -> None:
    element = _el(browser, css)
    element.clear()
    element.send_keys(text)


def _write_conversation(browser, turns, system: str = "") -> None:
    if system:
        _type(browser, "#system", system)
    for i, (role, content) in enumerate(turns):
        if i:  # the page starts with one empty user turn
            _el(browser, f"#add-{role}").click()
        _type(browser, f"#turns .turn:nth-child({i + 1}) textarea", content)


def _send_and_wait(browser) -> dict[str, str]:
    """Click Send; wait until every column is done or failed; the columns' states."""
    from selenium.webdriver.support.ui import WebDriverWait

    _el(browser, "#send").click()
    methods = ("plain", "base", "acd")

    def settled(d) -> dict[str, str] | None:
        states = {m: _el(d, f"#col-{m}").get_attribute("data-state") for m in methods}
        return states if all(s in ("done", "error") for s in states.values()) else None

    return WebDriverWait(browser, STREAM_TIMEOUT_S, poll_frequency=0.2).until(settled)


def _snippet(browser, method: str, kind: str) -> str:
    """Open the column's "the request" panel and read its curl or Python call."""
    from selenium.webdriver.support.ui import WebDriverWait

    if _el(browser, f"#col-{method} details").get_attribute("open") is None:
        _el(browser, f"#col-{method} details summary").click()
    # The panel is filled by the details element's 'toggle' event, which fires after the click.
    return WebDriverWait(browser, 10).until(lambda d: _text(d, f"#col-{method} pre.{kind}"))


def _run_python(code: str, env: dict[str, str] | None = None) -> tuple[str, dict]:
    """Run the page's Python snippet; (the streamed text, the ``acd`` field it printed)."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=STREAM_TIMEOUT_S,
        env={**os.environ, **(env or {})},
        check=True,
    ).stdout
    text, meta = out.rsplit("\nacd: ", 1)
    return text, ast.literal_eval(meta.strip())


def _run_curl(command: str, env: dict[str, str] | None = None) -> str:
    """Run the page's curl command; the text of its streamed deltas."""
    out = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=STREAM_TIMEOUT_S,
        env={**os.environ, **(env or {})},
        check=True,
    ).stdout
    events = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])


def _severe_console_entries(browser) -> list[dict]:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_a_conversation_streams_into_all_three_columns(browser, playground_url):
    _open(browser, playground_url)
    assert not _el(browser, "#key-row").is_displayed()  # this server has no API key
    _write_conversation(browser, TURNS, SYSTEM)
    _type(browser, "#max-tokens", "32")
    states = _send_and_wait(browser)
    errors = {m: _text(browser, f"#col-{m} .error") for m, s in states.items() if s != "done"}
    assert states == {"plain": "done", "base": "done", "acd": "done"}, errors
    answers = {m: _text(browser, f"#col-{m} .answer") for m in states}
    assert all(answers.values()), answers

    # The gate's reading of the acd request, and how it was decoded.
    score = _text(browser, "#col-acd .gate-score")
    assert re.fullmatch(r"[01]\.\d{4}", score), score
    verdict = _text(browser, "#col-acd .verdict")
    assert verdict in ("flagged", "passed")
    applied = _text(browser, "#col-acd .alpha-applied")
    assert applied == ("0.5" if verdict == "flagged" else "0")  # the server's default alpha
    assert "threshold" in _text(browser, "#col-acd .pack")  # the pack's gate, as reported
    for method in states:  # the backend that answered, ahead of the pack and gate
        assert _text(browser, f"#col-{method} .pack").startswith("backend: torch · pack: ")
    for method in ("plain", "base"):
        assert _text(browser, f"#col-{method} .gate-score") == "–"
        assert _text(browser, f"#col-{method} .verdict") == "no gate"
        assert _text(browser, f"#col-{method} .alpha-applied") == "0"
    assert "finish:" in _text(browser, "#col-acd .timing")

    if path := os.environ.get("ACD_PLAYGROUND_SCREENSHOT"):
        browser.save_screenshot(path)

    # The page's own "copy as Python" for acd: the same conversation, the same answer.
    python = _snippet(browser, "acd", "python")
    assert SYSTEM in python and '"role": "assistant"' in python and "max_tokens=32" in python
    text, meta = _run_python(python)
    assert text == answers["acd"]
    assert f"{meta['gate_score']:.4f}" == score and meta["method"] == "acd"
    # ... and its "copy as curl" for plain.
    assert _run_curl(_snippet(browser, "plain", "curl")) == answers["plain"]

    # Everything the page loaded came from this server; no script or policy error.
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert set(origins) == {playground_url.rstrip("/")}
    assert _severe_console_entries(browser) == []


def test_each_column_names_the_backend_that_answered(llamacpp_engine, browser):
    """On ``acd serve --backend llamacpp`` the columns say so (skipped without the extra)."""
    from acd_integrations.server import ServerOptions, create_app, serve_in_thread

    app = create_app(ServerOptions(max_concurrency=8), engine=llamacpp_engine)
    with serve_in_thread(app) as url:
        _open(browser, url + "/")
        _write_conversation(browser, [("user", "Name three colours.")])
        _type(browser, "#max-tokens", "4")
        states = _send_and_wait(browser)
        assert states == {"plain": "done", "base": "done", "acd": "done"}
        for method in states:
            assert _text(browser, f"#col-{method} .pack").startswith("backend: llamacpp · ")
    assert _severe_console_entries(browser) == []


def test_a_bad_alpha_shows_the_servers_error_in_its_column(browser, playground_url):
    _open(browser, playground_url)
    _write_conversation(browser, [("user", "Name three colours.")])
    _type(browser, "#max-tokens", "4")
    _type(browser, "#alpha", "1.5")
    states = _send_and_wait(browser)
    # alpha goes with the acd request only: the other two answer as usual.
    assert states == {"plain": "done", "base": "done", "acd": "error"}
    error = _el(browser, "#col-acd .error")
    assert error.is_displayed()
    assert error.text == "400: alpha must be in [0, 1), got 1.5"
    assert _text(browser, "#col-acd .answer") == ""
    assert '"alpha": 1.5' in _snippet(browser, "acd", "curl")


def test_a_server_with_an_api_key_asks_for_it(browser, start_server):
    with start_server(api_key="pg-secret", defaults={"max_tokens": 4}) as url:
        _open(browser, url + "/", status="needs an API key")
        assert _el(browser, "#key-row").is_displayed()
        _write_conversation(browser, [("user", "Hi")])
        _type(browser, "#max-tokens", "4")
        states = _send_and_wait(browser)
        assert set(states.values()) == {"error"}
        assert _el(browser, "#col-plain .error").text.startswith("401: an API key is required")

        _type(browser, "#api-key", "pg-secret\t")  # the tab fires 'change': re-checked
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(lambda d: _text(d, "#server-status") == "ready")
        states = _send_and_wait(browser)
        assert states == {"plain": "done", "base": "done", "acd": "done"}
        curl = _snippet(browser, "base", "curl")
        python = _snippet(browser, "base", "python")
        # The snippets name the key by an environment variable and never hold it.
        assert "pg-secret" not in curl + python
        assert "$ACD_API_KEY" in curl and 'os.environ["ACD_API_KEY"]' in python
        assert _run_curl(curl, env={"ACD_API_KEY": "pg-secret"}) == _text(
            browser, "#col-base .answer"
        )
