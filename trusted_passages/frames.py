"""Attestation frames carried inside the TLS channel before it is established.

Frame: magic ``b"TPv1"`` | type (u8) | payload length (u32, big endian) | payload.
Payloads are at most 1 MiB. The decoder is incremental and bounded: it never
holds more than one frame plus one fed chunk, rejects a wrong magic as soon as
the first differing byte arrives and an oversized length as soon as the header
is complete.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from trusted_passages.errors import ProtocolError

MAGIC: Final = b"TPv1"
HEADER: Final = struct.Struct(">4sBI")
MAX_PAYLOAD: Final = 1 << 20
MAX_ERROR_TEXT: Final = 1024  # characters of an ERROR frame's reason kept for display
ERROR_PREFIX: Final = "attestation failed: "


class FrameType(IntEnum):
    EVIDENCE = 1
    FINISHED = 2
    ERROR = 3


_TYPES: Final = frozenset(t.value for t in FrameType)


@dataclass(frozen=True)
class Frame:
    type: FrameType
    payload: bytes = b""

    def __repr__(self) -> str:
        return f"Frame({self.type.name}, {len(self.payload)} bytes)"


def encode_frame(frame_type: FrameType, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"{frame_type.name} payload of {len(payload)} bytes exceeds "
                            f"{MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, frame_type, len(payload)) + payload


def error_payload(check: str, reason: str) -> bytes:
    """The ERROR payload: one line of clear text, readable by a plain TLS client."""
    text = f"{ERROR_PREFIX}{_one_line(check, 64)}: {_one_line(reason, MAX_ERROR_TEXT)}\n"
    return text.encode()


def parse_error_payload(payload: bytes) -> tuple[str, str]:
    """(check, reason) of a peer's ERROR frame; never fails, whatever the peer sent."""
    text = payload[: 4 * MAX_ERROR_TEXT].decode("utf-8", errors="replace").strip()
    text = text.removeprefix(ERROR_PREFIX)
    check, sep, reason = text.partition(": ")
    if not sep:
        check, reason = "unknown", text
    return _one_line(check, 64) or "unknown", _one_line(reason, MAX_ERROR_TEXT)


def _one_line(text: str, limit: int) -> str:
    # A peer's text ends up in logs and exceptions: no control characters, bounded.
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return cleaned[:limit]


class FrameDecoder:
    """Incremental decoder; every malformation is a ProtocolError."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append bytes; feed bounded chunks and drain with next_frame() after each."""
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive.

        Only the frame at the head of the buffer is checked: what follows the
        last frame of the exchange is application data (take_remainder).
        """
        self._check_header()
        if len(self._buffer) < HEADER.size:
            return None
        _, frame_type, length = HEADER.unpack_from(self._buffer)
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size:end])
        del self._buffer[:end]
        return Frame(FrameType(frame_type), payload)

    def take_remainder(self) -> bytes:
        """Bytes after the last frame (application data once the exchange is over)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def _check_header(self) -> None:
        head = bytes(self._buffer[: len(MAGIC)])
        if head != MAGIC[: len(head)]:
            raise ProtocolError(f"bytes {head[:4]!r} are not a {MAGIC.decode()} frame "
                                "(application data before the attestation exchange completed?)")
        if len(self._buffer) < HEADER.size:
            return
        _, frame_type, length = HEADER.unpack_from(self._buffer)
        if frame_type not in _TYPES:
            raise ProtocolError(f"unknown frame type {frame_type}")
        if length > self._max_payload:
            raise ProtocolError(f"frame of {length} bytes exceeds the {self._max_payload}-byte "
                                "limit")
