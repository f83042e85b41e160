"""Node roles: the service a node runs once it has booted and its agent is about to serve.

A role is a callable ``start(node: NodeContext) -> RoleHandle`` registered in
:data:`ROLES` under its name (the ``role:`` of a node in the cluster spec). It
is called in the node process after the measured boot, with everything a
service needs in :class:`NodeContext`; :meth:`RoleHandle.stop` is called when
the node shuts down, and :meth:`RoleHandle.describe` is what ``status`` shows
as the node's service.

``generic`` and ``verifier`` run no service. ``server`` and ``client`` run
the Trusted Passages service (:mod:`testbed.tp_role`), ``cryptovm`` the
CryptoVM (:mod:`testbed.cryptovm_role`); :func:`register_role` replaces a
starter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from attestation.credential import CredentialChallenge
from attestation.evidence import Evidence
from attestation.tpm import EndorsementKey, KeyAlgorithm, TpmClient, TpmKey
from attestation.tpm_types import PcrSelection
from testbed.cluster import ROLE_NAMES, ClusterSpec, NodeSpec
from testbed.errors import StateError
from testbed.localca import LocalCA
from testbed.sim import BANK, SIM_PCRS, BootArtifacts, ClusterPaths, NodePaths

__all__ = [
    "ROLES",
    "NoService",
    "NodeContext",
    "RoleHandle",
    "RoleStarter",
    "register_role",
    "start_client",
    "start_cryptovm",
    "start_role",
    "start_server",
]


@dataclass(frozen=True)
class NodeContext:
    """Everything a role may use inside a node process.

    ``tpm`` is the node's only TPM connection (swtpm serves one client at a
    time and has no resource manager): hold ``tpm_lock`` around *every* use,
    check ``stopping`` once holding it (the node closes ``tpm`` under the lock
    after setting ``stopping``), and flush transient objects before releasing
    it. :meth:`quote` and :meth:`activate_credential` do all three.
    """

    name: str
    role: str
    spec: NodeSpec
    cluster: ClusterSpec
    boot: BootArtifacts  # what the node really booted (tampering applied)
    tpm: TpmClient
    tpm_lock: threading.Lock
    ak: TpmKey  # persistent, in the endorsement hierarchy; registered by `testbed up`
    ak_algorithm: KeyAlgorithm
    ek: EndorsementKey
    event_log: bytes  # the TCG log of the measured boot
    paths: NodePaths
    cluster_paths: ClusterPaths
    ca: LocalCA  # the work dir's EK CA: ca.ca_bundle() validates other nodes' EKs
    tcti: str
    stopping: threading.Event  # set when the node begins to shut down

    @property
    def workdir(self) -> Path:
        return self.cluster_paths.workdir

    @property
    def run_dir(self) -> Path:
        return self.paths.run

    @property
    def state_dir(self) -> Path:
        return self.paths.state

    def quote(self, nonce: bytes, selection: PcrSelection = SIM_PCRS) -> Evidence:
        """A quote by the node's AK, as evidence carrying the event log and the EK."""
        with self.tpm_lock:
            self._check_running()
            result = self.tpm.quote(self.ak, selection, nonce)
        return Evidence(attest=result.attest, signature=result.signature,
                        ak_public=self.ak.public, pcr_bank=selection.bank, pcrs=result.pcrs,
                        event_log=self.event_log if selection.bank == BANK else None,
                        ek_public=self.ek.public, ek_certificate=self.ek.certificate)

    def activate_credential(self, challenge: CredentialChallenge) -> bytes:
        with self.tpm_lock:
            self._check_running()
            return self.tpm.activate_credential(self.ak, self.ek.algorithm, challenge)

    def _check_running(self) -> None:
        if self.stopping.is_set():
            raise StateError(f"node {self.name} is shutting down")


class RoleHandle(Protocol):
    def stop(self) -> None: ...

    def describe(self) -> str: ...


RoleStarter = Callable[[NodeContext], RoleHandle]


@dataclass
class NoService:
    """A role that runs nothing; ``description`` is what ``status`` shows."""

    description: str = "none"

    def stop(self) -> None:
        pass

    def describe(self) -> str:
        return self.description


def start_no_service(node: NodeContext) -> RoleHandle:
    return NoService("none")


# --- services --------------------------------------------------------------------------------


def start_server(node: NodeContext) -> RoleHandle:
    """Trusted Passages: an attested-channel listener, and `connect` to peers."""
    # Imported here: the service module needs NodeContext from this one.
    from testbed.tp_role import start_trusted_passages

    return start_trusted_passages(node)


def start_client(node: NodeContext) -> RoleHandle:
    """Trusted Passages client: the same service (channels are mutual, both ways)."""
    from testbed.tp_role import start_trusted_passages

    return start_trusted_passages(node)


def start_cryptovm(node: NodeContext) -> RoleHandle:
    """The CryptoVM: sealed key store, CVM1 wire server, attested listener for nodes."""
    from testbed.cryptovm_role import start_cryptovm_service

    return start_cryptovm_service(node)


ROLES: dict[str, RoleStarter] = {
    "generic": start_no_service,
    "verifier": start_no_service,
    "server": start_server,
    "client": start_client,
    "cryptovm": start_cryptovm,
}
assert set(ROLES) == set(ROLE_NAMES), "every role a spec may name needs a starter"


def register_role(name: str, starter: RoleStarter) -> None:
    """Replace the starter of a role the spec format knows (e.g. from a plugin module)."""
    if name not in ROLE_NAMES:
        raise ValueError(f"unknown role {name!r}; the spec format knows {', '.join(ROLE_NAMES)}")
    ROLES[name] = starter


def start_role(node: NodeContext) -> RoleHandle:
    # Looked up at call time, so register_role() before a node starts takes effect.
    return ROLES[node.role](node)
