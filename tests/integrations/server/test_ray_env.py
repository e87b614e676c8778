"""``app_from_env`` and ``run_ray`` without a Ray cluster.

``app_from_env`` must run exactly what ``acd serve --ray`` with the same flags runs: every
flag of the command has a variable (or a stated reason for none), and for each one the
options built from the variable equal the options the CLI builds from the flag (the module
repeats the CLI's few conversions and defaults, since it may not import the CLI: these
tests are what keeps the two from drifting). ``run_ray``
is driven here with a stand-in ``ray`` module (its order of start and shutdown, its signal
handling); the real deployment is ``test_ray_serve.py`` (``make ray-test``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import types

import pytest

pytest.importorskip("fastapi")

from typer.testing import CliRunner

from acd_engine import ConfigError
from acd_engine.cli.main import app as cli_app
from acd_integrations.ray_proxy import PROXY_CALLBACK_ENV
from acd_integrations.server import ray_serve
from acd_integrations.server.ray_serve import (
    IGNORED_ENV,
    SERVE_ENV,
    EnvSettings,
    settings_from_env,
)

# One value per variable, each different from the flag's default (None: a switch turned on).
SAMPLES: dict[str, str | None] = {
    "model": "/models/my-model",
    "quantize": "int8",
    "backend": "torch",
    "pack": "/models/my-pack.safetensors",
    "require_pack": None,
    "api_key": "sk-test-key",
    "max_concurrency": "7",
    "max_body_bytes": "65536",
    "sse_keepalive": "2.5",
    "cors_origin": "http://localhost:3000",
    "method": "oid",
    "alpha": "0.25",
    "max_tokens": "64",
    "device": "cpu",
    "device_map": "auto",
    "replicas": "3",
    "num_cpus": "0.5",
    "num_gpus": "0.25",
}


def serve_params():
    import typer

    return typer.main.get_command(cli_app).commands["serve"].params


def flag_of(name: str) -> str:
    param = next(p for p in serve_params() if p.name == name)
    return max(param.opts, key=len)


@pytest.fixture()
def cli_settings(monkeypatch):
    """``cli_settings(*flags)``: what ``acd serve --ray <flags>`` hands to ``run_ray``."""

    def run(*flags: str) -> EnvSettings:
        seen: list[EnvSettings] = []

        def fake_run_ray(options, *, replicas, num_cpus, num_gpus):
            seen.append(EnvSettings(options, replicas, num_cpus, num_gpus))

        monkeypatch.setattr(ray_serve, "run_ray", fake_run_ray)
        result = CliRunner().invoke(cli_app, ["serve", "--ray", *flags])
        assert result.exit_code == 0, result.output
        assert len(seen) == 1
        return seen[0]

    return run


def test_every_serve_flag_has_a_variable_or_a_reason_for_none():
    names = {p.name for p in serve_params()}
    ignored = set(IGNORED_ENV)
    assert not set(SERVE_ENV) & ignored
    assert set(SERVE_ENV) | ignored == names, (
        "acd serve's flags and ray_serve.SERVE_ENV / IGNORED_ENV differ: "
        f"{sorted(names ^ (set(SERVE_ENV) | ignored))}"
    )
    # One naming rule, so an operator can guess a variable from the flag: --num-cpus-per-replica
    # -> ACD_NUM_CPUS_PER_REPLICA.
    for name, var in [*SERVE_ENV.items(), *((n, v) for n, (v, _) in IGNORED_ENV.items())]:
        assert var == "ACD_" + flag_of(name).lstrip("-").upper().replace("-", "_")
    assert set(SAMPLES) == set(SERVE_ENV)  # every variable is checked below


def test_no_variable_set_gives_the_cli_defaults(cli_settings):
    assert settings_from_env({}) == cli_settings()


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_variable_sets_what_its_flag_sets(name, cli_settings):
    value = SAMPLES[name]
    flags = [flag_of(name)] if value is None else [flag_of(name), value]
    from_cli = cli_settings(*flags)
    assert from_cli != cli_settings(), f"{flags} changes nothing; pick another sample"
    assert settings_from_env({SERVE_ENV[name]: value or "1"}) == from_cli


def test_all_variables_at_once_equal_all_flags(cli_settings):
    flags: list[str] = []
    env: dict[str, str] = {}
    for name, value in SAMPLES.items():
        flags += [flag_of(name)] if value is None else [flag_of(name), value]
        env[SERVE_ENV[name]] = value or "true"
    settings = settings_from_env(env)
    assert settings == cli_settings(*flags)
    assert settings.options.api_key == "sk-test-key"
    assert settings.options.device_map == "auto" and settings.options.quantize == "int8"
    assert settings.options.defaults == {"method": "oid", "alpha": 0.25, "max_tokens": 64}
    assert (settings.replicas, settings.num_cpus, settings.num_gpus) == (3, 0.5, 0.25)


def test_a_repeatable_flag_takes_a_comma_list(cli_settings):
    origins = "http://localhost:3000, https://app.example"
    settings = settings_from_env({"ACD_CORS_ORIGIN": origins})
    flags = ["--cors-origin", "http://localhost:3000", "--cors-origin", "https://app.example"]
    assert settings == cli_settings(*flags)
    assert settings.options.cors_origins == ("http://localhost:3000", "https://app.example")


@pytest.mark.parametrize("off", ["0", "false", "No", "off", "  "])
def test_a_switch_turned_off_or_empty_is_the_default(off):
    assert settings_from_env({"ACD_REQUIRE_PACK": off}) == settings_from_env({})


def test_bad_values_fail_in_house_style_naming_the_variable():
    with pytest.raises(ConfigError, match=r"^ACD_MAX_CONCURRENCY must be an integer, got 'many'$"):
        settings_from_env({"ACD_MAX_CONCURRENCY": "many"})
    with pytest.raises(ConfigError, match=r"^ACD_ALPHA must be a number, got 'half'$"):
        settings_from_env({"ACD_ALPHA": "half"})
    with pytest.raises(ConfigError, match=r"^ACD_REQUIRE_PACK must be one of 1, true, .*'maybe'"):
        settings_from_env({"ACD_REQUIRE_PACK": "maybe"})
    with pytest.raises(ConfigError, match=r"^ACD_REPLICAS must be >= 1, got 0$"):
        settings_from_env({"ACD_REPLICAS": "0"})
    # Checks past parsing are ServerOptions', with the CLI's own words.
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\), got 1.5"):
        settings_from_env({"ACD_ALPHA": "1.5"})
    with pytest.raises(ConfigError, match="max_concurrency must be >= 1, got 0"):
        settings_from_env({"ACD_MAX_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match=r"^ACD_DEFAULTS must be a JSON object, got '\[1\]'"):
        settings_from_env({"ACD_DEFAULTS": "[1]"})
    with pytest.raises(ConfigError, match=r"^ACD_DEFAULTS must be a JSON object, got '\{nope'"):
        settings_from_env({"ACD_DEFAULTS": "{nope"})
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        settings_from_env({"ACD_DEFAULTS": '{"alpah": 0.3}'})


def test_acd_defaults_adds_request_defaults_and_the_flags_win():
    env = {"ACD_DEFAULTS": '{"temperature": 0.7, "method": "nid", "alpha": 0.3}'}
    assert settings_from_env(env).options.defaults == {
        "temperature": 0.7,
        "method": "nid",  # no ACD_METHOD: the JSON's, not the CLI default
        "alpha": 0.3,
        "max_tokens": 256,  # in neither: the CLI default
    }
    both = settings_from_env({**env, "ACD_METHOD": "plain"})
    assert both.options.defaults["method"] == "plain"
    assert both.options.defaults["alpha"] == 0.3


def test_variables_for_flags_ray_owns_are_logged_as_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger=ray_serve.__name__):
        settings = settings_from_env({"ACD_PORT": "9999", "ACD_HOST": "0.0.0.0"})
    assert settings == settings_from_env({})
    assert "ignoring ACD_PORT" in caplog.text and "http_options.port" in caplog.text
    assert "ignoring ACD_HOST" in caplog.text


def test_app_from_env_builds_the_application_from_the_environment(monkeypatch):
    built = []
    monkeypatch.setattr(ray_serve, "build_application", lambda o, **kw: built.append((o, kw)))
    for var in (*SERVE_ENV.values(), "ACD_DEFAULTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACD_MAX_CONCURRENCY", "5")
    monkeypatch.setenv("ACD_API_KEY", "k")
    monkeypatch.setenv("ACD_REPLICAS", "2")
    ray_serve.app_from_env()
    [(options, layout)] = built
    assert options.max_concurrency == 5 and options.api_key == "k"
    assert layout == {"replicas": 2, "num_cpus": 1.0, "num_gpus": 0.0}


# -- run_ray with a stand-in ray ---------------------------------------------------------------


@pytest.fixture()
def fake_ray(monkeypatch):
    """A ``ray`` / ``ray.serve`` pair that records calls; ``build_application`` stubbed."""
    calls: list[tuple] = []
    ray = types.ModuleType("ray")
    serve = types.ModuleType("ray.serve")
    ray.initialized = False
    ray.is_initialized = lambda: ray.initialized
    ray.init = lambda **kw: calls.append(("ray.init", kw, os.environ.get(PROXY_CALLBACK_ENV)))
    ray.shutdown = lambda: calls.append(("ray.shutdown",))
    serve.start = lambda **kw: calls.append(("serve.start", kw))
    serve.run = lambda app, **kw: calls.append(("serve.run", app, kw))
    serve.shutdown = lambda: calls.append(("serve.shutdown",))
    ray.serve = serve
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.serve", serve)

    def fake_build(options, **kw):
        calls.append(("build", options.max_concurrency, kw))
        return "the-app"

    monkeypatch.setattr(ray_serve, "build_application", fake_build)
    ray.calls = calls
    return ray


def test_run_ray_starts_ray_then_serve_then_the_app(fake_ray, monkeypatch):
    monkeypatch.delenv(PROXY_CALLBACK_ENV, raising=False)
    options = ray_serve.ServerOptions(host="127.0.0.1", port=8123, max_concurrency=3)
    ray_serve.run_ray(options, replicas=2, num_cpus=0.5, num_gpus=0.0, blocking=False)
    layout = {"replicas": 2, "num_cpus": 0.5, "num_gpus": 0.0, "autoscaling_config": None}
    init = {"include_dashboard": False, "logging_level": logging.WARNING}
    assert fake_ray.calls == [
        # The proxy middleware is named before Ray starts, so Ray's processes inherit it.
        ("ray.init", init, "acd_integrations.ray_proxy:proxy_middlewares"),
        ("serve.start", {"http_options": {"host": "127.0.0.1", "port": 8123}}),
        ("build", 3, layout),
        ("serve.run", "the-app", {"name": "acd", "route_prefix": "/", "blocking": False}),
    ]
    # Joining a Ray that is already up (RAY_ADDRESS, a notebook): no second init.
    fake_ray.calls.clear()
    fake_ray.initialized = True
    ray_serve.run_ray(options, replicas=1, num_cpus=1, num_gpus=0, blocking=False)
    assert [c[0] for c in fake_ray.calls] == ["serve.start", "build", "serve.run"]


def test_run_ray_keeps_an_operators_own_proxy_callback_and_says_what_it_costs(
    fake_ray, monkeypatch, caplog
):
    monkeypatch.setenv(PROXY_CALLBACK_ENV, "mine:middlewares")
    with caplog.at_level(logging.WARNING, logger=ray_serve.__name__):
        ray_serve.run_ray(
            ray_serve.ServerOptions(), replicas=1, num_cpus=1, num_gpus=0, blocking=False
        )
    assert fake_ray.calls[0][2] == "mine:middlewares"
    assert "Ray's own 503, not 429" in caplog.text


def test_run_ray_shuts_serve_then_ray_down_on_sigterm(fake_ray, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    sleeps = []

    def sleep(seconds):  # the wait loop's sleep: the first one gets a SIGTERM, as from Kubernetes
        sleeps.append(seconds)
        assert len(sleeps) < 5, "SIGTERM did not end the wait"
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ray_serve.time, "sleep", sleep)
    ray_serve.run_ray(ray_serve.ServerOptions(), replicas=1, num_cpus=1, num_gpus=0)
    assert [c[0] for c in fake_ray.calls] == [
        "ray.init",
        "serve.start",
        "build",
        "serve.run",
        "serve.shutdown",
        "ray.shutdown",
    ]
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


# -- the deployment's limits, with the real ray (no cluster started) -----------------------------


def test_the_deployment_bounds_ongoing_and_queued_requests_by_max_concurrency(monkeypatch):
    pytest.importorskip("ray.serve")
    for var in (*SERVE_ENV.values(), "ACD_DEFAULTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACD_MAX_CONCURRENCY", "6")
    monkeypatch.setenv("ACD_REPLICAS", "3")
    monkeypatch.setenv("ACD_NUM_CPUS_PER_REPLICA", "0.5")
    app = ray_serve.app_from_env()
    deployment = app._bound_deployment
    assert deployment.name == "ACDReplica"
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0}
    # Ray sends a replica no more than the app admits, and queues as many as all 3 take.
    assert deployment.max_ongoing_requests == 6
    assert deployment.max_queued_requests == 18
    [options] = deployment.init_args
    assert ray_serve.ServerOptions(**options).max_concurrency == 6
    scaled = ray_serve.build_application(
        ray_serve.ServerOptions(max_concurrency=2),
        autoscaling_config={"min_replicas": 1, "max_replicas": 4},
    )._bound_deployment
    assert scaled.max_ongoing_requests == 2 and scaled.max_queued_requests == 8
