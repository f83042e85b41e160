"""asyncio adapter: plain asyncio streams (no ``ssl=``; the sans-IO core does TLS).

Until the channel is established, ``receive_data`` may call the issuer and
validator (TPM commands, milliseconds), so it runs in a worker thread; after
that, the core only decrypts and runs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from trusted_passages.blocking import READ_SIZE, raise_failure
from trusted_passages.config import ChannelConfig
from trusted_passages.errors import AttestationRejected, ProtocolError
from trusted_passages.events import Event, Inbox, established
from trusted_passages.interfaces import PeerEvidence
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


async def open_channel(host: str, port: int, config: ChannelConfig) -> AsyncAttestedChannel:
    """Open an attested channel; raises AttestationRejected."""
    try:
        async with asyncio.timeout(config.timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        raise ProtocolError(f"cannot connect to {host}:{port}: {exc}") from None
    try:
        return await establish(reader, writer, config.connection("client"), config.timeout)
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
AsyncFailureHandler = Callable[[AttestationRejected], None]


async def start_server(host: str, port: int, config: ChannelConfig, handler: AsyncHandler, *,
                       on_failure: AsyncFailureHandler | None = None) -> asyncio.Server:
    """Serve attested channels; ``handler`` gets each established channel (closed after)."""

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            channel = await establish(reader, writer, config.connection("server"),
                                      config.timeout)
        except (AttestationRejected, ProtocolError) as exc:
            log.info("attested channel refused: %s", exc)
            if on_failure is not None and isinstance(exc, AttestationRejected):
                on_failure(exc)
            await _close(writer)
            return
        except BaseException:  # cancelled (server shutting down): do not leak the socket
            writer.close()
            raise
        async with channel:
            try:
                await handler(channel)
            except Exception:
                log.exception("Trusted Passages connection handler failed")

    return await asyncio.start_server(serve_one, host, port)
