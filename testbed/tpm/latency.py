"""A TPM latency model: a unix-socket proxy in front of swtpm that delays commands.

swtpm answers a quote in about a millisecond; discrete TPMs take 17-190 ms for an
ECDSA quote (wolfTPM's measurements) and Chrome's field data puts TPM operations at
p50 200 ms, p95 600 ms. :class:`TpmLatencyProxy` listens on its own unix data socket
(and ``.ctrl`` control socket, relayed untouched), reads each TPM command whole,
holds it for the modelled time and then forwards it to swtpm, one command at a time
per connection, as a TPM does. It is a *model*: a fixed delay per command
(``per_command``) plus a fixed extra for commands that sign (``signing``: Quote,
Sign, Certify, ...), no variance, no queueing inside the TPM beyond what the
serialized connection gives. Benchmarks use it so that batching is measured as users
with hardware TPMs would see it.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from testbed.core.errors import SwtpmError
from testbed.tpm.swtpm import Swtpm

__all__ = ["SIGNING_COMMANDS", "LatencyModel", "TpmLatencyProxy"]

# TPM2_CC values of the commands that make the TPM sign (the slow ones on hardware).
SIGNING_COMMANDS: Final = frozenset({
    0x158,  # TPM2_Quote
    0x15D,  # TPM2_Sign
    0x148,  # TPM2_Certify
    0x13C,  # TPM2_CertifyCreation
    0x14C,  # TPM2_GetTime
    0x134,  # TPM2_GetSessionAuditDigest
    0x133,  # TPM2_GetCommandAuditDigest
})
_HEADER: Final = struct.Struct(">HII")  # tag, size, command code / response code
MAX_MESSAGE: Final = 1 << 16  # swtpm's buffers are 4 KiB by default; bounded either way
_CTRL_SUFFIX: Final = ".ctrl"
_IO_TIMEOUT: Final = 30.0


@dataclass(frozen=True)
class LatencyModel:
    """Seconds a command is held: ``per_command`` for every one, plus ``signing``
    for the commands in :data:`SIGNING_COMMANDS`."""

    per_command: float = 0.0
    signing: float = 0.0

    def __post_init__(self) -> None:
        if not (self.per_command >= 0 and self.signing >= 0):
            raise ValueError("TPM latencies must be >= 0 seconds")

    def delay(self, command_code: int) -> float:
        extra = self.signing if command_code in SIGNING_COMMANDS else 0.0
        return self.per_command + extra

    @classmethod
    def quote_ms(cls, milliseconds: float) -> LatencyModel:
        """A TPM whose signing commands (a quote) take ``milliseconds``."""
        return cls(signing=milliseconds / 1000)


class TpmLatencyProxy:
    """Serves ``listen`` (and ``listen.ctrl``) in front of a running unix-socket swtpm.

    Clients connect with :attr:`tcti`. Every connection gets a thread; stop with
    :meth:`close` (or use as a context manager).
    """

    def __init__(self, tpm: Swtpm, listen: Path, model: LatencyModel) -> None:
        self.upstream = tpm.socket_path
        self.listen = listen
        self.model = model
        self.commands = 0  # forwarded so far (for benchmarks and tests)
        self.signed = 0  # of which signing commands (quotes)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._servers = [self._bind(listen), self._bind(Path(f"{listen}{_CTRL_SUFFIX}"))]
        self._threads = [
            threading.Thread(target=self._accept, args=(self._servers[0], self._serve_data),
                             name="tpm-latency-data", daemon=True),
            threading.Thread(target=self._accept, args=(self._servers[1], self._relay_ctrl),
                             name="tpm-latency-ctrl", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.listen}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()
        for server in self._servers:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(timeout=5)
        for path in (self.listen, Path(f"{self.listen}{_CTRL_SUFFIX}")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # --- plumbing ---------------------------------------------------------------------

    def _bind(self, path: Path) -> socket.socket:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # 0600 socket: the TPM is this user's alone
            try:
                server.bind(str(path))
            finally:
                os.umask(old)
            server.listen(16)
        except OSError as exc:
            server.close()
            raise SwtpmError(f"cannot listen on {path} for the TPM latency proxy: "
                             f"{exc.strerror or exc}") from None
        return server

    def _accept(self, server: socket.socket, handler: object) -> None:
        assert callable(handler)
        while not self._closing.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._guarded, args=(handler, conn), daemon=True,
                             name="tpm-latency-conn").start()

    def _guarded(self, handler: object, conn: socket.socket) -> None:
        assert callable(handler)
        suffix = _CTRL_SUFFIX if handler == self._relay_ctrl else ""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
                up.settimeout(_IO_TIMEOUT)
                up.connect(f"{self.upstream}{suffix}")
                handler(conn, up)
        except (OSError, _Malformed):
            pass  # the client sees its connection closed, as with a TPM that went away
        finally:
            conn.close()

    def _serve_data(self, conn: socket.socket, up: socket.socket) -> None:
        while not self._closing.is_set():
            command = _read_message(conn)
            if command is None:
                return
            code = _HEADER.unpack_from(command)[2]
            time.sleep(self.model.delay(code))
            up.sendall(command)
            response = _read_message(up)
            if response is None:
                return
            with self._lock:
                self.commands += 1
                self.signed += code in SIGNING_COMMANDS
            conn.sendall(response)

    def _relay_ctrl(self, conn: socket.socket, up: socket.socket) -> None:
        peers = {conn: up, up: conn}
        while not self._closing.is_set():
            ready, _, _ = select.select(list(peers), [], [], 1.0)
            for sock in ready:
                data = sock.recv(4096)
                if not data:
                    return
                peers[sock].sendall(data)


class _Malformed(Exception):
    """A message whose header is not a TPM header of a sane size."""


def _read_message(sock: socket.socket) -> bytes | None:
    """One whole TPM command or response (header + body); None at a clean EOF."""
    header = _read_exactly(sock, _HEADER.size, eof_ok=True)
    if header is None:
        return None
    size = _HEADER.unpack(header)[1]
    if not _HEADER.size <= size <= MAX_MESSAGE:
        raise _Malformed(f"TPM message size {size}")
    body = _read_exactly(sock, size - _HEADER.size, eof_ok=False)
    assert body is not None
    return header + body


def _read_exactly(sock: socket.socket, n: int, *, eof_ok: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if eof_ok and not buf:
                return None
            raise _Malformed("truncated TPM message")
        buf += chunk
    return bytes(buf)
