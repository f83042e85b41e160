"""Predict the measured-boot events of a QEMU direct kernel boot under OVMF.

What OVMF (Debian 12's edk2 2022.11) and Debian 12's Linux 6.1 EFI stub log for
``-kernel vmlinuz -initrd initrd.img -append CMDLINE`` -- read from real boots:

* PCR 4, EV_EFI_BOOT_SERVICES_APPLICATION: the kernel, measured by OVMF's
  LoadImage with its **Authenticode** digest -- but of the image QEMU hands the
  firmware through fw_cfg, not of the file: QEMU's ``x86_load_linux`` patches
  the bzImage setup header first (type_of_loader 0xB0, loadflags CAN_USE_HEAP,
  heap_end_ptr, cmd_line_ptr, ramdisk_image, ramdisk_size, and vid_mode for
  ``vga=``). The digest therefore depends on the initrd's size and on where
  QEMU places it (top of low RAM), i.e. on the guest's memory size.
* PCR 9, EV_EVENT_TAG id 0x8F3B22ED "LOADED_IMAGE::LoadOptions": logged by the
  kernel's EFI stub; the digest is SHA-256 of the UEFI LoadOptions, the UTF-16LE
  command line OVMF built: QEMU's ``-append`` text + ``" initrd=initrd"`` + NUL.
* PCR 9, EV_EVENT_TAG id 0x8F3B22EC "Linux initrd": the stub's measurement of
  the initrd it loaded through LoadFile2: plain SHA-256 of ``initrd.img``.

Everything else in PCRs 0-7 (CRTM version, firmware volumes, Secure Boot
variables, BootOrder/Boot0000, the "Calling EFI Application" and
ExitBootServices actions, separators, option ROMs) depends only on the OVMF
build and the VM configuration, not on the guest. It is the one part that is
*not* predicted: it is captured once from a reference boot of the same OVMF
files and VM configuration (:class:`FirmwareReference`, keyed by
:class:`FirmwareConfig`) -- re-deriving it would mean re-implementing the
firmware's own build (FV contents, variable defaults).
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attestation.errors import EvidenceFormatError
from attestation.eventlog import (
    EV_NO_ACTION,
    EventLog,
    event_type_name,
    event_type_value,
)
from attestation.files import atomic_write
from attestation.policy import ExpectedEvent, ReferencePolicy
from testbed.qemu.predict.authenticode import authenticode_digest

__all__ = [
    "ACPI_DATA_SIZE",
    "EV_EFI_BOOT_SERVICES_APPLICATION",
    "EV_EVENT_TAG",
    "QUOTED_PCRS",
    "FirmwareConfig",
    "FirmwareReference",
    "PredictedEvent",
    "PredictionError",
    "kernel_digest",
    "load_options",
    "predict_events",
    "predict_policy",
    "qemu_patched_kernel",
]

EV_EVENT_TAG = 0x00000006
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
LOAD_OPTIONS_TAG = 0x8F3B22ED  # drivers/firmware/efi/libstub/efistub.h
INITRD_TAG = 0x8F3B22EC
KERNEL_PCR, STUB_PCR = 4, 9
QUOTED_PCRS = tuple(range(10))
"""PCRs a QEMU node quotes: the firmware's 0-7, the (empty) 8 and the stub's 9."""

# QEMU 7.2 hw/i386/x86.c x86_load_linux, boot protocol >= 2.02 kernels.
REAL_ADDR = 0x10000
CMDLINE_ADDR = 0x20000
ACPI_DATA_SIZE = 0x20000 + 0x8000  # pc/q35 machine types since 2.x
LOADER_TYPE_QEMU = 0xB0
CAN_USE_HEAP = 0x80
XLF_CAN_BE_LOADED_ABOVE_4G = 0x2
MAX_PREDICTED_RAM = 2 << 30  # below this q35 and pc put all RAM below 4 GiB
OVMF_INITRD_SUFFIX = " initrd=initrd"  # OvmfPkg X86QemuLoadImageLib
_VGA_MODES = {"normal": 0xFFFF, "ext": 0xFFFE, "ask": 0xFFFD}
REFERENCE_FORMAT = "testbed-firmware-reference"
REFERENCE_VERSION = 1


class PredictionError(EvidenceFormatError):
    """The boot cannot be predicted (unsupported kernel, config or reference)."""


# --- the kernel as QEMU hands it to the firmware -----------------------------------------


def _initrd_address(header: bytes, initrd_size: int, ram_bytes: int) -> int:
    protocol = struct.unpack_from("<H", header, 0x206)[0]
    xloadflags = struct.unpack_from("<H", header, 0x236)[0]
    if protocol >= 0x20C and xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G:
        initrd_max = 0xFFFFFFFF
    else:
        initrd_max = struct.unpack_from("<I", header, 0x22C)[0]
    below_4g = ram_bytes  # all RAM is below 4 GiB up to MAX_PREDICTED_RAM
    initrd_max = min(initrd_max, below_4g - ACPI_DATA_SIZE - 1)
    return (initrd_max - initrd_size) & ~4095


def _vga_mode(cmdline: str) -> int | None:
    at = cmdline.find("vga=")
    if at < 0:
        return None
    word = cmdline[at + 4 :].split(" ", 1)[0]
    if word in _VGA_MODES:
        return _VGA_MODES[word]
    try:
        return int(word, 0) & 0xFFFF
    except ValueError:
        return 0  # QEMU's strtol of garbage


def qemu_patched_kernel(kernel: bytes, *, initrd_size: int | None, cmdline: str,
                        ram_bytes: int) -> bytes:
    """The bzImage exactly as QEMU 7.2 exposes it through fw_cfg (setup header patched)."""
    if len(kernel) < 0x400 or kernel[0x202:0x206] != b"HdrS":
        raise PredictionError("the kernel is not a bzImage (no HdrS setup header)")
    protocol = struct.unpack_from("<H", kernel, 0x206)[0]
    if protocol < 0x202 or not kernel[0x211] & 0x01:
        raise PredictionError(f"boot protocol 0x{protocol:x} kernels are not supported")
    if ram_bytes > MAX_PREDICTED_RAM:
        raise PredictionError(f"guest RAM above {MAX_PREDICTED_RAM >> 20} MiB is not predicted")
    image = bytearray(kernel)
    struct.pack_into("<I", image, 0x228, CMDLINE_ADDR)
    vga = _vga_mode(cmdline)
    if vga is not None:
        struct.pack_into("<H", image, 0x1FA, vga)
    image[0x210] = LOADER_TYPE_QEMU
    image[0x211] |= CAN_USE_HEAP
    struct.pack_into("<H", image, 0x224, CMDLINE_ADDR - REAL_ADDR - 0x200)
    if initrd_size is not None:
        struct.pack_into("<I", image, 0x218, _initrd_address(kernel, initrd_size, ram_bytes))
        struct.pack_into("<I", image, 0x21C, initrd_size)
    return bytes(image)


def kernel_digest(kernel: bytes, *, initrd_size: int | None, cmdline: str, ram_bytes: int,
                  bank: str = "sha256") -> bytes:
    """The PCR 4 digest OVMF logs for this kernel in this VM."""
    patched = qemu_patched_kernel(kernel, initrd_size=initrd_size, cmdline=cmdline,
                                  ram_bytes=ram_bytes)
    return authenticode_digest(patched, bank)


def load_options(cmdline: str, *, has_initrd: bool = True) -> bytes:
    """The UEFI LoadOptions OVMF passes the kernel (UTF-16LE, NUL-terminated)."""
    text = cmdline + (OVMF_INITRD_SUFFIX if has_initrd else "")
    return (text + "\0").encode("utf-16-le")


# --- predicted events ---------------------------------------------------------------------


@dataclass(frozen=True)
class PredictedEvent:
    """One event the guest's boot will log, with what it stands for."""

    pcr: int
    event_type: int
    digest: bytes
    label: str
    role: str  # "kernel", "cmdline", "initrd" or "firmware"

    def expected(self) -> ExpectedEvent:
        return ExpectedEvent(self.pcr, self.event_type, self.digest, self.label)


def predict_events(kernel: Path, initrd: Path, cmdline: str, ram_bytes: int,
                   bank: str = "sha256") -> list[PredictedEvent]:
    """The guest-dependent events: the kernel in PCR 4, load options and initrd in PCR 9."""
    initrd_data = initrd.read_bytes()
    kdigest = kernel_digest(kernel.read_bytes(), initrd_size=len(initrd_data), cmdline=cmdline,
                            ram_bytes=ram_bytes, bank=bank)
    options = hashlib.new(bank, load_options(cmdline)).digest()
    return [
        PredictedEvent(KERNEL_PCR, EV_EFI_BOOT_SERVICES_APPLICATION, kdigest,
                       f"kernel {kernel.name} (Authenticode, as patched by QEMU)", "kernel"),
        PredictedEvent(STUB_PCR, EV_EVENT_TAG, options,
                       f"kernel command line: {_clip(cmdline)}", "cmdline"),
        PredictedEvent(STUB_PCR, EV_EVENT_TAG, hashlib.new(bank, initrd_data).digest(),
                       f"initrd {initrd.name}", "initrd"),
    ]


def _clip(text: str, limit: int = 120) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the firmware reference ---------------------------------------------------------------


@dataclass(frozen=True)
class FirmwareConfig:
    """What the firmware's own events depend on: the OVMF files and the VM's hardware."""

    ovmf_code_sha256: str
    ovmf_vars_sha256: str
    machine: str
    qemu_version: str
    devices: str  # a version tag of the device set domain.py defines
    memory_mib: int  # PCR 0's PEI firmware volume digest changes with the RAM size
    vcpus: int

    @classmethod
    def for_files(cls, code: Path, vars_template: Path, *, machine: str, devices: str,
                  memory_mib: int, vcpus: int,
                  qemu_binary: str = "qemu-system-x86_64") -> FirmwareConfig:
        return cls(_sha256_file(code), _sha256_file(vars_template), machine,
                   qemu_version(qemu_binary), devices, memory_mib, vcpus)

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise PredictionError(f"cannot run {binary} --version: {exc}") from None
    return out.splitlines()[0].strip() if out else "unknown"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FirmwareReference:
    """The firmware's events from a reference boot, with slots for the guest's events.

    ``events`` is every non-EV_NO_ACTION event of the reference log in log order
    as (pcr, type, digest hex, label, role); the guest-dependent ones keep their
    role (``kernel``, ``cmdline``, ``initrd``) and are replaced by predictions.
    """

    config: FirmwareConfig
    bank: str
    events: tuple[tuple[int, int, str, str, str], ...]
    captured_at: str

    @classmethod
    def from_log(cls, log: EventLog, config: FirmwareConfig,
                 predicted: Sequence[PredictedEvent], bank: str = "sha256") -> FirmwareReference:
        """Build from a reference boot of a known image; the predictions must match it.

        The check makes the capture a self-test of the prediction method: a
        QEMU, OVMF or kernel that measures differently fails here, loudly.
        """
        slots = _match_predictions(log, predicted, bank)
        events = []
        for event in log.events:
            if event.event_type == EV_NO_ACTION:
                continue
            role = slots.get(event.number, "firmware")
            events.append((event.pcr, event.event_type, event.digests[bank].hex(),
                           event.description, role))
        return cls(config, bank, tuple(events), time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()))

    def to_json(self) -> str:
        return json.dumps({
            "format": REFERENCE_FORMAT, "version": REFERENCE_VERSION, "key": self.config.key(),
            "config": asdict(self.config), "bank": self.bank, "captured_at": self.captured_at,
            "events": [{"pcr": p, "type": event_type_name(t), "digest": d, "label": lab,
                        "role": r} for p, t, d, lab, r in self.events],
        }, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> FirmwareReference:
        try:
            doc = json.loads(text)
            if doc["format"] != REFERENCE_FORMAT or doc["version"] != REFERENCE_VERSION:
                raise ValueError("unknown format or version")
            events = tuple(_reference_event(e) for e in doc["events"])
            return cls(FirmwareConfig(**doc["config"]), str(doc["bank"]), events,
                       str(doc["captured_at"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise PredictionError(f"firmware reference is not valid: {exc}") from None

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.config.key()}.json"
        atomic_write(path, self.to_json().encode(), mode=0o644)
        return path

    @classmethod
    def load(cls, directory: Path, config: FirmwareConfig) -> FirmwareReference | None:
        path = directory / f"{config.key()}.json"
        if not path.is_file():
            return None
        reference = cls.from_json(path.read_text())
        if reference.config != config:
            raise PredictionError(f"{path} was captured for another firmware configuration")
        return reference


def _reference_event(entry: dict[str, Any]) -> tuple[int, int, str, str, str]:
    event_type = event_type_value(str(entry["type"]))
    if event_type is None:
        raise ValueError(f"unknown event type {entry['type']!r}")
    bytes.fromhex(entry["digest"])
    return (int(entry["pcr"]), event_type, str(entry["digest"]), str(entry["label"]),
            str(entry["role"]))


def _match_predictions(log: EventLog, predicted: Sequence[PredictedEvent],
                       bank: str) -> dict[int, str]:
    """Event number -> role of each predicted event found in ``log``; raises if one is not."""
    slots: dict[int, str] = {}
    for want in predicted:
        found = [ev for ev in log.events_for(want.pcr)
                 if ev.event_type == want.event_type and ev.digests[bank] == want.digest]
        if len(found) != 1:
            candidates = [f"#{ev.number} {ev.type_name} {ev.digests[bank].hex()[:16]}"
                          for ev in log.events_for(want.pcr)]
            raise PredictionError(
                f"the reference boot did not log the predicted {want.role} event "
                f"(PCR {want.pcr} {event_type_name(want.event_type)} {want.digest.hex()[:16]}); "
                f"PCR {want.pcr} has {candidates}: the prediction method does not fit this "
                "QEMU/OVMF/kernel")
        slots[found[0].number] = want.role
    return slots


# --- the predicted policy -----------------------------------------------------------------


def _replay(events: Sequence[ExpectedEvent], bank: str) -> dict[int, bytes]:
    size = hashlib.new(bank).digest_size
    values = {pcr: bytes(size) for pcr in QUOTED_PCRS}
    for event in events:
        values[event.pcr] = hashlib.new(bank, values[event.pcr] + event.digest).digest()
    return values


def predict_policy(reference: FirmwareReference, predicted: Sequence[PredictedEvent], *,
                   name: str, description: str = "") -> ReferencePolicy:
    """The reference policy a node booting ``predicted`` on this firmware must satisfy.

    Expected events: the reference's firmware events with the guest slots filled
    by ``predicted``; expected PCR values: their replay (PCRs 0-9).
    """
    by_role = {p.role: p for p in predicted}
    events: list[ExpectedEvent] = []
    for pcr, event_type, digest, label, role in reference.events:
        if role == "firmware":
            events.append(ExpectedEvent(pcr, event_type, bytes.fromhex(digest), _clip(label)))
        elif role in by_role:
            events.append(by_role[role].expected())
        else:
            raise PredictionError(f"nothing predicted for the reference's {role} event")
    events.sort(key=lambda e: e.pcr)  # stable: log order within each PCR
    return ReferencePolicy(name=name, bank=reference.bank, pcrs=_replay(events, reference.bank),
                           events=tuple(events), description=description)
