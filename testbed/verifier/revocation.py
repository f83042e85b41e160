"""Revocation events (STUB: H2's module replaces this file; keep the names).

The verifier service calls :func:`publish` after recording each failed attestation.
This placeholder only logs; the real module signs the event and delivers it to every
running node so that channels close and key releases stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from testbed.core.paths import ClusterPaths

__all__ = ["RevocationEvent", "next_sequence", "publish"]

log = logging.getLogger("testbed.verifier.revocation")


@dataclass(frozen=True)
class RevocationEvent:
    node: str
    check: str
    reason: str
    time: str
    sequence: int


def next_sequence(paths: ClusterPaths) -> int:
    """Placeholder: the real module keeps a persisted, increasing counter."""
    return 0


def publish(paths: ClusterPaths, event: RevocationEvent) -> dict[str, str]:
    """Placeholder until the real revocation module: log the event, deliver nothing
    (the real one answers what each node said, by node)."""
    log.warning("revocation of %s in cluster %s (check %s, event %d): not delivered, "
                "revocation module not installed", event.node, paths.name, event.check,
                event.sequence)
    return {}
