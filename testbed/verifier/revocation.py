"""Revocation that acts: the verifier's signed decisions, delivered to every running node.

:func:`publish` signs a :class:`RevocationEvent` (or a :class:`Reinstate`) with the
verifier's Ed25519 key and hands it to every running node's agent as the role action
``revoked`` (``reinstated``), all nodes at once, each within :data:`DELIVERY_TIMEOUT_S`.
Each node verifies and applies it (:mod:`testbed.roles.revocation`): Trusted Passages
services close every channel to or from the revoked node and refuse new ones, the
CryptoVM refuses it releases and enrollments and lists it in its revocation list.

The key is made on first use in ``clusters/C/verifier/`` (private key 0600 in a 0700
directory; the public key beside it, which nodes pin at the first decision they accept).
Sequences come from :func:`next_sequence` (a counter in the same directory, under its
lock); a service allocating its own keeps them increasing: :func:`publish` raises the
counter to every sequence it signs. Reinstatement is never automatic: only
:func:`reinstate` (``testbed reinstate NODE``), an operator's decision.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from attestation.errors import TestbedError
from attestation.files import private_dir
from testbed.backends import open_backend
from testbed.core.clock import utc_now
from testbed.core.errors import StateError
from testbed.core.files import locked, read_json, write_json
from testbed.core.paths import ClusterPaths
from testbed.roles.revocation import (  # the key lives there: VMs get it at `up`
    PUBLIC_KEY,
    Decision,
    Reinstate,
    RevocationEvent,
    decision_args,
    encode_decision,
    record_decision,
    signing_key,
    verifier_key_dir,
)
from testbed.verifier.hosts import host_of, validate_host_row

__all__ = [
    "DELIVERY_TIMEOUT_S",
    "Reinstate",
    "RevocationEvent",
    "next_sequence",
    "public_key_file",
    "publish",
    "reinstate",
    "revoke",
    "signing_key",
]

DELIVERY_TIMEOUT_S = 1.0
SEQUENCE = "sequence.json"


def next_sequence(paths: ClusterPaths) -> int:
    """The next decision's sequence number (persisted, increasing)."""
    return _bump(paths, None)


def _bump(paths: ClusterPaths, used: int | None) -> int:
    directory = private_dir(verifier_key_dir(paths))
    with locked(directory / ".lock"):
        doc = read_json(directory / SEQUENCE) or {}
        last = doc.get("sequence", 0) if isinstance(doc, dict) else 0
        if not isinstance(last, int) or isinstance(last, bool):
            raise StateError(f"{directory / SEQUENCE} is damaged")
        value = last + 1 if used is None else max(last, used)
        write_json(directory / SEQUENCE, {"sequence": value})
    return value


def publish(paths: ClusterPaths, event: Decision) -> dict[str, str]:
    """Sign ``event`` and deliver it to every running node; what each node answered
    (``applied``, ``replay``, or the error), by node."""
    signature = signing_key(paths).sign(encode_decision(event))
    _bump(paths, event.sequence)
    try:
        record_decision(paths, event, signature)  # re-sent to a VM when it (re)starts
    except StateError as exc:  # deliver all the same: the running nodes must act now
        answers = _deliver(paths, event, signature)
        raise StateError(f"{exc}; the decision was delivered to the running nodes "
                         f"({answers}) but is not kept for VMs that restart") from None
    return _deliver(paths, event, signature)


def _deliver(paths: ClusterPaths, event: Decision, signature: bytes) -> dict[str, str]:
    args = decision_args(event, signature)
    nodes = paths.node_names()
    if not nodes:
        return {}
    backend = open_backend(paths)

    def deliver(node: str) -> str:
        try:
            agent = backend.agent(node, timeout=DELIVERY_TIMEOUT_S)
            answer = agent.role(event.kind, args)
        except TestbedError as exc:
            return f"error: {exc}"
        return "applied" if answer.get("applied") else "replay"

    try:
        with ThreadPoolExecutor(min(len(nodes), 16), thread_name_prefix="revocation") as pool:
            return dict(zip(nodes, pool.map(deliver, nodes), strict=True))
    finally:
        backend.close()


def revoke(paths: ClusterPaths, node: str, check: str, reason: str
           ) -> tuple[RevocationEvent, dict[str, str]]:
    """A node failed ``check``: sign and publish its revocation."""
    _check_name(paths, node)
    event = RevocationEvent(node, check, reason, utc_now(), next_sequence(paths))
    return event, publish(paths, event)


def reinstate(paths: ClusterPaths, node: str, reason: str = "operator decision"
              ) -> tuple[Reinstate, dict[str, str]]:
    """The explicit policy decision that trusts ``node`` again, published to every node."""
    _check_name(paths, node)
    decision = Reinstate(node, reason, utc_now(), next_sequence(paths))
    return decision, publish(paths, decision)


def _check_name(paths: ClusterPaths, node: str) -> None:
    """A clear error for a name that is neither a node nor a host row (``host:host1``)."""
    if host_of(node) is not None:
        validate_host_row(node)
    else:
        paths.node(node)


def public_key_file(paths: ClusterPaths) -> Path:
    return verifier_key_dir(paths) / PUBLIC_KEY
