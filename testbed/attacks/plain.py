"""Plain mutual TLS over the very same OpenSSL contexts: the attack lab's baseline.

Same library, same certificates and keys as the Trusted Passages side; only the
attestation exchange is missing. A connection "succeeds" when both handshakes
verify the peer certificate against the CA and application data flows.

The listeners follow the project's rule (:class:`attestation.slots.ConnectionSlots`):
the TLS handshake must finish within :data:`TIMEOUT` of accept however slowly its bytes
arrive, at most :data:`MAX_CONNECTIONS` at a time, and a newcomer finding them all
taken evicts the oldest connection still in its handshake.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from OpenSSL import SSL

from attestation.errors import TestbedError
from attestation.slots import ConnectionSlots, Slot, shutdown

PlainHandler = Callable[[bytes], bytes]
TIMEOUT = 5.0
MAX_CONNECTIONS = 64
RANK_HANDSHAKE = 0
_SWEEP_S = 0.2


class PlainTlsError(TestbedError):
    """A plain mTLS handshake or exchange failed."""


def _blocking(sock: socket.socket) -> socket.socket:
    """Blocking mode with kernel timeouts: pyOpenSSL treats a Python socket timeout as
    non-blocking I/O (WantRead), so bound the waits with SO_RCVTIMEO/SO_SNDTIMEO."""
    sock.settimeout(None)
    interval = struct.pack("ll", int(TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)
    return sock


def exchange(host: str, port: int, context: SSL.Context, message: bytes,
             server_name: str | None = None) -> bytes:
    """Connect, complete the mutual handshake, send ``message``, return the reply."""
    sock = _blocking(socket.create_connection((host, port), timeout=TIMEOUT))
    conn = SSL.Connection(context, sock)
    if server_name:
        conn.set_tlsext_host_name(server_name.encode())
    conn.set_connect_state()
    try:
        conn.do_handshake()
        conn.sendall(message)
        return bytes(conn.recv(65536))
    except SSL.Error as exc:
        raise PlainTlsError(f"TLS failed: {exc}") from None
    finally:
        with contextlib.suppress(SSL.Error, OSError):
            conn.shutdown()
        sock.close()


class _Acceptor:
    """A loopback listener whose thread hands each connection to ``_handle``."""

    def __init__(self, *, handshake_timeout: float = TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self._listener.settimeout(_SWEEP_S)
        self.handshake_timeout = handshake_timeout
        self.slots = ConnectionSlots(max_connections)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=type(self).__name__)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.slots.expire()
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed, or out of descriptors: the peer waits in the backlog
                self._stop.wait(_SWEEP_S)
                continue
            slot = self.slots.admit(shutdown(sock), timeout=self.handshake_timeout,
                                    rank=RANK_HANDSHAKE)
            if slot is None:
                sock.close()  # every slot past its handshake
                continue
            threading.Thread(target=self._handle_and_close, args=(sock, slot),
                             daemon=True).start()

    def _handle_and_close(self, sock: socket.socket, slot: Slot) -> None:
        try:
            self._handle(_blocking(sock), slot)
        except (SSL.Error, OSError):
            pass  # the lab's peers hang up on purpose; the outcome is judged elsewhere
        finally:
            sock.close()
            self.slots.release(slot)

    def _handshake_done(self, slot: Slot) -> None:
        """Past the handshake: the exchange's own deadlines apply; never evicted."""
        self.slots.step(slot, timeout=None, rank=None)

    def _handle(self, sock: socket.socket, slot: Slot) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._listener.close()
        self.slots.drop_all()


class PlainServer(_Acceptor):
    """Accepts plain mTLS connections; ``handler`` maps one request to its reply."""

    def __init__(self, context: SSL.Context, handler: PlainHandler, *,
                 handshake_timeout: float = TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self._context = context
        self._handler = handler
        self.received: list[bytes] = []
        super().__init__(handshake_timeout=handshake_timeout, max_connections=max_connections)

    def _handle(self, sock: socket.socket, slot: Slot) -> None:
        conn = SSL.Connection(self._context, sock)
        conn.set_accept_state()
        conn.do_handshake()
        self._handshake_done(slot)
        request = bytes(conn.recv(65536))
        self.received.append(request)
        conn.sendall(self._handler(request))
        conn.shutdown()

    def __enter__(self) -> PlainServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlainProxy(_Acceptor):
    """A man in the middle holding CA-valid certificates for both ends.

    It terminates the victim's TLS session with ``front`` (a server context whose
    certificate names the real server) and opens its own to the real server with
    ``back`` (a client context whose certificate names the real client), then
    relays the plaintext both ways, reading everything that passes.
    """

    def __init__(self, front: SSL.Context, back: SSL.Context, upstream: tuple[str, int], *,
                 handshake_timeout: float = TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self._front, self._back, self._upstream = front, back, upstream
        self.seen: list[bytes] = []
        super().__init__(handshake_timeout=handshake_timeout, max_connections=max_connections)

    def _handle(self, sock: socket.socket, slot: Slot) -> None:
        victim = SSL.Connection(self._front, sock)
        victim.set_accept_state()
        victim.do_handshake()  # before dialling upstream: a silent peer costs nothing there
        self._handshake_done(slot)
        with _blocking(socket.create_connection(self._upstream, timeout=TIMEOUT)) as up_sock:
            upstream = SSL.Connection(self._back, up_sock)
            upstream.set_connect_state()
            upstream.do_handshake()
            self._relay(victim, upstream)

    def _relay(self, a: SSL.Connection, b: SSL.Connection) -> None:
        """Copy both ways from one thread (an OpenSSL connection must not be read and
        written from two threads at once) until either side ends. Non-blocking: a read
        that only finds a record without data (a TLS 1.3 session ticket) must not hold
        up the other direction."""
        peers = {a: b, b: a}
        for conn in peers:
            conn.setblocking(False)
        deadline = time.monotonic() + 2 * TIMEOUT
        while time.monotonic() < deadline:
            ready = [c for c in peers if c.pending()] or \
                select.select(list(peers), [], [], 0.2)[0]
            for source in ready:
                try:
                    data = bytes(source.recv(65536))
                except SSL.WantReadError:
                    continue  # no application data (yet)
                except (SSL.Error, OSError):
                    return
                if not data:
                    return
                self.seen.append(data)
                if not _send_all(peers[source], data, deadline):
                    return

    def __enter__(self) -> PlainProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _send_all(conn: SSL.Connection, data: bytes, deadline: float) -> bool:
    """Write all of ``data`` to a non-blocking connection; False if it went away."""
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view):]
        except SSL.WantWriteError:
            if time.monotonic() > deadline:
                return False
            select.select([], [conn], [], 0.2)
        except (SSL.Error, OSError):
            return False
    return True
