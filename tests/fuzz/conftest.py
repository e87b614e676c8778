"""Hypothesis profiles for the property tests of bad input.

``ci`` (the default, used by ``make test``) is derandomized, so every run tries the same
cases and a failure reproduces; ``fuzz`` (``make fuzz``) tries many more, at random.
Each test module sets its own ``max_examples``, larger when ``HYPOTHESIS_PROFILE=fuzz``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", derandomize=True, deadline=None, database=None, suppress_health_check=_SLOW_OK
)
settings.register_profile("fuzz", deadline=None, suppress_health_check=_SLOW_OK)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
