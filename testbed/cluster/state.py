"""A cluster's shared state in the work directory: its spec as brought up, its policies,
its AK registry and the last attestation of each node (layout: :mod:`testbed.core.paths`).

Writers hold the cluster's locks: ``up`` and ``down`` the lifecycle lock, attestations
the attest lock; every file is replaced atomically, so readers never see half a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from attestation.errors import EvidenceFormatError, FileInputError, PolicyError
from attestation.files import atomic_write, private_dir, read_bounded
from attestation.policy import ReferencePolicy, dump_policy, load_policy
from attestation.registrar import AkRegistry
from testbed.cluster.results import AttestationRecord
from testbed.core.errors import StateError
from testbed.core.files import MAX_STATE_BYTES, read_json, write_json
from testbed.core.paths import NAME_PATTERN, ClusterPaths
from testbed.spec.cluster_spec import (
    ClusterSpec,
    ClusterSpecError,
    NodeSpec,
    dump_cluster_spec,
    load_cluster_spec,
)

__all__ = [
    "load_node_policy",
    "load_registry",
    "load_spec",
    "read_attestations",
    "record_attestation",
    "save_registry",
    "spec_policy",
    "write_spec_and_policies",
]


def load_spec(paths: ClusterPaths) -> ClusterSpec:
    """The spec the cluster was brought up with."""
    if not paths.spec.is_file():
        raise StateError(f"cluster {paths.name!r} has no spec at {paths.spec}; "
                         "bring it up with `testbed up`")
    return load_cluster_spec(paths.spec)


def write_spec_and_policies(paths: ClusterPaths, spec: ClusterSpec,
                            policies: Mapping[str, ReferencePolicy]) -> None:
    private_dir(paths.root / "policies")
    atomic_write(paths.spec, dump_cluster_spec(spec).encode())
    for name, policy in policies.items():
        atomic_write(paths.policy(name), dump_policy(policy).encode())


def spec_policy(node: NodeSpec) -> ReferencePolicy | None:
    """The policy file a node's spec names; None when its policy is to be predicted."""
    if node.policy is None:
        return None
    try:
        return load_policy(node.policy)
    except PolicyError as exc:
        raise ClusterSpecError(f"node {node.name}: policy {node.policy}: {exc}") from None


def load_node_policy(paths: ClusterPaths, node: str, explicit: Path | None = None
                     ) -> ReferencePolicy:
    """``explicit``, else the policy ``up`` wrote for ``node``."""
    path = explicit or paths.policy(node)
    if explicit is None and not path.is_file():
        raise StateError(f"node {node} has no policy at {path}; bring the cluster up with "
                         "`testbed up` or pass --policy FILE")
    return load_policy(path)


def load_registry(paths: ClusterPaths) -> AkRegistry:
    return parse_registry(paths, read_registry_bytes(paths))


def read_registry_bytes(paths: ClusterPaths) -> bytes | None:
    """The registry file's bytes (None: no registry yet)."""
    try:
        return read_bounded(paths.registry, MAX_STATE_BYTES, what="AK registry",
                            missing_ok=True)
    except FileInputError as exc:
        raise StateError(f"{paths.registry}: {exc}; `testbed down --purge` starts over") from None


def parse_registry(paths: ClusterPaths, data: bytes | None) -> AkRegistry:
    try:
        return AkRegistry() if data is None else AkRegistry.from_json(data)
    except EvidenceFormatError as exc:
        raise StateError(f"{paths.registry}: {exc}; `testbed down --purge` starts over") from None


def save_registry(paths: ClusterPaths, registry: AkRegistry) -> None:
    atomic_write(paths.registry, (registry.to_json() + "\n").encode())


def read_attestations(paths: ClusterPaths) -> dict[str, AttestationRecord]:
    """The last attestation of each node (nodes never attested are absent): a file per
    node (``attestations/NODE.json``), over the older one-file ``attestations.json``."""
    doc = read_json(paths.attestations)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise StateError(f"{paths.attestations} is not a JSON object")
    records = {str(node): AttestationRecord.from_dict(record, f"{paths.attestations}: {node}")
               for node, record in doc.items()}
    directory = paths.attestations_dir
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        if NAME_PATTERN.fullmatch(path.stem):
            records[path.stem] = AttestationRecord.from_dict(read_json(path), str(path))
    return records


def record_attestation(paths: ClusterPaths, node: str, record: AttestationRecord) -> None:
    """Replace ``node``'s record: its own file, so recording costs the same with 500
    nodes as with 5 (the one shared file was rewritten whole each time)."""
    paths.node(node)  # a valid node name: it becomes a file name
    private_dir(paths.attestations_dir)
    # Not fsync'd: what `status` shows, not evidence (that is the evidence log, fsync'd);
    # a crash may leave a node's previous record, never half a record.
    write_json(paths.attestations_dir / f"{node}.json", record.to_dict(), durable=False)
