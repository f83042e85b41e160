"""What a validated peer proved, as a small JSON-ready summary (for reports and demos)."""

from __future__ import annotations

from typing import Any

from attestation.eventlog import parse_event_log
from trusted_passages.interfaces import PeerEvidence

__all__ = ["BINDING_DESCRIPTION", "summarize"]

BINDING_DESCRIPTION = ("TLS 1.3 exporter 'EXPORTER-trusted-passages-v1' + SHA-256 of the "
                       "peer's certificate key")


def summarize(peer: PeerEvidence) -> dict[str, Any]:
    """Who, which PCRs, which policy, which binding, how many events, which checks passed."""
    evidence = peer.evidence
    log = evidence.event_log if evidence else None
    return {"node": peer.node, "node_verified": peer.node_verified, "profile": peer.profile,
            "binding": BINDING_DESCRIPTION,
            "policy": peer.policy_name,
            "pcr_bank": evidence.pcr_bank if evidence else None,
            "pcrs": sorted(evidence.pcrs) if evidence else [],
            "event_log_events": len(parse_event_log(log).events) if log else 0,
            "checks": [c.name for c in peer.report.checks if c.passed]}
