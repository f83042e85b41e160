"""Host-side (transparent) encrypted disks of qemu VMs (docs/svd.md, "VMs").

A disk is a qcow2 image with QEMU's LUKS encryption (``encrypt.format=luks``). Its key is
the CryptoVM's ``svd-<node>-<disk>`` (:mod:`cryptovm.disks`, the same wrapped passphrase
and attestation-gated release as a sim node's disk). The order problem (the VM must
attest before its key is released, but QEMU opens a disk when the VM starts) is solved by
**hot-plugging**: the VM boots without the disk, attests, then ``testbed up``, playing
the hypervisor, gets the passphrase released against a fresh quote of that VM and

1. defines a libvirt secret ``ephemeral='yes' private='yes'`` (never saved to disk,
   never read back through the API) with usage ``volume`` = the image path, and sets its
   value (``virSecretSetValue``);
2. attaches the disk live (``virDomainAttachDeviceFlags``, ``AFFECT_LIVE``: not in the
   persistent definition) with ``<encryption format='luks'><secret type='passphrase'
   uuid=.../>``: libvirt hands the key to QEMU (QMP ``object-add secret``, AES-encrypted
   under the domain's master key), QEMU opens the image;
3. undefines the secret at once: the key is then only in QEMU's memory, and gone when
   the VM stops. ``down`` also undefines any secret of the cluster's disks left by a
   crash between 1 and 3.

The domain has spare ``pcie-root-port`` controllers for this (:data:`HOTPLUG_PORTS`,
empty at boot: they add no firmware event, so the predicted policy is unchanged). The
guest sees a plain virtio disk whose serial is the disk's name.

Files: ``WORKDIR/vm-disks/<cluster>/<node>/<disk>.qcow2`` (ciphertext; outside the 0700
cluster tree because QEMU runs as ``libvirt-qemu``; kept by ``down``, removed by
``--purge``) and its binding ``nodes/NODE/state/disks/<disk>.svd.json`` (public).

**Guest-side mode** (docs/svd.md, "VMs: guest-side disks"; :func:`unlock_guest_disks`):
the image is a *plain* qcow2, hot-plugged after the VM attested like the host-side ones
(a disk present at boot would add firmware boot-option events, which the predicted
policy does not have) but with no secret at all. The guest formats it with LUKS2 itself
and opens it with ``cryptsetup``; the key comes to the guest from the CryptoVM guest over
an attested Trusted Passages channel that the host only relays (TLS records). The host
creates the disk key as CryptoVM root, grants the node's account ``node.<name>`` its
``release`` and ``public`` privileges, and keeps the binding the guest made (public: the
passphrase wrapped under the CryptoVM's key). It never holds the passphrase.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestation.files import private_dir
from cryptovm.disks import (
    BINDING_SUFFIX,
    Call,
    DiskBinding,
    DiskBindingError,
    Quote,
    disk_key_id,
    ensure_disk_key,
    new_passphrase,
    release_disk_key,
)
from cryptovm.errors import NotFound
from cryptovm.vsm import node_account
from testbed.cluster.agent import AgentClient
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.qemu.libvirtd import LibvirtError, load_libvirt
from testbed.qemu.relay import ChannelOutcome, relay_to_cryptovm
from testbed.spec.cluster_spec import DiskSpec
from testbed.svd.qcow2 import format_qcow2_luks, qcow2_luks_uuid
from testbed.svd.volumes import DiskState, DiskStatus

__all__ = ["HOTPLUG_PORTS", "GuestDiskKeys", "VmDiskFiles", "attach_host_disk",
           "attach_plain_disk", "attached_serials", "detach", "disk_root", "disk_status",
           "disk_xml", "hotplug", "remove_disk_secrets", "secret_xml", "unlock_guest_disks"]

HOTPLUG_PORTS = 4  # one per disk (a spec allows at most 4 per node)
AFFECT_LIVE = 1  # VIR_DOMAIN_AFFECT_LIVE
USAGE_VOLUME = 1  # VIR_SECRET_USAGE_TYPE_VOLUME
QEMU_IMG_TIMEOUT_S = 30.0


def disk_root(paths: ClusterPaths) -> Path:
    """Where the cluster's VM disk images live (QEMU must reach them)."""
    return paths.workdir / "vm-disks" / paths.name


@dataclass(frozen=True)
class VmDiskFiles:
    """One host-side disk of one VM (see the module docstring)."""

    paths: ClusterPaths
    node: str
    disk: str

    @property
    def image(self) -> Path:
        return disk_root(self.paths) / self.node / f"{self.disk}.qcow2"

    @property
    def binding(self) -> Path:
        return self.paths.node(self.node).state / "disks" / f"{self.disk}{BINDING_SUFFIX}"

    @property
    def format_run(self) -> Path:
        """The formatting qemu-storage-daemon's private directory (QMP socket, pid)."""
        return self.paths.node(self.node).run / "svd"


def _image_dir(files: VmDiskFiles) -> Path:
    """``vm-disks/<cluster>/<node>/``: searchable (o+x) but not listable by others, as
    QEMU's user must open the image in it; the image itself is 0600 (libvirt chowns it
    to QEMU's user while attached)."""
    directory = files.image.parent
    for level in (directory.parent.parent, directory.parent, directory):
        level.mkdir(mode=0o711, exist_ok=True)
        os.chmod(level, 0o711)  # noqa: S103 - search only, for QEMU's user; no listing
    return directory


def attach_host_disk(conn: Any, domain: Any, files: VmDiskFiles, spec: DiskSpec, target: str,
                     cryptovm: str, call: Call, quote: Quote,
                     public_key: Callable[[], bytes]) -> DiskStatus:
    """Release (or, on first use, make) the disk's passphrase and hot-plug the disk into
    the running, attested ``domain`` as virtio ``target`` (``vdb``...)."""
    if spec.name in attached_serials(domain):
        return _status(spec)  # `up` again: the running VM has it
    private_dir(files.binding.parent)
    _image_dir(files)
    if files.binding.is_file():
        binding = _bound(files)
        passphrase = release_disk_key(call, binding, quote)
    else:
        if files.image.exists():
            raise DiskBindingError(f"{files.image} exists without its binding "
                                   f"{files.binding.name}: its key is unknown; remove the "
                                   "image to start the disk over")
        fresh = new_passphrase(public_key())
        uuid = format_qcow2_luks(files.image, spec.size, fresh.passphrase, files.format_run)
        DiskBinding(files.node, files.disk, disk_key_id(files.node, files.disk), cryptovm,
                    spec.size, "host", uuid, fresh.wrapped_key).save(files.binding)
        passphrase = fresh.passphrase
    hotplug(conn, domain, files.image, spec.name, target, passphrase)
    return _status(spec)


def _status(spec: DiskSpec) -> DiskStatus:
    # The guest kernel names its disks itself (vda...): the serial is what identifies it.
    if spec.mode == "guest":
        return DiskStatus(spec.name, spec.mode, spec.size, "unlocked",
                          f"in the VM: /dev/mapper/svd-{spec.name} (the guest's dm-crypt)")
    return DiskStatus(spec.name, spec.mode, spec.size, "unlocked",
                      f"in the VM: the virtio disk with serial {spec.name!r}")


def disk_status(files: VmDiskFiles, spec: DiskSpec, attached: bool) -> DiskStatus:
    """``status``: unlocked while the running VM has it, else locked (or absent when it
    was never made); never a key."""
    if attached:
        return _status(spec)
    state: DiskState = "locked" if files.binding.is_file() else "absent"
    return DiskStatus(spec.name, spec.mode, spec.size, state)


def _bound(files: VmDiskFiles) -> DiskBinding:
    binding = DiskBinding.load(files.binding)
    if (binding.node, binding.disk, binding.mode) != (files.node, files.disk, "host"):
        raise DiskBindingError(f"{files.binding} binds {binding.mode} disk {binding.disk!r} "
                               f"of node {binding.node!r}, not host disk {files.disk!r} of "
                               f"{files.node!r}")
    found = qcow2_luks_uuid(files.image)  # before any key is asked for
    if found != binding.luks_uuid:
        raise DiskBindingError(f"disk image {files.image} is not disk {files.disk!r} of node "
                               f"{files.node!r}: its LUKS UUID {found} is not the bound "
                               f"{binding.luks_uuid} (an image swapped in?)")
    return binding


# --- guest-side mode: a plain qcow2, keyed inside the guest -------------------------------


def attach_plain_disk(domain: Any, files: VmDiskFiles, spec: DiskSpec, target: str) -> None:
    """Create (on first use) and hot-plug a guest-side disk's plain qcow2: no secret; the
    guest puts LUKS2 on it, so the host only ever stores ciphertext."""
    if spec.name in attached_serials(domain):
        return
    private_dir(files.binding.parent)
    _image_dir(files)
    if not files.image.exists():
        try:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(files.image),
                            str(spec.size)], check=True, capture_output=True,
                           timeout=QEMU_IMG_TIMEOUT_S)
        except (subprocess.SubprocessError, OSError) as exc:
            files.image.unlink(missing_ok=True)
            raise StateError(f"cannot create disk image {files.image}: {exc}") from None
        os.chmod(files.image, 0o600)
    libvirt = load_libvirt()
    try:
        domain.attachDeviceFlags(disk_xml(files.image, spec.name, target, None), AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise StateError(f"could not attach disk {spec.name} to {domain.name()}: {exc}"
                         ) from None


@dataclass(frozen=True)
class GuestDiskKeys:
    """What the host, as CryptoVM root, needs to prepare a node's guest-disk keys."""

    call: Call  # CVM1 as root to the CryptoVM VM
    reference_policy: str  # the node's (YAML)
    registry_json: str  # the cluster's AK registry

    def grant(self, node: str, disk: str) -> None:
        """The key (created inside the CryptoVM on first use) and the node's account's
        privileges for it; NotFound while the account does not exist yet (it is made at
        the node's first attested contact, never by root)."""
        ensure_disk_key(self.call, node, disk, self.reference_policy, self.registry_json)
        key_id = disk_key_id(node, disk)
        self.call("account_grant", name=node_account(node),
                  privileges=[f"key:{key_id}:release", f"key:{key_id}:public"])


def unlock_guest_disks(node_agent: AgentClient, cryptovm_agent: AgentClient, *, node: str,
                       cryptovm: str, disks: Sequence[tuple[VmDiskFiles, DiskSpec]],
                       keys: GuestDiskKeys, pcrs: Sequence[int]) -> list[DiskStatus]:
    """Have ``node``'s guest unlock its (attached) guest-side disks with keys it fetches
    from the CryptoVM guest over an attested channel; keep the bindings it made."""
    def relay(with_disks: bool) -> ChannelOutcome:
        request = {"op": "svd_unlock", "cryptovm": cryptovm, "node": node,
                   "pcrs": sorted(pcrs), "disks": [_order(f, s) for f, s in disks]
                   if with_disks else []}
        outcome = relay_to_cryptovm(node_agent, cryptovm_agent, request, node_name=node,
                                    cryptovm_name=cryptovm)
        if not outcome.established:
            why = outcome.client_view.get("error") or outcome.server_view.get("error") \
                or outcome.server_view.get("refused") or "no answer"
            raise StateError(f"guest disks of {node} not unlocked: {why}")
        return outcome

    try:
        for _, spec in disks:
            keys.grant(node, spec.name)
    except NotFound:  # no attested contact yet: one empty channel makes the account
        relay(with_disks=False)
        for _, spec in disks:
            keys.grant(node, spec.name)
    answers = relay(with_disks=True).client_view.get("disks")
    if not isinstance(answers, list) or len(answers) != len(disks):
        raise StateError(f"guest disks of {node}: the guest's answer lists no disks")
    refused = []
    for (files, spec), answer in zip(disks, answers, strict=True):
        _keep_binding(files, spec, answer)  # also when another disk was refused
        if isinstance(answer, dict) and "error" in answer:
            refused.append(f"disk {spec.name}: {str(answer['error'])[:300]}")
    if refused:
        raise StateError(f"guest disks of {node} not unlocked: {'; '.join(refused)}")
    return [_status(spec) for _, spec in disks]


def _order(files: VmDiskFiles, spec: DiskSpec) -> dict[str, Any]:
    binding = DiskBinding.load(files.binding) if files.binding.is_file() else None
    if binding is not None and (binding.node, binding.disk, binding.mode) != (
            files.node, files.disk, "guest"):
        raise DiskBindingError(f"{files.binding} binds {binding.mode} disk {binding.disk!r} "
                               f"of node {binding.node!r}, not guest disk {files.disk!r}")
    return {"name": spec.name, "binding": binding.to_doc() if binding else None}


def _keep_binding(files: VmDiskFiles, spec: DiskSpec, answer: object) -> None:
    """The binding a guest made on first use (public), checked before it is kept."""
    if not isinstance(answer, dict) or answer.get("name") != spec.name:
        raise StateError(f"guest disk {spec.name}: the guest answered another disk")
    if "binding" not in answer:
        return
    binding = DiskBinding.from_doc(answer["binding"], f"the guest's binding of {spec.name}")
    if (binding.node, binding.disk, binding.mode) != (files.node, files.disk, "guest"):
        raise DiskBindingError(f"the guest's binding of {spec.name} names another disk")
    binding.save(files.binding)


# --- libvirt: the ephemeral secret and the hot-plug -----------------------------------------


def secret_xml(image: Path) -> str:
    root = ET.Element("secret", ephemeral="yes", private="yes")
    ET.SubElement(root, "description").text = "testbed SVD disk key (set after attestation)"
    usage = ET.SubElement(root, "usage", type="volume")
    ET.SubElement(usage, "volume").text = str(image)
    return ET.tostring(root, encoding="unicode")


def disk_xml(image: Path, serial: str, target: str, secret_uuid: str | None) -> str:
    """A virtio qcow2 disk; encrypted (LUKS, key from the libvirt secret) unless
    ``secret_uuid`` is None (the benchmark's plain baseline)."""
    root = ET.Element("disk", type="file", device="disk")
    ET.SubElement(root, "driver", name="qemu", type="qcow2")
    source = ET.SubElement(root, "source", file=str(image))
    if secret_uuid is not None:
        encryption = ET.SubElement(source, "encryption", format="luks")
        ET.SubElement(encryption, "secret", type="passphrase", uuid=secret_uuid)
    ET.SubElement(root, "target", dev=target, bus="virtio")
    ET.SubElement(root, "serial").text = serial
    return ET.tostring(root, encoding="unicode")


def hotplug(conn: Any, domain: Any, image: Path, serial: str, target: str,
            passphrase: bytes) -> None:
    """Attach the encrypted image live; the libvirt secret exists only during the call."""
    libvirt = load_libvirt()
    try:
        secret = conn.secretDefineXML(secret_xml(image), 0)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"cannot define the disk's libvirt secret: {exc}") from None
    try:
        secret.setValue(passphrase, 0)
        domain.attachDeviceFlags(disk_xml(image, serial, target, secret.UUIDString()),
                                 AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise StateError(f"could not attach disk {serial} to {domain.name()}: {exc}") from None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            secret.undefine()


def detach(domain: Any, serial: str) -> bool:
    """Unplug the disk with ``serial`` from the running domain (the guest acknowledges the
    PCIe unplug; :func:`attached_serials` shows when it is gone). Whether it was there."""
    libvirt = load_libvirt()
    for disk in _live_disks(domain):
        if disk.findtext("serial") == serial:
            try:
                domain.detachDeviceFlags(ET.tostring(disk, encoding="unicode"), AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                raise StateError(f"could not detach disk {serial}: {exc}") from None
            return True
    return False


def _live_disks(domain: Any) -> list[ET.Element]:
    libvirt = load_libvirt()
    try:
        root = ET.fromstring(domain.XMLDesc(0))  # noqa: S314 - libvirtd's own XML
    except (libvirt.libvirtError, ET.ParseError):
        return []
    return root.findall("./devices/disk")


def attached_serials(domain: Any) -> set[str]:
    """Serials of the disks the running domain has (its live XML)."""
    return {serial for disk in _live_disks(domain) if (serial := disk.findtext("serial"))}


def remove_disk_secrets(conn: Any, paths: ClusterPaths) -> list[str]:
    """Undefine every libvirt secret of this cluster's disk images (left by a crash
    between define and undefine); their usage ids."""
    libvirt = load_libvirt()
    root = str(disk_root(paths)) + "/"
    removed = []
    with contextlib.suppress(libvirt.libvirtError):
        for secret in conn.listAllSecrets(0):
            with contextlib.suppress(libvirt.libvirtError):
                if secret.usageType() == USAGE_VOLUME and secret.usageID().startswith(root):
                    removed.append(secret.usageID())
                    secret.undefine()
    return removed
