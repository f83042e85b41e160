"""Blocking adapter of the multiplexer: many :class:`MuxChannel` over one AttestedChannel.

A :class:`MuxSession` owns the attested channel: one reader thread feeds the sans-IO
core (:mod:`trusted_passages.mux`), one writer thread sends what the core queues, so a
writer blocked by TCP never stops the reading that would free it (both peers would
otherwise wait on each other's full buffers). Applications call ``open``/``accept`` and
each channel's ``send``/``recv``/``close`` from their own threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

from trusted_passages.blocking import AttestedChannel
from trusted_passages.errors import ProtocolError
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.mux import ChannelTable, MuxConnection, MuxError, MuxSettings

POLL: Final = 0.05  # seconds; how soon the reader notices close()
DEFAULT_TIMEOUT: Final = 10.0


class MuxChannel:
    """One logical channel. ``recv`` returns b"" once the peer closed it."""

    def __init__(self, session: MuxSession, channel: int, application: str) -> None:
        self._session = session
        self.id = channel
        self.application = application
        self.inbox: deque[bytes] = deque()
        self.ended = False  # the peer will send nothing more
        self.answer: str | None = None  # "accepted" or the refusal reason (own opens)

    def __repr__(self) -> str:
        return f"MuxChannel({self.id}, {self.application!r})"

    @property
    def peer(self) -> PeerEvidence:
        return self._session.peer

    def send(self, data: bytes) -> None:
        self._session.send(self, data)

    def recv(self, timeout: float | None = None) -> bytes:
        return self._session.recv(self, timeout)

    def close(self) -> None:
        self._session.close_channel(self)

    def __enter__(self) -> MuxChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MuxSession:
    """Multiplexes one established attested channel; see module doc."""

    def __init__(self, channel: AttestedChannel, settings: MuxSettings | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self._channel = channel
        self._timeout = timeout
        # The TLS client opens odd channel ids: we are it when the peer is the server.
        self._core = MuxConnection(channel.peer.role == "server", settings)
        self._cond = threading.Condition()
        self._table: ChannelTable[MuxChannel] = ChannelTable(
            lambda channel, application: MuxChannel(self, channel, application))
        self._stopping = False
        self._ended = False  # the stream ended or failed: nothing more arrives
        self._threads = [threading.Thread(target=self._read_loop, name="mux-read", daemon=True),
                         threading.Thread(target=self._write_loop, name="mux-write",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()
        try:
            self._wait(lambda: self._core.ready, timeout, "the peer's mux HELLO")
        except BaseException:
            self.close()
            raise

    @property
    def peer(self) -> PeerEvidence:
        return self._channel.peer

    @property
    def failure(self) -> MuxError | None:
        return self._core.failure

    # --- channels -----------------------------------------------------------------------

    def open(self, application: str, timeout: float | None = None) -> MuxChannel:
        """Open a channel to ``application``; raises MuxError("refused") if refused."""
        with self._cond:
            channel = self._table.add(self._core.open(application), application)
            self._cond.notify_all()
        self._wait(lambda: channel.answer is not None, timeout, f"ACCEPT of {application!r}")
        if channel.answer != "accepted":
            raise MuxError("refused", f"{application!r}: {channel.answer}")
        return channel

    def accept(self, timeout: float | None = None) -> MuxChannel:
        """The next channel the peer opened."""
        self._wait(lambda: bool(self._table.incoming), timeout, "a channel from the peer")
        with self._cond:
            return self._table.incoming.popleft()

    def send(self, channel: MuxChannel, data: bytes) -> None:
        """Queue ``data``; blocks while more than one window waits for the peer's credit."""
        limit = self._core.settings.initial_window
        self._wait(lambda: self._core.pending(channel.id) < limit, None,
                   f"credit on channel {channel.id}")
        with self._cond:
            self._core.send(channel.id, data)
            self._cond.notify_all()

    def recv(self, channel: MuxChannel, timeout: float | None = None) -> bytes:
        self._wait(lambda: bool(channel.inbox) or channel.ended, timeout,
                   f"data on channel {channel.id}")
        with self._cond:
            if not channel.inbox:
                return b""
            data = channel.inbox.popleft()
            with contextlib.suppress(MuxError):  # a failed session grants nothing
                self._core.consumed(channel.id, len(data))
            self._cond.notify_all()
            return data

    def close_channel(self, channel: MuxChannel) -> None:
        with self._cond:
            self._core.close(channel.id)
            self._cond.notify_all()

    def close(self) -> None:
        """Close every channel, send what is queued (bounded), end the attested channel."""
        with self._cond:
            if self._core.failure is None:
                for channel in list(self._table.channels.values()):
                    self._core.close(channel.id)
            self._cond.notify_all()
        deadline = time.monotonic() + self._timeout
        with self._cond:
            self._cond.wait_for(lambda: not self._core.wants_write or self._ended,
                                max(0.0, deadline - time.monotonic()))
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(self._timeout)
        self._channel.close()

    def __enter__(self) -> MuxSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- threads ------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while not self._stopping:
            try:
                data = self._channel.recv(POLL)
            except ProtocolError:
                continue  # no data within POLL: look at _stopping again
            with self._cond:
                try:
                    self._ended = self._table.dispatch(self._core.receive_data(data))
                except MuxError:
                    self._ended = True
                self._cond.notify_all()
                if self._ended:
                    return

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._core.wants_write or self._stopping)
                if self._stopping and not self._core.wants_write:
                    return
                data = self._core.data_to_send()
                self._cond.notify_all()  # close() waits for the queue to drain
            try:
                self._channel.send(data)
            except ProtocolError:
                with self._cond:
                    self._ended = True
                    self._cond.notify_all()
                return


    def _wait(self, ready: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Wait until ``ready``; raise the session's failure, or a timeout naming ``what``."""
        limit = self._timeout if timeout is None else timeout
        with self._cond:
            done = self._cond.wait_for(
                lambda: ready() or self._core.failure is not None or self._ended, limit)
            if self._core.failure is not None:
                raise self._core.failure
            if ready():
                return
            if done:
                raise ProtocolError(f"the mux session ended while waiting for {what}")
            raise ProtocolError(f"timeout waiting for {what}")


Handler = Callable[[MuxChannel], None]


def serve_applications(session: MuxSession, handlers: Mapping[str, Handler], *,
                       channels: int) -> list[threading.Thread]:
    """Accept ``channels`` channels and run each application's handler on its own thread.

    The session's settings should list the same applications (``MuxSettings.applications``)
    so that the core refuses the others; a channel for an application without a handler
    is closed at once.
    """
    threads = []
    for _ in range(channels):
        channel = session.accept()
        handler = handlers.get(channel.application)
        if handler is None:
            channel.close()
            continue
        thread = threading.Thread(target=_run_handler, args=(handler, channel),
                                  name=f"mux-{channel.application}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def _run_handler(handler: Handler, channel: MuxChannel) -> None:
    with channel:
        handler(channel)
