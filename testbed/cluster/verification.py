"""Attesting a node, written once for every backend: a fresh nonce, a quote over the
node's agent, every check of the verifier against the cluster's AK registry, the node's
policy and the cluster's clock history, and the result recorded.

The clock history is the last accepted TPMS_ATTEST per AK, persisted and used under the
cluster's attest lock, so replays and clock rollbacks are caught across commands (and
concurrent ones). Every verification, accepted or not, is appended under the same lock
to the cluster's evidence log (:mod:`attestation.evidence_log`, ``evidence/``), which
``testbed evidence replay`` re-verifies.

A node whose vTPM was made on a hypervisor host is judged on two layers: the quote, and
the host's latest attestation, by the checks the hosts room registers here
(:func:`register_host_check`; ``host_attestation``, :mod:`testbed.hosts.deep`), and its
EK certificate chains through that host's intermediate CA (:func:`register_ek_links`,
:func:`ek_ca_bundle`): the cluster layer sits below the hosts and cannot import them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, TestbedError, VerificationError
from attestation.evidence import Evidence
from attestation.evidence_log import EvidenceLog, LoggedRuntime, RuntimeSlice
from attestation.ima import IMA_PCR, RuntimePolicy
from attestation.policy import ReferencePolicy
from attestation.report import NOT_RUN, CheckResult, VerificationReport, run_checks
from attestation.tpm_types import parse_attest, parse_public
from attestation.verifier import ClockHistory, QuoteVerifier
from testbed.cluster.agent import AgentClient
from testbed.cluster.results import AttestResult
from testbed.cluster.runtime import (
    RuntimeState,
    RuntimeWindow,
    agent_reader,
    judge_window,
    node_runtime_policy,
    quoting_pcr10,
    runtime_window,
)
from testbed.cluster.state import load_registry, record_attestation
from testbed.core.clock import utc_now
from testbed.core.errors import StateError
from testbed.core.files import locked, read_json, write_json
from testbed.core.paths import ClusterPaths
from testbed.tpm.localca import LocalCA
from trusted_passages.batch import BatchProof
from trusted_passages.tpm import verify_batched

__all__ = ["ClockHistoryStore", "EkLinks", "HostCheck", "RuntimeInput", "attest_node",
           "ek_ca_bundle", "evidence_dir", "register_ek_links", "register_host_check",
           "verify_evidence"]

_HISTORY_FORMAT = "testbed-clock-history"

HostCheck = Callable[[ClusterPaths, str], CheckResult | None]
"""A check of the layer beneath a node (its host): a result, or None for a node on none."""
_HOST_CHECKS: list[HostCheck] = []


def register_host_check(check: HostCheck) -> None:
    """Run ``check`` on every verification of a node (idempotent)."""
    if check not in _HOST_CHECKS:
        _HOST_CHECKS.append(check)


EkLinks = Callable[[Path], list[x509.Certificate]]
"""Extra EK path links of a work directory (the intermediates of attested hosts)."""
_EK_LINKS: list[EkLinks] = []


def register_ek_links(provider: EkLinks) -> None:
    """Offer ``provider``'s certificates as EK path links to every registration."""
    if provider not in _EK_LINKS:
        _EK_LINKS.append(provider)


def ek_ca_bundle(paths: ClusterPaths, ca: LocalCA) -> list[x509.Certificate]:
    """What a cluster's registrar validates EK certificates with: the work directory's EK
    CA (its self-signed root is the only anchor) and the registered path links."""
    bundle = ca.ca_bundle()
    for provider in _EK_LINKS:
        bundle.extend(provider(paths.workdir))
    return bundle


def _with_host_layer(report: VerificationReport, paths: ClusterPaths,
                     node: str) -> VerificationReport:
    """The report plus the host checks that apply to ``node``; a check that cannot decide
    fails (closed)."""
    extra = []
    for check in _HOST_CHECKS:
        try:
            result = check(paths, node)
        except TestbedError as exc:
            result = CheckResult("host_attestation", "failed",
                                 f"the host layer of node {node} cannot be judged: {exc}")
        if result is not None:
            extra.append(result)
    return VerificationReport((*report.checks, *extra)) if extra else report


class ClockHistoryStore:
    """A :class:`ClockHistory` persisted as the last accepted TPMS_ATTEST per AK.

    Only public ClockHistory methods are used: loading re-records each stored quote,
    which restores exactly the state the verifier had after accepting it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history = ClockHistory()
        self._attests: dict[str, str] = {}
        doc = read_json(self.path)
        if doc is None:
            return
        if not isinstance(doc, dict) or doc.get("format") != _HISTORY_FORMAT \
                or not isinstance(doc.get("aks"), dict):
            raise StateError(f"{path} is not a clock history file")
        for name_hex, attest_b64 in doc["aks"].items():
            self._restore(str(name_hex), attest_b64)

    def _restore(self, name_hex: str, attest_b64: object) -> None:
        try:
            raw = b64decode(attest_b64, "attest")
            self.history.record(bytes.fromhex(name_hex), parse_attest(raw).clock_info, raw)
        except (ValueError, EvidenceFormatError) as exc:
            raise StateError(f"{self.path}: entry {name_hex[:16]} is corrupt: {exc}") from None
        self._attests[name_hex] = b64encode(raw)

    def remember(self, evidence: Evidence) -> None:
        self._attests[parse_public(evidence.ak_public).name.hex()] = b64encode(evidence.attest)

    def save(self) -> None:
        write_json(self.path, {"format": _HISTORY_FORMAT, "version": 1, "aks": self._attests})


def evidence_dir(paths: ClusterPaths) -> Path:
    """Where the cluster's evidence log lives."""
    return paths.root / "evidence"


@dataclass(frozen=True)
class RuntimeInput:
    """The ``runtime`` check's inputs: the node's runtime policy and its log
    (``read(offset)``: over a pull node's agent, or the slice a push node sent)."""

    policy: RuntimePolicy
    read: Callable[[int], bytes]


def verify_evidence(paths: ClusterPaths, node: str, evidence: Evidence, nonce: bytes,
                    policy: ReferencePolicy, proof: BatchProof | None = None,
                    runtime: RuntimeInput | None = None) -> VerificationReport:
    """Verify evidence claimed to come from ``node`` with the cluster's registry and history.

    ``proof``: the quote is a batch's (a node whose quotes are batched) and this is the
    nonce's inclusion path: checked as ``batch_inclusion``, the leaf being ``nonce``.
    ``runtime``: also run the incremental ``runtime`` check (``docs/runtime.md``) on a
    quote that passed every other check. The evidence log records the verdict, the
    runtime check's included, with what re-verifies it offline.
    """
    registry = load_registry(paths)
    if node not in registry.nodes():
        raise StateError(f"node {node} is not registered in cluster {paths.name}: its AK was "
                         "never activated (run `testbed up`)")
    # Read the log before taking the cluster-wide lock (it may be a round trip to the node).
    window = None if runtime is None else _gather(paths, node, runtime, evidence)
    with locked(paths.attest_lock):
        store = ClockHistoryStore(paths.clock_history)
        verifier = QuoteVerifier(ak_trust=registry.for_node(node), policy=policy,
                                 clock_history=store.history)
        report = verifier.verify(evidence, nonce) if proof is None else \
            verify_batched(verifier, evidence, nonce, proof)
        if report.ok:
            store.remember(evidence)
            store.save()
        logged = None
        if runtime is not None:
            report, logged = _with_runtime(report, runtime.policy, window)
        EvidenceLog(evidence_dir(paths)).append(
            node, nonce, evidence, policy, report, utc_now(),
            batch=None if proof is None else proof.to_dict(), runtime=logged)
    if isinstance(window, RuntimeWindow) and report.ok:  # the next check starts after it
        RuntimeState(window.boot, window.end, window.quoted).save(paths, node)
    # After the evidence log: it records what the quote proves (and replays to that); the
    # host's own verdicts are in the hosts lab's evidence log.
    return _with_host_layer(report, paths, node)


def _gather(paths: ClusterPaths, node: str, runtime: RuntimeInput,
            evidence: Evidence) -> RuntimeWindow | VerificationError:
    try:
        return runtime_window(paths, node, runtime.read, evidence)
    except VerificationError as exc:
        return exc
    except EvidenceFormatError as exc:  # a malformed log line or slice
        return VerificationError("runtime", f"the node's runtime log is unusable: {exc}")


def _with_runtime(report: VerificationReport, policy: RuntimePolicy,
                  window: RuntimeWindow | VerificationError | None
                  ) -> tuple[VerificationReport, LoggedRuntime]:
    """``report`` plus the runtime check, run only on a quote that passed every check."""
    if report.failure is not None:
        checks = (*report.checks, CheckResult("runtime", "skipped", NOT_RUN))
        return VerificationReport(checks), LoggedRuntime(policy, None, None)
    logged = LoggedRuntime(policy, None if not isinstance(window, RuntimeWindow) else
                           RuntimeSlice(window.start, window.end, window.from_pcr, window.data),
                           False)
    if not isinstance(window, RuntimeWindow):
        assert window is not None
        failed = CheckResult("runtime", "failed", window.reason, window.data)
        return VerificationReport((*report.checks, failed)), logged
    result = run_checks([("runtime", lambda: judge_window(window, policy))])
    return (VerificationReport((*report.checks, *result.checks)),
            dataclasses.replace(logged, ok=result.ok))


def attest_node(paths: ClusterPaths, node: str, agent: AgentClient, policy: ReferencePolicy,
                pcrs: Sequence[int]) -> AttestResult:
    """Quote ``node`` with a fresh nonce over its agent, verify it, record the outcome.

    A node with a runtime policy also has PCR 10 quoted and its new ima-ng entries
    judged: the ``runtime`` check (:mod:`testbed.cluster.runtime`).
    """
    nonce = os.urandom(32)
    runtime_policy = node_runtime_policy(paths, node)
    runtime = None
    if runtime_policy is not None:
        pcrs, policy = sorted({*pcrs, IMA_PCR}), quoting_pcr10(policy)
        runtime = RuntimeInput(runtime_policy, agent_reader(agent))
    evidence, proof = agent.quote_batched(nonce, pcrs)
    report = verify_evidence(paths, node, evidence, nonce, policy, proof, runtime)
    result = AttestResult(paths.name, node, policy.name, nonce, utc_now(), report, evidence)
    record_attestation(paths, node, result.record())
    return result
