"""``migrate-to-tampered-host`` on real VMs and hosts (docs/hosts.md, "Migration").

Alice's lab has a host whose QEMU binary differs by one byte, and the VM Bob rents runs
on an honest host. Plain libvirt migrates it there (the baseline: nothing checks the
destination; the VM runs on the tampered host, which can read its memory and vTPM
state); ``testbed migrate`` attests the destination first and refuses, naming its
failed check (``policy``: PCR 14, the hypervisor stack), before anything is started.
The VM is then migrated back (plainly, as it came) so that the lab is as before.

:func:`migrate_to_tampered_host_on` runs it on a lab the caller has (the migration
test shares its lab and VM); :func:`migrate_to_tampered_host` makes one: two hosts on
a scratch network (host2 tampered), one small VM placed on host1, all torn down after.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from attestation.errors import TestbedError, VerificationError
from testbed.attacks.scenarios import Outcome, ScenarioResult
from testbed.cluster import lifecycle as cluster
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.core.progress import Progress
from testbed.hosts import lifecycle as hosts
from testbed.hosts.network import scratch_network
from testbed.qemu.backend import QemuBackend, VmRecord
from testbed.qemu.migration import MigrationFailed, migrate, plain_libvirt_migration
from testbed.spec.cluster_spec import parse_cluster_spec

__all__ = ["MIGRATE_TO_TAMPERED_HOST", "migrate_to_tampered_host",
           "migrate_to_tampered_host_on"]

MIGRATE_TO_TAMPERED_HOST = "migrate-to-tampered-host"
TITLE = "Live migration to a host with a tampered QEMU"
_SPEC = """\
version: 1
name: atkmig
backend: qemu
image: default
nodes:
  - name: bob
    role: generic
    host: host1
"""


def migrate_to_tampered_host_on(paths: ClusterPaths, node: str, tampered: str
                                ) -> ScenarioResult:
    """``node``'s VM (on a trusted host) and ``tampered``, a host of the same lab."""
    record = VmRecord.load(paths, node)
    if record is None or record.host is None:
        raise StateError(f"{MIGRATE_TO_TAMPERED_HOST}: node {node} runs on no lab host")
    home = record.host
    try:
        migrate(paths, node, tampered)
        tp = Outcome(True, f"testbed migrate moved {node} to {tampered}")
    except VerificationError as exc:
        tp = Outcome(False, f"refused before anything started: {exc}", exc.check, "verifier")
    if tp.attack_succeeded:  # back home, so that the baseline starts where it should
        plain_libvirt_migration(paths, node, home)
    try:
        moved = plain_libvirt_migration(paths, node, tampered)
    except MigrationFailed as exc:  # the scenario is wrong then, not the testbed
        return ScenarioResult(MIGRATE_TO_TAMPERED_HOST, TITLE,
                              Outcome(False, f"plain libvirt did not migrate: {exc}"), tp)
    plain = Outcome(True, f"plain libvirt migrated {node} {home} -> {tampered} in "
                    f"{moved.migration_seconds:.1f} s (downtime {moved.downtime_ms} ms): its "
                    "memory and vTPM state now sit on the tampered host")
    plain_libvirt_migration(paths, node, home)  # as it was
    return ScenarioResult(MIGRATE_TO_TAMPERED_HOST, TITLE, plain, tp)


def migrate_to_tampered_host(workdir: Path, *, progress: Progress | None = None
                             ) -> ScenarioResult:
    """The scenario on a lab of its own (two hosts, host2 tampered; one VM on host1)."""
    progress = progress or Progress(quiet=True)
    progress.expect(2)
    root = Path(tempfile.mkdtemp(prefix="atk-migrate-", dir=workdir))
    bridge, subnet = scratch_network("tbmig")
    try:
        with progress.step("two hosts (host2 with a tampered QEMU) and a VM on host1"):
            hosts.up(root, 2, bridge=bridge, subnet=subnet, tamper_qemu=["host2"])
            spec = parse_cluster_spec(_SPEC, root)
            backend = QemuBackend(ClusterPaths(root, spec.name))
            try:
                up = cluster.up(backend, spec, Progress(quiet=True))
            finally:
                backend.close()
            if not up.ok or up.rejected:
                raise StateError(f"{MIGRATE_TO_TAMPERED_HOST}: the VM on host1 did not come "
                                 "up attested")
        with progress.step("migrating it to host2: testbed migrate, then plain libvirt"):
            return migrate_to_tampered_host_on(ClusterPaths(root, spec.name), "bob", "host2")
    finally:
        with contextlib.suppress(TestbedError):
            QemuBackend(ClusterPaths(root, "atkmig")).down(purge=True)
        hosts.down(root)
        shutil.rmtree(root, ignore_errors=True)
