"""Simulated measured boot: extend a real TPM with the events firmware would log.

The sequence follows what OVMF does for a QEMU direct kernel boot: the CRTM
version and firmware volume into PCR 0, separators into PCRs 0-7, the kernel
image into PCR 4, and the Linux EFI stub's tagged events for the command line and
the initrd into PCR 9. The same events go into a TCG crypto-agile log, so a
simulated node is verified by exactly the code that verifies a real VM.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from attestation.eventlog import EventLogBuilder
from attestation.tpm import TpmClient

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
class BootChain:
    """What a node boots: each artifact's bytes (or stand-in content) and its command line."""

    firmware: bytes
    kernel: bytes
    initrd: bytes
    cmdline: str
    firmware_version: str = "edk2-stable202302"


@dataclass(frozen=True)
class BootStep:
    """One event of the simulated boot: where it goes, what is logged, what is extended."""

    pcr: int
    event_type: int
    data: bytes
    digest: bytes  # sha256
    label: str  # names the event in policies and mismatch messages


def load_options(cmdline: str) -> bytes:
    """The command line as the EFI stub measures it: UTF-16LE, NUL-terminated."""
    return (cmdline + "\x00").encode("utf-16-le")


def ovmf_boot_steps(*, firmware_version: str, firmware_digest: bytes, firmware_size: int,
                    kernel_digest: bytes, kernel_size: int, initrd_digest: bytes,
                    cmdline: str) -> list[BootStep]:
    """The events of an OVMF direct kernel boot, from the artifacts' digests.

    The one definition of the simulated sequence (sim nodes and predicted policies
    use it). Simplified against real OVMF (docs/qemu.md lists the differences): one
    firmware volume, no Secure Boot variables, and file digests instead of the
    Authenticode digest of QEMU's patched kernel.
    """
    version = firmware_version.encode("utf-16-le") + b"\x00\x00"
    options = load_options(cmdline)
    return [
        BootStep(0, EV_S_CRTM_VERSION, version, _sha256(version), "firmware version (S-CRTM)"),
        BootStep(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, _blob(firmware_size), firmware_digest,
                 "firmware volume"),
        *[BootStep(pcr, EV_SEPARATOR, SEPARATOR, _sha256(SEPARATOR), "separator")
          for pcr in range(8)],
        BootStep(4, EV_EFI_BOOT_SERVICES_APPLICATION, _image_load_event(kernel_size),
                 kernel_digest, "kernel"),
        BootStep(9, EV_EVENT_TAG, _tagged(LINUX_CMDLINE_TAG, b"LOADED_IMAGE::LoadOptions\x00"),
                 _sha256(options), "kernel command line"),
        BootStep(9, EV_EVENT_TAG, _tagged(LINUX_INITRD_TAG, b"Linux initrd\x00"),
                 initrd_digest, "initrd"),
    ]


def measure_steps(client: TpmClient, steps: list[BootStep],
                  banks: tuple[str, ...] = ("sha256",)) -> bytes:
    """Extend the TPM with ``steps`` (sha256) and return the matching event log."""
    log = EventLogBuilder(banks=banks, startup_locality=0)
    for step in steps:
        event = log.add_digests(step.pcr, step.event_type, step.data, {"sha256": step.digest})
        client.extend_pcr(step.pcr, event.digests)
    return log.to_bytes()


def measure_boot(client: TpmClient, chain: BootChain) -> bytes:
    """Extend the TPM's PCRs with ``chain``'s events; return the matching event log."""
    return measure_steps(client, ovmf_boot_steps(
        firmware_version=chain.firmware_version, firmware_digest=_sha256(chain.firmware),
        firmware_size=len(chain.firmware), kernel_digest=_sha256(chain.kernel),
        kernel_size=len(chain.kernel), initrd_digest=_sha256(chain.initrd),
        cmdline=chain.cmdline))


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


def artifact_digest(data: bytes, bank: str = "sha256") -> str:
    return hashlib.new(bank, data).hexdigest()
