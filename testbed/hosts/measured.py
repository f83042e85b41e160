"""A host's measured boot: the simulated firmware, kernel and command line of
:mod:`testbed.tpm.boot` (PCRs 0-7 and 9), then the hypervisor stack.

The hypervisor stack is the QEMU, libvirtd and swtpm binaries the host runs VMs with.
The host's init measures each file *as its own mount namespace shows it* into
:data:`STACK_PCR` with one ``EV_IPL`` event (data: ``"hypervisor-stack NAME PATH"``,
digest: SHA-256 of the file), before it starts any of them. A host with another QEMU
binary therefore has another PCR 14 and another event, and fails the ``policy`` check
naming that event.

PCR 14: PCRs 8-15 belong to the operating system; a host booted like the simulated one
has no shim (the only real user of 14, for MOK lists) and no systemd-stub (11, 12, 13),
and 10 is IMA's. 16 and 23 are resettable (debug, application) and unfit for evidence.

The prediction (:func:`predicted_host_policy`) measures the *reference* stack: the
lab's own binaries at the same paths (a real lab would use the packages' digests).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from attestation.eventlog import EventLogBuilder, initial_pcr_value, parse_event_log, replay
from attestation.policy import ReferencePolicy, policy_from_evidence
from attestation.tpm import TpmClient
from attestation.tpm_types import PcrSelection
from testbed.hosts.layout import HostsError
from testbed.spec.cluster_spec import Artifact, BootSpec
from testbed.tpm.boot import BANK, BootStep, boot_steps

__all__ = [
    "HOST_BOOT",
    "HOST_PCRS",
    "STACK",
    "STACK_PCR",
    "StackComponent",
    "host_steps",
    "measure_host",
    "predicted_host_policy",
    "resolve_stack",
]

STACK_PCR = 14
HOST_PCRS = PcrSelection(BANK, (0, 1, 2, 3, 4, 5, 6, 7, 9, STACK_PCR))
EV_IPL = 0xD
STACK = ("qemu-system-x86_64", "libvirtd", "swtpm")
"""The hypervisor stack, in measurement order."""

HOST_BOOT = BootSpec.from_content(
    firmware="host firmware volume (testbed hypervisor host)",
    kernel="vmlinuz-6.1.0-testbed-host", initrd="initrd.img-6.1.0-testbed-host",
    cmdline="root=/dev/testbed-host ro quiet intel_iommu=on")
"""The simulated boot chain of every host (stand-ins, as the sim nodes' are)."""


@dataclass(frozen=True)
class StackComponent:
    name: str
    path: str  # absolute; the same path on the lab and on the host

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path}


def resolve_stack(names: Sequence[str] = STACK) -> list[StackComponent]:
    """Where this machine has each binary of the stack."""
    found = []
    for name in names:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
        if path is None:
            raise HostsError(f"{name} is not installed; a hypervisor host needs QEMU, libvirt "
                             "and swtpm (docs/qemu.md lists the packages)")
        found.append(StackComponent(name, path))
    return found


def _stack_step(component: StackComponent, digest: bytes) -> BootStep:
    data = f"hypervisor-stack {component.name} {component.path}".encode() + b"\x00"
    return BootStep(STACK_PCR, EV_IPL, data, digest, f"hypervisor stack: {component.name}")


def host_steps(boot: BootSpec, stack: Sequence[StackComponent],
               digests: Mapping[str, bytes]) -> list[BootStep]:
    """Every event of a host's boot: firmware to command line, then the stack in order."""
    return [*boot_steps(boot), *(_stack_step(c, digests[c.name]) for c in stack)]


def measure_stack(stack: Sequence[StackComponent]) -> dict[str, bytes]:
    """SHA-256 of each binary, as this process's mount namespace shows it."""
    return {c.name: Artifact("file", c.path, where=f"stack {c.name}").measure()[0]
            for c in stack}


def measure_host(client: TpmClient, boot: BootSpec, stack: Sequence[StackComponent]) -> bytes:
    """Extend the host TPM with every boot event; return the event log."""
    log = EventLogBuilder(banks=(BANK,), startup_locality=0)
    for step in host_steps(boot, stack, measure_stack(stack)):
        event = log.add_digests(step.pcr, step.event_type, step.data, {BANK: step.digest})
        client.extend_pcr(step.pcr, event.digests)
    return log.to_bytes()


def predicted_host_policy(host: str, boot: BootSpec,
                          stack: Sequence[StackComponent]) -> ReferencePolicy:
    """The policy a good host satisfies: its boot chain and the lab's reference stack."""
    digests = measure_stack(stack)
    steps = host_steps(boot, stack, digests)
    log = EventLogBuilder(banks=(BANK,), startup_locality=0)
    for step in steps:
        log.add_digests(step.pcr, step.event_type, step.data, {BANK: step.digest})
    parsed = parse_event_log(log.to_bytes())
    replayed = replay(parsed, BANK)
    pcrs = {i: replayed.get(i, initial_pcr_value(parsed, i, BANK)) for i in HOST_PCRS.indices}
    labels: dict[tuple[int, int], str] = {}
    positions: dict[int, int] = {}
    for step in steps:
        positions[step.pcr] = positions.get(step.pcr, 0) + 1
        labels[(step.pcr, positions[step.pcr])] = step.label
    stack_text = ", ".join(f"{c.name} {digests[c.name].hex()[:12]}…" for c in stack)
    return policy_from_evidence(pcrs, parsed, name=f"{host}-predicted", bank=BANK,
                                labels=labels,
                                description=f"predicted for hypervisor host {host}: simulated "
                                            f"boot chain + the lab's stack ({stack_text})")
