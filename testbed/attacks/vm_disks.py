"""``stolen-disk`` on real VMs (docs/svd.md, "VMs: guest-side disks"): a guest-side
encrypted disk's qcow2 copied off the host is ciphertext, and the copy attached to
another VM gets no key.

:func:`stolen_disk_on_vms` runs on a cluster that is up (``tests/test_qemu_svd_guest.py``
uses its own VMs); :func:`stolen_disk_cluster` brings one up for ``testbed attack
--backend qemu stolen-disk`` and takes it down again. The owner VM has a guest-side disk
holding ``marker``; the thief is another attested VM of
the cluster. *Baseline:* the same marker written by the owner VM to a plain qcow2
(the disk without the SVD) is in the copied file. *With the SVD:* the copy has no
marker; attached to the thief's VM, the thief's guest asks the CryptoVM for the key over
its own attested channel (refused: its account holds no privilege on the key), and its
host asks as CryptoVM root with the thief's quote (refused, ``ak_trust``: the key is
bound to the owner's AK).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from attestation.encoding import b64encode
from attestation.errors import TestbedError
from cryptovm.disks import DiskBinding, release_disk_key
from cryptovm.errors import ReleaseDenied
from testbed.attacks.scenarios import Outcome, ScenarioResult
from testbed.cluster import lifecycle
from testbed.core.paths import ClusterPaths
from testbed.core.progress import Progress
from testbed.qemu.backend import QemuBackend, domain_name
from testbed.qemu.disks import AFFECT_LIVE, VmDiskFiles, detach, disk_root, disk_xml
from testbed.qemu.domain import connect
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.qemu.relay import relay_to_cryptovm
from testbed.roles.cryptovm import cryptovm_endpoint
from testbed.spec.cluster_spec import parse_cluster_spec

__all__ = ["STOLEN_DISK", "guest_answer", "stolen_disk_cluster", "stolen_disk_on_vms"]

STOLEN_DISK = "stolen-disk"
TITLE = "Disk image copied off the host (VMs, guest-side disk)"
BASELINE_SERIAL = "plainbaseline"
BASELINE_SIZE = 4 << 20
_OFFSET = 1 << 20
LAB_CLUSTER = "stolendisk"
LAB_SPEC = f"""version: 1
name: {LAB_CLUSTER}
backend: qemu
image: default
nodes:
  - {{name: cryptovm, role: cryptovm}}
  - name: server
    role: server
    disks:
      - {{name: data, size: 20M, mode: guest}}
"""


def stolen_disk_cluster(workdir: Path, progress: Progress) -> ScenarioResult:
    """``up`` a CryptoVM VM and a server VM with a guest-side disk in ``workdir``, write a
    random marker through the server's plain view, run the scenario, ``down --purge``."""
    paths = ClusterPaths(workdir, LAB_CLUSTER)
    backend = QemuBackend(paths)
    try:
        up = lifecycle.up(backend, parse_cluster_spec(LAB_SPEC, workdir), progress)
        failed = [f"{n.name}: {n.error}" for n in up.nodes if n.action == "failed"
                  or n.attested is not True]
        if failed:
            raise TestbedError(f"the stolen-disk cluster did not come up: {'; '.join(failed)}")
        marker = b"stolen-disk-marker-" + os.urandom(8).hex().encode()
        with progress.step("stolen-disk: the server VM writes a marker to its guest-side "
                           "disk; the disk copied, attached to the CryptoVM VM"):
            backend.agent("server", timeout=60).call(
                {"op": "disk_write", "disk": "data", "offset": _OFFSET,
                 "data": b64encode(marker)})
            return stolen_disk_on_vms(paths, owner="server", disk="data", thief="cryptovm",
                                      marker=marker)
    finally:
        with contextlib.suppress(TestbedError, OSError):
            backend.down(purge=True)
        backend.close()


def stolen_disk_on_vms(paths: ClusterPaths, *, owner: str, disk: str, thief: str,
                       marker: bytes, cryptovm: str = "cryptovm") -> ScenarioResult:
    """The scenario on a running cluster (see the module docstring)."""
    backend = QemuBackend(paths)
    conn = connect()
    try:
        plain = _baseline(paths, conn, backend, owner, marker)
        svd = _with_svd(paths, conn, backend, owner, disk, thief, marker, cryptovm)
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    return ScenarioResult(STOLEN_DISK, TITLE, plain, svd)


def _baseline(paths: ClusterPaths, conn: Any, backend: QemuBackend, owner: str,
              marker: bytes) -> Outcome:
    """The owner VM writes the marker to a plain qcow2; the copy holds it."""
    image = disk_root(paths) / owner / f"{BASELINE_SERIAL}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image),
                    str(BASELINE_SIZE)], check=True, capture_output=True, timeout=30)
    domain = conn.lookupByName(domain_name(paths, owner))
    domain.attachDeviceFlags(disk_xml(image, BASELINE_SERIAL, "vdy", None), AFFECT_LIVE)
    try:
        agent = backend.agent(owner, timeout=60)
        _wait_for_disk(agent, BASELINE_SERIAL)
        agent.call({"op": "disk_write", "disk": BASELINE_SERIAL, "offset": _OFFSET,
                    "data": b64encode(marker)})
        stolen = image.read_bytes()
    finally:
        with contextlib.suppress(TestbedError):
            detach(domain, BASELINE_SERIAL)
        image.unlink(missing_ok=True)
    return Outcome(marker in stolen, "the copied plain qcow2 holds the VM's data")


def _with_svd(paths: ClusterPaths, conn: Any, backend: QemuBackend, owner: str, disk: str,
              thief: str, marker: bytes, cryptovm: str) -> Outcome:
    files = VmDiskFiles(paths, owner, disk)
    copy = disk_root(paths) / thief / f"stolen-{disk}.qcow2"
    copy.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    shutil.copyfile(files.image, copy)
    copy.chmod(0o600)
    try:
        if marker in copy.read_bytes():
            return Outcome(True, "the marker is in the copied guest-side disk")
        domain = conn.lookupByName(domain_name(paths, thief))
        domain.attachDeviceFlags(disk_xml(copy, disk, "vdz", None), AFFECT_LIVE)
        try:
            _wait_for_disk(backend.agent(thief, timeout=60), disk)
            guest_released, in_guest = _thief_guest_asks(paths, backend, owner, disk, thief,
                                                         cryptovm)
            check, why = _thief_host_asks(paths, backend, files, thief, cryptovm)
        finally:
            with contextlib.suppress(TestbedError):
                detach(domain, disk)
    finally:
        copy.unlink(missing_ok=True)
    if guest_released or check is None:
        return Outcome(True, f"the CryptoVM released the key to the thief's VM ({in_guest}; "
                       f"its host: {why})")
    return Outcome(False, "the copied qcow2 is LUKS2 ciphertext (no marker in it); attached "
                   f"to the {thief} VM: its guest's own request: {in_guest}; its host's "
                   f"request with the {thief} VM's quote: refused, {check}: {why}",
                   caught_by=check, caught_at=cryptovm)


def _thief_guest_asks(paths: ClusterPaths, backend: QemuBackend, owner: str, disk: str,
                      thief: str, cryptovm: str) -> tuple[bool, str]:
    """The thief's guest unlocks "its" disk over its own attested channel."""
    binding = DiskBinding.load(VmDiskFiles(paths, owner, disk).binding)
    request = {"op": "svd_unlock", "cryptovm": cryptovm, "node": owner,
               "pcrs": list(QUOTED_PCRS), "disks": [{"name": disk, "binding": binding.to_doc()}]}
    outcome = relay_to_cryptovm(backend.agent(thief, timeout=120),
                                backend.agent(cryptovm, timeout=120), request,
                                node_name=thief, cryptovm_name=cryptovm)
    return guest_answer(outcome.client_view)


def guest_answer(view: dict[str, Any]) -> tuple[bool, str]:
    """Whether the thief's guest opened the disk, and its own words: a channel error, or
    the one disk's answer (``svd_unlock`` answers each disk on its own)."""
    if "error" in view:
        return False, f"refused ({str(view['error'])[:200]})"
    answers = view.get("disks")
    if not isinstance(answers, list) or len(answers) != 1 or not isinstance(answers[0], dict):
        return False, "refused (no disk answer)"
    if "error" in answers[0]:
        return False, f"refused ({str(answers[0]['error'])[:200]})"
    return True, f"opened as {answers[0].get('device')}"


def _thief_host_asks(paths: ClusterPaths, backend: QemuBackend, files: VmDiskFiles,
                     thief: str, cryptovm: str) -> tuple[str | None, str]:
    """As CryptoVM root with the thief VM's fresh quote: (the failed check, why)."""
    binding = DiskBinding.load(files.binding)
    agent = backend.agent(thief, timeout=120)
    client = cryptovm_endpoint(paths, cryptovm).client()
    try:
        release_disk_key(client.call, binding,
                         lambda data: agent.quote(data, list(QUOTED_PCRS)))
    except ReleaseDenied as exc:
        return getattr(exc, "check", None) or "release_denied", str(exc)[:200]
    finally:
        client.close()
    return None, "released"


def _wait_for_disk(agent: Any, serial: str, attempts: int = 60) -> None:
    """A hot-plugged disk appears in the guest within a second or two (TCG: more)."""
    for _ in range(attempts):
        if any(d["serial"] == serial for d in agent.call({"op": "disk_list"})["disks"]):
            return
        time.sleep(0.5)
    raise TestbedError(f"the hot-plugged disk {serial} never appeared in the guest")

