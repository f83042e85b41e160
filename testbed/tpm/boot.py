"""Simulated measured boot: extend a real TPM with the events firmware would log, and
predict, without any TPM, what a node booting a :class:`~testbed.spec.cluster_spec.BootSpec`
will show.

The sequence follows what OVMF does for a QEMU direct kernel boot: the CRTM version and
firmware volume into PCR 0, separators into PCRs 0-7, the kernel image into PCR 4, and
the Linux EFI stub's tagged events for the command line and the initrd into PCR 9. The
same events go into a TCG crypto-agile log, so a simulated node is verified by exactly
the code that verifies a real VM. Simplified against real OVMF (docs/qemu.md lists the
differences): one firmware volume, no Secure Boot variables, and file digests instead of
the Authenticode digest of QEMU's patched kernel.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from tpm2_pytss import TSS2_Exception

from attestation.errors import TpmError
from attestation.eventlog import EventLogBuilder, initial_pcr_value, parse_event_log, replay
from attestation.policy import ReferencePolicy, policy_from_evidence
from attestation.tpm import TpmClient
from attestation.tpm_types import PcrSelection
from testbed.spec.cluster_spec import Artifact, BootSpec

__all__ = [
    "BANK",
    "SIM_PCRS",
    "BootStep",
    "boot_steps",
    "boot_summary",
    "measure_boot",
    "predict_boot",
    "predicted_policy",
    "restore_clock_safety",
]

BANK = "sha256"
SIM_PCRS = PcrSelection(BANK, (0, 1, 2, 3, 4, 5, 6, 7, 9))
"""What a sim node is quoted over: firmware and boot manager PCRs 0-7, and PCR 9 (initrd,
command line)."""

EV_SEPARATOR = 0x4
EV_EVENT_TAG = 0x6
EV_S_CRTM_VERSION = 0x8
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
# The Linux EFI stub's tagged events (as real OVMF logs show them): the command line
# (LOADED_IMAGE::LoadOptions, UTF-16LE) first, then the initrd.
LINUX_CMDLINE_TAG = 0x8F3B22ED
LINUX_INITRD_TAG = 0x8F3B22EC
SEPARATOR = b"\x00\x00\x00\x00"


@dataclass(frozen=True)
class BootStep:
    """One event of the simulated boot: where it goes, what is logged, what is extended."""

    pcr: int
    event_type: int
    data: bytes
    digest: bytes  # sha256
    label: str  # names the event in policies and mismatch messages


def boot_steps(boot: BootSpec) -> list[BootStep]:
    """The events of an OVMF direct kernel boot of ``boot``: the one definition of the
    simulated sequence (sim nodes, the attack lab and predicted policies use it).

    An artifact given only by ``sha256`` is extended with that digest; its size, which
    only appears in event data, is 0.
    """
    firmware, kernel, initrd = (_measure(a) for a in (boot.firmware, boot.kernel, boot.initrd))
    version = boot.firmware_version.encode("utf-16-le") + b"\x00\x00"
    options = (boot.cmdline + "\x00").encode("utf-16-le")  # as the EFI stub measures it
    return [
        BootStep(0, EV_S_CRTM_VERSION, version, _sha256(version), "firmware version (S-CRTM)"),
        BootStep(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, _blob(firmware[1]), firmware[0],
                 "firmware volume"),
        *[BootStep(pcr, EV_SEPARATOR, SEPARATOR, _sha256(SEPARATOR), "separator")
          for pcr in range(8)],
        BootStep(4, EV_EFI_BOOT_SERVICES_APPLICATION, _image_load_event(kernel[1]),
                 kernel[0], "kernel"),
        BootStep(9, EV_EVENT_TAG, _tagged(LINUX_CMDLINE_TAG, b"LOADED_IMAGE::LoadOptions\x00"),
                 _sha256(options), "kernel command line"),
        BootStep(9, EV_EVENT_TAG, _tagged(LINUX_INITRD_TAG, b"Linux initrd\x00"),
                 initrd[0], "initrd"),
    ]


def measure_boot(client: TpmClient, boot: BootSpec) -> bytes:
    """Extend the TPM's PCRs with ``boot``'s events; return the matching event log."""
    log = EventLogBuilder(banks=(BANK,), startup_locality=0)
    for step in boot_steps(boot):
        event = log.add_digests(step.pcr, step.event_type, step.data, {BANK: step.digest})
        client.extend_pcr(step.pcr, event.digests)
    return log.to_bytes()


CLOCK_SAVE_INTERVAL_BITS = 22
"""The reference TPM (libtpms) saves Clock to NV each time it crosses a multiple of 2^22 ms
(NV_CLOCK_UPDATE_INTERVAL); crossing one is what sets TPMS_CLOCK_INFO.safe again."""


def restore_clock_safety(client: TpmClient) -> bool:
    """After an unorderly stop the TPM reports ``safe = 0``; make its Clock safe again.

    The TPM restored Clock from its last NV save, so it may be behind values it already
    reported, but never by more than one save interval. Advancing Clock (TPM2_ClockSet,
    owner auth) to the next save boundary puts it past every value reported before; the
    TPM then saves it and sets ``safe`` itself. A verifier refuses quotes with ``safe = 0``,
    so the platform does this at power-on. Returns whether Clock had to be advanced.
    """
    esapi = client.esapi
    try:
        info = esapi.read_clock().clockInfo
        if int(info.safe):
            return False
        step = CLOCK_SAVE_INTERVAL_BITS
        esapi.clock_set(((int(info.clock) >> step) + 1) << step)
        safe = int(esapi.read_clock().clockInfo.safe)
    except TSS2_Exception as exc:
        raise TpmError(f"making the TPM clock safe (TPM2_ClockSet) failed: {exc}") from None
    if not safe:
        raise TpmError("TPM2_ClockSet to the next clock save boundary left Clock unsafe")
    return True


def predict_boot(boot: BootSpec) -> tuple[bytes, dict[int, bytes]]:
    """The event log and the :data:`SIM_PCRS` values a node booting ``boot`` will have."""
    log = EventLogBuilder(banks=(BANK,), startup_locality=0)
    for step in boot_steps(boot):
        log.add_digests(step.pcr, step.event_type, step.data, {BANK: step.digest})
    log_bytes = log.to_bytes()
    parsed = parse_event_log(log_bytes)
    replayed = replay(parsed, BANK)
    pcrs = {i: replayed.get(i, initial_pcr_value(parsed, i, BANK)) for i in SIM_PCRS.indices}
    return log_bytes, pcrs


def predicted_policy(node: str, boot: BootSpec) -> ReferencePolicy:
    """The policy a node booting ``boot`` satisfies, computed without any TPM."""
    log_bytes, pcrs = predict_boot(boot)
    kernel = _measure(boot.kernel)[0]
    return policy_from_evidence(
        pcrs, parse_event_log(log_bytes), name=f"{node}-predicted", bank=BANK,
        labels=_labels(boot_steps(boot)),
        description=f"predicted from the boot chain of node {node} (kernel "
                    f"{kernel.hex()[:16]}…, cmdline {boot.cmdline[:60]!r})")


def boot_summary(boot: BootSpec) -> dict[str, str]:
    """What ``boot`` measures as, by digest: a node records it, ``up`` compares it."""
    return {"firmware": _digest_text(boot.firmware), "kernel": _digest_text(boot.kernel),
            "initrd": _digest_text(boot.initrd), "cmdline": boot.cmdline,
            "firmware_version": boot.firmware_version}


def _labels(steps: list[BootStep]) -> dict[tuple[int, int], str]:
    positions: dict[int, int] = {}
    labels: dict[tuple[int, int], str] = {}
    for step in steps:
        positions[step.pcr] = positions.get(step.pcr, 0) + 1
        labels[(step.pcr, positions[step.pcr])] = step.label
    return labels


def _measure(artifact: Artifact) -> tuple[bytes, int]:
    digest, size = artifact.measure()
    return digest, size or 0


def _digest_text(artifact: Artifact) -> str:
    return f"sha256:{artifact.measure()[0].hex()}"


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _tagged(tag: int, payload: bytes) -> bytes:
    return struct.pack("<II", tag, len(payload)) + payload


def _blob(size: int) -> bytes:
    # UEFI_PLATFORM_FIRMWARE_BLOB: base address and length (the content is digested).
    return struct.pack("<QQ", 0xFFC00000, size)


def _image_load_event(size: int) -> bytes:
    # UEFI_IMAGE_LOAD_EVENT with an empty device path: location, length, link-time address.
    return struct.pack("<QQQQ", 0, size, 0, 0)
