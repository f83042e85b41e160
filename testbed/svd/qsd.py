"""qemu-storage-daemon, driven over its private QMP socket: the real LUKS implementation.

QEMU's ``luks`` block driver writes and reads LUKS1 (cryptsetup-compatible) volumes.
One daemon serves one disk: it is started detached (``--daemonize``, pid file in a
private run directory), so that it outlives the command that started it and is stopped
by its PID. Its command line names sockets and pid files only; the passphrase reaches
it as a QMP ``object-add`` secret (base64 in memory, over the 0600 unix socket) and is
deleted (``object-del``) as soon as the volume is open: it is never on a command line
(other users read ``/proc/*/cmdline``) nor in a file.

The plain view is a FUSE export (``block-export-add`` type ``fuse``) over a regular
file: reads and writes of that file are decrypted/encrypted by the daemon.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestation.errors import EvidenceFormatError, TestbedError
from attestation.files import private_dir
from cryptovm.disks import luks_uuid
from testbed.core.errors import StateError
from testbed.core.processes import process_argv, read_pid, terminate

__all__ = ["DiskFormatError", "DiskKeyError", "QmpError", "StorageDaemon", "qsd_binary"]

BINARY = "qemu-storage-daemon"
MAX_QMP_LINE = 1 << 20  # a QMP answer we accept; job and error answers are a few kB
QMP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
SECRET_ID = "svd-key"  # noqa: S105 - the QOM id of the secret object, not a secret
MAX_SOCKET_PATH = 100


class QmpError(StateError):
    """The daemon is unreachable or refused a command (exit 4: the environment)."""


class DiskFormatError(EvidenceFormatError):
    """The image is not a usable LUKS volume: corrupt header, truncated, not LUKS."""


class DiskKeyError(EvidenceFormatError):
    """The key does not open the volume (no key slot accepts it)."""


def qsd_binary() -> str:
    found = shutil.which(BINARY)
    if found is None:
        raise StateError(f"{BINARY} is not installed: install qemu-system-x86 "
                         "(`sh .ci/bootstrap` does)")
    return found


def _classify(command: str, error: dict[str, Any]) -> TestbedError:
    """One project error for a QMP error answer: key, format, or environment."""
    desc = str(error.get("desc", error))[:300]
    lowered = desc.lower()
    if "invalid password" in lowered or "cannot unlock" in lowered:
        return DiskKeyError(f"the disk key does not open this LUKS volume ({desc})")
    if any(word in lowered for word in ("luks", "header", "payload", "key slot", "keyslot",
                                        "image", "magic", "cipher", "end of file")):
        return DiskFormatError(f"not a usable LUKS volume: {desc}")
    return QmpError(f"qemu-storage-daemon refused {command}: {desc}")


class _Qmp:
    """One QMP connection: line-delimited JSON, answers bounded, events kept aside."""

    def __init__(self, path: Path, timeout: float = QMP_TIMEOUT_S) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        try:
            self._sock.connect(str(path))
            self._message()  # the greeting
            self.execute("qmp_capabilities")
        except OSError as exc:
            self.close()
            raise QmpError(f"cannot reach qemu-storage-daemon at {path}: {exc}") from None

    def close(self) -> None:
        self._sock.close()

    def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_QMP_LINE:
                raise QmpError("qemu-storage-daemon sent an oversized QMP message")
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise QmpError(f"qemu-storage-daemon did not answer: {exc}") from None
            if not chunk:
                raise QmpError("qemu-storage-daemon closed its QMP socket")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _message(self) -> dict[str, Any]:
        try:
            doc = json.loads(self._line())
        except ValueError:
            raise QmpError("qemu-storage-daemon sent malformed QMP") from None
        if not isinstance(doc, dict):
            raise QmpError("qemu-storage-daemon sent malformed QMP")
        return doc

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"qemu-storage-daemon is gone: {exc}") from None
        while True:
            answer = self._message()
            if "event" in answer:
                self.events.append(answer)
                continue
            if "error" in answer:
                raise _classify(command, answer["error"])
            return answer.get("return")

    def wait_job(self, job_id: str, timeout: float = QMP_TIMEOUT_S) -> None:
        """Until ``job_id`` concluded; its error (if any) raised; the job dismissed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = {j["id"]: j for j in self.execute("query-jobs")}
            job = jobs.get(job_id)
            if job is None:
                raise QmpError(f"job {job_id} vanished")
            if job["status"] == "concluded":
                self.execute("job-dismiss", id=job_id)
                if "error" in job:
                    raise _classify("blockdev-create", {"desc": job["error"]})
                return
            time.sleep(0.02)
        raise QmpError(f"job {job_id} did not finish within {timeout:.0f} s")


@dataclass(frozen=True)
class StorageDaemon:
    """A running qemu-storage-daemon for one disk, found by its pid file."""

    run_dir: Path  # private (0700): QMP socket, pid file, log
    name: str

    @property
    def socket(self) -> Path:
        """In the run directory, or (a unix socket path is limited to 107 bytes) in a
        private directory named after it, so that a later command finds it again."""
        path = self.run_dir / f"{self.name}.qmp"
        if len(str(path)) <= MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"testbed-svd-{digest}" / "qmp"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def pid(self) -> int | None:
        with contextlib.suppress(StateError):
            pid = read_pid(self.pid_file)
            if pid is not None and self._ours(pid):
                return pid
        return None

    def _ours(self, pid: int) -> bool:
        argv = process_argv(pid) or []
        return bool(argv) and Path(argv[0]).name == BINARY and str(self.socket) in " ".join(argv)

    def start(self) -> StorageDaemon:
        """Start detached; returns once QMP listens (``--daemonize`` waits for it)."""
        private_dir(self.run_dir)
        private_dir(self.socket.parent)
        if self.pid is not None:
            raise StateError(f"a qemu-storage-daemon for {self.name} already runs "
                             f"(pid {self.pid}); stop it first")
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        argv = [qsd_binary(), "--chardev",
                f"socket,id=qmp,path={self.socket},server=on,wait=off",
                "--monitor", "chardev=qmp", "--pidfile", str(self.pid_file), "--daemonize"]
        try:  # umask 077 through sh: preexec_fn is unsafe in a threaded process
            subprocess.run(["sh", "-c", 'umask 077; exec "$@"', BINARY, *argv],
                           capture_output=True, text=True, timeout=QMP_TIMEOUT_S,
                           check=True, start_new_session=True)
        except subprocess.CalledProcessError as exc:
            raise QmpError(f"qemu-storage-daemon did not start: "
                           f"{(exc.stderr or '').strip()[-300:]}") from None
        except (subprocess.SubprocessError, OSError) as exc:
            raise QmpError(f"qemu-storage-daemon did not start: {exc}") from None
        return self

    def qmp(self) -> _Qmp:
        return _Qmp(self.socket)

    def stop(self) -> bool:
        """Stop by PID (TERM, then KILL); the FUSE export and every secret die with it.
        Whether a daemon was running."""
        pid = self.pid
        stopped = False
        if pid is not None:
            terminate(pid, lambda: self._ours(pid), STOP_TIMEOUT_S)
            stopped = True
        for leftover in (self.socket, self.pid_file):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        if self.socket.parent != self.run_dir:
            with contextlib.suppress(OSError):
                self.socket.parent.rmdir()
        return stopped

    # --- the volume -----------------------------------------------------------------------

    def create_luks(self, image: Path, size: int, key: bytes) -> None:
        """Format ``image`` (created, ``size`` bytes of payload) as a LUKS1 volume."""
        self._create(image, key, {"driver": "luks", "size": size, "key-secret": SECRET_ID,
                                  "iter-time": 10})

    def create_qcow2_luks(self, image: Path, size: int, key: bytes) -> None:
        """Format ``image`` (created) as a qcow2 of ``size`` bytes with QEMU's built-in
        LUKS encryption (``encrypt.format=luks``): what a VM's host-side disk is
        (docs/svd.md, "VMs"); QEMU itself opens it with the key libvirt hands over."""
        self._create(image, key, {"driver": "qcow2", "size": size,
                                  "encrypt": {"format": "luks", "key-secret": SECRET_ID,
                                              "iter-time": 10}})

    def _create(self, image: Path, key: bytes, options: dict[str, Any]) -> None:
        """Create ``image`` (never an existing file, never through a link) and have QEMU
        format it with ``options`` (blockdev-create), the key in a secret object that
        is deleted again before this returns."""
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        qmp = self.qmp()
        try:
            qmp.execute("blockdev-add", driver="file", filename=str(image),
                        **{"node-name": "svd-create-file"})
            _add_secret(qmp, key)
            _format(qmp, {**options, "file": "svd-create-file"})
            qmp.execute("object-del", id=SECRET_ID)
            qmp.execute("blockdev-del", **{"node-name": "svd-create-file"})
        finally:
            qmp.close()

    def open_luks(self, image: Path, key: bytes, node_name: str = "svd") -> None:
        """Open the volume with ``key``; the secret object is deleted at once."""
        luks_uuid(image)  # a truncated or non-LUKS image: one clear error, not a key error
        qmp = self.qmp()
        try:
            _add_secret(qmp, key)
            try:
                qmp.execute("blockdev-add", driver="luks", **{
                    "node-name": node_name, "key-secret": SECRET_ID,
                    "file": {"driver": "file", "filename": str(image)}})
            finally:
                qmp.execute("object-del", id=SECRET_ID)
        finally:
            qmp.close()

    def open_plain(self, image: Path, node_name: str = "svd") -> None:
        """A raw image (the baseline of the benchmark and the attack lab)."""
        qmp = self.qmp()
        try:
            qmp.execute("blockdev-add", driver="raw", **{
                "node-name": node_name, "file": {"driver": "file", "filename": str(image)}})
        finally:
            qmp.close()

    def export_fuse(self, mountpoint: Path, node_name: str = "svd") -> None:
        """The plain view: ``mountpoint`` (a regular file, created 0600) becomes the
        decrypted volume, for its owner only (``allow-other`` off)."""
        fd = os.open(mountpoint, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        qmp = self.qmp()
        try:
            qmp.execute("block-export-add", type="fuse", id="svd-export",
                        **{"node-name": node_name, "mountpoint": str(mountpoint),
                           "writable": True, "allow-other": "off"})
        finally:
            qmp.close()


def _add_secret(qmp: _Qmp, key: bytes) -> None:
    qmp.execute("object-add", **{"qom-type": "secret", "id": SECRET_ID,
                                 "data": base64.b64encode(key).decode(), "format": "base64"})


FORMAT_ATTEMPTS = 3
_COARSE_CLOCK = "accurate CPU usage"


def _format(qmp: _Qmp, options: dict[str, Any]) -> None:
    """``blockdev-create`` with ``options``; again when QEMU's PBKDF2 benchmark read no
    CPU time at all ("Unable to get accurate CPU usage": a per-thread CPU clock coarser
    than the benchmark's first round, seen on loaded machines)."""
    for attempt in range(1, FORMAT_ATTEMPTS + 1):
        qmp.execute("blockdev-create", **{"job-id": "svd-format", "options": options})
        try:
            qmp.wait_job("svd-format")
            return
        except QmpError as exc:
            if _COARSE_CLOCK not in str(exc) or attempt == FORMAT_ATTEMPTS:
                raise
