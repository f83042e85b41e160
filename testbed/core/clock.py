"""Times as the testbed records and prints them: ISO 8601, UTC, to the second."""

from __future__ import annotations

import datetime

__all__ = ["utc_now"]


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
