"""A live ``acd serve`` app on a free loopback port, sharing the session's engine.

A module marked ``pytest.mark.server_backends("torch", "llamacpp")`` runs each of its tests
that touch the engine once per backend named: ``torch`` is the session's ``engine``,
``llamacpp`` the session's ``llamacpp_engine`` (``acd serve --backend llamacpp``; skipped
where the ``[llamacpp]`` extra is missing). The parameter is module-scoped, so each backend
gets one server per module, not one per test. Unmarked modules run on torch alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("server_backends")
    if marker is not None and "server_backend" in metafunc.fixturenames:
        metafunc.parametrize("server_backend", marker.args, indirect=True, scope="module")


@pytest.fixture(scope="module")
def server_backend(request) -> str:
    """The backend this module's engine runs on: the marker's parameter, else ``torch``.

    A separate name (not a parameter on ``engine`` itself) so the session's ``engine`` is
    never re-keyed by it: that would tear the session fixture down between backends."""
    return getattr(request, "param", "torch")


@pytest.fixture(scope="module")
def engine(request, server_backend):
    if server_backend == "llamacpp":
        return request.getfixturevalue("llamacpp_engine")
    return request.getfixturevalue("engine")  # the session's (tests/conftest.py)


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
