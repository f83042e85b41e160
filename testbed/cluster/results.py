"""What the cluster commands return, the same on every backend.

Each result is a dataclass; ``to_dict()`` is its JSON form (the ``--json`` output), in
which a backend's own facts (a sim node's pids, a VM's domain and port) appear beside
the common fields. ``summary_items()`` gives the same facts as (label, value) pairs for
the text rendering, so the command line renders every backend without knowing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from attestation.evidence import Evidence
from attestation.report import VerificationReport
from testbed.core.errors import StateError
from testbed.core.files import tail

__all__ = [
    "AttestResult",
    "AttestationRecord",
    "BackendFacts",
    "DaemonsOutcome",
    "DownResult",
    "EnrollmentOutcome",
    "NodeAction",
    "NodeDown",
    "NodeFacts",
    "NodeStatus",
    "NodeUp",
    "OwnedProcess",
    "ServiceEndpoint",
    "ServiceInfo",
    "UpResult",
]

NodeAction = Literal["started", "kept", "failed"]


class NodeFacts(Protocol):
    """A backend's own facts about one node (in ``up`` and ``status`` results)."""

    def to_dict(self) -> dict[str, Any]: ...

    def summary_items(self) -> list[tuple[str, str]]: ...


BackendFacts = NodeFacts
"""A backend's own facts about a whole ``up`` (the qemu backend's accelerator, image)."""


@dataclass(frozen=True)
class NoFacts:
    def to_dict(self) -> dict[str, Any]:
        return {}

    def summary_items(self) -> list[tuple[str, str]]:
        return []


@dataclass(frozen=True)
class ServiceEndpoint:
    """One listener of a node's role service."""

    protocol: str  # "trusted-passages" | "cvm1"
    host: str
    port: int

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "host": self.host, "port": self.port}


@dataclass(frozen=True)
class ServiceInfo:
    """What a node's role service says about itself: its listeners, counters and facts.

    ``to_dict()`` is both the agent's wire form and the JSON output; ``summary()`` is
    the prose of the text output.
    """

    kind: str  # "trusted-passages" | "cryptovm" | "none"
    endpoints: tuple[ServiceEndpoint, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)  # channels, refused, keys
    facts: Mapping[str, str] = field(default_factory=dict)  # profile, trust, psk file ...

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "endpoints": [e.to_dict() for e in self.endpoints],
                "counts": dict(self.counts), "facts": dict(self.facts)}

    @classmethod
    def from_dict(cls, doc: object) -> ServiceInfo:
        """Strictly: an agent is a process of the cluster, but still a separate one."""
        try:
            if not isinstance(doc, dict):
                raise TypeError
            endpoints = tuple(ServiceEndpoint(_str(e["protocol"]), _str(e["host"]),
                                              _int(e["port"])) for e in doc["endpoints"])
            counts = {_str(k): _int(v) for k, v in doc["counts"].items()}
            facts = {_str(k): _str(v) for k, v in doc["facts"].items()}
            return cls(_str(doc["kind"]), endpoints, counts, facts)
        except (TypeError, KeyError, AttributeError):
            raise StateError("the node's agent described its service in an unexpected "
                             "form") from None

    def summary(self) -> str:
        if self.kind == "none":
            return "none"
        where = ", ".join(f"{e.protocol} on {e.host}:{e.port}" for e in self.endpoints)
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        facts = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.facts.items())
        return f"{self.kind}: {where} ({counts}){'; ' + facts if facts else ''}"


def _str(value: object) -> str:
    if not isinstance(value, str) or len(value) > 4096:
        raise TypeError
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError
    return value


@dataclass(frozen=True)
class AttestationRecord:
    """The outcome of one attestation, as ``attestations.json`` keeps the last per node."""

    ok: bool
    time: str
    policy: str
    failed_check: str | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "time": self.time, "policy": self.policy,
                "failed_check": self.failed_check, "detail": self.detail}

    @classmethod
    def from_dict(cls, doc: object, where: str) -> AttestationRecord:
        if not isinstance(doc, dict):
            raise StateError(f"{where}: not an attestation record")
        ok, time, policy = doc.get("ok"), doc.get("time"), doc.get("policy")
        check, detail = doc.get("failed_check"), doc.get("detail")
        if not (isinstance(ok, bool) and isinstance(time, str) and isinstance(policy, str)
                and isinstance(check, str | None) and isinstance(detail, str | None)):
            raise StateError(f"{where}: damaged attestation record; the next `testbed attest` "
                             "replaces it")
        return cls(ok, time, policy, check, detail)


@dataclass(frozen=True)
class AttestResult:
    """One attestation: the nonce sent, the policy used and every named check."""

    cluster: str
    node: str
    policy: str
    nonce: bytes
    time: str
    report: VerificationReport
    evidence: Evidence | None = None  # what the node sent (for `attest -o DIR`)

    def record(self) -> AttestationRecord:
        failure = self.report.failure
        return AttestationRecord(self.report.ok, self.time, self.policy,
                                 failure.name if failure else None,
                                 failure.detail if failure else None)

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "node": self.node, "policy": self.policy,
                "nonce": self.nonce.hex(), "time": self.time, **self.report.to_dict()}


@dataclass(frozen=True)
class EnrollmentOutcome:
    """Keyless TLS: whether a node got its TLS certificate from the cluster's CryptoVM.

    ``certificate`` and ``ca`` are the documents the node's role service returned.
    """

    ok: bool
    certificate: Mapping[str, Any] | None = None
    ca: Mapping[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if not self.ok:
            return {"ok": False, "error": self.error}
        return {"ok": True, "certificate": self.certificate, "ca": self.ca}


@dataclass
class NodeUp:
    """One node after ``up``: started, kept or failed; registered; attested."""

    name: str
    role: str
    facts: NodeFacts
    action: NodeAction = "started"
    tampered: tuple[str, ...] = ()
    registered: bool = False
    attestation: AttestationRecord | None = None
    service: ServiceInfo | None = None
    enrollment: EnrollmentOutcome | None = None
    error: str | None = None
    log_file: str | None = None  # the node's own log or console, when it failed
    log_tail: str | None = None
    note: str | None = None

    @property
    def attested(self) -> bool | None:
        """True accepted, False rejected, None not attested (failed before)."""
        return None if self.attestation is None else self.attestation.ok

    def fail(self, error: str, log_file: Path | None = None) -> None:
        self.action, self.error = "failed", error
        if log_file is not None:
            self.log_file, self.log_tail = str(log_file), tail(log_file)

    def to_dict(self) -> dict[str, Any]:
        record = self.attestation
        return {"name": self.name, "role": self.role, "action": self.action,
                "registered": self.registered, "attested": self.attested,
                "policy": record.policy if record else None,
                "failed_check": record.failed_check if record else None,
                "detail": record.detail if record else None,
                "tampered": list(self.tampered),
                "service": self.service.to_dict() if self.service else None,
                "enrollment": self.enrollment.to_dict() if self.enrollment else None,
                "error": self.error, "log_file": self.log_file, "log_tail": self.log_tail,
                "note": self.note,
                **self.facts.to_dict()}


@dataclass
class UpResult:
    backend: str
    cluster: str
    directory: Path
    nodes: list[NodeUp]
    seconds: float
    facts: BackendFacts = field(default_factory=NoFacts)

    @property
    def ok(self) -> bool:
        """Every node is up and registered (a rejection is :attr:`rejected`, not a failure)."""
        return all(n.action != "failed" for n in self.nodes)

    @property
    def rejected(self) -> list[str]:
        """Nodes that are up but whose attestation was rejected."""
        return [n.name for n in self.nodes if n.attested is False]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "backend": self.backend, "cluster": self.cluster,
                "directory": str(self.directory), "seconds": round(self.seconds, 1),
                "all_attested": all(n.attested for n in self.nodes),
                "rejected": self.rejected, **self.facts.to_dict(),
                "nodes": [n.to_dict() for n in self.nodes]}


@dataclass(frozen=True)
class NodeStatus:
    name: str
    role: str
    state: str  # sim: running, starting, stopping, failed, crashed, unresponsive, stopped,
    # down; qemu: libvirt's (running, shut off, paused, crashed, ...), missing, down
    reason: str | None  # why it is failed, crashed or unresponsive (None when healthy)
    agent: str | None  # answering | not answering | None (not running)
    service: ServiceInfo | None
    tampered: tuple[str, ...]
    last_attestation: AttestationRecord | None
    facts: NodeFacts

    def to_dict(self) -> dict[str, Any]:
        last = self.last_attestation
        return {"name": self.name, "role": self.role, "state": self.state,
                "reason": self.reason, "agent": self.agent, "tampered": list(self.tampered),
                "service": self.service.to_dict() if self.service else None,
                "last_attestation": last.to_dict() if last else None, **self.facts.to_dict()}


@dataclass(frozen=True)
class OwnedProcess:
    """A live process of a cluster, found in /proc (node, swtpm, qemu)."""

    pid: int
    kind: str
    node: str

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "kind": self.kind, "node": self.node}


@dataclass(frozen=True)
class NodeDown:
    name: str
    stopped_by: str | None = None  # agent | SIGTERM | SIGKILL | libvirt | None (not running)
    swtpm_stopped: bool = False  # sim: its swtpm was stopped from its pid file

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stopped_by": self.stopped_by,
                "swtpm_stopped": self.swtpm_stopped}


@dataclass(frozen=True)
class DaemonsOutcome:
    """What ``down`` did with the libvirt daemons (qemu)."""

    stopped: tuple[str, ...] = ()
    kept_for: tuple[str, ...] = ()  # other running domains that keep them up
    ours: bool = True  # False: this work directory did not start them

    def to_dict(self) -> dict[str, Any]:
        return {"stopped": list(self.stopped), "kept_for": list(self.kept_for),
                "started_by_this_workdir": self.ours}


@dataclass
class DownResult:
    backend: str
    cluster: str
    nodes: list[NodeDown]
    purged: bool
    leftovers: list[OwnedProcess] = field(default_factory=list)
    daemons: DaemonsOutcome | None = None

    @property
    def ok(self) -> bool:
        return not self.leftovers

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "backend": self.backend, "cluster": self.cluster,
                "purged": self.purged, "nodes": [n.to_dict() for n in self.nodes],
                "leftover_pids": [p.pid for p in self.leftovers],
                "leftovers": [p.to_dict() for p in self.leftovers],
                "daemons": self.daemons.to_dict() if self.daemons else None}
