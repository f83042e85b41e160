"""asyncio adapter of the multiplexer: :class:`AsyncMuxSession` over an AsyncAttestedChannel.

The same shape as :mod:`trusted_passages.mux_blocking`, with a reader task and a writer
task in place of the two threads (a reader never waits on a send, see there).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Final

from trusted_passages.aio import AsyncAttestedChannel
from trusted_passages.errors import ProtocolError
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.mux import ChannelTable, MuxConnection, MuxError, MuxSettings

DEFAULT_TIMEOUT: Final = 10.0
_IDLE: Final = 3600.0  # the reader's wait per recv; it is cancelled on close anyway


class AsyncMuxChannel:
    """One logical channel; ``recv`` returns b"" once the peer closed it."""

    def __init__(self, session: AsyncMuxSession, channel: int, application: str) -> None:
        self._session = session
        self.id = channel
        self.application = application
        self.inbox: deque[bytes] = deque()
        self.ended = False
        self.answer: str | None = None

    def __repr__(self) -> str:
        return f"AsyncMuxChannel({self.id}, {self.application!r})"

    @property
    def peer(self) -> PeerEvidence:
        return self._session.peer

    async def send(self, data: bytes) -> None:
        await self._session.send(self, data)

    async def recv(self, timeout: float | None = None) -> bytes:
        return await self._session.recv(self, timeout)

    async def close(self) -> None:
        await self._session.close_channel(self)

    async def __aenter__(self) -> AsyncMuxChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncMuxSession:
    """Create with :meth:`start` (it waits for the peer's HELLO)."""

    def __init__(self, channel: AsyncAttestedChannel, settings: MuxSettings | None,
                 timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout
        self._core = MuxConnection(channel.peer.role == "server", settings)
        self._cond = asyncio.Condition()
        self._table: ChannelTable[AsyncMuxChannel] = ChannelTable(
            lambda channel, application: AsyncMuxChannel(self, channel, application))
        self._stopping = False
        self._ended = False
        self._tasks = [asyncio.create_task(self._read_loop()),
                       asyncio.create_task(self._write_loop())]

    @classmethod
    async def start(cls, channel: AsyncAttestedChannel, settings: MuxSettings | None = None,
                    *, timeout: float = DEFAULT_TIMEOUT) -> AsyncMuxSession:
        session = cls(channel, settings, timeout)
        try:
            await session._wait(lambda: session._core.ready, timeout, "the peer's mux HELLO")
        except BaseException:
            await session.close()
            raise
        return session

    @property
    def peer(self) -> PeerEvidence:
        return self._channel.peer

    async def open(self, application: str, timeout: float | None = None) -> AsyncMuxChannel:
        async with self._cond:
            channel = self._table.add(self._core.open(application), application)
            self._cond.notify_all()
        await self._wait(lambda: channel.answer is not None, timeout,
                         f"ACCEPT of {application!r}")
        if channel.answer != "accepted":
            raise MuxError("refused", f"{application!r}: {channel.answer}")
        return channel

    async def accept(self, timeout: float | None = None) -> AsyncMuxChannel:
        await self._wait(lambda: bool(self._table.incoming), timeout, "a channel from the peer")
        return self._table.incoming.popleft()

    async def send(self, channel: AsyncMuxChannel, data: bytes) -> None:
        limit = self._core.settings.initial_window
        await self._wait(lambda: self._core.pending(channel.id) < limit, None,
                         f"credit on channel {channel.id}")
        async with self._cond:
            self._core.send(channel.id, data)
            self._cond.notify_all()

    async def recv(self, channel: AsyncMuxChannel, timeout: float | None = None) -> bytes:
        await self._wait(lambda: bool(channel.inbox) or channel.ended, timeout,
                         f"data on channel {channel.id}")
        if not channel.inbox:
            return b""
        data = channel.inbox.popleft()
        async with self._cond:
            with contextlib.suppress(MuxError):
                self._core.consumed(channel.id, len(data))
            self._cond.notify_all()
        return data

    async def close_channel(self, channel: AsyncMuxChannel) -> None:
        async with self._cond:
            self._core.close(channel.id)
            self._cond.notify_all()

    async def close(self) -> None:
        async with self._cond:
            if self._core.failure is None:
                for channel in list(self._table.channels.values()):
                    self._core.close(channel.id)
            self._cond.notify_all()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await self._cond.wait_for(lambda: not self._core.wants_write or self._ended)
            self._stopping = True
            self._cond.notify_all()
        reader, writer = self._tasks
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            async with asyncio.timeout(self._timeout):
                await asyncio.gather(reader, writer)
        await self._channel.close()

    async def __aenter__(self) -> AsyncMuxSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self._channel.recv(_IDLE)
            except ProtocolError:
                continue  # idle: keep waiting (close() cancels this task)
            async with self._cond:
                try:
                    self._ended = self._table.dispatch(self._core.receive_data(data))
                except MuxError:
                    self._ended = True
                self._cond.notify_all()
                if self._ended:
                    return

    async def _write_loop(self) -> None:
        while True:
            async with self._cond:
                await self._cond.wait_for(lambda: self._core.wants_write or self._stopping)
                if self._stopping and not self._core.wants_write:
                    return
                data = self._core.data_to_send()
                self._cond.notify_all()  # close() waits for the queue to drain
            try:
                await self._channel.send(data)
            except ProtocolError:
                async with self._cond:
                    self._ended = True
                    self._cond.notify_all()
                return


    async def _wait(self, ready: Callable[[], bool], timeout: float | None, what: str) -> None:
        limit = self._timeout if timeout is None else timeout
        async with self._cond:
            try:
                async with asyncio.timeout(limit):
                    await self._cond.wait_for(
                        lambda: ready() or self._core.failure is not None or self._ended)
            except TimeoutError:
                raise ProtocolError(f"timeout waiting for {what}") from None
            if self._core.failure is not None:
                raise self._core.failure
            if not ready():
                raise ProtocolError(f"the mux session ended while waiting for {what}")
