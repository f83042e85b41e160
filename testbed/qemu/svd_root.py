"""Booting an encrypted image (docs/svd.md, "Encrypted images"): attest first, then the
root disk, decrypted by QEMU with a key the tenant's CryptoVM released for this boot.

The chicken-and-egg (the VM must attest before its root key exists anywhere outside the
CryptoVM) is broken by the boot stage: the VM boots the clear, measured kernel and
initrd with an empty PCIe slot, its agent answers, and then:

1. the host attests the VM against the image's predicted policy (fresh nonce, EK-
   certified AK activated by the registrar); a rejected VM gets nothing (fail closed);
2. the tenant enrolls that VM for the root key: the key's release policy becomes the
   predicted policy plus *this* VM's AK;
3. the release: a second fresh quote of the VM, bound to an ephemeral recipient key,
   checked by the CryptoVM itself (nonce, ak_trust, policy, recipient_binding, clock);
4. the passphrase goes to libvirt as an **ephemeral, private secret** (never on disk,
   not readable back through the API), the LUKS disk is hot-plugged with it (QEMU's
   LUKS layer decrypts), and the secret is undefined at once: the key then lives only
   in QEMU's memory;
5. the boot stage finds ``/dev/vda``, unpacks the root filesystem into RAM and switches
   root into it; the agent comes back from the root filesystem.
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestation.policy import ReferencePolicy, dump_policy
from attestation.registrar import AkRegistry
from attestation.report import VerificationReport
from attestation.tpm_types import parse_public
from cryptovm.disks import Call, release_disk_key, release_policy_name
from testbed.cluster.backend import NodeFailed
from testbed.qemu.image.encrypted import EncryptedImage
from testbed.qemu.libvirtd import LibvirtError, load_libvirt
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.qemu.vms import QemuNode, VmBootError, VmDriver

__all__ = ["ROOT_REFUSED", "RootRefused", "RootRelease", "attach_root_disk", "boot_encrypted",
           "unlock_root", "wait_console"]

AFFECT_LIVE = 1  # VIR_DOMAIN_AFFECT_LIVE
BOOT_WAIT_S = 600.0  # each agent start (boot stage, then root) is a Python start under TCG
ROOT_REFUSED = "testbed-init: REFUSED"
"""What the boot stage prints when it will not go on (no disk, or a disk without key)."""


class RootRefused(NodeFailed):
    """The root key was not released for this VM (attestation failed or was refused)."""


@dataclass(frozen=True)
class RootRelease:
    """An encrypted-image VM that attested, got its root key and switched root."""

    report: VerificationReport
    release_seconds: float  # attestation passed -> disk plugged in (enroll + release)
    switch_seconds: float  # disk plugged in -> agent answering from the root filesystem


def boot_encrypted(driver: VmDriver, name: str, image: EncryptedImage,
                   **options: Any) -> QemuNode:
    """Start a VM on the image's boot stage with one free slot for its root disk."""
    return driver.boot(name, image.boot, hotplug_ports=1, **options)


def _disk_xml(path: Path, secret_uuid: str | None) -> str:
    disk = ET.Element("disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    ET.SubElement(disk, "source", file=str(path))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    ET.SubElement(disk, "readonly")
    if secret_uuid is not None:
        encryption = ET.SubElement(disk, "encryption", format="luks")
        ET.SubElement(encryption, "secret", type="passphrase", uuid=secret_uuid)
    return ET.tostring(disk, encoding="unicode")


def attach_root_disk(conn: Any, node: QemuNode, image: Path,
                     passphrase: bytes | None) -> None:
    """Hot-plug ``image`` as the VM's ``vda``: decrypted by QEMU with ``passphrase`` held
    in an ephemeral private libvirt secret for the moment of the attach, or as raw
    bytes (ciphertext) when ``passphrase`` is None (what a thief without a key can do)."""
    libvirt = load_libvirt()
    secret = None
    try:
        if passphrase is not None:
            secret_uuid = str(uuid.uuid4())
            secret = conn.secretDefineXML(
                f"<secret ephemeral='yes' private='yes'><uuid>{secret_uuid}</uuid>"
                f"<description>root disk key of {node.vm.spec.name}</description></secret>")
            secret.setValue(passphrase)
        node.vm.domain.attachDeviceFlags(
            _disk_xml(image, secret_uuid if secret is not None else None), AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"plugging the root disk into {node.name} failed: {exc}") from None
    finally:
        if secret is not None:
            secret.undefine()  # QEMU holds the key now; libvirt forgets it


def wait_console(node: QemuNode, needle: str, timeout: float) -> str:
    """Until the VM's console shows ``needle`` (the line); VmBootError if it stops first
    or the boot stage refuses."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = node.vm.console(400)
        for line in text.splitlines():
            if needle in line:
                return line.strip()
            if ROOT_REFUSED in line and ROOT_REFUSED not in needle:
                raise VmBootError(f"VM {node.name}: {line.strip()}", f"console:\n{text}")
        if not node.vm.active:
            raise VmBootError(f"VM {node.name} stopped", f"console:\n{text}")
        time.sleep(0.5)
    raise VmBootError(f"VM {node.name}: no {needle!r} on its console within {timeout:.0f} s",
                      f"console:\n{node.vm.console()}")


def _enroll(tenant: Call, node: str, policy: ReferencePolicy, ak_public: bytes) -> None:
    """The tenant admits this VM: its AK and the image's predicted policy."""
    registry = AkRegistry()
    registry.add(node, parse_public(ak_public))
    tenant("release_policy_set", name=release_policy_name(node),
           reference_policy=dump_policy(policy), ak_registry=registry.to_json())


def unlock_root(driver: VmDriver, node: QemuNode, image: EncryptedImage, tenant: Call,
                policy: ReferencePolicy, *, timeout: float = BOOT_WAIT_S) -> RootRelease:
    """Attest the booted VM, release its root key, plug the disk in, wait for the switch."""
    driver.wait(node, timeout)
    report, evidence = driver.attest(node, policy)
    if not report.ok:
        failure = report.failure
        raise RootRefused(f"VM {node.name} failed attestation ("
                          f"{failure.name if failure else '?'}): no root key is released",
                          failure.detail if failure else "")
    image.binding.check_image(image.root)  # the disk is the bound one, before any request
    started = time.monotonic()
    _enroll(tenant, image.binding.node, policy, evidence.ak_public)
    passphrase = release_disk_key(tenant, image.binding,
                                  lambda data: node.agent.quote(data, QUOTED_PCRS))
    attach_root_disk(driver.conn, node, image.root, passphrase)
    plugged = time.monotonic()
    wait_console(node, f"root filesystem {image.root_id} unpacked", timeout)
    driver.wait(node, timeout)
    return RootRelease(report, plugged - started, time.monotonic() - plugged)
