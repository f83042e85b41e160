"""Shared fixtures. The swtpm fixtures come from the project's pytest plugin
(testbed.tpm.pytest_plugin, registered as a pytest11 entry point)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# The real-VM tests' shared set-up asserts too: pytest explains its failed asserts as it
# does a test's (registered before any test module imports it).
pytest.register_assert_rewrite("tests.vm_lab")

# Property tests take their number of cases from one profile, picked by HYPOTHESIS_PROFILE:
# "ci" (the default) keeps every property test of the suite at about a minute in total;
# "dev" is quicker still; "long" is what bench/fuzz_long.py uses (>= 10,000 per property).
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=250, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("dev", max_examples=30, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("long", max_examples=10_000, database=None,
                          **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def nonce() -> bytes:
    return os.urandom(32)
