"""Disks inside a guest: the guest agent's ``disks`` role extension (docs/svd.md, "VMs").

Runs in the guest with Debian 12's python3 and the standard library only. A disk the
host attached (host-side mode: QEMU decrypts, the guest sees a plain virtio disk) is
found by the serial the host gave it, which is the disk's name in the cluster spec
(``/sys/block/vdX/serial``). The ops read and write the raw block device with
``O_DIRECT`` (page-aligned buffers from an anonymous mmap), so what they report is what
went through QEMU, not the guest's page cache.

Ops added to the agent::

    {"op": "disk_list"}   -> {"disks": [{"serial", "device", "size"}]}
    {"op": "disk_write", "disk": SERIAL, "offset": N, "data": b64}   -> {"written": N}
    {"op": "disk_read", "disk": SERIAL, "offset": N, "length": N}    -> {"data": b64}
    {"op": "disk_bench", "disk": SERIAL, "mib": N}
        -> {"write_mib_s", "read_mib_s", "mib", "block": 1 MiB}   (sequential, O_DIRECT)

Offsets and lengths are whole 4 KiB blocks (O_DIRECT wants aligned I/O); at most
64 KiB per read or write, at most 256 MiB per benchmark.
"""

from __future__ import annotations

import mmap
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attestation.encoding import b64decode, b64encode, require_int
from attestation.errors import EvidenceFormatError

__all__ = ["GuestDisks", "install"]

SYS_BLOCK = Path("/sys/block")
BLOCK = 4096
MAX_IO = 64 << 10
MAX_BENCH_MIB = 256
BENCH_BLOCK = 1 << 20
_SERIAL = re.compile(r"[a-z0-9][a-z0-9_-]{0,19}")
_DEVICE = re.compile(r"vd[a-z]{1,2}")


class GuestDisks:
    """The virtio disks of this guest, by serial."""

    def __init__(self, sys_block: Path = SYS_BLOCK, dev: Path = Path("/dev")) -> None:
        self._sys, self._dev = sys_block, dev

    def _disks(self) -> dict[str, tuple[Path, int]]:
        found = {}
        for entry in sorted(self._sys.glob("vd*")):
            if not _DEVICE.fullmatch(entry.name):
                continue
            serial = _read(entry / "serial")
            size = _read(entry / "size")
            if _SERIAL.fullmatch(serial) and size.isdigit():
                found[serial] = (self._dev / entry.name, int(size) * 512)
        return found

    def _device(self, request: dict[str, Any]) -> tuple[Path, int]:
        name = request.get("disk")
        if not isinstance(name, str) or not _SERIAL.fullmatch(name):
            raise ValueError("disk: the disk's name (its serial), e.g. data")
        disks = self._disks()
        if name not in disks:
            raise ValueError(f"no disk {name!r} in this guest (found: "
                             f"{', '.join(disks) or 'none'}); the host attaches a "
                             "host-side disk only after the VM attested")
        return disks[name]

    def list(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {"disks": [{"serial": s, "device": str(d), "size": n}
                          for s, (d, n) in self._disks().items()]}

    def write(self, request: dict[str, Any]) -> dict[str, Any]:
        device, size = self._device(request)
        offset = _block_int(request.get("offset"), "offset", size)
        data = b64decode(request.get("data"), "data", limit=MAX_IO)
        length = -(-len(data) // BLOCK) * BLOCK
        if not data or offset + length > size:
            raise ValueError(f"data: 1-{MAX_IO} bytes inside the disk ({size} bytes)")
        with _aligned_buffer(length) as buffer:
            buffer[: len(data)] = data
            fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
            try:
                written = os.pwritev(fd, [buffer], offset)
            finally:
                os.close(fd)
        return {"written": written}

    def read(self, request: dict[str, Any]) -> dict[str, Any]:
        device, size = self._device(request)
        offset = _block_int(request.get("offset"), "offset", size)
        length = _block_int(request.get("length"), "length", MAX_IO)
        if length == 0 or offset + length > size:
            raise ValueError(f"length: 4 KiB blocks, at most {MAX_IO}, inside the disk")
        with _aligned_buffer(length) as buffer:
            fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
            try:
                got = os.preadv(fd, [buffer], offset)
            finally:
                os.close(fd)
            return {"data": b64encode(bytes(buffer[:got]))}

    def bench(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sequential write, then read, of ``mib`` MiB in 1 MiB blocks, O_DIRECT (dd's
        ``oflag=direct``/``iflag=direct``); the disk's content is overwritten."""
        device, size = self._device(request)
        mib = require_int(request.get("mib"), "mib", EvidenceFormatError, minimum=1,
                          maximum=min(MAX_BENCH_MIB, size // BENCH_BLOCK))
        with _aligned_buffer(BENCH_BLOCK) as buffer:
            buffer[:] = os.urandom(BENCH_BLOCK)  # incompressible, as on a real disk
            write_s = _timed(device, os.O_WRONLY, mib, lambda fd, at: os.pwritev(fd, [buffer], at))
            read_s = _timed(device, os.O_RDONLY, mib, lambda fd, at: os.preadv(fd, [buffer], at))
        return {"mib": mib, "block": BENCH_BLOCK, "write_mib_s": round(mib / write_s, 1),
                "read_mib_s": round(mib / read_s, 1)}


def _timed(device: Path, flags: int, mib: int, io: Callable[[int, int], int]) -> float:
    fd = os.open(device, flags | os.O_DIRECT)
    try:
        start = time.perf_counter()
        for i in range(mib):
            if io(fd, i * BENCH_BLOCK) != BENCH_BLOCK:
                raise OSError(f"short I/O on {device} at MiB {i}")
        if flags & os.O_WRONLY:
            os.fsync(fd)
        return max(time.perf_counter() - start, 1e-6)
    finally:
        os.close(fd)


def _aligned_buffer(length: int) -> mmap.mmap:
    """A page-aligned buffer (O_DIRECT needs one): an anonymous mmap."""
    return mmap.mmap(-1, length)


def _block_int(value: object, name: str, limit: int) -> int:
    number = require_int(value, name, EvidenceFormatError, minimum=0, maximum=limit)
    if number % BLOCK:
        raise ValueError(f"{name}: a multiple of {BLOCK} (O_DIRECT)")
    return number


def _read(path: Path) -> str:
    try:
        with open(path) as f:
            return f.read(64).strip()
    except OSError:
        return ""


def install(agent: Any, _send_frame: Callable[..., None]) -> GuestDisks:
    """Add the disk ops to the guest agent."""
    disks = GuestDisks()
    agent.handlers.update({"disk_list": disks.list, "disk_write": disks.write,
                           "disk_read": disks.read, "disk_bench": disks.bench})
    return disks
