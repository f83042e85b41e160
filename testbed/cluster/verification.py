"""Attesting a node, written once for every backend: a fresh nonce, a quote over the
node's agent, every check of the verifier against the cluster's AK registry, the node's
policy and the cluster's clock history, and the result recorded.

The clock history is the last accepted TPMS_ATTEST per AK, persisted (a file per AK)
and used under the cluster's attest lock, so replays and clock rollbacks are caught
across commands (and concurrent ones); the verifier service passes its own histories
(:class:`ClockSource`, kept in its database). Every verification, accepted or not, is
appended under the same lock to the cluster's evidence log
(:mod:`attestation.evidence_log`, ``evidence/``), which ``testbed evidence replay``
re-verifies.

A node whose vTPM was made on a hypervisor host is judged on two layers: the quote, and
the host's latest attestation, by the checks the hosts room registers here
(:func:`register_host_check`; ``host_attestation``, :mod:`testbed.hosts.deep`), and its
EK certificate chains through that host's intermediate CA (:func:`register_ek_links`,
:func:`ek_ca_bundle`): the cluster layer sits below the hosts and cannot import them.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, TestbedError, VerificationError
from attestation.evidence import Evidence
from attestation.evidence_log import EvidenceLog, LoggedRuntime, RuntimeSlice
from attestation.files import fsync_dir, private_dir
from attestation.ima import IMA_PCR, RuntimePolicy
from attestation.policy import ReferencePolicy
from attestation.registrar import AkRegistry
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
from testbed.cluster.state import parse_registry, read_registry_bytes, record_attestation
from testbed.core.clock import utc_now
from testbed.core.errors import StateError
from testbed.core.files import locked, read_json, write_json
from testbed.core.paths import HOST_VTPM_BINDINGS, ClusterPaths
from testbed.tpm.localca import LocalCA
from trusted_passages.batch import BatchProof
from trusted_passages.tpm import verify_batched

__all__ = ["AkClockHistory", "ClockHistoryStore", "ClockSource", "EkLinks", "HostCheck",
           "RuntimeInput",
           "attest_node", "ek_ca_bundle", "evidence_dir", "register_ek_links",
           "register_host_check", "verify_evidence"]

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
    if not _HOST_CHECKS and (paths.workdir / HOST_VTPM_BINDINGS).exists():
        # vTPMs were made on hosts, but no host check is loaded: fail closed.
        extra.append(CheckResult("host_attestation", "failed",
                                 "this work directory has vTPMs made on hypervisor hosts, "
                                 "but the host layer (testbed.hosts.deep) is not loaded"))
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
    """A :class:`ClockHistory` persisted as the last accepted TPMS_ATTEST per AK, all
    AKs in one file (what the hosts lab uses; a cluster's verifier uses
    :class:`AkClockHistory`, a file per AK).

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


class AkClockHistory:
    """One AK's :class:`ClockHistory`, persisted as its last accepted TPMS_ATTEST in a
    file of its own (``clock-history/AKNAME.json``): an attestation reads and rewrites
    its own AK's file only, not every node's (O(1) per attestation, not O(nodes)).

    An AK without a file of its own is looked up in the older one-file layout
    (``clock-history.json``, kept and read, never written). Only public ClockHistory
    methods are used: loading re-records the stored quote, which restores exactly the
    state the verifier had after accepting it.
    """

    def __init__(self, paths: ClusterPaths, ak_name: bytes) -> None:
        self.name_hex = ak_name.hex()
        self.path = paths.clock_history_dir / f"{self.name_hex}.json"
        self.history = ClockHistory()
        self._attest: str | None = None
        doc = read_json(self.path)
        if doc is not None:
            if not isinstance(doc, dict) or doc.get("format") != _HISTORY_FORMAT \
                    or doc.get("ak") != self.name_hex:
                raise StateError(f"{self.path} is not this AK's clock history file")
            self._restore(doc.get("attest"), self.path)
            return
        legacy = read_json(paths.clock_history)
        if legacy is None:
            return
        if not isinstance(legacy, dict) or legacy.get("format") != _HISTORY_FORMAT \
                or not isinstance(legacy.get("aks"), dict):
            raise StateError(f"{paths.clock_history} is not a clock history file")
        if self.name_hex in legacy["aks"]:
            self._restore(legacy["aks"][self.name_hex], paths.clock_history)

    def _restore(self, attest_b64: object, where: Path) -> None:
        try:
            raw = b64decode(attest_b64, "attest")
            self.history.record(bytes.fromhex(self.name_hex), parse_attest(raw).clock_info,
                                raw)
        except (ValueError, EvidenceFormatError) as exc:
            raise StateError(f"{where}: entry {self.name_hex[:16]} is corrupt: {exc}") from None
        self._attest = b64encode(raw)

    def remember(self, evidence: Evidence) -> None:
        self._attest = b64encode(evidence.attest)

    def save(self, *, durable: bool = True) -> None:
        """Replace the AK's file; ``durable=False``: :meth:`sync` follows (see
        :func:`verify_evidence`)."""
        private_dir(self.path.parent)
        write_json(self.path, {"format": _HISTORY_FORMAT, "version": 2, "ak": self.name_hex,
                               "attest": self._attest}, durable=durable)

    def sync(self) -> None:
        """Make the AK's file as it is now durable (this save's, or a newer one's)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path.parent)


class ClockSource(Protocol):
    """Where :func:`verify_evidence` keeps clock histories instead of the per-AK files:
    the verifier service's database, made durable in its tick's transaction before any
    verdict of that tick is published (:mod:`testbed.verifier.clocks`)."""

    def history(self, ak_name: bytes) -> ClockHistory:
        """The AK's history (its last accepted quote); the verifier records into it."""
        ...

    def accepted(self, node: str, ak_name: bytes, evidence: Evidence) -> None:
        """``evidence`` passed: it is the AK's last accepted quote from now on."""
        ...


class _RegistryCache:
    """The parsed AK registry, parsed again only when the file's bytes differ.

    Keyed by the exact bytes read (never by a timestamp): a registry that changed in
    any way is parsed anew, so a verifier never trusts an AK the file no longer holds.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: dict[Path, tuple[bytes | None, AkRegistry]] = {}

    def get(self, paths: ClusterPaths) -> AkRegistry:
        data = read_registry_bytes(paths)
        with self._lock:
            hit = self._cached.get(paths.registry)
        if hit is not None and hit[0] == data:
            return hit[1]
        registry = parse_registry(paths, data)
        with self._lock:
            self._cached = {paths.registry: (data, registry)}  # one cluster at a time
        return registry


_registries = _RegistryCache()


def _ak_name(evidence: Evidence) -> bytes | None:
    """The name of the AK the evidence claims; None when its public is unparseable
    (the verifier then fails it: nothing is loaded or saved for it)."""
    try:
        return parse_public(evidence.ak_public).name
    except EvidenceFormatError:
        return None


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
                    runtime: RuntimeInput | None = None, *, clocks: ClockSource | None = None,
                    durable: bool = True) -> VerificationReport:
    """Verify evidence claimed to come from ``node`` with the cluster's registry and history.

    ``proof``: the quote is a batch's (a node whose quotes are batched) and this is the
    nonce's inclusion path: checked as ``batch_inclusion``, the leaf being ``nonce``.
    ``clocks``: the clock histories to use instead of the per-AK files (kept durable by
    whoever passes them). ``durable=False``: the caller runs ``EvidenceLog.sync`` on
    :func:`evidence_dir` before it publishes the verdict (once for many verifications).
    ``runtime``: also run the incremental ``runtime`` check (``docs/runtime.md``) on a
    quote that passed every other check. The evidence log records the verdict, the
    runtime check's included, with what re-verifies it offline.
    """
    registry = _registries.get(paths)
    if node not in registry.nodes():
        raise StateError(f"node {node} is not registered in cluster {paths.name}: its AK was "
                         "never activated (run `testbed up`)")
    # Read the log before taking the cluster-wide lock (it may be a round trip to the node).
    window = None if runtime is None else _gather(paths, node, runtime, evidence)
    ak_name = _ak_name(evidence)
    log = EvidenceLog(evidence_dir(paths))

    def judge() -> tuple[VerificationReport, LoggedRuntime | None, AkClockHistory | None]:
        """The verdict, the runtime check's record, and the AK's file history if saved."""
        store, history = _clock_history(paths, ak_name, clocks)
        verifier = QuoteVerifier(ak_trust=registry.for_node(node), policy=policy,
                                 clock_history=history)
        report = verifier.verify(evidence, nonce) if proof is None else \
            verify_batched(verifier, evidence, nonce, proof)
        saved = store if report.ok and store is not None else None
        if saved is not None:
            saved.remember(evidence)
            saved.save(durable=False)
        if report.ok and clocks is not None and ak_name is not None:
            clocks.accepted(node, ak_name, evidence)
        if runtime is None:
            return report, None, saved
        return (*_with_runtime(report, runtime.policy, window), saved)

    def append(report: VerificationReport, logged: LoggedRuntime | None) -> None:
        log.append(node, nonce, evidence, policy, report, utc_now(),
                   batch=None if proof is None else proof.to_dict(), runtime=logged,
                   durable=False)

    if clocks is None:  # the AK's file: read, checked and written under the lock
        with locked(paths.attest_lock):
            report, logged, store = judge()
            append(report, logged)
    else:
        # The caller's clock histories (the service: one attestation of a node at a time,
        # by its leases): only the evidence log's hash chain needs the cluster's lock.
        report, logged, store = judge()
        with locked(paths.attest_lock):
            append(report, logged)
    # Durable before the verdict is returned (before anyone acts on it), but fsync'd
    # after the lock: concurrent verifications wait for the disk together (one journal
    # commit for many) instead of queueing for it one by one inside the lock. Within
    # the lock every reader sees the newest state either way (the page cache).
    if store is not None:
        store.sync()
    if durable:
        log.sync()
    if isinstance(window, RuntimeWindow) and report.ok and \
            (window.end, window.quoted) != (window.start, window.from_pcr):
        # The next check starts after it (most quotes find no new entry: no rewrite).
        RuntimeState(window.boot, window.end, window.quoted).save(paths, node)
    # After the evidence log: it records what the quote proves (and replays to that); the
    # host's own verdicts are in the hosts lab's evidence log.
    return _with_host_layer(report, paths, node)


def _clock_history(paths: ClusterPaths, ak_name: bytes | None, clocks: ClockSource | None
                   ) -> tuple[AkClockHistory | None, ClockHistory]:
    """The AK's clock history: from ``clocks`` when given, else its own file (returned
    too: saved when the quote passes). An unparseable AK has none (its quote fails)."""
    if ak_name is None:
        return None, ClockHistory()
    if clocks is not None:
        return None, clocks.history(ak_name)
    store = AkClockHistory(paths, ak_name)
    return store, store.history


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
                pcrs: Sequence[int], *, clocks: ClockSource | None = None,
                durable: bool = True, record: bool = True) -> AttestResult:
    """Quote ``node`` with a fresh nonce over its agent, verify it, record the outcome
    (``record=False``: the caller keeps it; ``clocks``, ``durable``: as
    :func:`verify_evidence`).

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
    report = verify_evidence(paths, node, evidence, nonce, policy, proof, runtime,
                             clocks=clocks, durable=durable)
    result = AttestResult(paths.name, node, policy.name, nonce, utc_now(), report, evidence)
    if record:
        record_attestation(paths, node, result.record())
    return result
