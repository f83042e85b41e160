"""What every role is built on: the node context a role service runs in, the service
interface, and typed role requests.

A role's *node service* runs inside a sim node process (started after the measured
boot, before the agent serves); :meth:`RoleService.describe` is what ``status`` shows,
and :meth:`RoleService.call` answers the agent's ``role`` requests, each decoded into
the role's own :class:`RoleRequest` type before anything acts on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

from attestation.credential import CredentialChallenge
from attestation.evidence import Evidence
from attestation.tpm import EndorsementKey, KeyAlgorithm, TpmClient, TpmKey
from attestation.tpm_types import PcrSelection
from testbed.cluster.results import ServiceInfo
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths, NodePaths
from testbed.roles.revocation import RevocationGate
from testbed.spec.cluster_spec import BootSpec, ClusterSpec, NodeSpec
from testbed.tpm.boot import BANK, SIM_PCRS
from testbed.tpm.localca import LocalCA
from trusted_passages.batch import BatchProof

__all__ = [
    "InfoRequest",
    "NoService",
    "NodeContext",
    "RoleRequest",
    "RoleService",
    "decode_request",
]


@dataclass(frozen=True)
class NodeContext:
    """Everything a role may use inside a node process.

    ``tpm`` is the node's only TPM connection (swtpm serves one client at a time and
    has no resource manager): use it only through :meth:`tpm_session`, :meth:`quote`
    and :meth:`activate_credential`, which hold ``tpm_lock`` and check ``stopping``
    under it (the node closes ``tpm`` under the lock after setting ``stopping``).
    """

    name: str
    role: str
    spec: NodeSpec
    cluster: ClusterSpec
    boot: BootSpec  # what the node really booted (tampering applied)
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
    revocations: RevocationGate  # the verifier's signed decisions this node applied
    # The node's batched quote (spec ``batch_window``): a leaf in, the quote of its
    # batch's root and the leaf's path out; None quotes once per request.
    batched_quote: Callable[[bytes], tuple[Evidence, BatchProof]] | None = None

    @property
    def run_dir(self) -> Path:
        return self.paths.run

    @property
    def state_dir(self) -> Path:
        return self.paths.state

    @contextmanager
    def tpm_session(self) -> Iterator[TpmClient]:
        """The node's TPM connection, lent under its lock."""
        with self.tpm_lock:
            self._check_running()
            yield self.tpm

    def quote(self, nonce: bytes, selection: PcrSelection = SIM_PCRS) -> Evidence:
        """A quote by the node's AK, as evidence carrying the event log and the EK."""
        with self.tpm_session() as tpm:
            result = tpm.quote(self.ak, selection, nonce)
        return Evidence(attest=result.attest, signature=result.signature,
                        ak_public=self.ak.public, pcr_bank=selection.bank, pcrs=result.pcrs,
                        event_log=self.event_log if selection.bank == BANK else None,
                        ek_public=self.ek.public, ek_certificate=self.ek.certificate)

    def activate_credential(self, challenge: CredentialChallenge) -> bytes:
        with self.tpm_session() as tpm:
            return tpm.activate_credential(self.ak, self.ek.algorithm, challenge)

    def _check_running(self) -> None:
        if self.stopping.is_set():
            raise StateError(f"node {self.name} is shutting down")


class RoleRequest(Protocol):
    """One request a role service answers: decoded from the agent's ``args``."""

    action: ClassVar[str]

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self: ...

    def to_args(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class InfoRequest:
    """What a role service says about itself (ports, keys, certificates)."""

    action: ClassVar[str] = "info"

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        if args:
            raise StateError("info takes no args")
        return cls()

    def to_args(self) -> dict[str, Any]:
        return {}


def decode_request(types: tuple[type[RoleRequest], ...], action: str,
                   args: Mapping[str, Any], service: str) -> RoleRequest:
    """The typed request for ``action`` among ``types``, or a StateError naming the known."""
    for kind in types:
        if kind.action == action:
            return kind.from_args(args)
    known = ", ".join(kind.action for kind in types) or "no actions"
    raise StateError(f"unknown action {action[:40]!r}: the {service} knows {known}")


class RoleService(Protocol):
    """A running role service inside a node process."""

    def describe(self) -> ServiceInfo: ...

    def call(self, action: str, args: Mapping[str, Any]) -> dict[str, Any]: ...

    def stop(self) -> None: ...


@dataclass
class NoService:
    """A role that runs nothing."""

    def describe(self) -> ServiceInfo:
        return ServiceInfo("none")

    def call(self, action: str, args: Mapping[str, Any]) -> dict[str, Any]:
        raise StateError(f"unknown action {action[:40]!r}: this node's role runs no service")

    def stop(self) -> None:
        pass
