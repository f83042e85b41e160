"""Blocking sockets adapter: moves bytes between a socket and the sans-IO core.

``connect`` returns an :class:`AttestedChannel` once both sides are attested;
``serve`` accepts connections, establishes each in its own thread and hands the
channel to a handler. Every wait has a deadline (``ChannelConfig.timeout``): a
peer that stays silent during the exchange gets an ERROR "timeout waiting for ...".
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

from trusted_passages.config import ChannelConfig
from trusted_passages.errors import AttestationRejected, ProtocolError
from trusted_passages.events import AttestationFailed, Event, Inbox, established
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.protocol import TrustedPassagesConnection

log = logging.getLogger(__name__)
READ_SIZE: Final = 65536
_ACCEPT_POLL: Final = 0.05  # seconds; how quickly Server.close() is noticed


def rejected(event: AttestationFailed) -> AttestationRejected:
    return AttestationRejected(event.check, event.reason, by_peer=event.by_peer)


class AttestedChannel:
    """An established, mutually attested channel. One reader and one writer at most."""

    def __init__(self, sock: socket.socket, core: TrustedPassagesConnection,
                 peer: PeerEvidence, inbox: Inbox, timeout: float) -> None:
        self._sock = sock
        self._core = core
        self._peer = peer
        self._inbox = inbox
        self._timeout = timeout
        self._lock = threading.Lock()  # the core is not thread-safe

    def __repr__(self) -> str:
        return f"AttestedChannel(peer={self._peer.node!r}, closed={self._core.closed})"

    @property
    def peer(self) -> PeerEvidence:
        return self._peer

    def send(self, data: bytes) -> None:
        with self._lock:
            self._core.send(data)
            _flush(self._sock, self._core)

    def recv(self, timeout: float | None = None) -> bytes:
        """The next application bytes; b"" once the peer closed. Raises ProtocolError
        after ``timeout`` (default: the config's) without data."""
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        while self._inbox.waiting:
            data = _recv_until(self._sock, deadline, "application data")
            with self._lock:
                self._inbox.absorb(self._core.receive_data(data))
                _flush(self._sock, self._core)
        return self._inbox.take()

    def close(self) -> None:
        with self._lock:
            self._core.close()
            with contextlib.suppress(ProtocolError):  # the peer is gone already
                _flush(self._sock, self._core)
            self._sock.close()

    def __enter__(self) -> AttestedChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(host: str, port: int, config: ChannelConfig) -> AttestedChannel:
    """Open an attested channel to a Trusted Passages server; raises AttestationRejected."""
    try:
        sock = socket.create_connection((host, port), timeout=config.timeout)
    except OSError as exc:
        raise ProtocolError(f"cannot connect to {host}:{port}: {exc}") from None
    _no_delay(sock)
    try:
        return establish(sock, config.connection("client"), config.timeout)
    except BaseException:
        sock.close()
        raise


def _no_delay(sock: socket.socket) -> None:
    # Small handshake and frame writes in alternation: Nagle + delayed ACK would stall them.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def establish(sock: socket.socket, core: TrustedPassagesConnection,
              timeout: float) -> AttestedChannel:
    """Drive the handshake and exchange on ``sock``; each wait gets ``timeout`` seconds."""
    _flush(sock, core)
    while True:
        waiting = core.state
        deadline = time.monotonic() + timeout
        while core.state is waiting:
            try:
                data = _recv_until(sock, deadline, core.waiting_for)
            except ProtocolError:
                events = core.timeout()
                _flush_quietly(sock, core)
                raise_failure(events)
                raise
            events = core.receive_data(data)
            _flush_quietly(sock, core)
            core.prepare_evidence()  # after the flush: quote while the server quotes
            raise_failure(events)
            arrived = established(events)
            if arrived is not None:
                return AttestedChannel(sock, core, *arrived, timeout)
            if core.closed:
                raise ProtocolError("the connection closed during the exchange")


def raise_failure(events: list[Event]) -> None:
    """Raise AttestationRejected if the core refused the channel in ``events``."""
    for event in events:
        if isinstance(event, AttestationFailed):
            raise rejected(event)


def _recv_until(sock: socket.socket, deadline: float, what: str) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ProtocolError(f"timeout waiting for {what}")
    sock.settimeout(remaining)
    try:
        return sock.recv(READ_SIZE)
    except TimeoutError:
        raise ProtocolError(f"timeout waiting for {what}") from None
    except OSError:
        return b""  # a reset is an end of stream like any other: the core decides


def _flush(sock: socket.socket, core: TrustedPassagesConnection) -> None:
    data = core.data_to_send()
    if data:
        try:
            sock.sendall(data)
        except OSError as exc:
            raise ProtocolError(f"sending failed: {exc}") from None


def _flush_quietly(sock: socket.socket, core: TrustedPassagesConnection) -> None:
    # During the exchange a send failure shows up as EOF on the next read.
    with contextlib.suppress(ProtocolError):
        _flush(sock, core)


# --- server ------------------------------------------------------------------------------


Handler = Callable[[AttestedChannel], None]
FailureHandler = Callable[[AttestationRejected], None]


class Server:
    """Accepts connections on a thread; each is established and handled on its own."""

    def __init__(self, listener: socket.socket, config: ChannelConfig, handler: Handler, *,
                 on_failure: FailureHandler | None = None, max_connections: int = 64) -> None:
        self._listener = listener
        self._config = config
        self._handler = handler
        self._on_failure = on_failure
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, name="tp-accept",
                                          daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting and wait (bounded) for connection threads to finish."""
        self._stop.set()
        self._acceptor.join()
        self._listener.close()
        deadline = time.monotonic() + (self._config.timeout if timeout is None else timeout)
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        self._listener.settimeout(_ACCEPT_POLL)
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=_ACCEPT_POLL):
                continue  # at capacity: leave new connections in the backlog
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, OSError):
                self._slots.release()
                continue
            thread = threading.Thread(target=self._serve_one, args=(sock,), name="tp-conn",
                                      daemon=True)
            with self._threads_lock:
                self._threads.add(thread)
            thread.start()

    def _serve_one(self, sock: socket.socket) -> None:
        _no_delay(sock)
        try:
            channel = self._establish(sock)
            if channel is not None:
                with channel:
                    self._handler(channel)
        except Exception:
            log.exception("Trusted Passages connection handler failed")
        finally:
            sock.close()
            self._slots.release()
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _establish(self, sock: socket.socket) -> AttestedChannel | None:
        try:
            return establish(sock, self._config.connection("server"), self._config.timeout)
        except AttestationRejected as exc:
            log.info("attested channel refused: %s", exc)
            if self._on_failure is not None:
                self._on_failure(exc)
        except ProtocolError as exc:
            log.info("attested channel failed: %s", exc)
        return None


def serve(host: str, port: int, config: ChannelConfig, handler: Handler, *,
          on_failure: FailureHandler | None = None, max_connections: int = 64,
          backlog: int = 64) -> Server:
    """Listen on host:port (port 0: any free port, see Server.address) and serve."""
    listener = socket.create_server((host, port), backlog=backlog)
    return Server(listener, config, handler, on_failure=on_failure,
                  max_connections=max_connections)
