"""Prediction of OVMF's measured boot for a QEMU direct kernel boot (no VM needed).

The synthetic logs here follow the event sequence read from real boots of Debian
12's OVMF with Debian 12's kernel (see docs/qemu.md); the VM tests check the
same code against the real thing.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from attestation.eventlog import EventLog, EventLogBuilder, replay
from attestation.policy import EventMismatch, dump_policy, evaluate_policy, load_policy
from testbed.qemu.predict.authenticode import authenticode_digest
from testbed.qemu.predict.events import (
    ACPI_DATA_SIZE,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EVENT_TAG,
    FirmwareConfig,
    FirmwareReference,
    PredictionError,
    kernel_digest,
    load_options,
    predict_events,
    predict_policy,
    qemu_patched_kernel,
)
from tests.test_qemu_authenticode import make_pe

RAM = 512 << 20
CMDLINE = "console=ttyS0 panic=-1 quiet"
CONFIG = FirmwareConfig("aa" * 32, "bb" * 32, "q35", "QEMU emulator version 7.2", "v1", 512, 1)


def make_bzimage(payload: bytes = b"kernel code" * 100, protocol: int = 0x020F) -> bytes:
    image = bytearray(make_pe([payload], headers_size=0x400))
    image[0x1F1] = 1  # setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, protocol)
    image[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", image, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<H", image, 0x236, 0x7F)  # xloadflags
    return bytes(image)


@pytest.fixture
def artifacts(tmp_path: Path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(make_bzimage())
    initrd.write_bytes(b"initramfs" * 1000)
    return kernel, initrd


def test_qemu_patches_the_setup_header_like_x86_load_linux() -> None:
    kernel = make_bzimage()
    patched = qemu_patched_kernel(kernel, initrd_size=9000, cmdline=CMDLINE, ram_bytes=RAM)
    assert patched[0x210] == 0xB0  # type_of_loader: QEMU
    assert patched[0x211] == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<H", patched, 0x224)[0] == 0xFE00  # heap_end_ptr
    assert struct.unpack_from("<I", patched, 0x228)[0] == 0x20000  # cmd_line_ptr
    initrd_max = RAM - ACPI_DATA_SIZE - 1
    assert struct.unpack_from("<I", patched, 0x218)[0] == (initrd_max - 9000) & ~4095
    assert struct.unpack_from("<I", patched, 0x21C)[0] == 9000
    changed = [i for i, (a, b) in enumerate(zip(kernel, patched, strict=True)) if a != b]
    assert all(0x210 <= i < 0x22C for i in changed)
    assert kernel_digest(kernel, initrd_size=9000, cmdline=CMDLINE, ram_bytes=RAM) == \
        authenticode_digest(patched)


def test_kernel_digest_depends_on_initrd_size_ram_and_vga() -> None:
    kernel = make_bzimage()
    base = kernel_digest(kernel, initrd_size=9000, cmdline=CMDLINE, ram_bytes=RAM)
    assert kernel_digest(kernel, initrd_size=9001, cmdline=CMDLINE, ram_bytes=RAM) != base
    assert kernel_digest(kernel, initrd_size=9000, cmdline=CMDLINE, ram_bytes=RAM * 2) != base
    assert kernel_digest(kernel, initrd_size=9000, cmdline=CMDLINE + " extra",
                         ram_bytes=RAM) == base
    vga = qemu_patched_kernel(kernel, initrd_size=None, cmdline="vga=ext", ram_bytes=RAM)
    assert struct.unpack_from("<H", vga, 0x1FA)[0] == 0xFFFE


@pytest.mark.parametrize(("kernel", "ram", "message"), [
    (b"MZ" + bytes(5000), RAM, "not a bzImage"),
    (make_bzimage(protocol=0x0201), RAM, "boot protocol"),
    (make_bzimage(), 4 << 30, "RAM above"),
])
def test_unpredictable_boots_are_refused(kernel: bytes, ram: int, message: str) -> None:
    with pytest.raises(PredictionError, match=message):
        qemu_patched_kernel(kernel, initrd_size=1, cmdline="", ram_bytes=ram)


def test_load_options_are_ovmfs_utf16_command_line() -> None:
    assert load_options("a b") == "a b initrd=initrd\0".encode("utf-16-le")
    assert load_options("a", has_initrd=False) == "a\0".encode("utf-16-le")


def _tagged(tag: int, text: bytes) -> bytes:
    return struct.pack("<II", tag, len(text)) + text


def ovmf_like_log(kernel: Path, initrd: Path, cmdline: str) -> EventLog:
    """The event sequence of a real OVMF direct kernel boot (firmware digests made up)."""
    log = EventLogBuilder(startup_locality=None)
    log.add(0, 0x8, b"\0\0")
    log.add(0, 0x80000008, struct.pack("<QQ", 0x820000, 0xE0000), b"PEIFV")
    log.add(0, 0x80000008, struct.pack("<QQ", 0x900000, 0xC00000), b"DXEFV")
    for name in ("SecureBoot", "PK", "KEK", "db", "dbx"):
        log.add(7, 0x80000001, name.encode(), b"")
    log.add(7, 0x4, b"\0" * 4)
    predicted = {p.role: p for p in predict_events(kernel, initrd, cmdline, RAM)}
    log.add_digests(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"image load event",
                    {"sha256": predicted["kernel"].digest})
    log.add(1, 0x80000002, b"BootOrder", b"\0\0")
    log.add(1, 0x80000002, b"Boot0000", b"UiApp")
    log.add(4, 0x80000007, b"Calling EFI Application from Boot Option")
    for pcr in range(7):
        log.add(pcr, 0x4, b"\0" * 4)
    log.add(9, EV_EVENT_TAG, _tagged(0x8F3B22ED, b"LOADED_IMAGE::LoadOptions\0"),
            load_options(cmdline))
    log.add(9, EV_EVENT_TAG, _tagged(0x8F3B22EC, b"Linux initrd\0"), initrd.read_bytes())
    log.add(5, 0x80000007, b"Exit Boot Services Invocation")
    log.add(5, 0x80000007, b"Exit Boot Services Returned with Success")
    return log.build()


def _pcrs(log: EventLog) -> dict[int, bytes]:
    values = replay(log)
    return {pcr: values.get(pcr, bytes(32)) for pcr in range(10)}


def _reference(artifacts: tuple[Path, Path]) -> FirmwareReference:
    kernel, initrd = artifacts
    log = ovmf_like_log(kernel, initrd, CMDLINE)
    return FirmwareReference.from_log(log, CONFIG, predict_events(kernel, initrd, CMDLINE, RAM))


def test_predicted_policy_accepts_the_boot_it_predicts(artifacts: tuple[Path, Path]) -> None:
    kernel, initrd = artifacts
    reference = _reference(artifacts)
    assert [r for *_, r in reference.events].count("firmware") == 21
    policy = predict_policy(reference, predict_events(kernel, initrd, CMDLINE, RAM), name="p")
    log = ovmf_like_log(kernel, initrd, CMDLINE)
    assert evaluate_policy(policy, _pcrs(log), log) == []
    assert load_policy(dump_policy(policy)) == policy


def _first_event_mismatch(policy_cmdline: str, artifacts: tuple[Path, Path],
                          log: EventLog) -> EventMismatch:
    kernel, initrd = artifacts
    policy = predict_policy(_reference(artifacts),
                            predict_events(kernel, initrd, policy_cmdline, RAM), name="p")
    mismatches = [m for m in evaluate_policy(policy, _pcrs(log), log)
                  if isinstance(m, EventMismatch)]
    assert mismatches
    return mismatches[0]


def test_other_command_line_names_the_load_options_event(artifacts: tuple[Path, Path]) -> None:
    kernel, initrd = artifacts
    log = ovmf_like_log(kernel, initrd, CMDLINE + " init=/bin/sh")
    mismatch = _first_event_mismatch(CMDLINE, artifacts, log)
    assert (mismatch.pcr, mismatch.position) == (9, 1)
    assert "kernel command line" in mismatch.describe()


def test_other_initrd_names_the_initrd_event(artifacts: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    kernel, initrd = artifacts
    evil = tmp_path / "evil.img"
    evil.write_bytes(initrd.read_bytes()[:-1] + b"X")  # same size: the kernel digest holds
    log = ovmf_like_log(kernel, evil, CMDLINE)
    mismatch = _first_event_mismatch(CMDLINE, artifacts, log)
    assert (mismatch.pcr, mismatch.position) == (9, 2)
    assert "initrd" in mismatch.describe()


def test_other_kernel_names_the_kernel_event(artifacts: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    _, initrd = artifacts
    evil = tmp_path / "evil-vmlinuz"
    evil.write_bytes(make_bzimage(b"evil code" * 100))
    log = ovmf_like_log(evil, initrd, CMDLINE)
    mismatch = _first_event_mismatch(CMDLINE, artifacts, log)
    assert mismatch.pcr == 4 and "kernel" in mismatch.describe()


def test_reference_capture_checks_the_prediction(artifacts: tuple[Path, Path]) -> None:
    kernel, initrd = artifacts
    log = ovmf_like_log(kernel, initrd, "something else")
    with pytest.raises(PredictionError, match="did not log the predicted cmdline"):
        FirmwareReference.from_log(log, CONFIG, predict_events(kernel, initrd, CMDLINE, RAM))


def test_reference_round_trips_and_is_keyed_by_config(artifacts: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    reference = _reference(artifacts)
    assert FirmwareReference.from_json(reference.to_json()) == reference
    path = reference.save(tmp_path)
    assert path.name == f"{CONFIG.key()}.json"
    assert FirmwareReference.load(tmp_path, CONFIG) == reference
    other = FirmwareConfig(**{**CONFIG.__dict__, "memory_mib": 1024})
    assert other.key() != CONFIG.key()
    assert FirmwareReference.load(tmp_path, other) is None
    path.write_text(path.read_text().replace("EV_SEPARATOR", "EV_NOT_A_TYPE"))
    with pytest.raises(PredictionError, match="not valid"):
        FirmwareReference.load(tmp_path, CONFIG)


def test_initrd_event_is_plain_sha256(artifacts: tuple[Path, Path]) -> None:
    kernel, initrd = artifacts
    events = {p.role: p for p in predict_events(kernel, initrd, CMDLINE, RAM)}
    assert events["initrd"].digest == hashlib.sha256(initrd.read_bytes()).digest()
    assert events["cmdline"].digest == hashlib.sha256(load_options(CMDLINE)).digest()
