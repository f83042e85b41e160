"""The roles a node of a cluster spec may have, and what each runs where.

A :class:`Role` says what runs for it on each backend: in a sim node process (its node
service, started after the measured boot), in a qemu VM (a service the host starts in
the guest once the VM is attested, with the guest ports it forwards), and whether the
node enrolls with the cluster's CryptoVM for its TLS certificate (keyless TLS) once the
whole cluster is up. The backends look roles up here and nowhere else;
:func:`register_role` replaces one (e.g. from a plugin module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from testbed.cluster.agent import AgentClient
from testbed.cluster.results import EnrollmentOutcome, ServiceInfo
from testbed.core.paths import ClusterPaths
from testbed.roles import cryptovm, trusted_passages
from testbed.roles.base import NodeContext, NoService, RoleService
from testbed.spec.cluster_spec import ROLE_NAMES

__all__ = ["ROLES", "Role", "register_role", "role", "start_node_service"]

NodeServiceStarter = Callable[[NodeContext], RoleService]
VmServiceStarter = Callable[[ClusterPaths, str, AgentClient, Mapping[str, int]], ServiceInfo]
Enroller = Callable[[AgentClient], EnrollmentOutcome]


def _no_service(ctx: NodeContext) -> RoleService:
    return NoService()


@dataclass(frozen=True)
class Role:
    name: str
    node_service: NodeServiceStarter = _no_service
    vm_service: VmServiceStarter | None = None
    guest_ports: Mapping[str, int] = field(default_factory=dict)
    enroll: Enroller | None = None  # keyless TLS from the cluster's CryptoVM (sim nodes)


ROLES: dict[str, Role] = {
    "generic": Role("generic"),
    "verifier": Role("verifier"),
    "server": Role("server", trusted_passages.start_node_service,
                   enroll=trusted_passages.request_enrollment),
    "client": Role("client", trusted_passages.start_node_service,
                   enroll=trusted_passages.request_enrollment),
    "cryptovm": Role("cryptovm", cryptovm.start_node_service, cryptovm.start_vm_service,
                     cryptovm.GUEST_PORTS),
}
assert set(ROLES) == set(ROLE_NAMES), "every role a spec may name needs an entry"


def role(name: str) -> Role:
    """The role ``name`` (the spec loader admits only :data:`ROLE_NAMES`)."""
    return ROLES[name]


def register_role(entry: Role) -> None:
    """Replace a role the spec format knows (e.g. from a plugin module)."""
    if entry.name not in ROLE_NAMES:
        raise ValueError(f"unknown role {entry.name!r}; the spec format knows "
                         f"{', '.join(ROLE_NAMES)}")
    ROLES[entry.name] = entry


def start_node_service(ctx: NodeContext) -> RoleService:
    # Looked up at call time, so register_role() before a node starts takes effect.
    return ROLES[ctx.role].node_service(ctx)
