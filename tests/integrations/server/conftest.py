"""A live ``acd serve`` app on a free loopback port, sharing the session's engine."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@contextmanager
def live_server(engine, **options) -> Iterator[str]:
    """Serve ``create_app`` on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    from acd_integrations.server import ServerOptions, create_app

    app = create_app(ServerOptions(**options), engine=engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


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
