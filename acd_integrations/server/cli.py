"""What ``acd serve`` runs: options from the command line -> uvicorn (or Ray Serve).

Kept apart from ``acd_engine.cli.main`` so the engine's CLI imports no web framework: the
``serve`` command imports this module only when it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from acd_engine.errors import ConfigError
from acd_engine.install import pip_install_extra
from acd_integrations.server.app import ServerOptions, run_server

__all__ = ["serve"]

logger = logging.getLogger(__name__)


def serve(
    *,
    model: str | None,
    pack: str | None,
    host: str,
    port: int,
    api_key: str | None,
    max_concurrency: int,
    defaults: dict[str, Any],
    device: str = "auto",
    device_map: str | None = None,
    quantize: str = "none",
    backend: str = "auto",
    ray: bool = False,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_body_bytes: int | None = None,
    sse_keepalive: float | None = None,
    cors_origins: Sequence[str] = (),
    require_pack: bool = False,
) -> None:
    """Validate the options, then serve until interrupted.

    Raises:
        ConfigError: A bad option (an out-of-range default alpha, an unknown device map).
    """
    options = ServerOptions(
        model=model,
        pack=pack,
        require_pack=require_pack,
        device=device,
        device_map=device_map,
        quantize=quantize,
        backend=backend,
        host=host,
        port=port,
        api_key=api_key,
        max_concurrency=max_concurrency,
        defaults=defaults,
        cors_origins=tuple(cors_origins),
        # None: the option's own default (acd_integrations.server.transport)
        **{
            name: value
            for name, value in (
                ("max_body_bytes", max_body_bytes),
                ("sse_keepalive", sse_keepalive),
            )
            if value is not None
        },
    )
    if replicas < 1:
        raise ConfigError(f"replicas must be >= 1, got {replicas}")
    if ray:
        try:
            from acd_integrations.server.ray_serve import run_ray
        except ImportError as exc:
            raise ConfigError(
                f"--ray needs the ray extra: {pip_install_extra('ray')} ({exc})"
            ) from None
        run_ray(options, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus)
        return
    run_server(options)
