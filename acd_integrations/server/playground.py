"""The playground page ``acd serve`` answers at ``/``: package data, read once, served as is.

The page (``static/playground.html``) is one file with its CSS and JS inline: no build
step, no CDN, so it works on a machine with no network. It talks to the server only
through the public API (``/health``, ``/v1/models``, ``/v1/chat/completions``), like any
other client, so it shows exactly what a client gets.

The response carries a Content-Security-Policy that allows the page's own inline script
and style (by their sha256, not ``'unsafe-inline'``) and connections to its own origin
only: a page edited to load something from elsewhere fails in the browser, not silently
on the one offline machine where it matters. This module imports no web framework.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["PLAYGROUND_FILE", "PlaygroundPage", "playground_page"]

#: The page, relative to this package (``[tool.setuptools.package-data]`` ships it).
PLAYGROUND_FILE = "static/playground.html"

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class PlaygroundPage:
    """The page's HTML and the headers it is served with."""

    html: str
    headers: dict[str, str]


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(html: str) -> str:
    """A policy that admits exactly the page's inline ``<script>`` and ``<style>`` blocks.

    Why hashes: the browser then runs only the code shipped in the package; an injected
    script (or a copy edited to pull a library from a CDN) is refused.
    """
    scripts = [_digest(body) for tag, body in _INLINE.findall(html) if tag == "script"]
    styles = [_digest(body) for tag, body in _INLINE.findall(html) if tag == "style"]
    return "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(scripts or ["'none'"]),
            "style-src " + " ".join(styles or ["'none'"]),
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


@cache
def playground_page() -> PlaygroundPage:
    """The page from package data (read on first use; the file does not change at run time)."""
    html = (resources.files("acd_integrations.server") / PLAYGROUND_FILE).read_text("utf-8")
    headers = {
        "Content-Security-Policy": content_security_policy(html),
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return PlaygroundPage(html, headers)
