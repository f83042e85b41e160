"""asyncio adapter: plain asyncio streams (no ``ssl=``; the sans-IO core does TLS).

Until the channel is established, ``receive_data`` may call the issuer and
validator (TPM commands, milliseconds), so it runs in a worker thread; after
that, the core only decrypts and runs on the loop. ``start_server`` accepts and
establishes through :mod:`trusted_passages.listener` (per-step deadlines, bounded
slots, eviction of the oldest handshaking connection), then wraps each established
socket in a stream for the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from attestation.slots import Slot
from trusted_passages.config import ChannelConfig
from trusted_passages.errors import ProtocolError
from trusted_passages.events import Event, Inbox, established, raise_failure
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.listener import (
    DEFAULT_MAX_CONNECTIONS,
    READ_SIZE,
    FailureHandler,
    Listener,
)
from trusted_passages.protocol import TrustedPassagesConnection

log = logging.getLogger(__name__)


class AsyncAttestedChannel:
    """An established, mutually attested channel on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 core: TrustedPassagesConnection, peer: PeerEvidence, inbox: Inbox,
                 timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self._core = core
        self._peer = peer
        self._inbox = inbox
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"AsyncAttestedChannel(peer={self._peer.node!r}, closed={self._core.closed})"

    @property
    def peer(self) -> PeerEvidence:
        return self._peer

    async def send(self, data: bytes) -> None:
        self._core.send(data)
        await _flush(self._writer, self._core)

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next application bytes; b"" once the peer closed."""
        try:
            async with asyncio.timeout(self._timeout if timeout is None else timeout):
                while self._inbox.waiting:
                    data = await _read(self._reader)
                    self._inbox.absorb(self._core.receive_data(data))
                    await _flush(self._writer, self._core)
        except TimeoutError:
            raise ProtocolError("timeout waiting for application data") from None
        return self._inbox.take()

    async def close(self) -> None:
        self._core.close()
        with contextlib.suppress(ProtocolError):  # the peer is gone already
            await _flush(self._writer, self._core)
        await _close(self._writer)

    async def __aenter__(self) -> AsyncAttestedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_channel(host: str, port: int, config: ChannelConfig, *,
                       first_message: bytes | None = None) -> AsyncAttestedChannel:
    """Open an attested channel; raises AttestationRejected. ``first_message``: as for
    :func:`trusted_passages.blocking.connect`."""
    try:
        async with asyncio.timeout(config.timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        raise ProtocolError(f"cannot connect to {host}:{port}: {exc}") from None
    try:
        core = config.connection("client")
        if first_message is not None:
            core.send_first(first_message)
        return await establish(reader, writer, core, config.timeout)
    except BaseException:
        await _close(writer)
        raise


async def establish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    core: TrustedPassagesConnection, timeout: float) -> AsyncAttestedChannel:
    """Drive the handshake and exchange; each protocol step gets ``timeout`` seconds."""
    await _flush_quietly(writer, core)
    loop = asyncio.get_running_loop()
    while True:
        try:
            events = await _step(reader, writer, core, loop.time() + timeout)
        except TimeoutError:
            events = core.timeout()
        await _flush_quietly(writer, core)
        raise_failure(events)
        arrived = established(events)
        if arrived is not None:
            return AsyncAttestedChannel(reader, writer, core, *arrived, timeout)
        if core.closed:
            raise ProtocolError("the connection closed during the exchange")


async def _step(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                core: TrustedPassagesConnection, deadline: float) -> list[Event]:
    """Feed the core (answering as it goes) until its state changes; return those events.

    Only waiting for the peer is timed: a core call in progress is never cancelled
    (its worker thread would go on touching the core).
    """
    waiting = core.state
    while True:
        async with asyncio.timeout_at(deadline):
            data = await _read(reader)
        # May quote or verify: keep the event loop free.
        events = await asyncio.to_thread(core.receive_data, data)
        await _flush_quietly(writer, core)
        if core.evidence_wanted:  # after the flush: quote while the server quotes
            await asyncio.to_thread(core.prepare_evidence)
        if core.state is not waiting or events:
            return events


async def _read(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(READ_SIZE)
    except OSError:
        return b""  # a reset ends the stream; the core decides what that means


async def _flush(writer: asyncio.StreamWriter, core: TrustedPassagesConnection) -> None:
    data = core.data_to_send()
    if data:
        try:
            writer.write(data)
            await writer.drain()
        except OSError as exc:
            raise ProtocolError(f"sending failed: {exc}") from None


async def _flush_quietly(writer: asyncio.StreamWriter, core: TrustedPassagesConnection) -> None:
    with contextlib.suppress(ProtocolError):
        await _flush(writer, core)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


AsyncHandler = Callable[[AsyncAttestedChannel], Awaitable[None]]
AsyncFailureHandler = FailureHandler


class AttestedServer:
    """What :func:`start_server` returns: ``sockets``, ``close()``, ``wait_closed()``
    (the part of :class:`asyncio.Server` callers use), and an async context manager."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def __repr__(self) -> str:
        return f"AttestedServer({self._listener!r})"

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._listener.sock,)

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.address

    @property
    def connections(self) -> int:
        """Connections held now, established or not."""
        return len(self._listener.slots)

    def close(self) -> None:
        """Stop accepting and drop connections not yet established (handlers of
        established channels run on, as with :class:`asyncio.Server`)."""
        self._listener.close()

    async def wait_closed(self) -> None:
        await self._listener.wait_closed()

    async def __aenter__(self) -> AttestedServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(host: str, port: int, config: ChannelConfig, handler: AsyncHandler, *,
                       on_failure: AsyncFailureHandler | None = None,
                       max_connections: int = DEFAULT_MAX_CONNECTIONS,
                       backlog: int = 1024) -> AttestedServer:
    """Serve attested channels; ``handler`` gets each established channel (closed after).
    ``on_failure`` hears of each refused channel on the worker thread that ran the
    refusing validation (not on the loop)."""

    async def serve_one(sock: socket.socket, core: TrustedPassagesConnection,
                        peer: PeerEvidence, inbox: Inbox, slot: Slot) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            listener.slots.release(slot)
            return
        channel = AsyncAttestedChannel(reader, writer, core, peer, inbox, config.timeout)
        try:
            async with channel:
                await handler(channel)
        except Exception:
            log.exception("Trusted Passages connection handler failed")
        finally:
            listener.slots.release(slot)

    async def run_handler(sock: socket.socket, core: TrustedPassagesConnection,
                          peer: PeerEvidence, inbox: Inbox, slot: Slot) -> None:
        # A task of its own: closing the server cancels establishing, not handlers.
        task = asyncio.get_running_loop().create_task(serve_one(sock, core, peer, inbox, slot))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    handlers: set[asyncio.Task[None]] = set()
    listener = Listener(socket.create_server((host, port), backlog=backlog), config,
                        run_handler, on_failure=on_failure, max_connections=max_connections)
    return AttestedServer(listener)
