"""The playground page at ``/``: served from package data, self-contained, public API only.

No model and no browser here (``test_playground_browser.py`` drives the page in Chromium):
the app is built without its lifespan, so nothing loads.
"""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from acd_engine import DecodingConfig
from acd_integrations._params import result_metadata
from acd_integrations.server import ServerOptions, create_app
from acd_integrations.server.playground import playground_page


@pytest.fixture(scope="module")
def page():
    response = TestClient(create_app(ServerOptions())).get("/")
    assert response.status_code == 200
    return response


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_is_html_from_package_data(page):
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == playground_page().html
    assert "<title>acd playground</title>" in page.text


def test_the_policy_admits_exactly_the_inline_script_and_style(page):
    csp = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    [script] = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    [style] = re.findall(r"<style>(.*?)</style>", page.text, re.DOTALL)
    assert csp["script-src"] == _sha256(script)
    assert csp["style-src"] == _sha256(style)
    assert csp["default-src"] == "'none'"
    assert csp["connect-src"] == "'self'"  # the page talks to this server and nothing else


def test_nothing_is_loaded_from_elsewhere(page):
    # No CDN, no web font, no external script: it must work on a machine with no network.
    assert not re.search(r"https?://", page.text)
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=\"(?!data:)", page.text)


def test_the_page_calls_only_routes_this_server_has(page):
    app = create_app(ServerOptions())
    routes = {getattr(r, "path", "") for r in app.routes}
    called = set(re.findall(r'fetch\(endpoint\("([^"]+)"\)', page.text))
    assert called == {"health", "v1/models", "v1/chat/completions"}
    assert {"/" + path for path in called} <= routes


def test_each_column_shows_every_fact_of_the_acd_field_including_the_backend(page):
    """The ``acd`` field of an answer (the last chunk of its stream) says how it was
    decoded; the column shows each of its facts, the method being the column's title."""
    report = {"pack": "p", "gate": "g", "backend": "llamacpp"}
    sent = set(result_metadata(DecodingConfig(method="acd"), 0.9, True, report))
    [script] = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    read = set(re.findall(r"\bmeta\.(\w+)", script))
    assert read == sent - {"method"}, "a fact the server sends is not shown, or a stale name"
    assert "if (chunk.acd) this.showAcd(chunk.acd);" in script
    # Labelled, next to the pack and gate that decoded it.
    assert 'parts.push("backend: " + meta.backend);' in script
    assert 'this.q(".pack").textContent = parts.join(" · ");' in script


def test_the_page_needs_no_key_but_the_api_does():
    client = TestClient(create_app(ServerOptions(api_key="secret")))
    assert client.get("/").status_code == 200  # a static page: it holds no secret
    refused = client.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
