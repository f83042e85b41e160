"""``up`` and ``attest``, written once for every backend.

``up`` means the same on every backend: every node of the spec is up, registered (its
EK certificate validated against the work directory's CA, its AK activated) and
attested against its policy; a node's role service starts once it is attested. A node
that cannot come up is a failure (``UpResult.ok`` false); a node that comes up but is
rejected is reported, with the failed check (``UpResult.rejected``).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from attestation.errors import TestbedError
from attestation.files import private_dir
from attestation.policy import ReferencePolicy
from attestation.registrar import Registrar, register
from testbed.cluster.agent import AgentClient
from testbed.cluster.backend import ClusterBackend, NodeFailed
from testbed.cluster.results import AttestResult, NodeUp, UpResult
from testbed.cluster.runtime import forget_runtime_state
from testbed.cluster.state import (
    load_node_policy,
    load_registry,
    load_spec,
    save_registry,
    write_spec_and_policies,
)
from testbed.cluster.verification import attest_node, ek_ca_bundle
from testbed.core.files import locked
from testbed.core.progress import Progress
from testbed.spec.cluster_spec import ClusterSpec
from testbed.tpm.localca import LocalCA

__all__ = ["attest", "up"]


@dataclass
class _Run:
    """What one ``up`` works with."""

    backend: ClusterBackend
    policies: dict[str, ReferencePolicy]
    registrar: Registrar
    registry_lock: threading.Lock = field(default_factory=threading.Lock)


def up(backend: ClusterBackend, spec: ClusterSpec, progress: Progress) -> UpResult:
    """Bring ``spec`` up on ``backend`` (idempotent: nodes that are up are kept)."""
    started = time.monotonic()
    paths = backend.paths
    private_dir(paths.root)
    policies = backend.prepare(spec, progress)
    with locked(paths.lock):
        write_spec_and_policies(paths, spec, policies)
        registrar = Registrar(ek_ca_bundle(paths, LocalCA.ensure(paths.ca_dir)))
        run = _Run(backend, policies, registrar)
        nodes = backend.launch(spec, progress)
        _bring_up_all(run, nodes, progress)
        backend.finish(nodes, progress)
    return UpResult(backend.name, spec.name, paths.root, nodes, time.monotonic() - started,
                    backend.facts())


def _bring_up_all(run: _Run, nodes: list[NodeUp], progress: Progress) -> None:
    """Each node in parallel; progress shows them in spec order as they finish."""
    with concurrent.futures.ThreadPoolExecutor(max(1, len(nodes))) as pool:
        futures = [pool.submit(_bring_up, run, node) for node in nodes]
        for node, future in zip(nodes, futures, strict=True):
            tampered = ", TAMPERED" if node.tampered else ""
            kept = "already running; " if node.action == "kept" else ""
            with progress.step(f"node {node.name} ({node.role}{tampered}): {kept}ready, EK "
                               "check, credential activation, attestation"):
                future.result()


def _bring_up(run: _Run, node: NodeUp) -> None:
    """Ready, registered, attested, serving: each step only if the one before held."""
    if node.action == "failed":
        return
    backend = run.backend
    try:
        backend.wait_ready(node)
        agent = backend.agent(node.name)
    except TestbedError as exc:
        node.fail(exc.reason if isinstance(exc, NodeFailed) else str(exc),
                  backend.log_file(node.name))
        return
    try:
        _register(run, node.name, agent)
        node.registered = True
        result = attest_node(backend.paths, node.name, agent, run.policies[node.name],
                             backend.pcrs.indices)
    except TestbedError as exc:
        step = "attestation" if node.registered else "registration"
        node.fail(f"{step} failed: {exc}", backend.log_file(node.name))
        return
    node.attestation = result.record()
    if not result.report.ok:
        return  # no service on a node that failed its attestation
    try:
        backend.start_service(node)
    except TestbedError as exc:
        node.fail(f"{node.role} service: {exc}", backend.log_file(node.name))


def _register(run: _Run, node: str, agent: AgentClient) -> None:
    """Activate the node's AK (unless registered before) and add it to the registry."""
    paths = run.backend.paths
    with run.registry_lock:
        registry = load_registry(paths)
    ak = register(agent, node, run.registrar, registry)  # the node's TPM: nodes in parallel
    if ak is not None:
        with run.registry_lock:
            registry = load_registry(paths)
            registry.add(node, ak)  # replaces the AK of an earlier incarnation of this node
            save_registry(paths, registry)
            forget_runtime_state(paths, node)


def attest(backend: ClusterBackend, node: str, policy_path: Path | None = None
           ) -> AttestResult:
    """``testbed attest NODE``: a fresh quote over the node's agent, verified and recorded."""
    spec = load_spec(backend.paths)
    spec.node(node)  # a clear error for a node the cluster does not have
    policy = load_node_policy(backend.paths, node, policy_path)
    return attest_node(backend.paths, node, backend.agent(node), policy, backend.pcrs.indices)
