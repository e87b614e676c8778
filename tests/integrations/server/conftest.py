"""A live ``acd serve`` app on a free loopback port, sharing the session's engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@contextmanager
def live_server(engine, **options) -> Iterator[str]:
    """Serve ``create_app`` on 127.0.0.1:<free port> in a thread; yields the base URL."""
    from acd_integrations.server import ServerOptions, create_app, serve_in_thread

    with serve_in_thread(create_app(ServerOptions(**options), engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def server_url(engine) -> Iterator[str]:
    with live_server(engine, max_concurrency=32, defaults={"max_tokens": 16}) as url:
        yield url


@pytest.fixture(scope="module")
def model_id(engine) -> str:
    return engine.model_name


@pytest.fixture(scope="module")
def start_server(engine):
    """``start_server(**options)``: a context manager serving another app on its own port."""
    return lambda **options: live_server(engine, **options)
