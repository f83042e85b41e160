"""Shared fixtures. The swtpm fixtures come from the project's pytest plugin
(testbed.tpm.pytest_plugin, registered as a pytest11 entry point)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def nonce() -> bytes:
    return os.urandom(32)
