"""``acd serve --ray``: the same FastAPI app as Ray Serve replicas (extra ``[ray]``).

Each replica is a Ray actor that builds its own app with :func:`create_app` (built on the
replica by :class:`ReplicaApp`: the app, its engine and its metrics are never pickled), so
each replica loads its own engine and answers ``/health`` 503 until then.
Ray's proxy spreads requests over the replicas; each response names its replica in the
``x-acd-replica`` header.

``--max-concurrency`` bounds each replica, and as many requests as all replicas take may
wait in Ray's proxy; one more is answered as without Ray: 429 with ``Retry-After`` in
OpenAI's error shape (:func:`build_application`, :mod:`acd_integrations.ray_proxy`).

``app_from_env`` is the import path for a Ray Serve config file (KubeRay ``RayService``): it
reads every ``acd serve`` flag from an ``ACD_*`` environment variable (:data:`SERVE_ENV`),
and a test holds the options each variable gives equal to those its flag gives.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from fastapi import FastAPI

from acd_engine.errors import ConfigError
from acd_integrations.ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from acd_integrations.server.app import ServerOptions, create_app

__all__ = [
    "DEFAULTS_ENV",
    "IGNORED_ENV",
    "SERVE_ENV",
    "ACDReplica",
    "EnvSettings",
    "ReplicaApp",
    "app_from_env",
    "build_application",
    "run_ray",
    "settings_from_env",
]

logger = logging.getLogger(__name__)

#: Every ``acd serve`` flag a Ray Serve config file sets, by the command's parameter name:
#: the environment variable :func:`app_from_env` reads it from (``ACD_`` and the flag's long
#: name). A value is what the flag takes on the command line; a switch takes 1/true/yes/on
#: or 0/false/no/off; a repeatable flag takes a comma list; an empty variable counts as
#: unset. ``tests/integrations/server/test_ray_env.py`` fails when a flag of ``acd serve``
#: is in neither table, or its variable sets something else than the flag.
SERVE_ENV: dict[str, str] = {
    "model": "ACD_MODEL",
    "quantize": "ACD_QUANTIZE",
    "backend": "ACD_BACKEND",
    "pack": "ACD_PACK",
    "require_pack": "ACD_REQUIRE_PACK",
    "api_key": "ACD_API_KEY",
    "max_concurrency": "ACD_MAX_CONCURRENCY",
    "max_body_bytes": "ACD_MAX_BODY_BYTES",
    "sse_keepalive": "ACD_SSE_KEEPALIVE",
    "cors_origin": "ACD_CORS_ORIGIN",
    "method": "ACD_METHOD",
    "alpha": "ACD_ALPHA",
    "max_tokens": "ACD_MAX_TOKENS",
    "device": "ACD_DEVICE",
    "device_map": "ACD_DEVICE_MAP",
    "replicas": "ACD_REPLICAS",
    "num_cpus": "ACD_NUM_CPUS_PER_REPLICA",
    "num_gpus": "ACD_NUM_GPUS_PER_REPLICA",
}

#: ``acd serve`` flags no variable sets, with the reason; a variable named for one is
#: logged as ignored rather than silently dropped.
IGNORED_ENV: dict[str, tuple[str, str]] = {
    "host": ("ACD_HOST", "the address is Ray Serve's: http_options.host of the config file"),
    "port": ("ACD_PORT", "the port is Ray Serve's: http_options.port of the config file"),
    "ray": ("ACD_RAY", "app_from_env always builds the Ray Serve application"),
}

#: Request defaults beyond the flags: a JSON object in adapter names, such as
#: ``{"temperature": 0.7, "gate_threshold": 0.9}``. ``ACD_METHOD``, ``ACD_ALPHA`` and
#: ``ACD_MAX_TOKENS`` win over the same keys here.
DEFAULTS_ENV = "ACD_DEFAULTS"

# How `acd serve` turns its flags into ServerOptions (acd_engine/cli/main.py serve_command, then
# server/cli.py serve), repeated here because this module may not import the CLI (it imports
# this one); test_ray_env.py holds the two equal for every flag and for none set. These
# flags become the request defaults; these shape the deployment, not a replica's app; these
# are named otherwise in ServerOptions; these are not text; and the CLI's defaults where
# they are not ServerOptions' own.
_REQUEST_DEFAULT_FLAGS = ("method", "alpha", "max_tokens")
_DEPLOYMENT_FLAGS = ("replicas", "num_cpus", "num_gpus")
_OPTION_NAMES = {"cors_origin": "cors_origins"}
_KINDS = {
    "require_pack": "switch",
    "max_concurrency": "int",
    "max_body_bytes": "int",
    "sse_keepalive": "float",
    "cors_origin": "list",
    "alpha": "float",
    "max_tokens": "int",
    "replicas": "int",
    "num_cpus": "float",
    "num_gpus": "float",
}
_CLI_DEFAULTS: dict[str, Any] = {
    "method": "acd",
    "alpha": 0.5,
    "max_tokens": 256,
    "replicas": 1,
    "num_cpus": 1.0,
    "num_gpus": 0.0,
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ACDReplica:
    """One replica (Ray Serve wraps this class with :class:`ReplicaApp` as its ingress)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = ServerOptions(**options)


class ReplicaApp:
    """The ASGI app of the ingress: builds the real app on the replica, when first used.

    ``@serve.ingress(app)`` pickles ``app`` in the driver and unpickles it on each replica.
    The real app cannot travel that way (its metrics hold locks, its engine a model), and
    older Ray releases (2.46 among them) have no hook to build one on the replica. This
    stand-in carries plain options and builds the app on the replica, the first time Ray
    touches it there (Ray's replica adds its exception handlers to the app, then runs its
    lifespan startup, which starts loading the engine); so each replica loads its own
    engine and answers ``/health`` 503 until then. Everything else is the real app's.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        self._app: FastAPI | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_options": self._options, "_app": None}  # never a built app

    def _built(self) -> FastAPI:
        if self._app is None:
            self._app = create_app(ServerOptions(**self._options))
        return self._app

    def __getattr__(self, name: str) -> Any:
        # Only for names this object lacks; private ones (pickling's probes, our own fields
        # before unpickling sets them) are never the app's.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._built(), name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._built()(scope, receive, send)


def build_application(
    options: ServerOptions,
    *,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    autoscaling_config: dict[str, Any] | None = None,
) -> Any:
    """A bound Ray Serve application of ``replicas`` (or autoscaled) ACD replicas.

    The queue bound: Ray's router sends a replica at most ``max_ongoing_requests`` =
    ``options.max_concurrency`` requests (the app's own bound, so a replica never refuses
    what Ray sent it while another one is free); the rest wait in Ray's proxy for a free
    replica. Ray counts a request as queued from its arrival until a replica takes it,
    routing included, so the queue (``max_queued_requests``, per proxy: one per node) holds
    as many as all replicas take at once: replicas x ``max_concurrency`` (with autoscaling,
    ``max_replicas`` x); a smaller one would refuse a burst the replicas could take. One
    request more is refused by Ray, and ``acd_integrations.ray_proxy`` turns that refusal
    into the 429 with ``Retry-After`` that ``acd serve`` documents.

    Args:
        options: The server options every replica uses (host and port are Ray's, not these).
        replicas: Fixed replica count (ignored when ``autoscaling_config`` is given).
        num_cpus: CPUs reserved per replica (fractions allowed: 0.5 packs two per core).
        num_gpus: GPUs per replica (0.5 packs two replicas on one GPU).
        autoscaling_config: Passed through to ``@serve.deployment`` unchanged.
    """
    from ray import serve

    deployment_options: dict[str, Any] = {
        "name": "ACDReplica",
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": options.max_concurrency,
        "max_queued_requests": _most_replicas(replicas, autoscaling_config)
        * options.max_concurrency,
    }
    if autoscaling_config is not None:
        deployment_options["autoscaling_config"] = autoscaling_config
    else:
        deployment_options["num_replicas"] = replicas
    plain = options.model_dump()
    ingress = serve.ingress(ReplicaApp(plain))(ACDReplica)
    deployment = serve.deployment(**deployment_options)(ingress)
    return deployment.bind(plain)


def _most_replicas(replicas: int, autoscaling_config: dict[str, Any] | None) -> int:
    if autoscaling_config is None:
        return max(1, replicas)
    return max(1, int(autoscaling_config.get("max_replicas", 1)))


def run_ray(
    options: ServerOptions,
    *,
    replicas: int,
    num_cpus: float,
    num_gpus: float,
    autoscaling_config: dict[str, Any] | None = None,
    blocking: bool = True,
) -> None:
    """Start a local Ray (or join ``RAY_ADDRESS``) and serve on ``options.host:port``.

    A local Ray's proxy gets :mod:`acd_integrations.ray_proxy` (a full queue is a 429);
    a cluster's nodes need ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in their own
    environment. With ``blocking`` it waits until Ctrl-C or SIGTERM, then shuts Serve and
    Ray down.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        _use_proxy_callback(os.environ)  # before ray.init: Ray's processes inherit it
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": options.host, "port": options.port})
    app = build_application(
        options,
        replicas=replicas,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        autoscaling_config=autoscaling_config,
    )
    logger.info(
        "acd serve --ray: %d replica(s) at http://%s:%s/v1", replicas, options.host, options.port
    )
    serve.run(app, name="acd", route_prefix="/", blocking=False)
    if not blocking:
        return
    # Our own wait, not serve.run(blocking=True): on Ctrl-C or SIGTERM (what Kubernetes
    # and process managers send) we shut Serve and the local Ray down in order ourselves,
    # so no replica or raylet outlives the command.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("acd serve --ray: shutting down")
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        ray.shutdown()


def _use_proxy_callback(environ: Any) -> None:
    """Name ACD's proxy middleware for Ray's proxies, unless the operator named their own."""
    current = environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    if current != PROXY_CALLBACK:
        logger.warning(
            "%s=%s: Ray's proxy runs that instead of %s, so a full queue is answered with "
            "Ray's own 503, not 429",
            PROXY_CALLBACK_ENV,
            current,
            PROXY_CALLBACK,
        )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class EnvSettings(NamedTuple):
    """What ``acd serve --ray`` with the variables' flags would run: options and layout."""

    options: ServerOptions
    replicas: int
    num_cpus: float
    num_gpus: float


def settings_from_env(environ: Mapping[str, str]) -> EnvSettings:
    """The options ``acd serve --ray`` builds from the flags that ``environ`` names.

    An unset (or empty) variable leaves its flag at the CLI's default.

    Raises:
        ConfigError: A bad value, named by its variable (``ACD_PORT``-like variables are
            logged and ignored).
    """
    values: dict[str, Any] = {}
    for name, var in SERVE_ENV.items():
        raw = environ.get(var, "").strip()
        if raw:
            values[name] = _parse(var, raw, _KINDS.get(name, "text"))
    for var, reason in IGNORED_ENV.values():
        if environ.get(var, "").strip():
            logger.warning("ignoring %s: %s", var, reason)
    defaults = _json_defaults(environ)
    for name in _REQUEST_DEFAULT_FLAGS:
        if name in values:
            defaults[name] = values.pop(name)
        elif name not in defaults:
            defaults[name] = _CLI_DEFAULTS[name]
    layout = {name: values.pop(name, _CLI_DEFAULTS[name]) for name in _DEPLOYMENT_FLAGS}
    if layout["replicas"] < 1:  # the check server/cli.py makes for --replicas
        raise ConfigError(f"{SERVE_ENV['replicas']} must be >= 1, got {layout['replicas']}")
    fields = {_OPTION_NAMES.get(k, k): v for k, v in values.items()}
    return EnvSettings(ServerOptions(**fields, defaults=defaults), **layout)


def _parse(var: str, raw: str, kind: str) -> Any:
    """One variable's text as its flag's value."""
    if kind == "switch":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"{var} must be one of {', '.join(_TRUE + _FALSE)}, got {raw!r}")
    if kind == "list":
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if kind in ("int", "float"):
        try:
            return int(raw) if kind == "int" else float(raw)
        except ValueError:
            what = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"{var} must be {what}, got {raw!r}") from None
    return raw


def _json_defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    raw = environ.get(DEFAULTS_ENV, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{DEFAULTS_ENV} must be a JSON object, got {raw!r} ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{DEFAULTS_ENV} must be a JSON object, got {raw!r}")
    return value


def app_from_env() -> Any:
    """The application for a Ray Serve config file: ``acd serve`` flags from ``ACD_*``.

    Each flag's variable is in :data:`SERVE_ENV` (``ACD_MODEL``, ``ACD_PACK``,
    ``ACD_DEVICE_MAP``, ``ACD_QUANTIZE``, ``ACD_API_KEY``, ``ACD_MAX_CONCURRENCY``,
    ``ACD_METHOD``...); :data:`DEFAULTS_ENV` adds request defaults. ``num_replicas`` and
    ``ray_actor_options`` in the config file override ``ACD_REPLICAS`` and the per-replica
    CPUs and GPUs.
    """
    settings = settings_from_env(os.environ)
    return build_application(
        settings.options,
        replicas=settings.replicas,
        num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus,
    )
