"""A bounded scanner of plaintext TLS 1.2 handshake messages, for the classic profile.

The classic profile binds values that only exist on the wire: the ClientHello
random and the EncryptedPreMasterSecret of an RSA ClientKeyExchange. The core sees
every TLS byte through the memory BIOs, so this follows one direction of the
stream, reassembles handshake messages (split across records, records split
across reads) and keeps the bodies of the wanted types. It stops at
ChangeCipherSpec: everything after it is encrypted. Framing only, not TLS:
OpenSSL parses the same bytes and does the cryptography.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

from trusted_passages.errors import ProtocolError

MAX_RECORD: Final = (1 << 14) + 2048  # TLSCiphertext limit (RFC 5246, 6.2.3)
MAX_WANTED_MESSAGE: Final = 1 << 16  # a ClientHello fits; an RSA-16384 EPMS is 2 KiB
RANDOM_BYTES: Final = 32


class ContentType(IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class HandshakeType(IntEnum):
    CLIENT_HELLO = 1
    CLIENT_KEY_EXCHANGE = 16


class HandshakeScanner:
    """Feed one direction's raw TLS bytes; read ``messages`` (type -> first body).

    Memory: a 5-byte record header, a 4-byte message header and at most one
    wanted message body; unwanted messages are skipped without buffering.
    """

    def __init__(self, wanted: frozenset[int]) -> None:
        self.wanted = wanted
        self.messages: dict[int, bytes] = {}
        self.done = False  # ChangeCipherSpec seen: nothing more is plaintext
        self._record_header = bytearray()
        self._record_left = 0
        self._record_type = 0
        self._msg_header = bytearray()
        self._msg_left = 0
        self._msg_type = 0
        self._msg_body: bytearray | None = None

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.done:
            if self._record_left == 0:
                view = self._take_record_header(view)
                continue
            take = min(self._record_left, len(view))
            self._record_left -= take
            if self._record_type == ContentType.HANDSHAKE:
                self._handshake_bytes(view[:take])
            view = view[take:]

    def _take_record_header(self, view: memoryview) -> memoryview:
        need = 5 - len(self._record_header)
        self._record_header += view[:need]
        if len(self._record_header) < 5:
            return view[need:]
        content_type, major, _minor, length = struct.unpack(">BBBH", self._record_header)
        self._record_header.clear()
        if major != 3 or length > MAX_RECORD:
            raise ProtocolError(f"not a TLS record (version {major}, length {length})")
        if content_type == ContentType.CHANGE_CIPHER_SPEC:
            self._finish()
        elif content_type not in (ContentType.HANDSHAKE, ContentType.ALERT):
            raise ProtocolError(f"TLS record type {content_type} before ChangeCipherSpec")
        self._record_type, self._record_left = content_type, length
        return view[need:]

    def _finish(self) -> None:
        if self._msg_header or self._msg_left:
            raise ProtocolError("ChangeCipherSpec in the middle of a handshake message")
        self.done = True

    def _handshake_bytes(self, view: memoryview) -> None:
        while view:
            if self._msg_left == 0 and self._msg_body is None:
                need = 4 - len(self._msg_header)
                self._msg_header += view[:need]
                view = view[need:]
                if len(self._msg_header) == 4:
                    self._start_message()
                continue
            take = min(self._msg_left, len(view))
            if self._msg_body is not None:
                self._msg_body += view[:take]
            self._msg_left -= take
            view = view[take:]
            if self._msg_left == 0:
                self._end_message()

    def _start_message(self) -> None:
        self._msg_type = self._msg_header[0]
        self._msg_left = int.from_bytes(self._msg_header[1:4])
        self._msg_header.clear()
        if self._msg_type in self.wanted and self._msg_type not in self.messages:
            if self._msg_left > MAX_WANTED_MESSAGE:
                raise ProtocolError(f"handshake message type {self._msg_type} of "
                                    f"{self._msg_left} bytes is too large")
            self._msg_body = bytearray()
        if self._msg_left == 0:
            self._end_message()

    def _end_message(self) -> None:
        if self._msg_body is not None:
            self.messages[self._msg_type] = bytes(self._msg_body)
        self._msg_body = None


def client_hello_random(body: bytes) -> bytes:
    """ClientHello.random: the 32 bytes after the 2-byte legacy version."""
    if len(body) < 2 + RANDOM_BYTES:
        raise ProtocolError("ClientHello too short for its random")
    return body[2 : 2 + RANDOM_BYTES]


def encrypted_premaster_secret(body: bytes) -> bytes:
    """The EncryptedPreMasterSecret of an RSA ClientKeyExchange (u16 length + bytes)."""
    if len(body) < 3 or int.from_bytes(body[:2]) != len(body) - 2:
        raise ProtocolError("ClientKeyExchange is not an RSA EncryptedPreMasterSecret")
    return body[2:]
