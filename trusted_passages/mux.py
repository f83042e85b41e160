"""TLS multiplexing over one attested session (after draft-badra-hajjeh-mtls): the sans-IO core.

Several logical channels share one established Trusted Passages channel. Every mux
frame travels inside the attested TLS stream::

    type (u8) | channel id (u16, big endian) | length (u16, big endian) | payload

The draft's record header is source port | destination port | length (6 bytes). Here a
channel is named by one id chosen by the side that opens it (odd ids: the TLS client,
even: the server, as in HTTP/2, so the two sides never collide without a round trip),
and the application is named once, in OPEN, instead of in every frame: 5 bytes a frame.
docs/multiplexing.md has the frame types and the rules.

Flow control is credit based, per channel and direction: a side sends DATA only within
the credit the peer granted (OPEN/ACCEPT carry the initial window, CREDIT adds to it as
the peer's application consumes data), so a receiver buffers at most one window a
channel, and one channel whose reader is slow stalls only itself. Sending is round
robin over channels, one frame each in turn: a busy channel cannot starve the others.

Any violation by the peer raises :class:`MuxError` naming it (``code``) and queues a
GOAWAY frame that tells the peer why; the session is then dead.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, Generic, Protocol, TypeVar

from trusted_passages.errors import ProtocolError

HEADER: Final = struct.Struct(">BHH")
HELLO: Final = struct.Struct(">BHHI")  # version, max channels, max frame, initial window
WINDOW: Final = struct.Struct(">I")
VERSION: Final = 1
MIN_FRAME: Final = 1024  # every control frame fits; a peer may not advertise less
MAX_FRAME: Final = 0xFFFF  # what a u16 length can say
MAX_APPLICATION: Final = 64  # bytes of an application name
MAX_REASON: Final = 256  # bytes of a REFUSE or GOAWAY reason kept
MAX_WINDOW: Final = 1 << 30
CLIENT_FIRST_ID: Final = 1
SERVER_FIRST_ID: Final = 2
MAX_ID: Final = 0xFFFF


class FrameType(IntEnum):
    HELLO = 0
    OPEN = 1
    ACCEPT = 2
    REFUSE = 3
    DATA = 4
    CREDIT = 5
    CLOSE = 6
    GOAWAY = 7


_TYPES: Final = frozenset(t.value for t in FrameType)


class MuxError(ProtocolError):
    """A multiplexing failure; ``code`` names it (unknown_channel, window_overrun, ...).

    ``by_peer``: the peer sent GOAWAY (it found us at fault, or gave up).
    """

    def __init__(self, code: str, reason: str, *, by_peer: bool = False) -> None:
        super().__init__(f"{'the peer ended the session: ' if by_peer else ''}{code}: {reason}")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


@dataclass(frozen=True)
class MuxSettings:
    """What this side accepts; sent to the peer in HELLO."""

    max_channels: int = 128  # channels the peer may have open at once
    max_frame: int = 16384  # payload bytes of one frame (one TLS record's worth)
    initial_window: int = 65536  # credit each channel starts with, per direction
    applications: frozenset[str] | None = None  # the peer may open these (None: any)

    def __post_init__(self) -> None:
        if not 1 <= self.max_channels <= MAX_ID // 2:
            raise ValueError(f"max_channels must be 1..{MAX_ID // 2}")
        if not MIN_FRAME <= self.max_frame <= MAX_FRAME:
            raise ValueError(f"max_frame must be {MIN_FRAME}..{MAX_FRAME}")
        if not 1 <= self.initial_window <= MAX_WINDOW:
            raise ValueError(f"initial_window must be 1..{MAX_WINDOW}")


@dataclass(frozen=True)
class Frame:
    type: FrameType
    channel: int
    payload: bytes = b""

    def __repr__(self) -> str:
        return f"Frame({self.type.name}, {self.channel}, {len(self.payload)} bytes)"


def encode_frame(frame_type: FrameType, channel: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"mux {frame_type.name} payload of {len(payload)} bytes")
    return HEADER.pack(frame_type, channel, len(payload)) + payload


class FrameDecoder:
    """Incremental, bounded: holds at most one frame plus the last chunk fed."""

    def __init__(self, max_frame: int) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        if len(self._buffer) < HEADER.size:
            return None
        frame_type, channel, length = HEADER.unpack_from(self._buffer)
        if frame_type not in _TYPES:
            raise MuxError("malformed_frame", f"unknown frame type {frame_type}")
        if length > self._max_frame:
            raise MuxError("oversized_frame", f"a frame of {length} bytes exceeds the "
                           f"{self._max_frame}-byte limit")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size:end])
        del self._buffer[:end]
        return Frame(FrameType(frame_type), channel, payload)

    def end_of_stream(self) -> None:
        if self._buffer:
            raise MuxError("truncated_frame", f"the stream ended inside a frame "
                           f"({len(self._buffer)} bytes of it)")


# --- events -------------------------------------------------------------------------------


class MuxEvent:
    """Base class of what :meth:`MuxConnection.receive_data` reports."""


@dataclass(frozen=True)
class Ready(MuxEvent):
    """The peer's HELLO arrived: channels may be opened."""


@dataclass(frozen=True)
class ChannelOpened(MuxEvent):
    """The peer opened a channel and it was accepted."""

    channel: int
    application: str


@dataclass(frozen=True)
class ChannelAccepted(MuxEvent):
    channel: int


@dataclass(frozen=True)
class ChannelRefused(MuxEvent):
    channel: int
    reason: str


@dataclass(frozen=True)
class ChannelData(MuxEvent):
    channel: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class ChannelEnded(MuxEvent):
    """The peer will send nothing more on this channel."""

    channel: int


@dataclass(frozen=True)
class SessionEnded(MuxEvent):
    """The underlying stream ended cleanly between frames."""


# --- per-channel state --------------------------------------------------------------------


@dataclass
class _Channel:
    id: int
    application: str
    accepted: bool  # both ends agreed (ACCEPT sent or received)
    send_credit: int = 0  # bytes the peer still lets us send
    recv_credit: int = 0  # bytes we still let the peer send
    unacknowledged: int = 0  # consumed by our application, not yet granted back
    outgoing: bytearray = field(default_factory=bytearray)
    local_open: bool = True  # we may still send
    remote_open: bool = True  # the peer may still send
    close_queued: bool = False  # CLOSE goes out once outgoing is empty


class MuxConnection:
    """One side of a multiplexed session; bytes in, bytes out, events (h11 style).

    ``initiator``: this side was the TLS client (its channel ids are odd).
    """

    def __init__(self, initiator: bool, settings: MuxSettings | None = None) -> None:
        self.settings = settings or MuxSettings()
        self._decoder = FrameDecoder(self.settings.max_frame)
        self._next_id = CLIENT_FIRST_ID if initiator else SERVER_FIRST_ID
        self._peer_parity = SERVER_FIRST_ID % 2 if initiator else CLIENT_FIRST_ID % 2
        self._peer_next_id = SERVER_FIRST_ID if initiator else CLIENT_FIRST_ID
        self._channels: dict[int, _Channel] = {}
        self._control: deque[bytes] = deque()
        self._rotation: deque[int] = deque()  # channels that may have DATA to send
        self._peer: MuxSettings | None = None
        self._failure: MuxError | None = None
        s = self.settings
        self._control.append(encode_frame(FrameType.HELLO, 0, HELLO.pack(
            VERSION, s.max_channels, s.max_frame, s.initial_window)))

    # --- state --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._peer is not None and self._failure is None

    @property
    def failure(self) -> MuxError | None:
        return self._failure

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    def pending(self, channel: int) -> int:
        """Bytes queued on ``channel`` and not yet framed (0 for a finished channel)."""
        state = self._channels.get(channel)
        return 0 if state is None else len(state.outgoing)

    def can_send(self, channel: int) -> bool:
        state = self._channels.get(channel)
        return state is not None and state.local_open and not state.close_queued

    # --- the application's side ---------------------------------------------------------

    def open(self, application: str) -> int:
        """Queue OPEN for a new channel; its id. ChannelAccepted/Refused follows."""
        self._check_alive()
        peer = self._peer_settings()
        name = application.encode()
        if not 1 <= len(name) <= MAX_APPLICATION or not application.isprintable():
            raise ValueError(f"application names are 1..{MAX_APPLICATION} printable bytes")
        mine = sum(1 for c in self._channels if c % 2 == self._next_id % 2)
        if mine >= peer.max_channels:
            raise MuxError("too_many_channels", f"the peer accepts {peer.max_channels} "
                           "channels at once", by_peer=False)
        if self._next_id > MAX_ID:
            raise MuxError("channel_ids_exhausted", "this session opened every channel id it "
                           "has; open a new session")
        channel, self._next_id = self._next_id, self._next_id + 2
        state = _Channel(channel, application, accepted=False,
                         recv_credit=self.settings.initial_window)
        self._channels[channel] = state
        self._control.append(encode_frame(FrameType.OPEN, channel,
                                          WINDOW.pack(self.settings.initial_window) + name))
        return channel

    def send(self, channel: int, data: bytes) -> None:
        """Queue ``data`` on ``channel``; it leaves as credit allows (data_to_send)."""
        self._check_alive()
        state = self._channels.get(channel)
        if state is None or not state.local_open or state.close_queued:
            raise ProtocolError(f"mux channel {channel} is closed for sending")
        state.outgoing += data
        self._schedule(state)

    def consumed(self, channel: int, count: int) -> None:
        """The application took ``count`` bytes of ``channel``: grant them back."""
        state = self._channels.get(channel)
        if state is None or not state.remote_open or self._failure is not None:
            return  # nothing more will come: no credit needed
        state.unacknowledged += count
        if state.unacknowledged >= self.settings.initial_window // 2:
            grant, state.unacknowledged = state.unacknowledged, 0
            state.recv_credit += grant
            self._control.append(encode_frame(FrameType.CREDIT, channel, WINDOW.pack(grant)))

    def close(self, channel: int) -> None:
        """Half-close: CLOSE goes out after what is queued. Idempotent."""
        state = self._channels.get(channel)
        if state is None or state.close_queued or not state.local_open:
            return
        state.close_queued = True
        self._schedule(state)

    def data_to_send(self, limit: int = 1 << 18) -> bytes:
        """Control frames first, then DATA round robin, one frame per channel in turn."""
        out = bytearray()
        while self._control and len(out) < limit:
            out += self._control.popleft()
        while self._rotation and len(out) < limit and self._peer is not None:
            state = self._channels.get(self._rotation.popleft())
            if state is not None:
                out += self._next_data_frame(state)
        return bytes(out)

    @property
    def wants_write(self) -> bool:
        return bool(self._control) or (self._peer is not None and bool(self._rotation))

    # --- the peer's side ----------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[MuxEvent]:
        """Feed bytes from the attested channel; b"" is its end. Raises MuxError."""
        self._check_alive()
        try:
            if not data:
                self._decoder.end_of_stream()
                return [SessionEnded()]
            self._decoder.feed(data)
            events: list[MuxEvent] = []
            while (frame := self._decoder.next_frame()) is not None:
                self._on_frame(frame, events)
            return events
        except MuxError as exc:
            self._fail(exc)
            raise

    def _on_frame(self, frame: Frame, events: list[MuxEvent]) -> None:
        if self._peer is None and frame.type is not FrameType.HELLO:
            raise MuxError("protocol", f"{frame.type.name} before HELLO")
        handler = {
            FrameType.HELLO: self._on_hello, FrameType.OPEN: self._on_open,
            FrameType.ACCEPT: self._on_accept, FrameType.REFUSE: self._on_refuse,
            FrameType.DATA: self._on_data, FrameType.CREDIT: self._on_credit,
            FrameType.CLOSE: self._on_close, FrameType.GOAWAY: self._on_goaway,
        }[frame.type]
        handler(frame, events)

    def _on_hello(self, frame: Frame, events: list[MuxEvent]) -> None:
        if self._peer is not None:
            raise MuxError("protocol", "a second HELLO")
        if len(frame.payload) != HELLO.size or frame.channel != 0:
            raise MuxError("malformed_frame", "HELLO is 9 bytes on channel 0")
        version, channels, max_frame, window = HELLO.unpack(frame.payload)
        if version != VERSION:
            raise MuxError("version", f"the peer speaks mux version {version}, not {VERSION}")
        try:
            self._peer = MuxSettings(channels, max_frame, window)
        except ValueError as exc:
            raise MuxError("malformed_frame", f"HELLO: {exc}") from None
        events.append(Ready())

    def _on_open(self, frame: Frame, events: list[MuxEvent]) -> None:
        channel = frame.channel
        if channel % 2 != self._peer_parity or channel < self._peer_next_id:
            raise MuxError("bad_channel_id", f"OPEN of channel {channel}: the peer's next id "
                           f"is {self._peer_next_id} or above, of its parity")
        window, name = self._window(frame, extra=True)
        application = _application(name)
        self._peer_next_id = channel + 2
        theirs = sum(1 for c in self._channels if c % 2 == self._peer_parity)
        if theirs >= self.settings.max_channels:
            raise MuxError("too_many_channels", f"the peer opened more than "
                           f"{self.settings.max_channels} channels at once")
        allowed = self.settings.applications
        if allowed is not None and application not in allowed:
            self._control.append(encode_frame(FrameType.REFUSE, channel,
                                              f"no application {application!r}".encode()))
            return
        self._channels[channel] = _Channel(channel, application, accepted=True,
                                           send_credit=window,
                                           recv_credit=self.settings.initial_window)
        self._control.append(encode_frame(FrameType.ACCEPT, channel,
                                          WINDOW.pack(self.settings.initial_window)))
        events.append(ChannelOpened(channel, application))

    def _on_accept(self, frame: Frame, events: list[MuxEvent]) -> None:
        state = self._own_pending(frame)
        window, _ = self._window(frame)
        state.accepted, state.send_credit = True, window
        self._schedule(state)
        events.append(ChannelAccepted(state.id))

    def _on_refuse(self, frame: Frame, events: list[MuxEvent]) -> None:
        state = self._own_pending(frame)
        del self._channels[state.id]
        events.append(ChannelRefused(state.id, _text(frame.payload)))

    def _on_data(self, frame: Frame, events: list[MuxEvent]) -> None:
        state = self._known(frame)
        if state is None or not state.remote_open:
            raise MuxError("data_after_close", f"DATA on channel {frame.channel} after the "
                           "peer closed it")
        if not frame.payload:
            raise MuxError("malformed_frame", "an empty DATA frame")
        if len(frame.payload) > state.recv_credit:
            raise MuxError("window_overrun", f"{len(frame.payload)} bytes on channel "
                           f"{state.id} with {state.recv_credit} bytes of credit left")
        state.recv_credit -= len(frame.payload)
        events.append(ChannelData(state.id, frame.payload))

    def _on_credit(self, frame: Frame, events: list[MuxEvent]) -> None:
        state = self._known(frame)
        if state is None or not state.local_open:
            return  # we closed it: credit the peer sent before seeing our CLOSE
        grant, _ = self._window(frame)
        if state.send_credit + grant > MAX_WINDOW:
            raise MuxError("window_overrun", f"credit beyond {MAX_WINDOW} bytes")
        state.send_credit += grant
        self._schedule(state)

    def _on_close(self, frame: Frame, events: list[MuxEvent]) -> None:
        state = self._known(frame)
        if frame.payload:
            raise MuxError("malformed_frame", "CLOSE carries no payload")
        if state is None or not state.remote_open:
            raise MuxError("data_after_close", f"a second CLOSE of channel {frame.channel}")
        state.remote_open = False
        events.append(ChannelEnded(state.id))
        self._retire_if_done(state)

    def _on_goaway(self, frame: Frame, events: list[MuxEvent]) -> None:
        code, _, reason = _text(frame.payload).partition(": ")
        raise MuxError(code or "goaway", reason or "no reason given", by_peer=True)

    # --- helpers ------------------------------------------------------------------------

    def _known(self, frame: Frame) -> _Channel | None:
        """The channel a frame names; None if it was retired; unknown ids are violations."""
        state = self._channels.get(frame.channel)
        if state is not None:
            if not state.accepted:
                raise MuxError("protocol", f"{frame.type.name} on channel {frame.channel} "
                               "before it was accepted")
            return state
        ours = frame.channel % 2 == self._next_id % 2
        if frame.channel == 0 or frame.channel >= (self._next_id if ours else self._peer_next_id):
            raise MuxError("unknown_channel", f"{frame.type.name} on channel {frame.channel}, "
                           "which was never opened")
        return None

    def _own_pending(self, frame: Frame) -> _Channel:
        state = self._channels.get(frame.channel)
        if state is None or state.accepted or frame.channel % 2 != self._next_id % 2:
            raise MuxError("unknown_channel", f"{frame.type.name} for channel "
                           f"{frame.channel}, which this side is not opening")
        return state

    @staticmethod
    def _window(frame: Frame, *, extra: bool = False) -> tuple[int, bytes]:
        if len(frame.payload) < WINDOW.size or (not extra and len(frame.payload) != WINDOW.size):
            raise MuxError("malformed_frame", f"{frame.type.name} payload of "
                           f"{len(frame.payload)} bytes")
        (window,) = WINDOW.unpack_from(frame.payload)
        if not 0 < window <= MAX_WINDOW:
            raise MuxError("malformed_frame", f"{frame.type.name} window of {window} bytes")
        return window, frame.payload[WINDOW.size:]

    def _next_data_frame(self, state: _Channel) -> bytes:
        peer = self._peer_settings()
        size = min(len(state.outgoing), state.send_credit, peer.max_frame)
        frame = b""
        if state.accepted and size > 0:
            chunk = bytes(state.outgoing[:size])
            del state.outgoing[:size]
            state.send_credit -= size
            frame = encode_frame(FrameType.DATA, state.id, chunk)
        if state.accepted and state.close_queued and not state.outgoing:
            frame += encode_frame(FrameType.CLOSE, state.id)
            state.local_open, state.close_queued = False, False
            self._retire_if_done(state)
            return frame
        self._schedule(state)
        return frame

    def _schedule(self, state: _Channel) -> None:
        sendable = state.accepted and (
            (state.outgoing and state.send_credit > 0)
            or (state.close_queued and not state.outgoing))
        if sendable and state.id not in self._rotation:
            self._rotation.append(state.id)

    def _retire_if_done(self, state: _Channel) -> None:
        if not state.local_open and not state.remote_open:
            self._channels.pop(state.id, None)

    def _peer_settings(self) -> MuxSettings:
        if self._peer is None:
            raise ProtocolError("the mux session is not ready: the peer's HELLO has not arrived")
        return self._peer

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, exc: MuxError) -> None:
        self._failure = exc
        self._channels.clear()
        self._rotation.clear()
        self._control.clear()
        if not exc.by_peer:
            reason = f"{exc.code}: {exc.reason}".encode()[:MAX_REASON]
            self._control.append(encode_frame(FrameType.GOAWAY, 0, reason))


def _application(name: bytes) -> str:
    try:
        application = name.decode()
    except UnicodeDecodeError:
        raise MuxError("malformed_frame", "the application name is not UTF-8") from None
    if not 1 <= len(name) <= MAX_APPLICATION or not application.isprintable():
        raise MuxError("malformed_frame", f"application names are 1..{MAX_APPLICATION} "
                       "printable bytes")
    return application


def _text(payload: bytes) -> str:
    text = payload[:MAX_REASON].decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text)


# --- for the adapters --------------------------------------------------------------------


class Endpoint(Protocol):
    """What the adapters' channel objects hold for :class:`ChannelTable`."""

    id: int
    inbox: deque[bytes]
    ended: bool  # the peer will send nothing more
    answer: str | None  # own opens: "accepted", or the peer's refusal


E = TypeVar("E", bound=Endpoint)


class ChannelTable(Generic[E]):
    """The adapters' one reading of the core's events: channels, inboxes, accept queue."""

    def __init__(self, make: Callable[[int, str], E]) -> None:
        self._make = make
        self.channels: dict[int, E] = {}
        self.incoming: deque[E] = deque()

    def add(self, channel: int, application: str) -> E:
        endpoint = self._make(channel, application)
        self.channels[channel] = endpoint
        return endpoint

    def dispatch(self, events: list[MuxEvent]) -> bool:
        """Apply ``events``; True once the session ended."""
        for event in events:
            if isinstance(event, ChannelData):
                self.channels[event.channel].inbox.append(event.data)
            elif isinstance(event, ChannelOpened):
                self.incoming.append(self.add(event.channel, event.application))
            elif isinstance(event, ChannelAccepted):
                self.channels[event.channel].answer = "accepted"
            elif isinstance(event, ChannelRefused):
                self.channels.pop(event.channel).answer = event.reason
            elif isinstance(event, ChannelEnded):
                self.channels[event.channel].ended = True
            elif isinstance(event, SessionEnded):
                return True
        return False
