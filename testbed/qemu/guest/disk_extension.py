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

**Guest-side mode** (docs/svd.md, "VMs: guest-side disks"): the host attaches a plain
qcow2 and never holds a key; the guest formats it with LUKS2 on first use and opens it
with ``cryptsetup`` (dm-crypt in the guest kernel) under ``/dev/mapper/svd-<disk>``, which
the ops above then use for that disk. The key comes from the CryptoVM guest over an
attested Trusted Passages channel (this guest's ``tp_extension``, cluster-CA identity;
the host splices the channel's TLS records to the CryptoVM's ``cvm_attested``): as its
account ``node.<name>`` the guest asks for the disk key's release with a fresh quote of
its own vTPM bound to a recipient key made for that request (:mod:`cryptovm.disks`, the
sim nodes' code). The passphrase goes to cryptsetup on its stdin (``--key-file=-``):
never in a file, on a command line, in a log or in an answer.

    stream {"op": "svd_unlock", "cryptovm": NODE, "node": NODE, "pcrs": [int],
            "disks": [{"name": SERIAL, "binding": binding doc | null}]}
        -> {"session": hex}; then the channel; its result (``tp_result``):
           {"role": "svd", "disks": [{"name", "device", "luks_uuid", "fetched",
            "formatted", "seconds", "binding" (public; first use only)}
                                     or {"name", "error"}]}
    {"op": "svd_lock", "disk": SERIAL}   -> {"locked": bool}   (cryptsetup close)
"""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestation.agent_wire import refuse_request
from attestation.encoding import b64decode, b64encode, require_int
from attestation.errors import EvidenceFormatError, TestbedError
from attestation.evidence import Evidence
from cryptovm.attested import StreamClient
from cryptovm.disks import (
    DiskBinding,
    DiskBindingError,
    disk_key_id,
    new_passphrase,
    release_disk_key,
)

__all__ = ["DiskOrder", "GuestDisks", "GuestSideDisks", "Luks", "LuksError", "UnlockOrder",
           "install", "parse_unlock"]

SYS_BLOCK = Path("/sys/block")
BLOCK = 4096
MAX_IO = 64 << 10
MAX_BENCH_MIB = 256
BENCH_BLOCK = 1 << 20
_SERIAL = re.compile(r"[a-z0-9][a-z0-9_-]{0,19}")
_DEVICE = re.compile(r"vd[a-z]{1,2}")
_NODE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
MAPPER = Path("/dev/mapper")
MAPPER_PREFIX = "svd-"
MAX_GUEST_DISKS = 4  # as a spec allows per node
CRYPTSETUP_TIMEOUT_S = 120.0  # TCG guests are slow
# LUKS2 with PBKDF2 at cryptsetup's minimum: the passphrase is 256 random bits, not a
# password (stretching buys nothing), and Argon2 would need memory a small guest lacks.
LUKS_FORMAT = ("luksFormat", "--batch-mode", "--type", "luks2", "--cipher",
               "aes-xts-plain64", "--key-size", "512", "--hash", "sha256", "--pbkdf",
               "pbkdf2", "--pbkdf-force-iterations", "1000")


class GuestDisks:
    """The virtio disks of this guest, by serial."""

    def __init__(self, sys_block: Path = SYS_BLOCK, dev: Path = Path("/dev")) -> None:
        self._sys, self._dev = sys_block, dev

    def raw(self) -> dict[str, tuple[Path, int]]:
        """The virtio disks by serial (a guest-side disk's: its ciphertext)."""
        found = {}
        for entry in sorted(self._sys.glob("vd*")):
            if not _DEVICE.fullmatch(entry.name):
                continue
            serial = _read(entry / "serial")
            size = _read(entry / "size")
            if _SERIAL.fullmatch(serial) and size.isdigit():
                found[serial] = (self._dev / entry.name, int(size) * 512)
        return found

    def mapped(self) -> dict[str, tuple[Path, int]]:
        """The guest-side disks this guest unlocked: ``/dev/mapper/svd-<serial>``."""
        found = {}
        for entry in sorted(self._sys.glob("dm-*")):
            name, size = _read(entry / "dm" / "name"), _read(entry / "size")
            serial = name.removeprefix(MAPPER_PREFIX)
            if name.startswith(MAPPER_PREFIX) and _SERIAL.fullmatch(serial) and size.isdigit():
                found[serial] = (self._dev / "mapper" / name, int(size) * 512)
        return found

    def _disks(self) -> dict[str, tuple[Path, int]]:
        # An unlocked guest-side disk is its plain mapper device, not its ciphertext.
        return {**self.raw(), **self.mapped()}

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


# --- guest-side mode: LUKS2 by cryptsetup, keyed by the CryptoVM --------------------------


class LuksError(TestbedError):
    """cryptsetup refused or failed (its own words, bounded; never a key)."""


Runner = Callable[..., "subprocess.CompletedProcess[bytes]"]


class Luks:
    """cryptsetup on one block device (or image file); a passphrase is only ever written
    to cryptsetup's stdin (``--key-file=-``)."""

    def __init__(self, device: Path, run: Runner = subprocess.run) -> None:
        self.device, self._run = device, run

    def _cryptsetup(self, args: Sequence[str], passphrase: bytes | None = None
                    ) -> subprocess.CompletedProcess[bytes]:
        command = ["cryptsetup", *args]
        if passphrase is not None:
            command.append("--key-file=-")
        try:
            return self._run(command, input=passphrase or b"", capture_output=True,
                             timeout=CRYPTSETUP_TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise LuksError("cryptsetup is not installed (cryptsetup-bin)") from None
        except subprocess.TimeoutExpired:
            raise LuksError(f"cryptsetup {args[0]} took over {CRYPTSETUP_TIMEOUT_S:.0f} s"
                            ) from None

    def _checked(self, args: Sequence[str], passphrase: bytes | None = None) -> str:
        done = self._cryptsetup(args, passphrase)
        if done.returncode == 2 and passphrase is not None:
            raise LuksError("the disk key does not open this LUKS volume")
        if done.returncode != 0:
            words = done.stderr.decode(errors="replace").strip().splitlines()
            raise LuksError(f"cryptsetup {args[0]} {self.device.name}: "
                            f"{(words[-1] if words else f'exit {done.returncode}')[:200]}")
        return done.stdout.decode(errors="replace").strip()[:200]

    def is_luks(self) -> bool:
        return self._cryptsetup(["isLuks", str(self.device)]).returncode == 0

    def uuid(self) -> str:
        """The LUKS header's UUID (no key needed): read before any key is asked for."""
        return self._checked(["luksUUID", str(self.device)])

    def format(self, passphrase: bytes) -> str:
        """A new LUKS2 volume over the whole device; its UUID."""
        self._checked([*LUKS_FORMAT, str(self.device)], passphrase)
        return self.uuid()

    def test(self, passphrase: bytes) -> None:
        """Whether ``passphrase`` opens a key slot (no mapping made)."""
        self._checked(["open", "--test-passphrase", str(self.device)], passphrase)

    def open(self, name: str, passphrase: bytes) -> Path:
        self._checked(["open", "--type", "luks2", str(self.device), name], passphrase)
        return MAPPER / name

    def close(self, name: str) -> None:
        self._checked(["close", name])


@dataclass(frozen=True)
class DiskOrder:
    """One disk to unlock: its name (serial) and its binding (None: format it)."""

    name: str
    binding: DiskBinding | None


@dataclass(frozen=True)
class UnlockOrder:
    """A validated ``svd_unlock`` request."""

    cryptovm: str
    node: str
    pcrs: tuple[int, ...]
    disks: tuple[DiskOrder, ...]


_UNLOCK_KEYS = {"op", "cryptovm", "node", "pcrs", "disks"}


def parse_unlock(request: dict[str, Any]) -> UnlockOrder:
    """The host's request, strictly: ValueError naming the field for anything else."""
    unknown = set(request) - _UNLOCK_KEYS
    if unknown:
        raise ValueError(f"svd_unlock: unknown keys {sorted(unknown)[:4]}")
    cryptovm, node = request.get("cryptovm"), request.get("node")
    for field_name, value in (("cryptovm", cryptovm), ("node", node)):
        if not isinstance(value, str) or not _NODE.fullmatch(value):
            raise ValueError(f"{field_name}: a node name")
    pcrs = request.get("pcrs")
    if not isinstance(pcrs, list) or not 0 < len(pcrs) <= 24 or len(set(pcrs)) != len(pcrs) \
            or not all(type(p) is int and 0 <= p < 24 for p in pcrs):
        raise ValueError("pcrs: a list of distinct PCR indices 0-23")
    disks = request.get("disks")
    if not isinstance(disks, list) or len(disks) > MAX_GUEST_DISKS:
        raise ValueError(f"disks: a list of at most {MAX_GUEST_DISKS}")
    orders = tuple(_disk_order(d, i, str(node)) for i, d in enumerate(disks))
    if len({o.name for o in orders}) != len(orders):
        raise ValueError("disks: a disk named twice")
    return UnlockOrder(str(cryptovm), str(node), tuple(sorted(pcrs)), orders)


def _disk_order(doc: object, index: int, node: str) -> DiskOrder:
    where = f"disks[{index}]"
    if not isinstance(doc, dict) or set(doc) != {"name", "binding"}:
        raise ValueError(f"{where}: {{name, binding}}")
    name, binding_doc = doc["name"], doc["binding"]
    if not isinstance(name, str) or not _SERIAL.fullmatch(name):
        raise ValueError(f"{where}.name: a disk name")
    if binding_doc is None:
        return DiskOrder(name, None)
    try:
        binding = DiskBinding.from_doc(binding_doc, f"{where}.binding")
    except (DiskBindingError, TypeError) as exc:
        raise ValueError(str(exc)) from None
    if (binding.node, binding.disk, binding.mode) != (node, name, "guest"):
        raise ValueError(f"{where}.binding: binds {binding.mode} disk {binding.disk!r} of "
                         f"{binding.node!r}, not guest disk {name!r} of {node!r}")
    return DiskOrder(name, binding)


Quote = Callable[[dict[str, Any]], dict[str, Any]]


class GuestSideDisks:
    """``svd_unlock`` and ``svd_lock`` (the module docstring)."""

    def __init__(self, agent: Any, disks: GuestDisks, luks: Callable[[Path], Luks] = Luks,
                 mapper: Path = MAPPER) -> None:
        self._agent, self._disks, self._luks, self._mapper = agent, disks, luks, mapper

    def unlock(self, request: dict[str, Any], conn: Any, send_frame: Callable[..., None]
               ) -> None:
        tp = getattr(self._agent, "trusted_passages", None)
        try:
            order = parse_unlock(request)
            if tp is None:
                raise ValueError("svd_unlock needs the Trusted Passages extension")
        except ValueError as exc:
            refuse_request(conn, str(exc), send_frame)
            return
        tp.client_channel(conn, order.cryptovm, lambda channel: self.unlock_with(
            StreamClient(channel.recv, channel.send).call, order))

    def unlock_with(self, call: Callable[..., dict[str, Any]], order: UnlockOrder
                    ) -> dict[str, Any]:
        """Unlock each disk with CVM1 ``call``s over the attested channel. Each disk
        answers on its own: a refusal of one must not lose another's new binding."""
        answers = []
        for disk in order.disks:
            try:
                answers.append(self._unlock(call, order, disk))
            except Exception as exc:  # its refusal, in words (never a key): the host reports
                answers.append({"name": disk.name, "error": f"{type(exc).__name__}: {exc}"})
        return {"role": "svd", "cryptovm": order.cryptovm, "disks": answers}

    def _unlock(self, call: Callable[..., dict[str, Any]], order: UnlockOrder,
                disk: DiskOrder) -> dict[str, Any]:
        started = time.perf_counter()
        name = MAPPER_PREFIX + disk.name
        raw = self._disks.raw().get(disk.name)
        if raw is None:
            raise DiskBindingError(f"no disk {disk.name!r} attached to this guest")
        luks = self._luks(raw[0])
        if (self._mapper / name).exists():  # `up` again: it is open
            return {"name": disk.name, "device": str(self._mapper / name), "fetched": False,
                    "formatted": False, "luks_uuid": luks.uuid(), "seconds": 0.0}
        binding, passphrase = self._key(call, order, disk, luks, raw[1])
        device = luks.open(name, passphrase)
        answer = {"name": disk.name, "device": str(device), "fetched": True,
                  "formatted": disk.binding is None, "luks_uuid": binding.luks_uuid,
                  "seconds": round(time.perf_counter() - started, 3)}
        if disk.binding is None:
            answer["binding"] = binding.to_doc()  # public: the passphrase is wrapped
        return answer

    def _key(self, call: Callable[..., dict[str, Any]], order: UnlockOrder, disk: DiskOrder,
             luks: Luks, size: int) -> tuple[DiskBinding, bytes]:
        key_id = disk_key_id(order.node, disk.name)
        if disk.binding is None:  # first use: this guest formats, and forgets the passphrase
            if luks.is_luks():
                raise DiskBindingError(f"disk {disk.name!r} already holds a LUKS volume but "
                                       "no binding was given: its key is unknown")
            fresh = new_passphrase(bytes(call("public_key", key_id=key_id)["public_key"]))
            uuid = luks.format(fresh.passphrase)
            return DiskBinding(order.node, disk.name, key_id, order.cryptovm, size, "guest",
                               uuid, fresh.wrapped_key), fresh.passphrase
        found = luks.uuid()  # before any key is asked for
        if found != disk.binding.luks_uuid:
            raise DiskBindingError(f"disk {disk.name!r} is not the bound volume: its LUKS "
                                   f"UUID {found} is not {disk.binding.luks_uuid} (a disk "
                                   "swapped in?)")

        def quote(data: bytes) -> Evidence:
            return Evidence.from_dict(self._agent.quote({"nonce": data.hex(),
                                                         "pcrs": list(order.pcrs)}))
        return disk.binding, release_disk_key(call, disk.binding, quote)

    def lock(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("disk")
        if not isinstance(name, str) or not _SERIAL.fullmatch(name):
            raise ValueError("disk: the disk's name")
        raw = self._disks.raw().get(name)
        if raw is None or not (self._mapper / (MAPPER_PREFIX + name)).exists():
            return {"locked": False}
        self._luks(raw[0]).close(MAPPER_PREFIX + name)
        return {"locked": True}


def install(agent: Any, send_frame: Callable[..., None]) -> GuestDisks:
    """Add the disk ops to the guest agent."""
    disks = GuestDisks()
    guest_side = GuestSideDisks(agent, disks)
    agent.handlers.update({"disk_list": disks.list, "disk_write": disks.write,
                           "disk_read": disks.read, "disk_bench": disks.bench,
                           "svd_lock": guest_side.lock})
    agent.stream_handlers["svd_unlock"] = \
        lambda request, conn: guest_side.unlock(request, conn, send_frame)
    return disks
