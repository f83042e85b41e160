"""Blocking sockets adapter: moves bytes between a socket and the sans-IO core.

``connect`` returns an :class:`AttestedChannel` once both sides are attested;
``serve`` accepts connections on one event-loop thread, which holds each one until its
first bytes arrive (:mod:`trusted_passages.listener`: bounded slots, eviction of the
oldest handshaking connection, silent connections cost no thread), then hands it to a
worker thread that runs the whole exchange and then the handler: no thread hand-over
on the handshake's critical path, as in a thread-per-connection TLS server. Every
wait has a deadline (``ChannelConfig.timeout``, per protocol step): a peer that stays
silent during the exchange gets an ERROR "timeout waiting for ...".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from trusted_passages.config import ChannelConfig
from trusted_passages.errors import AttestationRejected, ProtocolError
from trusted_passages.events import Event, Inbox, established, raise_failure, rejected
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.listener import (
    DEFAULT_MAX_CONNECTIONS,
    READ_SIZE,
    Accepted,
    FailureHandler,
    Listener,
    no_delay,
    note_not_established,
    report_failure,
)
from trusted_passages.protocol import State, TrustedPassagesConnection

__all__ = ["AttestedChannel", "FailureHandler", "Handler", "Server", "connect", "establish",
           "raise_failure", "rejected", "serve"]

log = logging.getLogger(__name__)
DEFAULT_WORKERS = 32  # handlers running at once; more established channels wait their turn


class _QuotePool:
    """Clients' own quotes, off the thread that receives and validates the server's
    evidence. Made at first use in each process: a forked child has none of its
    parent's threads, and a pool copied from the parent would wait for them forever."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def submit(self, issue: Callable[[], bytes]) -> Future[bytes]:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(self._size, thread_name_prefix="tp-quote")
                self._pid = os.getpid()
            return self._pool.submit(issue)


_QUOTES = _QuotePool(8)


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


def connect(host: str, port: int, config: ChannelConfig, *,
            first_message: bytes | None = None) -> AttestedChannel:
    """Open an attested channel to a Trusted Passages server; raises AttestationRejected.

    ``first_message`` (a request) rides right behind this client's evidence when the
    server allows it (TrustedPassagesConnection.send_first): a round trip saved."""
    try:
        sock = socket.create_connection((host, port), timeout=config.timeout)
    except OSError as exc:
        raise ProtocolError(f"cannot connect to {host}:{port}: {exc}") from None
    no_delay(sock)
    try:
        core = config.connection("client")
        if first_message is not None:
            core.send_first(first_message)
        return establish(sock, core, config.timeout)
    except BaseException:
        sock.close()
        raise


def establish(sock: socket.socket, core: TrustedPassagesConnection,
              timeout: float) -> AttestedChannel:
    """Drive the handshake and exchange on ``sock``; each wait gets ``timeout`` seconds."""
    core.checks_after_finished = True
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
            events += _finish_handshake(sock, core)
            # After the flush: quote while the server quotes. With tpv1.2 the evidence
            # leaves at once (the server validates it while we validate its own), so
            # quote here; else in a thread, so that the server's evidence is
            # validated meanwhile.
            if core.concurrent:
                core.prepare_evidence()
                _flush_quietly(sock, core)
            else:
                core.prepare_evidence(submit=_QUOTES.submit)
            channel = _outcome(sock, core, events, timeout)
            if channel is not None:
                return channel


def establish_accepted(accepted: Accepted, timeout: float,
                       on_failure: FailureHandler | None = None) -> AttestedChannel:
    """The server's side of :func:`establish`, in the thread the listener handed the
    connection to: its first bytes are in ``accepted``, the TLS step ends at its
    deadline (from accept), each later step gets ``timeout`` seconds. ``on_failure``
    hears of a refusal (in this thread) before AttestationRejected is raised."""
    sock, core = accepted.sock, accepted.core
    data, deadline = accepted.data, accepted.deadline
    while True:
        waiting = core.state
        events = core.receive_data(data)
        _flush_quietly(sock, core)
        events += _finish_handshake(sock, core)
        report_failure(events, on_failure)
        channel = _outcome(sock, core, events, timeout)
        if channel is not None:
            return channel
        if core.state is not waiting:
            deadline = time.monotonic() + timeout
            if waiting is State.HANDSHAKING:
                accepted.proven()
        try:
            data = _recv_until(sock, deadline, core.waiting_for)
        except ProtocolError:
            events = core.timeout()
            _flush_quietly(sock, core)
            report_failure(events, on_failure)
            raise_failure(events)
            raise


def _finish_handshake(sock: socket.socket, core: TrustedPassagesConnection) -> list[Event]:
    """Once the handshake's last TLS bytes are out (a client's Finished, which the server
    verifies meanwhile; a server's session tickets, which the client reads while the
    server quotes): this side's own checks, then the server's evidence."""
    events = core.finish_handshake()
    if events:
        _flush_quietly(sock, core)
    return events


def _outcome(sock: socket.socket, core: TrustedPassagesConnection, events: list[Event],
             timeout: float) -> AttestedChannel | None:
    """What the core's latest events decide: refused (raises), established (the
    channel), or not yet (None)."""
    raise_failure(events)
    arrived = established(events)
    if arrived is not None:
        return AttestedChannel(sock, core, *arrived, timeout)
    if core.closed:
        raise ProtocolError("the connection closed during the exchange")
    return None


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


class Server:
    """Accepts on one event-loop thread; each connection that speaks gets a worker
    thread, which establishes the channel and then runs the handler.

    ``max_connections`` bounds the connections held at once, established or not (and
    so the worker threads); ``workers`` the handlers running at once (more established
    channels wait their turn). ``on_failure`` runs for each channel refused, on the
    worker thread that ran the refusing step.
    """

    def __init__(self, listener: socket.socket, config: ChannelConfig, handler: Handler, *,
                 on_failure: FailureHandler | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 workers: int = DEFAULT_WORKERS) -> None:
        self._config = config
        self._handler = handler
        self._on_failure = on_failure
        if workers < 1:
            raise ValueError("at least one worker thread is needed")
        # One thread per connection past its first bytes; slots bound them. A batched
        # quote holds its thread for the batch window, so every connection in flight
        # needs its own, or the pool caps the batch.
        self._workers = _Workers(max_connections)
        self._handlers = threading.BoundedSemaphore(workers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tp-listener",
                                        daemon=True)
        self._thread.start()
        self._closed = False
        started = asyncio.run_coroutine_threadsafe(self._listen(listener, max_connections),
                                                   self._loop)
        try:
            self._listener = started.result()
        except BaseException:
            self._stop_loop()
            listener.close()
            raise

    def __repr__(self) -> str:
        return f"Server({self._listener!r})"

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.address

    @property
    def connections(self) -> int:
        """Connections held now, established or not."""
        return len(self._listener.slots)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, drop connections not yet established, and wait (bounded) for
        the handlers of established channels to finish."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + (self._config.timeout if timeout is None else timeout)
        with contextlib.suppress(Exception):  # the loop is gone already: nothing to stop
            asyncio.run_coroutine_threadsafe(self._stop_listening(), self._loop).result(
                max(0.1, deadline - time.monotonic()))
        self._stop_loop()
        self._workers.close(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _listen(self, sock: socket.socket, max_connections: int) -> Listener:
        return Listener(sock, self._config, hand_off=self._hand_off,
                        on_failure=self._on_failure, max_connections=max_connections)

    async def _stop_listening(self) -> None:
        self._listener.close()
        await self._listener.wait_closed()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _hand_off(self, accepted: Accepted) -> None:  # on the loop
        self._workers.submit(lambda: self._serve(accepted))

    def _serve(self, accepted: Accepted) -> None:
        """In a worker thread: establish, then handle; always close and release."""
        try:
            accepted.sock.setblocking(True)
            try:
                channel = establish_accepted(accepted, self._config.timeout, self._on_failure)
            except (AttestationRejected, ProtocolError) as exc:  # on_failure has heard
                note_not_established(exc)
                return
            finally:
                accepted.settled()
            with self._handlers:
                self._handle(channel)
        finally:
            accepted.sock.close()
            accepted.release()

    def _handle(self, channel: AttestedChannel) -> None:
        try:
            with channel:
                self._handler(channel)
        except Exception:
            log.exception("Trusted Passages connection handler failed")


class _Workers:
    """At most ``size`` daemon threads running submitted jobs; threads are started on
    demand and reused. Daemon threads: a handler stuck past :meth:`close`'s deadline
    must not hold the process up (handlers' reads have deadlines of their own)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("at least one worker thread is needed")
        self._size = size
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)
        if self._idle.acquire(blocking=False):
            return  # an idle worker takes it
        with self._lock:
            if len(self._threads) < self._size:
                thread = threading.Thread(target=self._work, name="tp-handler", daemon=True)
                self._threads.append(thread)
                thread.start()

    def close(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()  # Server._handle catches what a handler raises
            self._idle.release()


def serve(host: str, port: int, config: ChannelConfig, handler: Handler, *,
          on_failure: FailureHandler | None = None,
          max_connections: int = DEFAULT_MAX_CONNECTIONS, workers: int = DEFAULT_WORKERS,
          backlog: int = 1024) -> Server:
    """Listen on host:port (port 0: any free port, see Server.address) and serve."""
    listener = socket.create_server((host, port), backlog=backlog)
    return Server(listener, config, handler, on_failure=on_failure,
                  max_connections=max_connections, workers=workers)
