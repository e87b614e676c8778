"""``acd serve --ray``: the same FastAPI app as Ray Serve replicas (extra ``[ray]``).

Each replica is a Ray actor that builds its own app with :func:`create_app` (late-bound
``@serve.ingress``: the app, its engine and its metrics are created on the replica, never
pickled), so each replica loads its own engine and answers ``/health`` 503 until then.
Ray's proxy spreads requests over the replicas; each response names its replica in the
``x-acd-replica`` header.

``app_from_env`` is the import path for a Ray Serve config file (KubeRay ``RayService``):
it reads the model and defaults from ``ACD_*`` environment variables.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

from fastapi import FastAPI

from acd_integrations.server.app import ServerOptions, create_app

__all__ = ["ACDReplica", "app_from_env", "build_application", "run_ray"]

logger = logging.getLogger(__name__)


class ACDReplica:
    """One replica: its own engine and app, built on the replica from plain options."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = ServerOptions(**options)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.options)


def build_application(
    options: ServerOptions,
    *,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    autoscaling_config: dict[str, Any] | None = None,
) -> Any:
    """A bound Ray Serve application of ``replicas`` (or autoscaled) ACD replicas.

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
    }
    if autoscaling_config is not None:
        deployment_options["autoscaling_config"] = autoscaling_config
    else:
        deployment_options["num_replicas"] = replicas
    ingress = serve.ingress()(ACDReplica)
    deployment = serve.deployment(**deployment_options)(ingress)
    return deployment.bind(options.model_dump())


def run_ray(
    options: ServerOptions,
    *,
    replicas: int,
    num_cpus: float,
    num_gpus: float,
    autoscaling_config: dict[str, Any] | None = None,
    blocking: bool = True,
) -> None:
    """Start a local Ray (or join ``RAY_ADDRESS``) and serve on ``options.host:port``."""
    import ray
    from ray import serve

    if not ray.is_initialized():
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
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("acd serve --ray: shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def app_from_env() -> Any:
    """The application for a Ray Serve config file: options from ``ACD_*`` variables.

    ``ACD_MODEL``, ``ACD_PACK``, ``ACD_DEVICE``, ``ACD_MAX_CONCURRENCY`` and
    ``ACD_DEFAULTS`` (a JSON object such as ``{"method": "acd", "alpha": 0.5}``).
    """
    options = ServerOptions(
        model=os.environ.get("ACD_MODEL") or None,
        pack=os.environ.get("ACD_PACK") or None,
        device=os.environ.get("ACD_DEVICE", "auto"),
        max_concurrency=int(os.environ.get("ACD_MAX_CONCURRENCY", "32")),
        defaults=json.loads(os.environ.get("ACD_DEFAULTS", "{}")),
    )
    return build_application(options)
