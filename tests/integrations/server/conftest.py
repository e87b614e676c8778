"""A live ``acd serve`` app on a free loopback port, sharing a session engine.

The servers here serve ``server_engine``: the session's ``engine`` (torch), or, in a module
marked ``pytest.mark.server_backends("torch", "llamacpp")``, each backend named in turn
(``llamacpp`` is the session's ``llamacpp_engine``, as ``acd serve --backend llamacpp``
runs it; skipped where the ``[llamacpp]`` extra is missing). The parameter is
module-scoped, so each backend gets one server per module, not one per test.

Why a name of its own and not an override of ``engine``: session fixtures that take
``engine`` (``tiny_llama``) cannot take a module-scoped one, and a parameter on ``engine``
would tear the session's engine down between backends. A test in a marked module that
needs the engine behind its server takes ``server_engine``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("server_backends")
    if marker is None:
        return
    if "engine" in inspect.signature(metafunc.function).parameters:
        # It would get torch's engine while its server runs on another backend.
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid} takes 'engine' in a server_backends module; "
            "take 'server_engine' (the engine behind its server)"
        )
    if "server_engine" in metafunc.fixturenames:
        metafunc.parametrize("server_engine", marker.args, indirect=True, scope="module")


@pytest.fixture(scope="module")
def server_engine(request):
    """The engine the servers here serve: the marker's backend, else torch's."""
    if getattr(request, "param", "torch") == "llamacpp":
        return request.getfixturevalue("llamacpp_engine")
    return request.getfixturevalue("engine")  # the session's (tests/conftest.py)


@contextmanager
def live_server(engine, **options) -> Iterator[str]:
    """Serve ``create_app`` on 127.0.0.1:<free port> in a thread; yields the base URL."""
    from acd_integrations.server import ServerOptions, create_app, serve_in_thread

    with serve_in_thread(create_app(ServerOptions(**options), engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def server_url(server_engine) -> Iterator[str]:
    with live_server(server_engine, max_concurrency=32, defaults={"max_tokens": 16}) as url:
        yield url


@pytest.fixture(scope="module")
def model_id(server_engine) -> str:
    return server_engine.model_name


@pytest.fixture(scope="module")
def start_server(server_engine):
    """``start_server(**options)``: a context manager serving another app on its own port."""
    return lambda **options: live_server(server_engine, **options)
