"""Only the known third-party noise is dropped; everything else those loggers say shows."""

from __future__ import annotations

import logging

import acd_engine  # noqa: F401  # installs the filters on import
from acd_engine.log_noise import NOISE, install_noise_filters


def test_known_noise_is_dropped_and_other_messages_pass(caplog):
    install_noise_filters()  # idempotent: a second call adds no second filter
    for name, fragment in NOISE:
        log = logging.getLogger(name)
        assert sum(type(f).__name__ == "_DropNoise" for f in log.filters) == 1
        with caplog.at_level(logging.WARNING, logger=name):
            caplog.clear()
            log.warning("%s /x/_C_cutlass.so: Could not load this library", fragment)
            log.warning("something a user should see")
        assert [r.getMessage() for r in caplog.records] == ["something a user should see"]
