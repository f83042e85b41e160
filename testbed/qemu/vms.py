"""The QEMU backend: boot guest images as libvirt VMs and attest them from the host.

Typical use::

    with VmDriver(workdir) as driver:
        image = build_image(workdir)
        policy = driver.predicted_policy(image)         # boots a reference VM once
        node = driver.boot("vm0", image)
        driver.wait(node)
        report, evidence = driver.attest(node, policy)
        assert report.ok

Everything the backend starts (domains, their swtpm and QEMU processes, and the
libvirt daemons if it had to start them) is stopped by :meth:`VmDriver.close`,
except after :meth:`VmDriver.release`, which hands VMs and daemons over to a
longer-lived owner (the qemu clusters of :mod:`testbed.qemu.backend`).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from attestation.errors import TestbedError
from attestation.eventlog import parse_event_log
from attestation.evidence import Evidence
from attestation.policy import ReferencePolicy
from attestation.registrar import AkRegistry, Registrar, register
from attestation.report import VerificationReport
from attestation.tpm_types import PublicArea
from attestation.verifier import QuoteVerifier
from testbed.cluster.agent import AgentClient, AgentTransport, TcpTransport
from testbed.cluster.backend import NodeFailed
from testbed.core.errors import StateError
from testbed.qemu.accel import AccelChoice, detect_accel
from testbed.qemu.domain import DEVICE_SET, DOMAIN_PREFIX, Firmware, Vm, VmSpec, connect, free_port
from testbed.qemu.image.build import GuestImage
from testbed.qemu.libvirtd import Daemons, LibvirtError, ensure_daemons
from testbed.qemu.predict.events import (
    QUOTED_PCRS,
    FirmwareConfig,
    FirmwareReference,
    PredictionError,
    predict_events,
    predict_policy,
)
from testbed.tpm.localca import LocalCA

__all__ = ["QemuNode", "VmBootError", "VmDriver"]

BOOT_TIMEOUT_S = 240.0
PORT_ATTEMPTS = 3
POLL_INTERVAL_S = 0.5
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class VmBootError(NodeFailed):
    """A VM stopped or never answered; the detail is its console's tail."""


@dataclass
class QemuNode:
    """One booted VM and how to reach its agent."""

    name: str
    vm: Vm
    image: GuestImage
    cmdline: str
    started: float  # time.monotonic() before the domain was defined
    ready: float | None = None
    status: dict[str, Any] = field(default_factory=dict)
    transport: AgentTransport | None = None  # None: the agent's forward on 127.0.0.1

    @property
    def agent(self) -> AgentClient:
        transport = self.transport or TcpTransport(self.vm.spec.agent_port)
        return AgentClient(transport, node=self.name, timeout=60.0)

    @property
    def boot_seconds(self) -> float | None:
        return None if self.ready is None else self.ready - self.started


class VmDriver:
    """VMs on ``qemu:///system`` with the project's CA, a registrar and predicted policies."""

    def __init__(self, workdir: Path, *, accel: AccelChoice | None = None,
                 firmware: Firmware = "ovmf", memory_mib: int = 512,
                 reference_dir: Path | None = None) -> None:
        self.workdir = Path(workdir).absolute()
        self.reference_dir = Path(reference_dir or self.workdir / "firmware").absolute()
        self.accel = accel or detect_accel()
        self.firmware: Firmware = firmware
        self.memory_mib = memory_mib
        self.ca = LocalCA.ensure(self.workdir / "ca")
        self.registrar = Registrar(self.ca.ca_bundle())
        self.nodes: dict[str, QemuNode] = {}
        self._lock = threading.Lock()
        self.daemons: Daemons = ensure_daemons(self.workdir / "run" / "libvirt")
        try:
            self.conn = connect()
        except BaseException:
            self.daemons.stop()
            raise

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> VmDriver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Destroy every VM this backend booted, then stop daemons it started."""
        for name in list(self.nodes):
            self.stop(name)
        with contextlib.suppress(Exception):
            self.conn.close()
        self.daemons.stop()

    def release(self) -> None:
        """Leave every VM and daemon running, forgotten by this backend; close libvirt.

        For VMs that outlive this process (``testbed up --backend qemu``): their
        owner stops them later by domain name, and the daemons by their pid files
        in ``<workdir>/run/libvirt``.
        """
        self.nodes.clear()
        self.daemons.started.clear()
        self.close()

    def stop(self, name: str) -> None:
        node = self.nodes.pop(name, None)
        if node is not None:
            node.vm.destroy()

    def boot(self, name: str, image: GuestImage, *, cmdline: str | None = None,
             domain: str | None = None, run_dir: Path | None = None,
             guest_ports: Sequence[int] = (), hotplug_ports: int = 0,
             lab_bridge: str | None = None) -> QemuNode:
        """Define and start a VM (returns at once; :meth:`wait` for its agent).

        ``domain`` (default ``testbed-<name>``) and ``run_dir`` (default
        ``<workdir>/qemu/<name>``, console log and NVRAM) let clusters keep
        their VMs apart from other testbed runs. Each of ``guest_ports`` gets a
        forward from a free port on 127.0.0.1 (``node.vm.spec.forwards``);
        ``hotplug_ports`` empty PCIe ports take disks attached later; ``lab_bridge`` puts
        its lab NIC on that bridge (testbed/qemu/network.py).
        """
        if not _NAME.fullmatch(name):
            raise ValueError(f"node name {name!r} must match {_NAME.pattern}")
        started = time.monotonic()
        with self._lock:
            if name in self.nodes:
                raise StateError(f"node {name!r} is already running")
            for attempt in range(PORT_ATTEMPTS):
                spec = VmSpec(
                    name=domain or f"{DOMAIN_PREFIX}{name}", kernel=image.kernel,
                    initrd=image.initrd, cmdline=image.cmdline if cmdline is None else cmdline,
                    run_dir=run_dir or self.workdir / "qemu" / name, agent_port=self._port(),
                    guest_port=image.agent_port, accel=self.accel, firmware=self.firmware,
                    memory_mib=self.memory_mib, hotplug_ports=hotplug_ports,
                    forwards=tuple((self._port(), port) for port in guest_ports),
                    lab_bridge=lab_bridge)  # fmt: skip
                try:
                    vm = Vm.start(self.conn, spec, self.ca,
                                  owned=(self.workdir, image.directory.parent.parent))
                    break
                except LibvirtError as exc:  # lost the race for the hostfwd port: retry
                    if "forwarding" not in str(exc) or attempt == PORT_ATTEMPTS - 1:
                        raise
            node = QemuNode(name, vm, image, spec.cmdline, started)
            self.nodes[name] = node
        return node

    def _port(self) -> int:
        used = {port for node in self.nodes.values()
                for port in (node.vm.spec.agent_port, *(h for h, _ in node.vm.spec.forwards))}
        while (port := free_port()) in used:
            continue
        return port

    def wait(self, node: QemuNode, timeout: float = BOOT_TIMEOUT_S) -> dict[str, Any]:
        """Until the guest agent answers ``status``; VmBootError if the VM stops first."""
        deadline = time.monotonic() + timeout
        client = node.agent.with_timeout(5.0)
        while time.monotonic() < deadline:
            if not node.vm.active:
                raise VmBootError(f"VM {node.name} stopped before its agent answered",
                                  f"console:\n{node.vm.console()}")
            with contextlib.suppress(TestbedError):
                node.status = client.status()
                node.ready = time.monotonic()
                return node.status
            time.sleep(POLL_INTERVAL_S)
        raise VmBootError(f"VM {node.name}'s agent did not answer within {timeout:.0f} s",
                          f"console:\n{node.vm.console()}")

    # --- attestation -------------------------------------------------------------------

    def activate(self, node: QemuNode) -> PublicArea | None:
        """Registrar-style AK activation against the VM's EK (trusted by this driver)."""
        return register(node.agent, node.name, self.registrar, AkRegistry())

    def attest(self, node: QemuNode, policy: ReferencePolicy | None
               ) -> tuple[VerificationReport, Evidence]:
        """Activate the AK, quote PCRs 0-9 with a fresh nonce, verify against ``policy``."""
        self.activate(node)
        nonce = os.urandom(32)
        evidence = node.agent.quote(nonce, QUOTED_PCRS)
        verifier = QuoteVerifier(ak_trust=self.registrar, policy=policy)
        return verifier.verify(evidence, nonce), evidence

    # --- prediction --------------------------------------------------------------------

    def firmware_config(self) -> FirmwareConfig:
        if self.firmware != "ovmf":
            raise PredictionError("SeaBIOS does not measure a directly booted kernel, initrd or "
                                  "command line: only OVMF boots can be predicted")
        probe = VmSpec(name="probe", kernel=Path(), initrd=Path(), cmdline="",
                       run_dir=Path(), agent_port=0, guest_port=0, accel=self.accel)
        return FirmwareConfig.for_files(probe.ovmf_code, probe.ovmf_vars, machine=probe.machine,
                                        devices=DEVICE_SET, memory_mib=self.memory_mib,
                                        vcpus=probe.vcpus)

    def firmware_reference(self, image: GuestImage) -> FirmwareReference:
        """The stored firmware reference for this OVMF/VM config, captured now if missing."""
        config = self.firmware_config()
        reference = FirmwareReference.load(self.reference_dir, config)
        if reference is None:
            reference = self.capture_reference(image, config)
            reference.save(self.reference_dir)
        return reference

    def capture_reference(self, image: GuestImage, config: FirmwareConfig
                          ) -> FirmwareReference:
        """Boot ``image`` once and keep the firmware's own events (checked quote + log)."""
        node = self.boot(f"fwref-{config.key()[:8]}", image)
        try:
            self.wait(node)
            report, evidence = self.attest(node, None)
            if not report.ok or evidence.event_log is None:
                raise PredictionError(f"reference boot failed verification: {report}")
            predicted = self.predict(image, node.cmdline)
            return FirmwareReference.from_log(parse_event_log(evidence.event_log), config,
                                              predicted)
        finally:
            self.stop(node.name)

    def predict(self, image: GuestImage, cmdline: str | None = None) -> list[Any]:
        return predict_events(image.kernel, image.initrd,
                              image.cmdline if cmdline is None else cmdline,
                              self.memory_mib << 20)

    def predicted_policy(self, image: GuestImage, cmdline: str | None = None
                         ) -> ReferencePolicy:
        """What a VM booting ``image`` (with ``cmdline``) on this backend must show."""
        reference = self.firmware_reference(image)
        predicted = self.predict(image, cmdline)
        return predict_policy(reference, predicted, name=f"qemu-{image.digest[:12]}",
                              description=f"predicted from image {image.digest[:16]} on "
                                          f"firmware reference {reference.config.key()[:16]}")
