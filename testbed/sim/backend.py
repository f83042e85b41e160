"""The ``sim`` backend: a cluster of node processes, each with its own swtpm.

Each node is ``python -m testbed.sim.node`` (:mod:`testbed.sim.node`), started detached
and reached over its agent socket; the nodes of a spec's ``swarm: N`` entry are hosted
many to a process (:mod:`testbed.sim.swarm`), each still with its own swtpm and agent
socket. Its boot is simulated (:mod:`testbed.tpm.boot`): the
policy it must satisfy is predicted from its spec's honest boot chain, without any TPM.
Its role service runs inside the node process from the start.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from attestation.errors import TestbedError
from attestation.policy import ReferencePolicy
from attestation.tpm_types import PcrSelection
from cryptovm.disks import Call, ensure_disk_key
from testbed.cluster.agent import AgentClient, AgentUnavailable, UnixTransport
from testbed.cluster.results import (
    DownResult,
    NodeDown,
    NodeStatus,
    NodeUp,
    NoFacts,
    ServiceInfo,
)
from testbed.cluster.runtime import ensure_runtime_policy
from testbed.cluster.state import load_spec, read_attestations, spec_policy
from testbed.core.errors import StateError
from testbed.core.files import locked
from testbed.core.paths import ClusterPaths, private_tree
from testbed.core.processes import terminate
from testbed.core.progress import Progress
from testbed.roles.cryptovm import cryptovm_endpoint
from testbed.roles.disks import UNLOCK_ACTION
from testbed.roles.registry import role
from testbed.sim.processes import (
    AGENTS_PER_PROCESS,
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    SWARM_POLL_S,
    SWARM_READY_S_PER_NODE,
    SWARM_STOP_TIMEOUT_S,
    cluster_processes,
    ensure_exited,
    hosting_swarm,
    inspect_node,
    launch_node,
    launch_swarm,
    node_pid,
    prepare_run_dir,
    stop_process,
    swarm_of,
    wait_node_gone,
    wait_ready,
)
from testbed.spec.cluster_spec import ClusterSpec, DiskSpec, NodeSpec
from testbed.svd.volumes import DiskFiles, DiskStatus, attach, detach_all, disk_status
from testbed.tpm.boot import SIM_PCRS, boot_summary, predicted_policy
from testbed.tpm.runtime import default_policy
from testbed.tpm.swtpm import Swtpm

__all__ = ["SimBackend", "SimNodeFacts", "SimStatusFacts", "node_policy"]


@dataclass(frozen=True)
class SimNodeFacts:
    pid: int | None = None
    swtpm_pid: int | None = None
    tcti: str | None = None
    disks: tuple[DiskStatus, ...] = ()  # encrypted disks (docs/svd.md): never a key
    tpm_latency_ms: float | None = None  # the TPM latency model, when the node has one
    batch_window_ms: float | None = None  # its quotes are batched, within this window

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid, "swtpm_pid": self.swtpm_pid, "tcti": self.tcti,
                               "tpm_latency_ms": self.tpm_latency_ms,
                               "batch_window_ms": self.batch_window_ms}
        if self.disks:
            out["disks"] = [d.to_dict() for d in self.disks]
        return out

    def summary_items(self) -> list[tuple[str, str]]:
        timing = [(label, f"{value:g} ms") for label, value in (
            ("tpm latency", self.tpm_latency_ms), ("batch window", self.batch_window_ms))
            if value is not None]
        items = [("pid", str(self.pid or "-")), ("swtpm", str(self.swtpm_pid or "-")),
                 ("tcti", self.tcti or "-"), *timing]
        if self.disks:
            items.append(("disks", ", ".join(d.summary() for d in self.disks)))
        return items


@dataclass(frozen=True)
class SimStatusFacts(SimNodeFacts):
    agent_socket: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "agent_socket": self.agent_socket}


def disk_files(paths: ClusterPaths, node: str, disk: str) -> DiskFiles:
    node_paths = paths.node(node)
    return DiskFiles(node, disk, node_paths.state, node_paths.run)


def node_policy(node: NodeSpec) -> ReferencePolicy:
    """A node's reference policy: its file, or predicted from its *untampered* boot chain."""
    return spec_policy(node) or predicted_policy(node.name, node.boot)


STATUS_PROBE_S = 2.0  # an agent that has not answered by then is unresponsive


class SimBackend:
    """Node processes on this machine (see the module docstring)."""

    name = "sim"
    pcrs: PcrSelection = SIM_PCRS

    def __init__(self, paths: ClusterPaths) -> None:
        self.paths = paths
        self._deadline = 0.0
        self._boots: dict[str, dict[str, str]] = {}
        self._has_cryptovm = False

    # --- up -------------------------------------------------------------------------------

    def prepare(self, spec: ClusterSpec, progress: Progress) -> dict[str, ReferencePolicy]:
        if spec.backend != "sim":
            raise StateError(f"cluster {spec.name} has backend {spec.backend}, not sim")
        # Before any process starts: every artifact must be readable, every policy valid.
        self._boots = {n.name: boot_summary(n.effective_boot) for n in spec.nodes}
        self._has_cryptovm = any(n.role == "cryptovm" for n in spec.nodes)
        has_disks = any(n.disks for n in spec.nodes)
        progress.expect(len(spec.nodes) + self._has_cryptovm + has_disks)
        for node in spec.nodes:  # sim nodes run their baseline: judged by the runtime check
            ensure_runtime_policy(self.paths, node.name, default_policy(f"{node.name}-runtime"))
        return {node.name: node_policy(node) for node in spec.nodes}

    def launch(self, spec: ClusterSpec, progress: Progress) -> list[NodeUp]:
        """Launch every node that is not up yet, all at once: they come up in parallel."""
        swarmed = {n.name: n for n in spec.nodes if n.swarm is not None}
        launched = self._launch_swarms(list(swarmed.values())) if swarmed else {}
        nodes = [launched[node.name] if node.name in swarmed else self._launch(node)
                 for node in spec.nodes]
        fresh = sum(n.action != "kept" for n in launched.values())
        self._deadline = time.monotonic() + READY_TIMEOUT_S + SWARM_READY_S_PER_NODE * fresh
        return nodes

    def _launch_swarms(self, specs: list[NodeSpec]) -> dict[str, NodeUp]:
        """Swarm nodes: those running are kept, the others started
        :data:`AGENTS_PER_PROCESS` to a swarm process (one /proc scan for them all)."""
        nodes = {spec.name: NodeUp(spec.name, spec.role, SimNodeFacts(),
                                   tampered=spec.tampered.fields() if spec.tampered else ())
                 for spec in specs}
        processes = cluster_processes(self.paths)
        start = []
        for name, node in nodes.items():
            current = inspect_node(self.paths, name) if hosting_swarm(self.paths, name) \
                else None
            if current is not None and current.state in ("running", "starting") \
                    and current.pid is not None:
                node.action, node.facts = "kept", SimNodeFacts(pid=current.pid)
                continue
            private_tree(self.paths.workdir, self.paths.node(name).root)
            prepare_run_dir(self.paths, name, processes)
            start.append(name)
        for first in range(0, len(start), AGENTS_PER_PROCESS):
            chunk = start[first:first + AGENTS_PER_PROCESS]
            try:
                pid = launch_swarm(self.paths, chunk)
            except TestbedError as exc:
                for name in chunk:
                    nodes[name].fail(f"could not start its swarm process: {exc}")
                continue
            for name in chunk:
                nodes[name].facts = SimNodeFacts(pid=pid)
        return nodes

    def _launch(self, spec: NodeSpec) -> NodeUp:
        tampered = spec.tampered.fields() if spec.tampered else ()
        node = NodeUp(spec.name, spec.role, SimNodeFacts(), tampered=tampered)
        current = inspect_node(self.paths, spec.name)
        if current.state in ("running", "starting") and current.pid is not None:
            node.action, node.facts = "kept", SimNodeFacts(pid=current.pid)
            return node
        if current.pid is not None:  # failed or stopping, still exiting: let it finish
            ensure_exited(self.paths, spec.name, current.pid)
        # clusters/ and nodes/ too: work directories of older versions had them 0755.
        private_tree(self.paths.workdir, self.paths.node(spec.name).root)
        node_paths = self.paths.node(spec.name)
        # A node that crashed left its disks open: locked before its run directory goes,
        # so that the new boot gets them back only by attesting again.
        detach_all(node_paths.state, node_paths.run, spec.name)
        try:
            prepare_run_dir(self.paths, spec.name)
            node.facts = SimNodeFacts(pid=launch_node(self.paths, spec.name))
        except TestbedError as exc:
            node.fail(f"could not start the node: {exc}")
        return node

    def wait_ready(self, node: NodeUp) -> None:
        assert isinstance(node.facts, SimNodeFacts) and node.facts.pid is not None
        swarm = self.paths.node(node.name).pid_file.exists() and \
            hosting_swarm(self.paths, node.name) is not None
        info = wait_ready(self.paths, node.name, node.facts.pid, self._deadline,
                          SWARM_POLL_S if swarm else 0.02)
        node.facts = SimNodeFacts(node.facts.pid, info.swtpm_pid, info.tcti,
                                  tpm_latency_ms=info.tpm_latency_ms,
                                  batch_window_ms=info.batch_window_ms)
        if node.action == "kept":
            # A running node keeps what it booted; say so when the spec now differs.
            node.tampered = tuple(info.tampered)
            if info.boot != self._boots.get(node.name):
                node.note = ("runs another boot chain than the spec now gives; "
                             "`testbed down` then `testbed up` to apply the spec")

    def agent(self, node: str, *, timeout: float = 30.0) -> AgentClient:
        """The node's agent; a node known to be failed, crashed, stopped or stuck is
        refused at once with the reason (a stopped swtpm would otherwise hold a quote
        until the timeout)."""
        state = inspect_node(self.paths, node)
        if state.state not in ("running", "starting"):
            why = f": {state.reason}" if state.reason else " (`testbed up` starts it)"
            raise AgentUnavailable(f"node {node!r} is {state.state}{why}")
        return AgentClient(UnixTransport(self.paths.node(node).socket), node=node,
                           timeout=timeout)

    def start_service(self, node: NodeUp) -> None:
        """A sim node runs its role service from the start; ``status`` shows it."""
        with contextlib.suppress(TestbedError):
            node.service = ServiceInfo.from_dict(
                self.agent(node.name, timeout=5.0).status().get("service"))

    def finish(self, nodes: list[NodeUp], progress: Progress) -> None:
        """Keyless TLS: with a cryptovm node in the cluster, each running server and
        client node gets its TLS certificate from it (after registration: the CryptoVM
        checks nodes against the registry). A refusal (a tampered node) is reported per
        node; it is the CryptoVM's own attestation-gated release at work."""
        if not self._has_cryptovm:
            return
        with progress.step("keyless TLS: server and client nodes enroll with the CryptoVM"):
            for node in nodes:
                enroll = role(node.role).enroll
                if enroll is not None and node.action != "failed":
                    node.enrollment = enroll(self.agent(node.name))
        self._unlock_disks(nodes, progress)

    def _unlock_disks(self, nodes: list[NodeUp], progress: Progress) -> None:
        """Host-side (transparent) disks: the backend, playing the hypervisor, asks the
        CryptoVM for each disk's key with the node's fresh quote, only for a node that
        passed its attestation; the key goes to a qemu-storage-daemon, never to a file."""
        spec = load_spec(self.paths)
        host = [(n, d) for n in nodes for d in spec.node(n.name).disks if d.mode == "host"]
        guest = [n for n in nodes if n.role != "cryptovm"  # its store disk opened at start
                 and any(d.mode == "guest" for d in spec.node(n.name).disks)]
        if not host and not guest:
            return
        cryptovm = next(n.name for n in spec.nodes if n.role == "cryptovm")
        with progress.step("encrypted disks: unlocked after attestation (host side by the "
                           "hypervisor, guest side by the node itself)"):
            if host:
                self._unlock_host(host, cryptovm)
            for node in guest:
                self._unlock_guest(node)

    def _unlock_guest(self, node: NodeUp) -> None:
        """The node fetches its own keys over Trusted Passages: the backend sees none."""
        if node.action == "failed" or node.attested is not True:
            return
        try:
            answer = self.agent(node.name, timeout=60.0).role(UNLOCK_ACTION)
            disks = tuple(DiskStatus(**d) for d in answer.get("disks", ()))
        except (TestbedError, TypeError) as exc:
            node.fail(f"guest disks not unlocked: {exc}")
            return
        if isinstance(node.facts, SimNodeFacts):
            node.facts = replace(node.facts, disks=(*node.facts.disks, *disks))

    def _unlock_host(self, host: list[tuple[NodeUp, DiskSpec]], cryptovm: str) -> None:
        try:
            client = cryptovm_endpoint(self.paths, cryptovm).client()
        except TestbedError as exc:  # e.g. the cryptovm node failed to start
            for node, disk in host:
                if node.action != "failed" and node.attested is True:
                    node.fail(f"disk {disk.name} not unlocked: no CryptoVM to ask ({exc})")
            return
        try:
            for node, disk in host:
                self._unlock(node, disk, cryptovm, client.call)
        finally:
            client.close()

    def _unlock(self, node: NodeUp, disk: DiskSpec, cryptovm: str, call: Call) -> None:
        if node.action == "failed" or node.attested is not True:
            return  # fail closed: no key for a node that did not pass its policy
        agent = self.agent(node.name)
        try:
            status = attach(disk_files(self.paths, node.name, disk.name), disk, cryptovm, call,
                            lambda data: agent.quote(data, list(SIM_PCRS.indices)),
                            lambda: ensure_disk_key(call, node.name, disk.name,
                                                    self.paths.policy(node.name).read_text(),
                                                    self.paths.registry.read_text()))
        except (TestbedError, OSError) as exc:
            node.fail(f"disk {disk.name} not unlocked: {exc}")
            return
        if isinstance(node.facts, SimNodeFacts):
            node.facts = replace(node.facts, disks=(*node.facts.disks, status))

    def facts(self) -> NoFacts:
        return NoFacts()

    def log_file(self, node: str) -> Path:
        """The node's log; a swarm node's is its swarm process's."""
        members = hosting_swarm(self.paths, node)
        return self.paths.swarm_log(members[0]) if members else self.paths.node(node).log

    def close(self) -> None:
        """Nothing to release: the nodes outlive the command by design."""

    # --- status ---------------------------------------------------------------------------

    def status(self) -> list[NodeStatus]:
        spec = load_spec(self.paths) if self.paths.spec.is_file() else None
        specs = {n.name: n for n in spec.nodes} if spec else {}
        # Spec order first, then nodes left over from an earlier spec of this cluster.
        names = [*specs, *(n for n in self.paths.node_names() if n not in specs)]
        last = read_attestations(self.paths)
        return [self._status(name, specs.get(name), last.get(name)) for name in names]

    def _status(self, name: str, spec: NodeSpec | None, last: Any) -> NodeStatus:
        state = inspect_node(self.paths, name)
        label, reason = state.state, state.reason
        service, agent = None, None
        if state.state == "running":
            try:  # within the 5 s that status promises to find a stuck node in
                doc = self.agent(name, timeout=STATUS_PROBE_S).status()
                agent = "answering"
                service = ServiceInfo.from_dict(doc.get("service"))
            except AgentUnavailable as exc:
                label, agent, reason = "unresponsive", "not answering", str(exc)
            except TestbedError as exc:
                reason = f"agent answered, but: {exc}"
        live = state.info if state.pid else None  # what the running node says of itself
        spec_tampered = spec.tampered.fields() if spec and spec.tampered else ()
        disks = tuple(disk_status(disk_files(self.paths, name, d.name), d)
                      for d in (spec.disks if spec else ()))
        facts = SimStatusFacts(state.pid, live.swtpm_pid if live else None,
                               live.tcti if live else None, disks,
                               live.tpm_latency_ms if live else None,
                               live.batch_window_ms if live else None,
                               agent_socket=str(self.paths.node(name).socket))
        role = (live.role if live else None) or (spec.role if spec else "?")
        return NodeStatus(
            name=name, role=role, state=label, reason=reason, agent=agent, service=service,
            tampered=tuple(live.tampered) if live else spec_tampered, last_attestation=last,
            facts=facts)

    # --- down -----------------------------------------------------------------------------

    def down(self, *, purge: bool) -> DownResult:
        """Stop every node and swtpm of the cluster and verify none is left.

        TPM state (node identities), the registry, policies and the clock history stay
        for the next ``up`` unless ``purge``, which removes the cluster directory.
        """
        paths = self.paths
        # Even with the cluster directory deleted, its processes are still found in /proc.
        lock = locked(paths.lock) if paths.root.is_dir() else contextlib.nullcontext()
        with lock:
            swarms = self._stop_swarms()
            names = sorted(set(paths.node_names()) | {p.node for p in cluster_processes(paths)})
            nodes = [self._stop_node(name, swarms.get(name)) for name in names]
            for proc in cluster_processes(paths):  # anything not found through its pid file
                with contextlib.suppress(StateError):
                    stop_process(paths, proc.pid, proc.kind, proc.node)  # type: ignore[arg-type]
            leftovers = cluster_processes(paths)
            if not leftovers:
                self._remove_state(names, purge)
        return DownResult(self.name, paths.name, nodes, purge and not leftovers, leftovers)

    def _stop_swarms(self) -> dict[str, str | None]:
        """Stop every swarm process at once (each stops its nodes and their swtpms):
        node -> the signal its swarm process took."""
        swarms = {proc.pid: swarm_of(self.paths, proc.pid)
                  for proc in cluster_processes(self.paths) if proc.kind == "swarm"}

        def stop(pid: int) -> str | None:
            members = swarms[pid] or []
            with contextlib.suppress(StateError):
                return terminate(pid, lambda: swarm_of(self.paths, pid) == members,
                                 SWARM_STOP_TIMEOUT_S)
            return None

        with ThreadPoolExecutor(max(1, len(swarms))) as pool:
            signals = dict(zip(swarms, pool.map(stop, swarms), strict=True))
        return {node: signals[pid] for pid, members in swarms.items()
                for node in members or ()}

    def _stop_node(self, name: str, swarm_signal: str | None = None) -> NodeDown:
        pid = node_pid(self.paths, name)
        stopped_by = self._stop_node_process(name, pid) if pid is not None else swarm_signal
        swtpm_stopped = False
        with contextlib.suppress(StateError):  # unreadable pid file: the /proc scan finds it
            swtpm_stopped = Swtpm.stop_pidfile(self.paths.node(name).swtpm_pid)
        node_paths = self.paths.node(name)  # disks locked: the node (VM) is gone
        detach_all(node_paths.state, node_paths.run, name)
        return NodeDown(name, stopped_by, swtpm_stopped)

    def _stop_node_process(self, name: str, pid: int) -> str | None:
        """Ask the agent to shut down (the node stops its swtpm itself), then signal."""
        with contextlib.suppress(TestbedError, AgentUnavailable):
            self.agent(name, timeout=2.0).shutdown()
            if wait_node_gone(self.paths, name, pid, STOP_TIMEOUT_S):
                return "agent"
        try:
            return stop_process(self.paths, pid, "node", name)
        except StateError:
            return None  # survived SIGKILL: down() reports it as a leftover

    def _remove_state(self, names: list[str], purge: bool) -> None:
        if purge:
            shutil.rmtree(self.paths.root, ignore_errors=True)
            return
        for name in names:
            shutil.rmtree(self.paths.node(name).run, ignore_errors=True)
