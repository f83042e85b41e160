"""Hypervisor hosts in the verifier service (docs/verifier.md, "Hosts").

A host of the lab (``WORKDIR/hosts/``, :mod:`testbed.hosts`) is a row of the verifier's
store named ``host:NAME`` (a cluster node's name cannot hold a ``:``), claimed and
leased like a pull node and attested over the host agent's SSH session
(:func:`testbed.hosts.attest.attest_host`, which also records the host's latest verdict
for ``testbed hosts status`` and placement). :class:`HostAttesters` keeps one SSH
session per host open across ticks and drops it after a failure, so the next tick
reconnects.

A host that fails makes every VM placed on it (the spec's ``host:`` field) untrusted:
:func:`host_marks` is that decision, one failed outcome per VM with check ``host`` and
reason ``HOST failed CHECK``; :func:`on_failed_host` keeps a VM's own attestations
failing while its host stays failed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from attestation.errors import EvidenceFormatError, TestbedError
from testbed.cluster.agent import AgentClient, AgentError, AgentUnavailable
from testbed.core.errors import ArgumentError
from testbed.hosts.attest import attest_host, record_failure
from testbed.hosts.layout import LabPaths, LabState, host_index
from testbed.hosts.remote import HostUnreachable, SshSession, agent_client
from testbed.spec.cluster_spec import ClusterSpec
from testbed.verifier.store import HOST_CHECK, UNREACHABLE_CHECK, Outcome

__all__ = ["CONNECT_S", "HOST_PREFIX", "HostAttesters", "host_marks", "host_of", "host_row",
           "on_failed_host", "placement", "validate_host_row"]

HOST_PREFIX = "host:"
CONNECT_S = 10.0  # a fresh session: the SSH login and the agent's start, until it answers
FAILED_STATES = ("rejected", "unreachable")


def host_row(host: str) -> str:
    """The store row (and event node) of ``host``: ``host:host1``."""
    return HOST_PREFIX + host


def host_of(row: str) -> str | None:
    """The host a store row stands for, None for a cluster node."""
    return row[len(HOST_PREFIX):] if row.startswith(HOST_PREFIX) else None


def validate_host_row(row: str) -> str:
    """``row``'s host name, or ArgumentError (``testbed reinstate host:host9``)."""
    host = host_of(row)
    if host is None:
        raise ArgumentError(f"{row!r} is not a host row (host:NAME)")
    host_index(host)
    return host


def placement(spec: ClusterSpec) -> dict[str, str]:
    """VM -> the host it runs on, for the spec's nodes that name one."""
    return {node.name: node.host for node in spec.nodes if node.host is not None}


def failed_reason(host: str, check: str) -> str:
    return f"{host} failed {check or 'attestation'}"


def host_marks(spec: ClusterSpec, failed: Outcome) -> list[Outcome]:
    """The decision when a host fails: one failed outcome per VM placed on it (mode
    ``host``: no quote of the VM was taken), check ``host``, reason naming the host and
    the check it failed. Empty for a host that passed or a row that is no host."""
    host = host_of(failed.node)
    if host is None or failed.ok:
        return []
    reason = failed_reason(host, failed.check)
    return [Outcome(vm, False, HOST_CHECK, reason, failed.finished, failed.finished, "host")
            for vm, on in sorted(placement(spec).items()) if on == host]


def on_failed_host(outcome: Outcome, host: str, check: str) -> Outcome:
    """A VM's own attestation while its host is failed: failed with check ``host`` (a
    good quote from a VM on a compromised hypervisor proves nothing), its own verdict
    kept in the reason."""
    own = "ok" if outcome.ok else f"FAIL {outcome.check}"
    return Outcome(outcome.node, False, HOST_CHECK,
                   f"{failed_reason(host, check)} (its own attestation: {own})",
                   outcome.started, outcome.finished, outcome.mode)


def lab_hosts(lab: LabPaths) -> list[str]:
    """The hosts the lab made (none without a lab)."""
    state = LabState.load(lab)
    return [] if state is None else sorted(state.hosts)


def _failed_check(exc: TestbedError) -> str:
    if isinstance(exc, AgentUnavailable | AgentError | HostUnreachable):
        return UNREACHABLE_CHECK
    return "evidence" if isinstance(exc, EvidenceFormatError) else "verifier"


@dataclass
class HostAttesters:
    """The verifier's SSH sessions to the lab's hosts: one per host, kept open across
    ticks, dropped after a failure (the next attestation reconnects). One attestation per
    host at a time (the service's in-flight set), so a session has one user."""

    lab: LabPaths
    _sessions: dict[str, tuple[SshSession, AgentClient]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def attest(self, host: str, timeout: float) -> Outcome:
        """Attest ``host`` (each read bounded by ``timeout``; the SSH login by the
        lab's own timeout); never raises: a failure is a failed outcome, recorded as
        the host's latest verdict too."""
        row, started = host_row(host), time.time()
        try:
            verdict = attest_host(self.lab, host, self._agent(host, timeout))
        except TestbedError as exc:
            self.drop(host)
            check = _failed_check(exc)
            record_failure(self.lab, host, check, str(exc))
            return Outcome(row, False, check, str(exc), started, time.time())
        if verdict.trusted:
            return Outcome(row, True, "", "", started, time.time())
        return Outcome(row, False, verdict.failed_check or "verifier", verdict.message,
                       started, time.time())

    def _agent(self, host: str, timeout: float) -> AgentClient:
        with self._lock:
            pair = self._sessions.get(host)
        if pair is not None:
            return pair[1]
        state = LabState.load(self.lab)
        if state is None or host not in state.hosts:
            raise HostUnreachable(f"host {host} is no longer in the lab")
        session = SshSession(state.hosts[host].address, self.lab)
        agent = agent_client(session, host, timeout)
        with self._lock:
            self._sessions[host] = (session, agent)
        # The agent process starts with the session (Python, the TPM stack): once,
        # bounded apart, so that each quote then has its own deadline.
        agent.with_timeout(CONNECT_S).status()
        return agent

    def drop(self, host: str) -> None:
        with self._lock:
            pair = self._sessions.pop(host, None)
        if pair is not None:
            pair[0].close()

    def keep(self, hosts: list[str]) -> None:
        """Close the sessions of hosts no longer in the lab."""
        for host in set(self._sessions) - set(hosts):
            self.drop(host)

    def close(self) -> None:
        for host in list(self._sessions):
            self.drop(host)
