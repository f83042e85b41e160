"""The Trusted Passages server side both adapters share: one event loop, no thread per
connection until a channel is established.

Every accepted connection is a coroutine on raw non-blocking sockets
(``loop.sock_recv``/``sock_sendall``), so hundreds of idle or slow peers cost a socket
and a small OpenSSL object each, not a thread. The core's ``receive_data`` may quote or
verify (TPM commands, milliseconds), so it runs in the loop's worker threads.

Rules (docs/security.md, "Listeners"):

* each protocol step has its own deadline of ``config.timeout``: the TLS handshake
  counted from accept, the evidence and FINISHED steps from the end of the step
  before; bytes arriving never extend it. A late peer gets the core's ERROR frame
  (once there is a TLS channel to send it on) and is closed;
* at most ``max_connections`` at a time (:class:`attestation.slots.ConnectionSlots`):
  a newcomer that finds them all taken evicts the oldest connection that has sent
  nothing yet, else the oldest still in its TLS handshake (neither has shown a
  certificate of the cluster's CA); when none is, the newcomer is closed at once
  rather than left waiting in the backlog. So a flood of silent connections, however
  fast it is renewed, cannot push out a client whose ClientHello has arrived;
* the accept backlog (1024 by default) is larger than a burst of connections the loop
  has not accepted yet: a full backlog drops SYNs, and a dropped SYN costs a genuine
  client a one-second retransmission;
* what is buffered is bounded by the core (one TLS record, one frame of at most
  1 MiB) and by one read of :data:`READ_SIZE` bytes.

Once established, the socket and core are handed to ``on_established`` (the asyncio
adapter wraps them in a stream); the slot stays taken, never evicted, until the caller
releases it.

The blocking adapter instead takes each connection over at its first bytes
(``hand_off``, :class:`Accepted`): one thread of its own then runs the whole exchange
and the handler, with no hop between the loop and worker threads per step (each hop
is two thread wake-ups on the handshake's critical path). Until its first bytes a
connection costs no thread, nor a task: a reader callback and a timer on the loop. A
connection in a thread is dropped (evicted, or the listener closing) by shutting its
socket down, which wakes the thread's blocked read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from attestation.slots import CLOSING, ConnectionSlots, Slot, has_data, shutdown
from trusted_passages.config import ChannelConfig
from trusted_passages.errors import AttestationRejected, ProtocolError
from trusted_passages.events import Event, Inbox, established, raise_failure
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.protocol import TrustedPassagesConnection

log = logging.getLogger(__name__)

READ_SIZE = 65536
DEFAULT_MAX_CONNECTIONS = 64
RANK_SILENT, RANK_HANDSHAKE = 0, 1  # the evictable stages, first evicted first
SEND_GRACE_S = 1.0  # to tell a late peer why it is dropped, past its deadline
_ACCEPT_BURST = 64  # accepts per wake-up: keep the backlog short, let the loop breathe

Established = Callable[[socket.socket, TrustedPassagesConnection, PeerEvidence, Inbox, Slot],
                       Awaitable[None]]
FailureHandler = Callable[[AttestationRejected], None]


@dataclass(eq=False)
class Accepted:
    """A connection whose first bytes arrived, handed to a thread of its own: it feeds
    ``data`` to ``core`` and drives the exchange; the TLS step ends at ``deadline``
    (``time.monotonic()``, counted from accept). The thread must call :meth:`proven`
    once the TLS handshake is done, :meth:`settled` once the channel is established or
    refused, and :meth:`release` when it is done with the socket (closed)."""

    sock: socket.socket
    core: TrustedPassagesConnection
    data: bytes
    deadline: float
    slot: Slot
    _listener: Listener = field(repr=False)

    def proven(self) -> None:
        self._listener._proven(self.slot)

    def settled(self) -> None:
        """Established or refused: closing the listener no longer drops it."""
        self._listener._settled(self)

    def release(self) -> None:
        self._listener._settled(self)
        self._listener.slots.release(self.slot)


HandOff = Callable[[Accepted], None]


class Listener:
    """Accepts on ``sock`` in the running event loop until :meth:`close`. Exactly one of
    ``on_established`` (the loop drives the exchange) and ``hand_off`` (a thread does,
    from the first bytes on) is given."""

    def __init__(self, sock: socket.socket, config: ChannelConfig,
                 on_established: Established | None = None, *,
                 hand_off: HandOff | None = None, on_failure: FailureHandler | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if (on_established is None) == (hand_off is None):
            raise ValueError("give the Listener on_established or hand_off, not both")
        self.sock = sock
        self.config = config
        self.slots = ConnectionSlots(max_connections)
        self._on_established = on_established
        self._hand_off = hand_off
        self._on_failure = on_failure
        self._loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Task[None]] = set()  # not established yet
        self._watching: set[_Pending] = set()  # hand-off: waiting for their first bytes
        self._in_threads: set[Accepted] = set()  # handed off, not settled yet
        self._threads_lock = threading.Lock()
        self._closed = asyncio.Event()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    def __repr__(self) -> str:
        return f"Listener({self.address}, {self.slots!r})"

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop accepting and drop every connection not established yet."""
        if not self._closed.is_set():
            self._closed.set()
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for task in list(self._pending):
            task.cancel()
        for pending in list(self._watching):
            pending.drop(CLOSING)
        with self._threads_lock:
            handed_off = list(self._in_threads)
        for accepted in handed_off:
            shutdown(accepted.sock)(CLOSING)

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._pending, return_exceptions=True)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BURST):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: the peer waits in the backlog meanwhile
                log.warning("Trusted Passages listener cannot accept: %s", exc)
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        pending = _Pending(conn)
        spoke = has_data(conn)
        slot = self.slots.admit(pending.drop, timeout=None,
                                rank=RANK_HANDSHAKE if spoke else RANK_SILENT,
                                reassess=None if spoke else lambda: _spoke_since(conn))
        if slot is None:  # every slot holds a connection past its TLS handshake
            conn.close()
            return
        if self._hand_off is not None:
            self._watch_first_bytes(pending, slot)
            return
        pending.task = self._loop.create_task(self._serve(pending, slot))
        self._pending.add(pending.task)
        # Runs even for a task cancelled before it started (evicted at once).
        pending.task.add_done_callback(lambda _: self._finish(pending, slot))

    def _finish(self, pending: _Pending, slot: Slot) -> None:
        if pending.task is not None:
            self._pending.discard(pending.task)
        if not pending.handed_over:
            pending.conn.close()
            self.slots.release(slot)

    def _server_core(self, conn: socket.socket) -> TrustedPassagesConnection:
        conn.setblocking(False)
        no_delay(conn)
        core = self.config.connection("server")
        core.checks_after_finished = True  # see _receive and blocking.establish_accepted
        return core

    async def _serve(self, pending: _Pending, slot: Slot) -> None:
        conn = pending.conn
        core = self._server_core(conn)
        try:
            peer, inbox = await establish_socket(
                conn, core, self.config.timeout, on_step=lambda: self._proven(slot),
                on_data=lambda: self.slots.step(slot, timeout=None, rank=RANK_HANDSHAKE),
                on_failure=self._on_failure)
        except (AttestationRejected, ProtocolError) as exc:  # on_failure has heard of it
            note_not_established(exc)
            return
        pending.handed_over = True
        assert self._on_established is not None
        await self._on_established(conn, core, peer, inbox, slot)

    def _watch_first_bytes(self, pending: _Pending, slot: Slot) -> None:
        """Wait on the loop (no thread, no task: a callback, the fewest wake-ups on a
        genuine client's path) for the first bytes, then hand the connection to a thread
        of its own, which closes it and releases its slot."""
        conn = pending.conn
        core = self._server_core(conn)
        deadline = self._loop.time() + self.config.timeout  # loop.time() is time.monotonic()
        fd = conn.fileno()

        def unwatch() -> None:
            self._watching.discard(pending)
            self._loop.remove_reader(fd)
            timer.cancel()

        def readable() -> None:
            try:
                data = conn.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return  # woken for nothing: keep waiting
            except OSError:
                data = b""  # a reset: the core decides what that means, in the thread
            unwatch()
            self.slots.step(slot, timeout=None, rank=RANK_HANDSHAKE)
            accepted = Accepted(conn, core, data, deadline, slot, self)
            with self._threads_lock:
                self._in_threads.add(accepted)
            pending.accepted = accepted
            assert self._hand_off is not None
            self._hand_off(accepted)

        def expired() -> None:
            unwatch()
            self._end_unserved(pending, slot)
            events = core.timeout()
            if self._on_failure is not None:  # it may block: not on the loop
                self._loop.run_in_executor(None, report_failure, events, self._on_failure)

        def drop(_reason: str) -> None:  # evicted, or the listener closing
            unwatch()
            self._end_unserved(pending, slot)

        timer = self._loop.call_at(deadline, expired)
        pending.dropper = drop
        self._watching.add(pending)
        self._loop.add_reader(fd, readable)

    def _end_unserved(self, pending: _Pending, slot: Slot) -> None:
        pending.conn.close()
        self.slots.release(slot)

    def _settled(self, accepted: Accepted) -> None:
        with self._threads_lock:
            self._in_threads.discard(accepted)

    def _proven(self, slot: Slot) -> None:
        """Past the TLS handshake: the peer showed a certificate of the trusted CA."""
        self.slots.step(slot, timeout=None, rank=None)


class _Pending:
    """A connection being established: its socket, and its task (on the loop) or its
    first-bytes watch (hand-off) or its thread (handed off)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.task: asyncio.Task[None] | None = None
        self.handed_over = False
        self.dropper: Callable[[str], None] | None = None  # ends the first-bytes watch
        self.accepted: Accepted | None = None  # handed off to a thread of its own

    def drop(self, reason: str) -> None:
        if self.accepted is not None:  # its thread wakes up to the end of the stream
            shutdown(self.conn)(reason)
        elif self.dropper is not None:
            self.dropper(reason)
        elif self.task is not None:  # cancelling ends in Listener._finish
            self.task.cancel()


def _spoke_since(conn: socket.socket) -> int | None:
    """Before a silent connection is evicted: its first bytes may be waiting unread."""
    return RANK_HANDSHAKE if has_data(conn) else None


def no_delay(sock: socket.socket) -> None:
    # Small handshake and frame writes in alternation: Nagle + delayed ACK would stall them.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def establish_socket(sock: socket.socket, core: TrustedPassagesConnection,
                           timeout: float, *, on_step: Callable[[], None] | None = None,
                           on_data: Callable[[], None] | None = None,
                           on_failure: FailureHandler | None = None
                           ) -> tuple[PeerEvidence, Inbox]:
    """Drive the handshake and exchange on a non-blocking socket; each protocol step has
    ``timeout`` seconds, the first counted from now. ``on_data`` hears of the first
    bytes from the peer, ``on_step`` of the first step completed (the TLS handshake).
    ``on_failure`` hears of a refusal on the worker thread that ran the core's call
    which refused (a validator's thread-local notes, such as the node it was told it
    is, are visible there), then AttestationRejected is raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await _send(sock, core, deadline)
    while True:
        waiting = core.state
        try:
            events = await _step(sock, core, deadline, on_data, on_failure)
            on_data = None
        except TimeoutError:
            events = core.timeout()
            await _send_quietly(sock, core, loop.time() + SEND_GRACE_S)
            await asyncio.to_thread(report_failure, events, on_failure)
        raise_failure(events)
        arrived = established(events)
        if arrived is not None:
            return arrived
        if core.closed:
            raise ProtocolError("the connection closed during the exchange")
        if core.state is not waiting:
            deadline = loop.time() + timeout
            if on_step is not None:
                on_step()
                on_step = None


async def _step(sock: socket.socket, core: TrustedPassagesConnection, deadline: float,
                on_data: Callable[[], None] | None = None,
                on_failure: FailureHandler | None = None) -> list[Event]:
    """Feed the core until its state changes or it reports events; only the waits for
    the peer are timed (a core call in progress is never cancelled by a timeout)."""
    loop = asyncio.get_running_loop()
    waiting = core.state
    while True:
        async with asyncio.timeout_at(deadline):
            try:
                data = await loop.sock_recv(sock, READ_SIZE)
            except OSError:
                data = b""  # a reset ends the stream; the core decides what that means
        if data and on_data is not None:
            on_data()
            on_data = None
        events, unsent = await _in_thread(_receive, sock, core, data, on_failure)
        await _send_bytes(sock, unsent, max(deadline, loop.time() + SEND_GRACE_S))
        if core.state is not waiting or events:
            return events


async def _in_thread(receive: Callable[[socket.socket, TrustedPassagesConnection, bytes,
                                         FailureHandler | None], tuple[list[Event], bytes]],
                     *args: Any) -> tuple[list[Event], bytes]:
    """``asyncio.to_thread``, except that a cancelled caller (an evicted connection)
    still waits for the thread: it may be sending on the socket, which must stay open
    (its descriptor not reused) until it is done."""
    work = asyncio.ensure_future(asyncio.to_thread(receive, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await work
        raise


def _receive(sock: socket.socket, core: TrustedPassagesConnection, data: bytes,
             on_failure: FailureHandler | None) -> tuple[list[Event], bytes]:
    """In a worker thread: feed the core, and send what it answers right from here (the
    socket is non-blocking, and the loop does not touch it while it awaits this call):
    the answer leaves without waiting for the loop to wake up. What the kernel does not
    take at once is returned, for the loop to send."""
    events = core.receive_data(data)
    unsent = _send_now(sock, core.data_to_send())
    # The handshake's last bytes are out (or queued for the loop, in order): this side's
    # checks and quote (TrustedPassagesConnection.finish_handshake).
    events += core.finish_handshake()
    later = core.data_to_send()
    unsent = unsent + later if unsent else _send_now(sock, later)
    report_failure(events, on_failure)
    return events, unsent


def _send_now(sock: socket.socket, data: bytes) -> bytes:
    """What of ``data`` the kernel did not take at once (the loop sends that)."""
    try:
        sent = sock.send(data) if data else 0
    except OSError:  # would block, or broken: the loop sends it all, and meets any error
        sent = 0
    return data[sent:]


def note_not_established(exc: AttestationRejected | ProtocolError) -> None:
    """The listener's log line for a channel it did not establish (info: peers' doing)."""
    kind = "refused" if isinstance(exc, AttestationRejected) else "failed"
    log.info("attested channel %s: %s", kind, exc)


def report_failure(events: list[Event], on_failure: FailureHandler | None) -> None:
    if on_failure is None:
        return
    try:
        raise_failure(events)
    except AttestationRejected as exc:
        try:
            on_failure(exc)
        except Exception:  # the caller's bug must not keep the channel from closing
            log.exception("Trusted Passages on_failure handler failed")


async def _send(sock: socket.socket, core: TrustedPassagesConnection, deadline: float) -> None:
    await _send_all(sock, core.data_to_send(), deadline)


async def _send_bytes(sock: socket.socket, data: bytes, deadline: float) -> None:
    """Send ``data`` quietly (a failure shows up as EOF on the next read)."""
    with contextlib.suppress(ProtocolError):
        await _send_all(sock, data, deadline)


async def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    if not data:
        return
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.get_running_loop().sock_sendall(sock, data)
    except TimeoutError:
        raise ProtocolError("sending failed: the peer does not read") from None
    except OSError as exc:
        raise ProtocolError(f"sending failed: {exc}") from None


async def _send_quietly(sock: socket.socket, core: TrustedPassagesConnection,
                        deadline: float) -> None:
    # During the exchange a send failure shows up as EOF on the next read.
    with contextlib.suppress(ProtocolError):
        await _send(sock, core, deadline)
