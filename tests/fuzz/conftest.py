"""Hypothesis profiles for the property tests of bad input.

``ci`` (the default, used by ``make test``) is derandomized, so every run tries the same
cases and a failure reproduces; ``fuzz`` (``make fuzz``) tries many more, at random.
``fuzz-short`` (``make fuzz-short``, which ``.ci/run`` runs after ``make test``) tries as
many cases as ``ci``, but fresh random ones on every run: each CI run samples the same
distribution ``make fuzz`` does, so a case that breaks ``make fuzz`` shows up in CI too,
within a minute or two. A failure there prints the ``@reproduce_failure`` blob to replay it.
Each test module sets its own ``max_examples``, larger when ``HYPOTHESIS_PROFILE=fuzz``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", derandomize=True, deadline=None, database=None, suppress_health_check=_SLOW_OK
)
settings.register_profile("fuzz", deadline=None, print_blob=True, suppress_health_check=_SLOW_OK)
settings.register_profile(
    "fuzz-short", deadline=None, database=None, print_blob=True, suppress_health_check=_SLOW_OK
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
