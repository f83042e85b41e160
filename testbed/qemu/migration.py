"""``testbed migrate NODE --to HOST``: attested, TLS-encrypted live migration of a placed
VM between the lab's hosts (docs/hosts.md, "Migration").

The host side (fresh attestation, migration credentials, the destination's files) is
:mod:`testbed.hosts.migration`; this module moves the VM: libvirt's managed migration
(not peer-to-peer: the lab holds both hosts' connections, ``qemu+ssh``), then the
cluster's record (``vm.json``), the vTPM's binding (``vtpms.json``), and the source's
leftovers. Nothing starts until the destination attested good *now*.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from attestation.encoding import b64encode
from attestation.errors import TestbedError
from testbed.cluster.agent import AgentClient
from testbed.core.errors import ArgumentError
from testbed.core.paths import ClusterPaths
from testbed.core.progress import Progress
from testbed.hosts.attest import HostVerdict
from testbed.hosts.deep import move_vtpm
from testbed.hosts.layout import HostsError, LabPaths, LabState
from testbed.hosts.migration import (
    attest_now,
    issue_migration_credentials,
    leftovers,
    prepare_destination,
)
from testbed.hosts.placement import HostNotTrusted, PlacedHost
from testbed.hosts.remote import SshTcpTransport
from testbed.qemu.backend import QemuBackend, VmRecord
from testbed.qemu.domain import connect
from testbed.qemu.image.build import GuestImage
from testbed.qemu.libvirtd import LibvirtError, load_libvirt
from testbed.qemu.network import Capture, CaptureStats

__all__ = ["MigrationFailed", "MigrationResult", "migrate", "plain_libvirt_migration",
           "random_marker"]

MARKER_COPIES = 4096  # 32-byte marker x 4096 = 128 KiB of guest RAM (32 pages)
CAPTURE_LIMIT = 4 << 30  # every byte of a migration stream is searched (a 512 MiB guest)


class MigrationFailed(HostsError):
    """libvirt refused or aborted the migration; the VM keeps running on its source."""


@dataclass
class MigrationResult:
    node: str
    domain: str
    source: str
    destination: str
    tls: bool
    seconds: float  # the whole command: attestation, credentials, migration, cleanup
    migration_seconds: float  # libvirt's migrate3 call
    downtime_ms: int | None  # libvirt's completed-job statistics
    data_bytes: int | None  # what the stream carried (data_processed)
    page_bytes: int | None  # of which whole guest pages (memory_normal_bytes)
    destination_attestation: dict[str, Any] | None  # None: the plain baseline
    source_left: list[str]
    capture: dict[str, Any] | None = None  # with a marker: what the bridge showed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Ends:
    source: PlacedHost
    destination: PlacedHost


def migrate(paths: ClusterPaths, node: str, destination: str, *, tls: bool = True,
            marker: bytes | None = None, progress: Progress | None = None) -> MigrationResult:
    """Move ``node``'s running VM to ``destination`` (see the module docstring).

    ``tls=False`` is the lab's control for the capture proof only (docs/hosts.md).
    ``marker``: put copies of it in the guest's RAM first and capture the lab bridge
    during the migration (``capture`` in the result counts frames that carry it)."""
    return _move(paths, node, destination, attested=True, tls=tls, marker=marker,
                 progress=progress or Progress(quiet=True))


def plain_libvirt_migration(paths: ClusterPaths, node: str, destination: str
                            ) -> MigrationResult:
    """What a lab without host attestation does (the attack lab's baseline): the
    destination prepared and the VM migrated, no attestation, no TLS."""
    return _move(paths, node, destination, attested=False, tls=False, marker=None,
                 progress=Progress(quiet=True))


def _move(paths: ClusterPaths, node: str, destination: str, *, attested: bool, tls: bool,
          marker: bytes | None, progress: Progress) -> MigrationResult:
    progress.expect(3 + attested + (attested and tls))
    started = time.monotonic()
    record = VmRecord.load(paths, node)
    if record is None:
        raise ArgumentError(f"node {node} of cluster {paths.name} has no running VM")
    lab = LabPaths(paths.workdir)
    with _ends(lab, node, record, destination) as ends:
        verdict = _attested_ends(lab, ends, tls, progress) if attested else None
        image = GuestImage.load(Path(record.image_dir))
        with progress.step(f"{destination}: guest image, run directory, vTPM directory, "
                           "VM network"):
            prepare_destination(ends.destination, record.domain, record.uuid,
                                [(image.kernel, "the guest kernel"),
                                 (image.initrd, "the guest initrd")])
            _join_vm_network(paths, destination)
        label = "TLS" if tls else "NO TLS (lab control)"
        with progress.step(f"live migration {ends.source.name} -> {destination} ({label})"):
            stats, seconds, capture = _migrate_watched(paths, ends, record, tls, marker)
        with progress.step("cluster state, vTPM binding, source cleanup"):
            replace(record, host=destination).save(paths, node)
            move_vtpm(lab, node, destination)
            ends.source.remove_vm(record.domain, record.uuid)
            left = leftovers(ends.source, record.domain, record.uuid)
    return MigrationResult(
        node, record.domain, ends.source.name, destination, tls,
        round(time.monotonic() - started, 2), round(seconds, 2),
        _int(stats.get("downtime")), _int(stats.get("data_processed")),
        _int(stats.get("memory_normal_bytes")),
        None if verdict is None else verdict.to_dict(), left, capture)


def _join_vm_network(paths: ClusterPaths, host: str) -> None:
    """A placed VM's lab NIC is on its host's bridge of the cluster's VM segment: the
    destination needs that bridge before the VM arrives (idempotent)."""
    backend = QemuBackend(paths)
    try:
        backend.join_host_to_vm_network(host)
    finally:
        backend.close()


def _attested_ends(lab: LabPaths, ends: _Ends, tls: bool, progress: Progress) -> HostVerdict:
    """The destination attests now, or nothing starts; with TLS the source too, and both
    get fresh migration credentials."""
    with progress.step(f"attest {ends.destination.name} now"
                       + (f" (and {ends.source.name})" if tls else "")):
        verdict = attest_now(lab, ends.destination)
        source_verdict = attest_now(lab, ends.source) if tls else None
    if source_verdict is not None:
        with progress.step("migration credentials: keys made on both hosts, "
                           "certificates from the lab's migration CA"):
            issue_migration_credentials(lab, ends.source, source_verdict)
            issue_migration_credentials(lab, ends.destination, verdict)
    return verdict


@contextlib.contextmanager
def _ends(lab: LabPaths, node: str, record: VmRecord, destination: str
          ) -> Iterator[_Ends]:
    """Both hosts' SSH sides: the source must be a lab host, the destination another."""
    state = LabState.load(lab)
    if record.host is None or state is None or record.host not in state.hosts:
        raise HostNotTrusted(record.host or "local", "source_host",
                             f"node {node} does not run on a host of this lab; only placed "
                             "VMs migrate (docs/hosts.md)")
    if destination == record.host:
        raise ArgumentError(f"node {node} already runs on {destination}")
    if destination not in state.hosts:
        raise HostNotTrusted(destination, "host_up", "no such host in this lab; "
                             "`testbed hosts up N` makes host1..hostN")
    ends = _Ends(PlacedHost(lab, state.hosts[record.host]),
                 PlacedHost(lab, state.hosts[destination]))
    try:
        yield ends
    finally:
        ends.source.close()
        ends.destination.close()


def _migrate_watched(paths: ClusterPaths, ends: _Ends, record: VmRecord, tls: bool,
                     marker: bytes | None) -> tuple[dict[str, Any], float, dict[str, Any] | None]:
    if marker is None:
        return (*_migrate(ends, record, tls), None)
    agent = AgentClient(SshTcpTransport(ends.source.session, record.agent_port),
                        node=record.domain, timeout=30.0)
    held = agent.call({"op": "hold_marker", "marker": b64encode(marker),
                       "copies": MARKER_COPIES})
    state = LabState.load(LabPaths(paths.workdir))
    assert state is not None
    with Capture(state.bridge, marker, limit=CAPTURE_LIMIT) as capture:
        stats, seconds = _migrate(ends, record, tls)
    return stats, seconds, {"bridge": state.bridge, "held_bytes": held.get("held"),
                            **_capture_dict(capture.stats)}


def _capture_dict(stats: CaptureStats) -> dict[str, Any]:
    return {"frames": stats.frames, "bytes": stats.bytes,
            "marker_frames": stats.marker_frames}


def _migrate(ends: _Ends, record: VmRecord, tls: bool) -> tuple[dict[str, Any], float]:
    """libvirt's migration, driven from the lab with both connections; the destination's
    files are removed again when it fails (the VM keeps running on the source)."""
    libvirt = load_libvirt()
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
             | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    if tls:
        flags |= libvirt.VIR_MIGRATE_TLS
    params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{ends.destination.address}"}
    source = connect(ends.source.libvirt_uri)
    try:
        dest = connect(ends.destination.libvirt_uri)
        try:
            domain = source.lookupByName(record.domain)
            started = time.monotonic()
            try:
                moved = domain.migrate3(dest, params, flags)
            except libvirt.libvirtError as exc:
                with contextlib.suppress(TestbedError):
                    ends.destination.remove_vm(record.domain, record.uuid)
                raise MigrationFailed(f"migrating {record.domain} to "
                                      f"{ends.destination.name} failed: {exc}; it still "
                                      f"runs on {ends.source.name}") from None
            seconds = time.monotonic() - started
            stats: dict[str, Any] = {}
            with contextlib.suppress(libvirt.libvirtError):
                stats = moved.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            return stats, seconds
        finally:
            dest.close()
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"libvirt over qemu+ssh: {exc}") from None
    finally:
        source.close()


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def random_marker() -> bytes:
    """A marker nobody else's traffic carries by chance (32 random bytes)."""
    return os.urandom(32)
