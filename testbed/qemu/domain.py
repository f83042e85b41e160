"""VMs through libvirt-python: domain XML, vTPM manufacturing, lifecycle.

A testbed VM is a libvirt domain (``qemu:///system``) with:

* q35 + OVMF (read-only ``OVMF_CODE_4M.fd``, a per-VM copy of ``OVMF_VARS_4M.fd``
  made by libvirt from the template) by default, SeaBIOS as an option;
* QEMU direct kernel boot of the guest image (kernel, initrd, command line);
* ``<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>``: libvirt
  runs swtpm. The TPM is *manufactured by the project* first
  (:func:`testbed.tpm.swtpm.provision` with the project's :class:`~testbed.tpm.localca.LocalCA`)
  in the state directory libvirt uses for this UUID,
  ``/var/lib/libvirt/swtpm/<uuid>/tpm2``; libvirt only runs ``swtpm_setup`` for a
  missing state, so it never touches /var/lib/swtpm-localca or /etc;
* the serial console written to a log file (by virtlogd);
* TCG (``type='qemu'``) unless KVM really works (:mod:`testbed.qemu.accel`);
* one NIC on an isolated QEMU user-mode network (``restrict=on``: no route out,
  not even to the host) whose only opening is a ``hostfwd`` from
  ``127.0.0.1:<port>`` to the guest agent. libvirt 9.0's ``<interface type='user'>``
  cannot forward ports without passt, so the netdev is given as ``qemu:commandline``
  arguments. The NIC's option ROM is off (nothing to PXE boot, and OVMF would
  measure it into PCR 2);
* a second NIC on the cluster's lab segment (docs/svd.md, "The VM network"): a Linux
  bridge of the cluster's own with one tap per VM (libvirt's ``type='bridge'``), or, for a
  VM without one, a tap connected to nothing. The guest sees the same device either way
  (same slot, same MAC, no option ROM), so the firmware measures the same: the guest
  sets its own MAC and addresses once it is attested (testbed/qemu/guest/net_extension.py);
* no graphics, video, USB, balloon: fewer devices, faster TCG boot, fewer firmware events;
* for a VM with host-side encrypted disks, empty ``pcie-root-port`` controllers to
  hot-plug them into after attestation (:mod:`testbed.qemu.disks`): an empty port has
  no option ROM and no boot option, so OVMF measures nothing more.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from testbed.qemu.accel import AccelChoice
from testbed.qemu.libvirtd import LIBVIRT_URI, LibvirtError, load_libvirt
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import provision

__all__ = [
    "DEVICE_SET",
    "DOMAIN_PREFIX",
    "GUEST_IP",
    "OVMF_CODE",
    "OVMF_VARS",
    "Firmware",
    "Vm",
    "VmSpec",
    "connect",
    "domain_xml",
    "free_port",
    "leftover_domains",
    "remove_leftovers",
    "tpm_state_dir",
]

Firmware = Literal["ovmf", "seabios"]
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SWTPM_STORAGE = Path("/var/lib/libvirt/swtpm")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DOMAIN_PREFIX = "testbed-"
GUEST_IP = "10.0.2.15"  # QEMU user-mode networking's first DHCP address, set statically
DEVICE_SET = "q35-crb-virtio-net-norom-lab-v2"
"""Tag of the device set :func:`domain_xml` builds; part of the firmware reference key."""
LAB_MAC = "52:54:00:7b:00:01"  # what the firmware sees on every VM; the guest sets its own
LAB_SLOT = "0x04"  # pcie.0 slot of the lab NIC (the agent NIC is at 0x03)
UNDEFINE_NVRAM = 4  # VIR_DOMAIN_UNDEFINE_NVRAM
UNDEFINE_TPM = 64  # VIR_DOMAIN_UNDEFINE_TPM (libvirt >= 8.9)

ET.register_namespace("qemu", QEMU_NS)


@dataclass(frozen=True)
class VmSpec:
    """Everything a domain definition needs."""

    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    run_dir: Path  # console log and NVRAM live here
    agent_port: int  # host side, on 127.0.0.1
    guest_port: int
    accel: AccelChoice
    firmware: Firmware = "ovmf"
    memory_mib: int = 512
    vcpus: int = 1
    machine: str = "q35"
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    ovmf_code: Path = OVMF_CODE
    ovmf_vars: Path = OVMF_VARS
    # More (host port on 127.0.0.1, guest port) openings, e.g. a CryptoVM's service port.
    forwards: tuple[tuple[int, int], ...] = ()
    lab_bridge: str | None = None  # the cluster's lab bridge; None: a tap to nothing
    # Empty pcie-root-ports for disks hot-plugged after attestation (testbed/qemu/disks.py).
    hotplug_ports: int = 0

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def nvram(self) -> Path:
        return self.run_dir / "OVMF_VARS.fd"

    def with_cmdline(self, cmdline: str) -> VmSpec:
        return replace(self, cmdline=cmdline)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _os(root: ET.Element, spec: VmSpec) -> None:
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.firmware == "ovmf":
        _sub(os_el, "loader", str(spec.ovmf_code), readonly="yes", type="pflash")
        _sub(os_el, "nvram", str(spec.nvram), template=str(spec.ovmf_vars))
    _sub(os_el, "kernel", str(spec.kernel))
    _sub(os_el, "initrd", str(spec.initrd))
    _sub(os_el, "cmdline", spec.cmdline)


def _devices(root: ET.Element, spec: VmSpec) -> None:
    devices = _sub(root, "devices")
    _sub(devices, "emulator", shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.console_log), append="off")
    _sub(serial, "target", port="0")
    tpm = _sub(devices, "tpm", model="tpm-crb")
    _sub(tpm, "backend", type="emulator", version="2.0")
    _lab_nic(devices, spec)
    _sub(devices, "controller", type="usb", model="none")
    _sub(_sub(devices, "video"), "model", type="none")
    _sub(devices, "memballoon", model="none")
    if spec.hotplug_ports:  # q35's root bus takes no hot-plug: an empty port per disk
        _sub(devices, "controller", type="pci", index="0", model="pcie-root")
    for index in range(1, spec.hotplug_ports + 1):
        _sub(devices, "controller", type="pci", index=str(index), model="pcie-root-port")


def _lab_nic(devices: ET.Element, spec: VmSpec) -> None:
    """The lab NIC: on the cluster's bridge, or on a tap connected to nothing."""
    nic = _sub(devices, "interface", type="bridge" if spec.lab_bridge else "ethernet")
    if spec.lab_bridge:
        _sub(nic, "source", bridge=spec.lab_bridge)
    _sub(nic, "mac", address=LAB_MAC)
    _sub(nic, "model", type="virtio")
    _sub(nic, "rom", enabled="no")
    _sub(nic, "address", type="pci", domain="0x0000", bus="0x00", slot=LAB_SLOT,
         function="0x0")


def _network(root: ET.Element, spec: VmSpec) -> None:
    openings = ((spec.agent_port, spec.guest_port), *spec.forwards)
    netdev = "user,id=agentnet,restrict=on,ipv6=off," + ",".join(
        f"hostfwd=tcp:127.0.0.1:{host}-{GUEST_IP}:{guest}" for host, guest in openings)
    nic = "virtio-net-pci,netdev=agentnet,romfile=,bus=pcie.0,addr=0x3" \
        if spec.machine.startswith(("q35", "pc-q35")) else \
        "virtio-net-pci,netdev=agentnet,romfile=,bus=pci.0,addr=0x3"
    commandline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for value in ("-netdev", netdev, "-device", nic):
        ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=value)


def domain_xml(spec: VmSpec) -> str:
    """The libvirt domain XML for ``spec``."""
    root = ET.Element("domain", type=spec.accel.domain_type)
    _sub(root, "name", spec.name)
    _sub(root, "uuid", spec.uuid)
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.vcpus))
    _os(root, spec)
    _sub(_sub(root, "features"), "acpi")
    _sub(root, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(root, event, "destroy")  # panic=-1 reboots: a crashed guest just stops
    _devices(root, spec)
    _network(root, spec)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def tpm_state_dir(vm_uuid: str) -> Path:
    """Where libvirt keeps (and swtpm reads) this VM's TPM state."""
    return SWTPM_STORAGE / vm_uuid / "tpm2"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connect(uri: str = LIBVIRT_URI) -> Any:
    """A libvirt connection (``virConnect``); LibvirtError if nobody answers."""
    libvirt = load_libvirt()

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"cannot connect to {uri}: {exc}") from None


def _traversable(path: Path, owned: Sequence[Path]) -> None:
    """QEMU runs as libvirt-qemu: every directory above its files needs o+x.

    Directories at or below one of ``owned`` (the testbed's own work and image
    directories) get o+x (search only, no listing); any other directory lacking
    it is an error naming it.
    """
    roots = [root.absolute() for root in owned]
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o001:
            continue
        if not any(parent == root or root in parent.parents for root in roots):
            raise LibvirtError(f"{parent} is not searchable by QEMU's user (libvirt-qemu): "
                               "chmod o+x it or use a work directory elsewhere")
        parent.chmod(mode | 0o001)


class Vm:
    """One defined and running testbed domain. :meth:`destroy` removes every trace."""

    def __init__(self, conn: Any, spec: VmSpec, domain: Any) -> None:
        self.conn = conn
        self.spec = spec
        self.domain = domain

    @classmethod
    def start(cls, conn: Any, spec: VmSpec, ca: LocalCA, owned: Sequence[Path] = ()) -> Vm:
        """Manufacture the vTPM, define the domain and start it.

        ``owned`` are the testbed's directories above the run directory and the
        image, which may be made searchable for QEMU (see :func:`_traversable`).
        """
        libvirt = load_libvirt()

        if not spec.name.startswith(DOMAIN_PREFIX):
            raise ValueError(f"testbed domain names start with {DOMAIN_PREFIX!r}")
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        for path in (spec.run_dir, spec.kernel, spec.initrd):
            _traversable(path, owned)
        state = tpm_state_dir(spec.uuid)
        provision(state, ca)
        try:
            domain = conn.defineXML(domain_xml(spec))
        except libvirt.libvirtError as exc:
            shutil.rmtree(state.parent, ignore_errors=True)
            raise LibvirtError(f"defining {spec.name} failed: {exc}") from None
        vm = cls(conn, spec, domain)
        try:
            domain.create()
        except libvirt.libvirtError as exc:
            vm.destroy()
            raise LibvirtError(f"starting {spec.name} failed: {exc}") from None
        return vm

    @classmethod
    def start_placed(cls, conn: Any, spec: VmSpec) -> Vm:
        """Define and start a VM on a host (``conn`` over ``qemu+ssh``) whose files and
        vTPM state :class:`testbed.hosts.placement.PlacedHost` already made there."""
        libvirt = load_libvirt()

        if not spec.name.startswith(DOMAIN_PREFIX):
            raise ValueError(f"testbed domain names start with {DOMAIN_PREFIX!r}")
        try:
            domain = conn.defineXML(domain_xml(spec))
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"defining {spec.name} failed: {exc}") from None
        vm = cls(conn, spec, domain)
        try:
            domain.create()
        except libvirt.libvirtError as exc:
            vm.destroy()
            raise LibvirtError(f"starting {spec.name} failed: {exc}") from None
        return vm

    @property
    def active(self) -> bool:
        libvirt = load_libvirt()

        try:
            return bool(self.domain.isActive())
        except libvirt.libvirtError:
            return False

    def console(self, lines: int = 30) -> str:
        """The tail of the serial console log."""
        try:
            text = self.spec.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def destroy(self) -> None:
        """Stop QEMU (libvirt stops swtpm), undefine with NVRAM and TPM state."""
        libvirt = load_libvirt()

        with contextlib.suppress(libvirt.libvirtError):
            if self.domain.isActive():
                self.domain.destroy()
        for flags in (UNDEFINE_NVRAM | UNDEFINE_TPM, UNDEFINE_NVRAM, 0):
            try:  # older libvirt (and the test driver) know fewer flags
                self.domain.undefineFlags(flags)
                break
            except libvirt.libvirtError:
                continue
        shutil.rmtree(SWTPM_STORAGE / self.spec.uuid, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.spec.nvram.unlink()


def leftover_domains(conn: Any) -> Iterator[Any]:
    """Every domain (running or only defined) whose name has the testbed prefix."""
    for domain in conn.listAllDomains(0):
        if domain.name().startswith(DOMAIN_PREFIX):
            yield domain


def remove_leftovers(conn: Any) -> list[str]:
    """Destroy and undefine every testbed domain (e.g. after a killed run); their names.

    Only for when no other testbed process uses this libvirt: it cannot tell
    whose domains they are.
    """
    removed = []
    for domain in list(leftover_domains(conn)):
        spec_uuid = domain.UUIDString()
        vm = Vm(conn, VmSpec(name=domain.name(), kernel=Path(), initrd=Path(), cmdline="",
                             run_dir=Path("/nonexistent"), agent_port=0, guest_port=0,
                             accel=AccelChoice("tcg", "cleanup"), uuid=spec_uuid), domain)
        vm.destroy()
        removed.append(domain.name())
    return removed
