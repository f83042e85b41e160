"""The verifier service: attests every registered node of a cluster at an interval.

One process (``python -m testbed.verifier.service``, started detached by
``testbed verifier start``) runs one loop:

- every interval it re-reads the cluster's AK registry (the nodes to attest), renews its
  heartbeat and prunes old events;
- every tick it claims the pull nodes that are due (:meth:`Store.claim`: a lease per
  node) and hands them to a bounded thread pool; each worker asks the node's agent for
  a quote over a fresh nonce with a per-quote deadline and verifies it with
  :func:`testbed.cluster.verification.attest_node` (registry, policy, clock history);
- push nodes (``--push NODE``) send their own evidence to the verifier's unix socket
  (the agent wire: role actions ``nonce`` then ``evidence``, :func:`push_attest`), with
  their runtime log from where the verifier's last good quote left it: the same
  incremental ``runtime`` check as pull nodes;
- the lab's hypervisor hosts (``WORKDIR/hosts/``) are rows ``host:NAME`` claimed like
  pull nodes and attested over their SSH sessions (:mod:`testbed.verifier.hosts`); a
  host that fails marks every VM placed on it untrusted (check ``host``);
- each outcome is recorded by the loop's thread alone (events, the node's state), a
  failure is handed to :func:`testbed.verifier.revocation.publish`, and state changes
  and failures go to the webhooks.

Durability costs one fsync per tick, not several per attestation: workers verify with
the clock histories in memory (:class:`~testbed.verifier.clocks.StoreClocks`) and append
to the evidence log without fsync; the loop then makes the evidence log durable and
commits the tick's outcomes with the clock history of every quote they accepted in one
transaction, and only then publishes (events, revocations, webhooks, the per-node
record ``testbed status`` shows, written when a node's state changes). A verifier killed
mid-tick published nothing of that tick, and its next attestation of each node starts
from the last committed history.

A stuck agent holds one worker until its deadline, never the loop; a node whose lease
ran out is claimed again (by this verifier or another sharing the database).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attestation.encoding import b64decode, b64encode, require_int
from attestation.errors import EvidenceFormatError, FileInputError, TestbedError, VerificationError
from attestation.evidence import Evidence
from attestation.evidence_log import EvidenceLog
from attestation.files import atomic_write, private_dir, read_bounded, remove_durably
from attestation.ima import IMA_PCR
from attestation.policy import MAX_POLICY_BYTES, ReferencePolicy, load_policy
from attestation.report import VerificationReport
from attestation.tpm_types import PcrSelection, parse_attest
from testbed.backends import open_backend
from testbed.cluster.agent import (
    AgentClient,
    AgentError,
    AgentUnavailable,
    BatchedEvidence,
    UnixTransport,
    split_batch,
)
from testbed.cluster.backend import ClusterBackend
from testbed.cluster.results import AttestationRecord
from testbed.cluster.runtime import (
    RuntimeState,
    node_runtime_policy,
    quoting_pcr10,
    slice_reader,
)
from testbed.cluster.state import (
    load_node_policy,
    load_registry,
    load_spec,
    record_attestation,
)
from testbed.cluster.verification import (
    RuntimeInput,
    attest_node,
    evidence_dir,
    verify_evidence,
)
from testbed.core.clock import iso_utc
from testbed.core.errors import ArgumentError, StateError, UsageError
from testbed.core.files import read_json, tail, write_json
from testbed.core.paths import NAME_PATTERN, ClusterPaths
from testbed.core.processes import launch_detached, process_argv, read_pid, terminate
from testbed.hosts import deep as _deep  # noqa: F401  # the host_attestation check, host EK links
from testbed.hosts.layout import LabPaths
from testbed.sim.agent_server import AgentServer
from testbed.spec.cluster_spec import ClusterSpec
from testbed.verifier import revocation
from testbed.verifier.clocks import StoreClocks
from testbed.verifier.hosts import (
    CONNECT_S,
    FAILED_STATES,
    HostAttesters,
    host_marks,
    host_of,
    host_row,
    lab_hosts,
    on_failed_host,
    placement,
)
from testbed.verifier.store import (
    UNREACHABLE_CHECK,
    Event,
    Outcome,
    Store,
    StoreError,
    VerifierRow,
    open_store,
)
from testbed.verifier.webhooks import WebhookSender, load_secret

__all__ = [
    "DEFAULT_INTERVAL_S",
    "DEFAULT_WORKERS",
    "PushEndpoint",
    "VerifierConfig",
    "VerifierFiles",
    "VerifierService",
    "main",
    "push_attest",
    "running_pid",
    "start_verifier",
    "stop_verifiers",
    "verifier_status",
]

DEFAULT_INTERVAL_S = 2.0
DEFAULT_WORKERS = 32  # 500 nodes at 2 s: 250 attestations/s at up to ~0.1 s each (Little)
NONCE_TTL_S = 30.0  # a push nonce not used within this is refused
RECONNECT_S = 1.0  # between attempts to reopen a database that failed
MAX_PUSHED_RUNTIME = 1 << 20  # runtime log bytes one push may carry (its frame: 4 MiB)
PUSH_GRACE = 3  # intervals without pushed evidence before a push node is unreachable
MAX_PUSH_CONNECTIONS = 32
HOST_DEADLINE_S = 2.0  # per read of a host attestation, at least (over SSH)
HOST_LEASE_S = CONNECT_S  # + the deadline: a host's lease covers a fresh SSH session
MAX_BATCH = 512  # outcomes recorded in one transaction
RECORD_EVERY_S = 30.0  # a node's status record rewritten at least this often

log = logging.getLogger("testbed.verifier")


@dataclass(frozen=True)
class VerifierFiles:
    """The verifier's files in the cluster directory (``clusters/NAME/verifier/``, 0700)."""

    paths: ClusterPaths

    @property
    def root(self) -> Path:
        return self.paths.root / "verifier"

    @property
    def database(self) -> Path:
        return self.root / "verifier.db"

    @property
    def settings(self) -> Path:
        """Which database the verifiers of this cluster use (0600: a URL may hold a password)."""
        return self.root / "settings.json"

    def pid_file(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def push_socket(self, name: str) -> Path:
        return self.root / f"{name}.sock"

    def names(self) -> list[str]:
        """Verifiers with a pid file here."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.pid"))

    def database_url(self, explicit: str | None = None) -> str:
        """``explicit``, else the one ``start`` saved, else the SQLite file here."""
        if explicit:
            return explicit
        saved = read_json(self.settings)
        if isinstance(saved, dict) and isinstance(saved.get("db"), str):
            return str(saved["db"])
        return str(self.database)

    def save_database_url(self, url: str) -> None:
        private_dir(self.root)
        write_json(self.settings, {"db": url})


@dataclass(frozen=True)
class VerifierConfig:
    workdir: Path
    cluster: str
    name: str = "verifier"
    interval: float = DEFAULT_INTERVAL_S
    deadline: float | None = None  # per quote; default half the interval
    db: str | None = None
    webhooks: tuple[str, ...] = ()
    webhook_secret: Path | None = None
    push: tuple[str, ...] = ()
    workers: int = DEFAULT_WORKERS
    hosts: bool = True  # attest the lab's hypervisor hosts too (docs/verifier.md, "Hosts")

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise UsageError(f"invalid verifier name {self.name!r}")
        if not 0.1 <= self.interval <= 3600:
            raise ArgumentError(f"--interval {self.interval}: between 0.1 and 3600 seconds")
        if self.deadline is not None and not 0.05 <= self.deadline <= self.interval:
            raise ArgumentError(f"--deadline {self.deadline}: between 0.05 s and the interval")
        if not 1 <= self.workers <= 256:
            raise ArgumentError(f"--workers {self.workers}: between 1 and 256")
        if self.webhooks and self.webhook_secret is None:
            raise UsageError("--webhook needs --webhook-secret FILE (bodies are signed)")

    @property
    def quote_deadline(self) -> float:
        return self.deadline if self.deadline is not None else self.interval / 2

    @property
    def lease(self) -> float:
        """How long a claim holds a node: the quote's deadline and time to verify, and
        less than the interval, so that another verifier takes over within one."""
        return min(self.quote_deadline + 0.5, self.interval * 0.75)

    def argv(self) -> list[str]:
        """The service's command line for this configuration."""
        argv = [sys.executable, "-m", "testbed.verifier.service", "--workdir",
                str(self.workdir), "--cluster", self.cluster, "--name", self.name,
                "--interval", repr(self.interval), "--workers", str(self.workers)]
        if self.deadline is not None:
            argv += ["--deadline", repr(self.deadline)]
        if self.db:
            argv += ["--db", self.db]
        for url in self.webhooks:
            argv += ["--webhook", url]
        if self.webhook_secret is not None:
            argv += ["--webhook-secret", str(self.webhook_secret)]
        for node in self.push:
            argv += ["--push", node]
        if not self.hosts:
            argv.append("--no-hosts")
        return argv


def outcome_of(node: str, report: VerificationReport, started: float, mode: str) -> Outcome:
    failure = report.failure
    if failure is None:
        return Outcome(node, True, "", "", started, time.time(), mode)
    return Outcome(node, False, failure.name, failure.detail, started, time.time(), mode)


def failed_outcome(node: str, exc: TestbedError, started: float, mode: str) -> Outcome:
    """An attestation that produced no report: fails closed, naming why."""
    if isinstance(exc, AgentUnavailable | AgentError):
        check = UNREACHABLE_CHECK
    elif isinstance(exc, EvidenceFormatError):
        check = "evidence"
    else:
        check = "verifier"
    return Outcome(node, False, check, str(exc), started, time.time(), mode)


class PolicyCache:
    """Each node's policy, parsed again only when its file's bytes changed.

    Parsing the YAML policy is most of an attestation's CPU (about 24 ms of 33 ms
    here): a verifier attesting every node each interval reads the file (a few KiB)
    and keeps the parsed policy while the bytes are exactly those it parsed, so an
    edited policy applies from the next attestation on (keyed by content, never by a
    timestamp an edit might not change).
    """

    def __init__(self, paths: ClusterPaths) -> None:
        self.paths = paths
        self._cached: dict[str, tuple[bytes, ReferencePolicy]] = {}
        self._lock = threading.Lock()

    def get(self, node: str) -> ReferencePolicy:
        try:
            data = read_bounded(self.paths.policy(node), MAX_POLICY_BYTES, what="policy file")
        except FileInputError:
            return load_node_policy(self.paths, node)  # it says what is wrong
        with self._lock:
            hit = self._cached.get(node)
        if hit is not None and hit[0] == data:
            return hit[1]
        policy = load_policy(data)
        with self._lock:
            self._cached[node] = (data, policy)
        return policy

    def keep(self, nodes: set[str]) -> None:
        """Forget the nodes no longer registered."""
        with self._lock:
            for node in set(self._cached) - nodes:
                del self._cached[node]


# --- push mode ----------------------------------------------------------------------------


class _NotServed(TestbedError):
    pass


@dataclass
class PushEndpoint:
    """The verifier's side of push mode, served on a unix socket by an
    :class:`AgentServer` (its bounded slots and frame limits): role actions ``nonce``
    (one outstanding nonce per push node, ``NONCE_TTL_S``; with the PCRs to quote and
    where the node's runtime log is to be sent from) and ``evidence`` (verified against
    that nonce, which is then spent: a replay is refused; its ``runtime`` slice judged
    like a pull node's log)."""

    paths: ClusterPaths
    push_nodes: frozenset[str]
    outcomes: queue.Queue[Outcome]
    policies: PolicyCache
    clocks: StoreClocks
    pcrs: Sequence[int] = ()  # the boot PCRs every quote covers (the backend's)
    _nonces: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def role_call(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        node = args.get("node")
        if not isinstance(node, str) or node not in self.push_nodes:
            raise _NotServed(f"{str(node)[:40]!r} is not a push node of this verifier")
        if action == "nonce" and set(args) == {"node"}:
            nonce = secrets.token_bytes(32)
            with self._lock:
                self._nonces[node] = (nonce, time.monotonic() + NONCE_TTL_S)
            return {"nonce": b64encode(nonce), **self._wanted(node)}
        if action == "evidence" and {"node", "evidence"} <= set(args) \
                <= {"node", "evidence", "runtime"}:
            return self._evidence(node, args["evidence"], args.get("runtime"))
        raise _NotServed(f"unknown push action {action[:40]!r} or arguments")

    def _wanted(self, node: str) -> dict[str, Any]:
        """What the node's evidence must cover: the PCRs and, for a node with a runtime
        policy, its runtime log from where the last good quote left it (``boot``: the
        TPM's reset and restart counts of that quote; another boot sends from 0)."""
        if node_runtime_policy(self.paths, node) is None:
            return {"pcrs": list(self.pcrs), "runtime": None}
        state = RuntimeState.load(self.paths, node)
        since = {"offset": 0, "boot": None} if state is None else \
            {"offset": state.offset, "boot": list(state.boot)}
        return {"pcrs": sorted({*self.pcrs, IMA_PCR}), "runtime": since}

    def _evidence(self, node: str, document: object, runtime: object) -> dict[str, Any]:
        with self._lock:
            nonce, expiry = self._nonces.pop(node, (b"", 0.0))
        if not nonce or time.monotonic() > expiry:
            raise _NotServed(f"no live nonce for {node}: fetch one first (each is used once)")
        started = time.time()
        if not isinstance(document, dict):
            raise EvidenceFormatError("evidence must be a JSON object")
        try:
            evidence, proof = split_batch(document)
            policy, check = self.policies.get(node), _pushed_runtime(self.paths, node, runtime)
            report = verify_evidence(self.paths, node, evidence, nonce,
                                     policy if check is None else quoting_pcr10(policy),
                                     proof, check, clocks=self.clocks, durable=False)
            outcome = outcome_of(node, report, started, "push")
        except TestbedError as exc:
            outcome = failed_outcome(node, exc, started, "push")
        self.outcomes.put(outcome)
        return {"ok": outcome.ok, "check": outcome.check, "reason": outcome.reason[:500]}

    # The agent ops an AgentServer also routes: not served here.
    def identity(self) -> dict[str, Any]:
        raise _NotServed("a verifier has no identity op")

    def activate(self, challenge: Any) -> bytes:
        raise _NotServed("a verifier has no activate op")

    def quote(self, nonce: bytes, selection: PcrSelection) -> Evidence:
        raise _NotServed("a verifier has no quote op")

    def status(self) -> dict[str, Any]:
        return {"verifier": True, "push_nodes": sorted(self.push_nodes)}

    def shutdown(self) -> None:
        raise _NotServed("stop a verifier with `testbed verifier stop`")

    # The runtime-integrity ops a node's agent serves (docs/runtime.md): not a verifier's.
    def runtime_log(self, offset: int) -> bytes:
        raise _NotServed("a verifier has no runtime log")

    def runtime_measure(self, path: str, content: bytes) -> dict[str, Any]:
        raise _NotServed("a verifier measures nothing")


def _pushed_runtime(paths: ClusterPaths, node: str, runtime: object) -> RuntimeInput | None:
    """The runtime check of pushed evidence: None for a node without a runtime policy;
    else over the log slice it sent (``{"offset", "data"}``), failing closed without one."""
    policy = node_runtime_policy(paths, node)
    if policy is None:
        return None
    if runtime is None:
        def missing(_: int) -> bytes:
            raise VerificationError("runtime", "the pushed evidence carries no runtime log "
                                    "(the node has a runtime policy)")
        return RuntimeInput(policy, missing)
    if not isinstance(runtime, dict) or set(runtime) != {"offset", "data"}:
        raise EvidenceFormatError("runtime must be an object with keys ['data', 'offset']")
    offset = require_int(runtime["offset"], "runtime offset", EvidenceFormatError, minimum=0)
    data = b64decode(runtime["data"], "runtime data", limit=MAX_PUSHED_RUNTIME)
    return RuntimeInput(policy, slice_reader(offset, data))


def push_attest(paths: ClusterPaths, node: str, agent: AgentClient, *,
                verifier: str = "verifier", pcrs: Sequence[int] | None = None,
                timeout: float = 10.0) -> dict[str, Any]:
    """What a push node does (here on a sim node's behalf): fetch a nonce from the
    verifier, quote it on the node's TPM, send the evidence with the runtime log new
    since the verifier's last good quote; returns the verdict."""
    endpoint = AgentClient(UnixTransport(VerifierFiles(paths).push_socket(verifier)),
                           node=f"verifier {verifier}", timeout=timeout)
    answer = endpoint.role("nonce", {"node": node})
    nonce = b64decode(answer.get("nonce"), "nonce", limit=64)
    wanted = answer.get("pcrs")
    if pcrs is None:
        pcrs = wanted if isinstance(wanted, list) and wanted else \
            list(open_backend(paths).pcrs.indices)
    evidence, proof = agent.quote_batched(nonce, pcrs)
    document = evidence.to_dict() if proof is None else \
        BatchedEvidence(evidence, proof).to_dict()
    request: dict[str, Any] = {"node": node, "evidence": document}
    since = answer.get("runtime")
    if isinstance(since, dict):  # read after the quote: the log explains what it covers
        request["runtime"] = _runtime_since(agent, evidence, since)
    return endpoint.role("evidence", request)


def _runtime_since(agent: AgentClient, evidence: Evidence,
                   since: dict[str, Any]) -> dict[str, Any]:
    """The node's log from where the verifier's last good quote left it (from 0 when
    this quote is of another boot), at most MAX_PUSHED_RUNTIME bytes."""
    clock = parse_attest(evidence.attest).clock_info
    same_boot = since.get("boot") == [clock.reset_count, clock.restart_count]
    offset = require_int(since.get("offset"), "offset", EvidenceFormatError, minimum=0) \
        if same_boot else 0
    data = bytearray()
    while len(data) < MAX_PUSHED_RUNTIME:
        chunk = agent.runtime_log(offset + len(data))
        if not chunk:
            break
        data += chunk
    return {"offset": offset, "data": b64encode(bytes(data[:MAX_PUSHED_RUNTIME]))}


# --- the service ----------------------------------------------------------------------------


class VerifierService:
    """One verifier process's loop; :meth:`run` until :meth:`stop`."""

    def __init__(self, config: VerifierConfig, store: Store,
                 backend: ClusterBackend | None = None) -> None:
        self.config = config
        self.paths = ClusterPaths(config.workdir, config.cluster)
        self.files = VerifierFiles(self.paths)
        self.store = store
        self.backend = backend or open_backend(self.paths)
        self.pcrs = list(self.backend.pcrs.indices)
        self.outcomes: queue.Queue[Outcome] = queue.Queue()
        self.stopping = threading.Event()
        self.started = time.time()
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="attest")
        self._revoker = ThreadPoolExecutor(1, thread_name_prefix="revoke")
        self._inflight: set[str] = set()
        self._undelivered: set[str] = set()  # nodes whose revocation a node missed
        self._undelivered_lock = threading.Lock()
        self._webhooks = (WebhookSender(config.cluster, config.webhooks,
                                        load_secret(config.webhook_secret))
                          if config.webhooks and config.webhook_secret else None)
        self.policies = PolicyCache(self.paths)
        self.clocks = StoreClocks(self.paths)
        self._records: dict[str, AttestationRecord] = {}  # each node's latest, for status
        self._records_lock = threading.Lock()
        self._recorded_at: dict[str, float] = {}  # node -> when its record was written
        self._agents: dict[str, AgentClient] = {}  # node -> its agent (see _agent)
        self._agents_lock = threading.Lock()
        self._push = PushEndpoint(self.paths, frozenset(config.push), self.outcomes,
                                  self.policies, self.clocks, tuple(self.pcrs))
        self._server = AgentServer(self._push, self.files.push_socket(config.name),
                                   max_connections=MAX_PUSH_CONNECTIONS, idle_timeout=10.0)
        self.lab = LabPaths(config.workdir)
        self._hosts = HostAttesters(self.lab)
        self._spec: ClusterSpec | None = None  # read at each sync while the lab has hosts
        self._placement: dict[str, str] = {}  # VM -> its host (the spec's `host:`)
        self._failed_hosts: dict[str, str] = {}  # host -> the check it failed
        self._lab_has_hosts = False  # no second claim per tick without hosts
        # A host's quote crosses SSH and its agent reads the event log: never under
        # HOST_DEADLINE_S, which a host answers well within when it works.
        self._host_deadline = max(config.quote_deadline, HOST_DEADLINE_S)

    def start(self) -> None:
        """Bind the push socket (before the pid file says the verifier is ready)."""
        private_dir(self.files.root)
        self._server.start()

    def run(self) -> None:
        """The loop, until :meth:`stop`; a failing round (a database or state error) is
        logged and retried at the next tick, never the end of the service."""
        tick = min(0.05, self.config.interval / 20)
        next_sync = 0.0
        try:
            while not self.stopping.is_set():
                now = time.time()
                try:
                    if now >= next_sync:
                        self._sync(now)
                        next_sync = now + self.config.interval
                    self._dispatch(now)
                    self._drain(tick)
                except StoreError as exc:  # e.g. PostgreSQL restarted: a new connection
                    log.error("verifier round failed: %s", exc)
                    self.stopping.wait(RECONNECT_S)
                    self._reconnect()
                except TestbedError as exc:
                    log.error("verifier round failed: %s", exc)
                    self.stopping.wait(tick)
        finally:
            self._close()

    def stop(self) -> None:
        self.stopping.set()

    def _reconnect(self) -> None:
        try:
            fresh = open_store(self.files.database_url(self.config.db))
        except TestbedError as exc:
            log.error("reconnecting to the verifier database: %s", exc)
            return
        self.store.close()
        self.store = fresh

    def _sync(self, now: float) -> None:
        if not self.paths.root.is_dir():  # `down --purge` removed the cluster: no orphan
            log.warning("cluster %s is gone (%s): stopping", self.paths.name, self.paths.root)
            self.stop()
            return
        nodes = load_registry(self.paths).nodes()
        hosts = lab_hosts(self.lab) if self.config.hosts else []
        self.store.sync_nodes(nodes, self.config.push, [host_row(h) for h in hosts])
        self.policies.keep(set(nodes))
        with self._agents_lock:  # nodes no longer registered
            for gone in set(self._agents) - set(nodes):
                del self._agents[gone]
        self._hosts.keep(hosts)
        self._sync_hosts(hosts)
        self.store.heartbeat(self.config.name, os.getpid(), self.started,
                             self.config.interval, now)
        self.store.prune()
        self._push_overdue(now)

    def _sync_hosts(self, hosts: list[str]) -> None:
        """Which VM runs on which host, and which hosts are failed, as the store says (a
        restarted verifier keeps the VMs of a failed host untrusted)."""
        self._lab_has_hosts = bool(hosts)
        if not hosts:  # a cluster without a lab: nothing to read per interval
            self._spec, self._placement, self._failed_hosts = None, {}, {}
            return
        self._spec = load_spec(self.paths)
        self._placement = placement(self._spec)
        self._failed_hosts = {
            host: row.last_check for row in self.store.nodes()
            if (host := host_of(row.node)) is not None and row.state in FAILED_STATES}

    def _push_overdue(self, now: float) -> None:
        """A push node that sent no evidence for PUSH_GRACE intervals is unreachable:
        silence must not keep a node trusted (fail closed)."""
        grace = PUSH_GRACE * self.config.interval
        if now - self.started < grace:
            return
        for row in self.store.nodes():
            if row.node in self.config.push and row.state != "unreachable" \
                    and row.last_time < now - grace:
                self.outcomes.put(Outcome(row.node, False, UNREACHABLE_CHECK,
                                          f"no evidence pushed for {grace:g} s", now, now,
                                          "push"))

    def _dispatch(self, now: float) -> None:
        free = self.config.workers - len(self._inflight)
        claims = self.store.claim(self.config.name, now, interval=self.config.interval,
                                  lease=self.config.lease, limit=free)
        if self._lab_has_hosts and len(claims) < free:
            claims += self.store.claim(self.config.name, now, interval=self.config.interval,
                                       lease=HOST_LEASE_S + self._host_deadline,
                                       limit=free - len(claims), mode="host")
        if claims:  # the newest committed clock history, whoever attested them last
            self.clocks.refresh(self.store.clocks_of([c.node for c in claims]))
        for claim in claims:
            if claim.node in self._inflight:
                # Its last quote is still running a lease later (an agent that trickles
                # bytes defeats a per-read timeout): not a second quote, and not
                # trusted meanwhile.
                self._record(Outcome(claim.node, False, UNREACHABLE_CHECK,
                                     "the previous quote is still running after its lease",
                                     now, time.time()), finished=False)
            else:
                self._inflight.add(claim.node)
                self._pool.submit(self._pull, claim.node)

    def _pull(self, node: str) -> None:
        started = time.time()
        if (host := host_of(node)) is not None:
            self.outcomes.put(self._hosts.attest(host, self._host_deadline))
            return
        try:
            agent = self._agent(node)
            policy = self.policies.get(node)
            result = attest_node(self.paths, node, agent, policy, self.pcrs,
                                 clocks=self.clocks, durable=False, record=False)
            with self._records_lock:
                self._records[node] = result.record()
            outcome = outcome_of(node, result.report, started, "pull")
        except TestbedError as exc:
            outcome = failed_outcome(node, exc, started, "pull")
        except Exception as exc:  # a bug in one attestation must not end the service
            log.exception("attestation of %s failed", node)
            outcome = Outcome(node, False, "verifier", f"internal error: {exc!r}"[:500],
                              started, time.time())
        if outcome.check == UNREACHABLE_CHECK:  # ask the backend again: it says why
            with self._agents_lock:
                self._agents.pop(node, None)
        self.outcomes.put(outcome)

    def _agent(self, node: str) -> AgentClient:
        """The node's agent client, asked of the backend once (which inspects the node's
        processes: a node found down is refused at once, with the reason) and reused
        while its quotes arrive. Only a unix socket's: its path is the node's own, so a
        reused client never reaches another node (a VM's forwarded port might)."""
        with self._agents_lock:
            known = self._agents.get(node)
        if known is not None:
            return known
        agent = self.backend.agent(node, timeout=self.config.quote_deadline)
        if isinstance(agent.transport, UnixTransport):
            with self._agents_lock:
                self._agents[node] = agent
        return agent

    def _drain(self, wait: float) -> None:
        """Record every outcome that arrived, waiting up to ``wait`` for the first: in
        one transaction (a commit per tick, not per attestation)."""
        arrived: list[Outcome] = []
        with contextlib.suppress(queue.Empty):
            arrived.append(self.outcomes.get(timeout=wait))
            while len(arrived) < MAX_BATCH:
                arrived.append(self.outcomes.get_nowait())
        if not arrived:
            return
        for outcome in arrived:
            if outcome.mode == "pull":  # a worker's: its node is no longer in flight
                self._inflight.discard(outcome.node)
        arrived = [self._under_host(outcome) for outcome in arrived]
        recorded = self._commit(arrived)
        for outcome, events in zip(arrived, recorded, strict=True):
            self._status_record(outcome.node, changed=len(events) > 1)
            self._act(outcome, events)

    def _commit(self, outcomes: list[Outcome]) -> list[list[Event]]:
        """Make the tick durable before anything of it is published: the evidence log
        the workers appended to (one fsync for them all), then the outcomes with the
        clock history of every quote accepted (one transaction). A failure publishes
        nothing: the staged histories go with the next commit, the nodes are attested
        again at their next turn."""
        try:
            EvidenceLog(evidence_dir(self.paths)).sync()
        except FileNotFoundError:
            pass  # no verification appended yet (unreachable nodes only): nothing to sync
        except OSError as exc:
            raise StateError(f"cannot make the evidence log durable: {exc}") from None
        clocks = self.clocks.take_pending()
        try:
            return self.store.record_all(self.config.name, outcomes, clocks)
        except StoreError:
            self.clocks.restage(clocks)
            raise

    def _status_record(self, node: str, *, changed: bool) -> None:
        """The node's record for ``testbed status`` (a file per node, not evidence):
        rewritten when its state changed or its record is RECORD_EVERY_S old, not at
        every attestation (a rename each)."""
        with self._records_lock:
            record = self._records.pop(node, None)
        now, last = time.monotonic(), self._recorded_at.get(node)
        fresh = last is not None and now - last < RECORD_EVERY_S
        if record is None or (fresh and not changed):
            return
        self._recorded_at[node] = now
        with contextlib.suppress(TestbedError, OSError):  # status only: never the loop's end
            record_attestation(self.paths, node, record)

    def _record(self, outcome: Outcome, *, finished: bool = True) -> None:
        """Record ``outcome``; ``finished``: a worker's, so its node is no longer in flight."""
        if finished and outcome.mode == "pull":
            self._inflight.discard(outcome.node)
        outcome = self._under_host(outcome)
        self._act(outcome, self.store.record(self.config.name, outcome))

    def _under_host(self, outcome: Outcome) -> Outcome:
        """A VM's outcome while its host is failed counts as a failure (docs/verifier.md)."""
        host = self._placement.get(outcome.node)
        if host in self._failed_hosts and outcome.mode != "host":
            return on_failed_host(outcome, str(host), self._failed_hosts[str(host)])
        return outcome

    def _act(self, outcome: Outcome, events: list[Event]) -> None:
        """What follows a recorded outcome: webhooks, revocation of a failed node, and a
        host's verdict for the VMs on it."""
        for event in events:
            if self._webhooks is not None and (event.kind == "state" or not event.ok):
                self._webhooks.send(event)
        if not outcome.ok and (len(events) > 1 or self._redeliver(outcome.node, None)):
            self._revoker.submit(self._publish, events[0])
        if (failed := host_of(outcome.node)) is not None:
            self._host_verdict(failed, outcome, changed=len(events) > 1)

    def _host_verdict(self, host: str, outcome: Outcome, *, changed: bool) -> None:
        """A host's outcome: a host that turned failed marks each VM on it untrusted
        (each VM's state change, its revocation published as any node's)."""
        if outcome.ok:
            self._failed_hosts.pop(host, None)
            return
        self._failed_hosts[host] = outcome.check
        if changed and self._spec is not None:
            for mark in host_marks(self._spec, outcome):
                self._record(mark, finished=False)

    def _redeliver(self, node: str, failed: bool | None) -> bool:
        """Whether ``node``'s revocation must be published again (a node missed it);
        with ``failed`` given, remember that instead."""
        with self._undelivered_lock:
            if failed is None:
                return node in self._undelivered
            (self._undelivered.add if failed else self._undelivered.discard)(node)
            return failed

    def _publish(self, event: Event) -> None:
        """Revoke ``event.node``: on its change into a failed state, and again at each
        failure while a running node did not get it. The decision's sequence comes from
        revocation's counter (nodes refuse a sequence they have seen), never below the
        event's own."""
        try:
            sequence = max(event.seq, revocation.next_sequence(self.paths))
            answers = revocation.publish(self.paths, revocation.RevocationEvent(
                event.node, event.check, event.reason, iso_utc(event.time), sequence))
        except Exception:  # delivery is revocation's job; the loop goes on
            log.exception("revocation of %s (event %d) failed", event.node, event.seq)
            self._redeliver(event.node, True)
            return
        missed = [n for n, a in answers.items() if n != event.node and a.startswith("error")]
        self._redeliver(event.node, bool(missed))
        log.info("revocation of %s (event %d, sequence %d): %s", event.node, event.seq,
                 sequence, ", ".join(f"{n} {a[:80]}" for n, a in sorted(answers.items()))
                 or "no node to tell")

    def _close(self) -> None:
        self._server.close()
        self._hosts.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._revoker.shutdown(wait=True, cancel_futures=False)
        if self._webhooks is not None:
            self._webhooks.close()
        with contextlib.suppress(TestbedError):
            self.store.forget_verifier(self.config.name)


# --- starting, finding and stopping the process -------------------------------------------

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


def _is_ours(pid: int, files: VerifierFiles, name: str) -> bool:
    """Whether ``pid`` is this cluster's verifier ``name`` (a reused pid is not)."""
    argv = process_argv(pid)
    if not argv or "testbed.verifier.service" not in argv:
        return False
    options = dict(itertools.pairwise(argv))
    return (Path(options.get("--workdir", "")).absolute() == files.paths.workdir
            and options.get("--cluster") == files.paths.name
            and options.get("--name", "verifier") == name)


def running_pid(files: VerifierFiles, name: str) -> int | None:
    pid = read_pid(files.pid_file(name))
    return pid if pid is not None and _is_ours(pid, files, name) else None


def start_verifier(config: VerifierConfig) -> int:
    """Start the service detached; its pid once it serves (its pid file written)."""
    files = VerifierFiles(ClusterPaths(config.workdir, config.cluster))
    if not files.paths.root.is_dir():
        raise ArgumentError(f"no cluster {config.cluster!r} in {config.workdir}")
    if config.webhook_secret is not None:
        load_secret(config.webhook_secret)  # a bad secret is the caller's error, now
    if (pid := running_pid(files, config.name)) is not None:
        raise StateError(f"verifier {config.name} already runs (pid {pid}); "
                         "`testbed verifier stop` first")
    private_dir(files.root)
    with contextlib.suppress(FileNotFoundError):
        files.pid_file(config.name).unlink()  # left by a verifier that was killed
    url = files.database_url(config.db)
    open_store(url).close()  # the schema exists and the database answers, or a clear error
    files.save_database_url(url)
    pid = launch_detached(config.argv(), files.log(config.name), files.root)
    deadline = time.monotonic() + START_TIMEOUT_S
    while read_pid(files.pid_file(config.name)) != pid:
        if process_argv(pid) is None or time.monotonic() > deadline:
            terminate(pid, lambda: _is_ours(pid, files, config.name), STOP_TIMEOUT_S)
            raise StateError(f"verifier {config.name} did not start; its log "
                             f"{files.log(config.name)}:\n{tail(files.log(config.name)) or ''}")
        time.sleep(0.05)
    return pid


def stop_verifiers(paths: ClusterPaths, name: str | None = None) -> dict[str, str | None]:
    """Stop this cluster's verifiers (or only ``name``): verifier -> the signal it took
    (None: it was not running)."""
    files = VerifierFiles(paths)
    stopped: dict[str, str | None] = {}
    for each in [name] if name else files.names():
        pid = running_pid(files, each)
        stopped[each] = None if pid is None else _terminate(pid, files, each)
        with contextlib.suppress(FileNotFoundError):
            files.pid_file(each).unlink()
    return stopped


def _terminate(pid: int, files: VerifierFiles, name: str) -> str | None:
    return terminate(pid, lambda: _is_ours(pid, files, name), STOP_TIMEOUT_S)


def verifier_status(paths: ClusterPaths, db: str | None = None) -> dict[str, Any]:
    """The verifiers (pid files checked in /proc, heartbeats from the store) and every
    node's state as the store has it."""
    files = VerifierFiles(paths)
    url = files.database_url(db)
    processes = {name: running_pid(files, name) for name in files.names()}
    if not files.settings.exists() and db is None:
        return {"cluster": paths.name, "database": None, "verifiers": [], "nodes": []}
    store = open_store(url)
    try:
        rows, nodes = store.verifiers(), store.nodes()
    finally:
        store.close()
    names = sorted(set(processes) | {r.name for r in rows})
    beats = {r.name: r for r in rows}
    return {
        "cluster": paths.name,
        "database": "postgresql" if url.startswith("postgres") else url,
        "verifiers": [{"name": n, "pid": processes.get(n),
                       "running": processes.get(n) is not None,
                       **({"heartbeat": beats[n].heartbeat, "interval": beats[n].interval}
                          if n in beats else {})} for n in names],
        "nodes": [{**n.to_dict(), "kind": "node" if host_of(n.node) is None else "host",
                   "stale": _stale(n.last_time, rows)} for n in nodes],
    }


def _stale(last_time: float, verifiers: Sequence[VerifierRow]) -> bool:
    """Whether a node's last verdict is older than three of the longest interval: no
    verifier is keeping it current, so its state says nothing about now."""
    interval = max((v.interval for v in verifiers), default=DEFAULT_INTERVAL_S)
    return time.time() - last_time > 3 * interval


# --- the process ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m testbed.verifier.service")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--cluster", required=True)
    p.add_argument("--name", default="verifier")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S)
    p.add_argument("--deadline", type=float, default=None)
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    p.add_argument("--db", default=None)
    p.add_argument("--webhook", action="append", default=[])
    p.add_argument("--webhook-secret", type=Path, default=None)
    p.add_argument("--push", action="append", default=[])
    p.add_argument("--no-hosts", dest="hosts", action="store_false")
    return p


def config_from_args(args: argparse.Namespace) -> VerifierConfig:
    return VerifierConfig(workdir=args.workdir, cluster=args.cluster, name=args.name,
                          interval=args.interval, deadline=args.deadline, db=args.db,
                          webhooks=tuple(args.webhook), webhook_secret=args.webhook_secret,
                          push=tuple(args.push), workers=args.workers, hosts=args.hosts)


def main(argv: Sequence[str] | None = None) -> int:
    """The detached process: serve until SIGTERM/SIGINT; the pid file says it is ready."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = config_from_args(_parser().parse_args(argv))
        files = VerifierFiles(ClusterPaths(config.workdir, config.cluster))
        store = open_store(files.database_url(config.db))
        service = VerifierService(config, store)
    except TestbedError as exc:
        print(f"verifier: error: {exc}", file=sys.stderr)
        return 4
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: service.stop())
    pid_file = files.pid_file(config.name)
    try:
        service.start()
        atomic_write(pid_file, f"{os.getpid()}\n".encode())
        service.run()
    except TestbedError as exc:
        print(f"verifier: error: {exc}", file=sys.stderr)
        return 4
    finally:
        with contextlib.suppress(OSError, StateError):
            remove_durably(pid_file)
        service.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
