"""Simulated measured boot: extend a real TPM with the events firmware would log.

The sequence follows what OVMF does for a QEMU direct kernel boot: the CRTM
version and firmware volume into PCR 0, separators into PCRs 0-7, the kernel
image into PCR 4, and the Linux EFI stub's tagged events for the initrd and the
command line into PCR 9. The same events go into a TCG crypto-agile log, so a
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
LINUX_INITRD_TAG = 0x8F3B22ED  # the Linux EFI stub's tagged event ids
LINUX_CMDLINE_TAG = 0x8F3B22EC


@dataclass(frozen=True)
class BootChain:
    """What a node boots: each artifact's bytes (or stand-in content) and its command line."""

    firmware: bytes
    kernel: bytes
    initrd: bytes
    cmdline: str
    firmware_version: str = "edk2-stable202302"


def _tagged(tag: int, payload: bytes) -> bytes:
    return struct.pack("<II", tag, len(payload)) + payload


def _blob(data: bytes) -> bytes:
    # UEFI_PLATFORM_FIRMWARE_BLOB: base address and length (the content is digested).
    return struct.pack("<QQ", 0xFFC00000, len(data))


def measure_boot(client: TpmClient, chain: BootChain, banks: tuple[str, ...] = ("sha256",)
                 ) -> bytes:
    """Extend the TPM's PCRs with ``chain``'s events; return the matching event log."""
    log = EventLogBuilder(banks=banks, startup_locality=0)
    cmdline = chain.cmdline.encode() + b"\x00"
    steps = [
        (0, EV_S_CRTM_VERSION, chain.firmware_version.encode("utf-16-le") + b"\x00\x00", None),
        (0, EV_EFI_PLATFORM_FIRMWARE_BLOB, _blob(chain.firmware), chain.firmware),
        *[(pcr, EV_SEPARATOR, b"\x00\x00\x00\x00", None) for pcr in range(8)],
        (4, EV_EFI_BOOT_SERVICES_APPLICATION, _image_load_event(chain.kernel), chain.kernel),
        (9, EV_EVENT_TAG, _tagged(LINUX_INITRD_TAG, b"Linux initrd\x00"), chain.initrd),
        (9, EV_EVENT_TAG, _tagged(LINUX_CMDLINE_TAG, cmdline), cmdline),
    ]
    for pcr, event_type, data, digest_data in steps:
        event = log.add(pcr, event_type, data, digest_data)
        client.extend_pcr(pcr, event.digests)
    return log.to_bytes()


def _image_load_event(image: bytes) -> bytes:
    # UEFI_IMAGE_LOAD_EVENT with an empty device path: location, length, link-time address.
    return struct.pack("<QQQQ", 0, len(image), 0, 0)


def artifact_digest(data: bytes, bank: str = "sha256") -> str:
    return hashlib.new(bank, data).hexdigest()
