"""The CryptoVM VM's store disk, host side (docs/svd.md, "The CryptoVM VM's store disk").

The disk is a plain qcow2 (``WORKDIR/vm-disks/<cluster>/<node>/<disk>.qcow2``): the
encryption is inside the guest (:mod:`cryptovm.storedisk`: LUKS2, dm-crypt, the
passphrase sealed to the VM's vTPM PCRs in the volume's LUKS2 token), so the host never
has a key to give and every byte of the file is ciphertext or the LUKS2 header. QEMU
sees an ordinary disk.

It is **hot-plugged** into the running VM after its attestation, just before the
CryptoVM starts on it, like a host-side disk: the domain boots with empty PCIe root
ports, so the firmware measures the same devices as without the disk and the VM's
predicted policy is unchanged.

Its life is its vTPM's: the passphrase unseals only on the vTPM that sealed it, which
libvirt keeps while the domain stays defined (a reboot, :func:`reboot_domain`) and
removes when the domain is undefined. So a *new* domain for the node starts with a new
store disk (:func:`discard_store_image`), and ``down`` removes the image with the VM.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.qemu.disks import AFFECT_LIVE, attached_serials, disk_root, disk_xml
from testbed.qemu.libvirtd import load_libvirt
from testbed.spec.cluster_spec import DiskSpec, NodeSpec
from testbed.svd.volumes import DiskState, DiskStatus

__all__ = ["attach_store_disk", "discard_store_image", "reboot_domain", "store_disk",
           "store_image", "store_status"]

QEMU_IMG_TIMEOUT_S = 60.0
STOP_WAIT_S = 30.0


def store_disk(spec: NodeSpec) -> DiskSpec | None:
    """The store disk of a cryptovm node (the spec allows it at most one, mode guest)."""
    return spec.disks[0] if spec.role == "cryptovm" and spec.disks else None


def store_image(paths: ClusterPaths, node: str, disk: str) -> Path:
    return disk_root(paths) / node / f"{disk}.qcow2"


def _create(image: Path, size: int) -> None:
    """A blank qcow2 (reads zeros: the guest formats it); directories 0711 (QEMU's user
    must open the file, nobody may list them), the file 0600 (libvirt chowns it)."""
    for level in (image.parent.parent.parent, image.parent.parent, image.parent):
        level.mkdir(mode=0o711, exist_ok=True)
        os.chmod(level, 0o711)  # noqa: S103 - search only, for QEMU's user; no listing
    try:
        done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image),
                               str(size)], capture_output=True, timeout=QEMU_IMG_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StateError(f"cannot create the store disk {image}: {exc}") from None
    if done.returncode != 0:
        raise StateError(f"cannot create the store disk {image}: "
                         f"{done.stderr.decode(errors='replace').strip()[-300:]}")
    os.chmod(image, 0o600)


def attach_store_disk(domain: Any, paths: ClusterPaths, node: str, disk: DiskSpec,
                      target: str = "vdb") -> Path:
    """Create the image on first use and hot-plug it (plain: no key at the host) into the
    running ``domain``, serial = the disk's name; nothing if it is attached already."""
    image = store_image(paths, node, disk.name)
    if disk.name in attached_serials(domain):
        return image
    if not image.exists():
        _create(image, disk.size)
    libvirt = load_libvirt()
    try:
        domain.attachDeviceFlags(disk_xml(image, disk.name, target, None), AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise StateError(f"could not attach the store disk {disk.name} to {domain.name()}: "
                         f"{exc}") from None
    return image


def store_status(paths: ClusterPaths, node: str, disk: DiskSpec, attached: bool) -> DiskStatus:
    """``status``: unlocked while the running VM has it (its CryptoVM opens it right after
    the hot-plug), locked when the image exists, else absent; never a key."""
    if attached:
        return DiskStatus(disk.name, disk.mode, disk.size, "unlocked",
                          "in the VM: LUKS2 opened by the guest at /run/cryptovm/store")
    state: DiskState = "locked" if store_image(paths, node, disk.name).exists() else "absent"
    return DiskStatus(disk.name, disk.mode, disk.size, state)


def discard_store_image(paths: ClusterPaths, spec: NodeSpec) -> bool:
    """Remove the node's store image before a *new* domain (a new vTPM) boots: it was
    sealed to a vTPM that is gone. Whether there was one."""
    disk = store_disk(spec)
    if disk is None:
        return False
    image = store_image(paths, spec.name, disk.name)
    existed = image.exists()
    image.unlink(missing_ok=True)
    return existed


def reboot_domain(domain: Any, stop_guest: Callable[[], None] | None = None) -> float:
    """Power-cycle a running, persistent domain: the same definition and vTPM state
    (libvirt keeps it while the domain is defined), a fresh boot, measured anew.
    ``stop_guest`` first lets the guest close what it holds open (best effort); the
    seconds the power cycle took."""
    libvirt = load_libvirt()
    started = time.monotonic()
    if stop_guest is not None:
        stop_guest()
    try:
        if domain.isActive():
            domain.destroy()
        deadline = time.monotonic() + STOP_WAIT_S
        while domain.isActive() and time.monotonic() < deadline:
            time.sleep(0.2)
        domain.create()
    except libvirt.libvirtError as exc:
        raise StateError(f"could not reboot {domain.name()}: {exc}") from None
    return time.monotonic() - started
