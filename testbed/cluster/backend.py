"""The cluster backend interface: what ``sim`` (node processes) and ``qemu`` (libvirt VMs)
each implement so that ``up``, ``status``, ``attest`` and ``down`` mean the same on both.

``up`` itself is written once (:func:`testbed.cluster.lifecycle.up`): the backend
prepares (policies, images), launches nodes, says when each is ready and reaches its
agent; registration and attestation are the lifecycle's. ``status`` and ``down`` are
the backend's own, returning the shared result types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from attestation.policy import ReferencePolicy
from attestation.tpm_types import PcrSelection
from testbed.cluster.agent import AgentClient
from testbed.cluster.results import BackendFacts, DownResult, NodeStatus, NodeUp
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.core.progress import Progress
from testbed.spec.cluster_spec import ClusterSpec

__all__ = ["ClusterBackend", "NodeFailed"]


class NodeFailed(StateError):
    """A node did not come up: ``reason`` says why in a line; ``detail`` (e.g. the tail of
    a VM's console) completes the message for callers that have nothing else to show."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}; {detail}" if detail else reason)
        self.reason = reason


class ClusterBackend(Protocol):
    """One cluster on one backend, for the length of one command."""

    name: str
    paths: ClusterPaths
    pcrs: PcrSelection
    """What an attestation of a node of this backend quotes."""

    def prepare(self, spec: ClusterSpec, progress: Progress) -> dict[str, ReferencePolicy]:
        """Everything before a node starts: artifacts readable (images built), and each
        node's reference policy."""
        ...

    def launch(self, spec: ClusterSpec, progress: Progress) -> list[NodeUp]:
        """Start every node of ``spec`` that is not up (in parallel); keep those that are."""
        ...

    def wait_ready(self, node: NodeUp) -> None:
        """Until ``node``'s agent answers; :class:`NodeFailed` if it never will."""
        ...

    def agent(self, node: str, *, timeout: float = 30.0) -> AgentClient: ...

    def start_service(self, node: NodeUp) -> None:
        """After ``node`` was attested: start its role's service where the backend does."""
        ...

    def finish(self, nodes: list[NodeUp], progress: Progress) -> None:
        """After every node is up: what needs all of them (keyless TLS enrollment)."""
        ...

    def facts(self) -> BackendFacts: ...

    def log_file(self, node: str) -> Path | None:
        """Where the node's own output goes (a sim node's log, a VM's serial console)."""
        ...

    def status(self) -> list[NodeStatus]: ...

    def down(self, *, purge: bool) -> DownResult: ...

    def close(self) -> None:
        """Release what this command held; nodes and the daemons they need keep running."""
        ...
