"""The event stream read back: what ``testbed events [--follow]`` prints."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from testbed.core.clock import iso_utc
from testbed.verifier.store import Event, Store

__all__ = ["describe", "follow"]

POLL_S = 0.2


def describe(event: Event) -> str:
    """One line for people: ``#12 2026-12-05T06:00:00Z server attestation FAIL policy``."""
    verdict = "ok" if event.ok else f"FAIL {event.check}"
    what = event.reason if event.kind == "state" else verdict
    detail = f" ({event.reason[:200]})" if event.kind == "attestation" and not event.ok \
        and event.reason else ""
    return (f"#{event.seq} {iso_utc(event.time)} {event.node} {event.kind} {what}{detail} "
            f"[{event.mode}, {event.verifier}]")


def follow(store: Store, after: int, stop: threading.Event | None = None,
           poll: float = POLL_S) -> Iterator[Event]:
    """Every event after ``after``, then each new one as it is recorded, until ``stop``."""
    stop = stop or threading.Event()
    while not stop.is_set():
        batch = store.events_after(after)
        yield from batch
        if batch:
            after = batch[-1].seq
        else:
            stop.wait(poll)
