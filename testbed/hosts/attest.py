"""Host attestation: the host TPM's AK activated against its EK certificate (the
project CA), then a quote over PCRs 0-7, 9 and 14 verified against the host's predicted
policy. Every check is named; a host whose registration or quote fails is untrusted,
with the check that failed.

The lab's verifier state mirrors a cluster's (:mod:`testbed.cluster.verification`):
an AK registry, the clock history (replays and rollbacks are caught across commands)
and the evidence log, all under ``WORKDIR/hosts/`` and the lab's attest lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from attestation.errors import EndorsementError, TestbedError, VerificationError
from attestation.evidence_log import EvidenceLog
from attestation.files import atomic_write, private_dir, read_bounded
from attestation.policy import ReferencePolicy, dump_policy, load_policy
from attestation.registrar import AkRegistry, Registrar, register
from attestation.report import VerificationReport
from attestation.verifier import QuoteVerifier
from testbed.cluster.agent import AgentClient
from testbed.cluster.verification import ClockHistoryStore
from testbed.core.clock import utc_now
from testbed.core.files import MAX_STATE_BYTES, locked, read_json, write_json
from testbed.hosts.layout import HostsError, LabPaths
from testbed.hosts.measured import HOST_BOOT, HOST_PCRS, predicted_host_policy, resolve_stack
from testbed.tpm.localca import LocalCA

__all__ = ["HostVerdict", "attest_host", "host_policy", "load_host_registry", "read_verdicts",
           "record_failure", "register_host", "write_host_policy"]


@dataclass(frozen=True)
class HostVerdict:
    """The outcome of one host attestation (or of its registration)."""

    host: str
    trusted: bool
    failed_check: str | None
    message: str
    policy: str
    time: str
    checks: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "verdict": "trusted" if self.trusted else "untrusted",
                "trusted": self.trusted, "failed_check": self.failed_check,
                "message": self.message, "policy": self.policy, "time": self.time,
                "checks": list(self.checks)}

    @classmethod
    def from_dict(cls, doc: object) -> HostVerdict | None:
        if not isinstance(doc, dict):
            return None
        try:
            return cls(str(doc["host"]), bool(doc["trusted"]),
                       None if doc.get("failed_check") is None else str(doc["failed_check"]),
                       str(doc.get("message", "")), str(doc.get("policy", "")),
                       str(doc.get("time", "")))
        except KeyError:
            return None


def write_host_policy(lab: LabPaths, host: str) -> ReferencePolicy:
    """The host's policy predicted from its boot chain and the lab's reference stack."""
    policy = predicted_host_policy(host, HOST_BOOT, resolve_stack())
    private_dir(lab.policy(host).parent)
    atomic_write(lab.policy(host), dump_policy(policy).encode())
    return policy


def host_policy(lab: LabPaths, host: str) -> ReferencePolicy:
    if not lab.policy(host).is_file():
        raise HostsError(f"host {host} has no policy at {lab.policy(host)}: "
                         "bring it up with `testbed hosts up`")
    return load_policy(lab.policy(host))


def load_host_registry(lab: LabPaths) -> AkRegistry:
    data = read_bounded(lab.registry, MAX_STATE_BYTES, what="AK registry", missing_ok=True)
    return AkRegistry() if data is None else AkRegistry.from_json(data)


def register_host(lab: LabPaths, host: str, agent: AgentClient) -> HostVerdict | None:
    """Activate the host's AK against its EK certificate; a verdict only on refusal."""
    registrar = Registrar(LocalCA(lab.ca_dir).ca_bundle())
    try:
        with locked(lab.attest_lock):
            registry = load_host_registry(lab)
        ak = register(agent, host, registrar, registry)
    except VerificationError as exc:
        return _refused(lab, host, exc.check, exc.reason)
    except EndorsementError as exc:
        return _refused(lab, host, "ek_certificate", str(exc))
    if ak is not None:
        with locked(lab.attest_lock):
            registry = load_host_registry(lab)
            registry.add(host, ak)
            atomic_write(lab.registry, (registry.to_json() + "\n").encode())
    return None


def _refused(lab: LabPaths, host: str, check: str, message: str) -> HostVerdict:
    verdict = HostVerdict(host, False, check, f"registration refused: {message}",
                          "", utc_now())
    _record(lab, verdict)
    return verdict


def attest_host(lab: LabPaths, host: str, agent: AgentClient) -> HostVerdict:
    """A fresh quote over the host agent (SSH), every check run, the verdict recorded."""
    policy = host_policy(lab, host)
    nonce = os.urandom(32)
    evidence = agent.quote(nonce, HOST_PCRS.indices)
    with locked(lab.attest_lock):
        registry = load_host_registry(lab)
        if host not in registry.nodes():
            raise HostsError(f"host {host} is not registered: its AK was never activated "
                             "(`testbed hosts up` registers it)")
        store = ClockHistoryStore(lab.clock_history)
        report = QuoteVerifier(ak_trust=registry.for_node(host), policy=policy,
                               clock_history=store.history).verify(evidence, nonce)
        if report.ok:
            store.remember(evidence)
            store.save()
        private_dir(lab.evidence)
        EvidenceLog(lab.evidence).append(host, nonce, evidence, policy, report, utc_now())
    verdict = _verdict(host, policy, report)
    _record(lab, verdict)
    return verdict


def record_failure(lab: LabPaths, host: str, check: str, message: str) -> HostVerdict:
    """An attestation that produced no report (the host did not answer over SSH, its
    agent failed): recorded as the host's latest verdict, untrusted, so that ``hosts
    status`` and placement stop trusting a host nobody can attest (fail closed)."""
    verdict = HostVerdict(host, False, check, message[:1000], "", utc_now())
    _record(lab, verdict)
    return verdict


def _verdict(host: str, policy: ReferencePolicy, report: VerificationReport) -> HostVerdict:
    failure = report.failure
    checks = tuple({"name": c.name, "state": c.state} for c in report.checks)
    if failure is None:
        return HostVerdict(host, True, None, "every check passed", policy.name, utc_now(),
                           checks)
    return HostVerdict(host, False, failure.name, failure.detail, policy.name, utc_now(),
                       checks)


def _record(lab: LabPaths, verdict: HostVerdict) -> None:
    with locked(lab.attest_lock):
        doc = read_json(lab.attestations)
        doc = doc if isinstance(doc, dict) else {}
        doc[verdict.host] = verdict.to_dict()
        write_json(lab.attestations, doc)


def read_verdicts(lab: LabPaths) -> dict[str, HostVerdict]:
    try:
        doc = read_json(lab.attestations)
    except TestbedError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(h): v for h, d in doc.items() if (v := HostVerdict.from_dict(d)) is not None}
