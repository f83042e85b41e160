"""Times as the testbed records and prints them: ISO 8601, UTC, to the second."""

from __future__ import annotations

import datetime

__all__ = ["iso_utc", "utc_now"]


def utc_now() -> str:
    """Now, in the one time format of every output: ISO 8601 UTC, ``2026-12-05T06:00:00Z``."""
    return iso_utc(datetime.datetime.now(datetime.UTC).timestamp())


def iso_utc(seconds: float) -> str:
    """A Unix time in the output format (whole seconds, ``Z``)."""
    moment = datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
