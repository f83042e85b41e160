"""The attestation agent's wire format, shared by every agent and its one client.

An agent (a sim node's, over a unix socket; a VM's guest agent, over TCP) answers the
registrar's and the verifier's requests. Frame: a big-endian u32 length, then that many
bytes of UTF-8 JSON (one object), at most :data:`MAX_FRAME` bytes. Each request gets
exactly one response frame on the same connection; errors are ``{"error": "..."}``.

The requests every agent serves::

    {"op": "identity"}  -> {"node", "role", "ek_algorithm", "ek_certificate": b64 DER,
                            "ek_public": b64 TPMT_PUBLIC, "ak_public": b64 TPMT_PUBLIC}
    {"op": "activate", "credential_blob": b64, "encrypted_secret": b64} -> {"secret": b64}
    {"op": "quote", "nonce": hex, "pcrs": [0, 1, ...]}
                        -> an Evidence (attestation/evidence.py to_dict()), with the event log
    {"op": "status"}    -> what the agent says about itself
    {"op": "shutdown"}  -> {"stopping": true}

Standard library only: the guest agent runs this with Debian's python3.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any

from attestation.encoding import b64decode, b64encode, require_int
from attestation.errors import EvidenceFormatError

__all__ = [
    "MAX_CREDENTIAL_BYTES",
    "MAX_FRAME",
    "MAX_NONCE_BYTES",
    "FrameError",
    "activate_request",
    "decode_message",
    "parse_activate_request",
    "parse_quote_request",
    "quote_request",
    "recv_frame",
    "refuse_request",
    "send_frame",
]

MAX_FRAME = 4 << 20
"""A quote with a real OVMF event log is tens of KiB; 4 MiB bounds any frame."""
MAX_NONCE_BYTES = 64  # TPM2_Quote's qualifyingData limit
MAX_CREDENTIAL_BYTES = 4096  # an ID object / encrypted seed is a few hundred bytes
MAX_PCR = 23
_HEADER = struct.Struct(">I")


class FrameError(EvidenceFormatError):
    """A frame is oversized, truncated or not a JSON object."""


def send_frame(sock: socket.socket, message: Mapping[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    sock.sendall(_HEADER.pack(len(body)) + body)


def refuse_request(sock: socket.socket, reason: str,
                   send: Callable[[socket.socket, Mapping[str, Any]], None] = send_frame
                   ) -> None:
    """A request that cannot be served (e.g. a stream op whose arguments are wrong): one
    ``{"error": reason}`` frame (``send``: how this agent sends one), if the peer still
    reads, then the connection closed."""
    with contextlib.suppress(OSError):
        send(sock, {"error": reason})
    sock.close()


def recv_frame(sock: socket.socket) -> bytes | None:
    """The next frame's body; None on a clean end of stream before a header."""
    header = _recv_exactly(sock, _HEADER.size, allow_eof=True)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    body = _recv_exactly(sock, length, allow_eof=False)
    assert body is not None
    return body


def _recv_exactly(sock: socket.socket, size: int, *, allow_eof: bool) -> bytes | None:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = sock.recv(min(size - got, 65536))
        if not chunk:
            if allow_eof and got == 0:
                return None
            raise FrameError(f"connection closed after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def decode_message(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"frame is not JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise FrameError("frame must hold a JSON object")
    return message


# --- the requests that carry values ------------------------------------------------------


def quote_request(nonce: bytes, pcrs: tuple[int, ...] | list[int]) -> dict[str, Any]:
    return {"op": "quote", "nonce": nonce.hex(), "pcrs": list(pcrs)}


def parse_quote_request(request: Mapping[str, Any]) -> tuple[bytes, list[int]]:
    """(nonce, sorted PCR indices), or EvidenceFormatError naming the field."""
    value = request.get("nonce")
    if not isinstance(value, str) or len(value) > 2 * MAX_NONCE_BYTES:
        raise EvidenceFormatError(f"nonce: expected at most {MAX_NONCE_BYTES} bytes as hex")
    try:
        nonce = bytes.fromhex(value)
    except ValueError:
        raise EvidenceFormatError("nonce: not hexadecimal") from None
    if not nonce:
        raise EvidenceFormatError("nonce: empty (a quote needs fresh qualifying data)")
    pcrs = request.get("pcrs")
    if not isinstance(pcrs, list) or not pcrs or len(pcrs) > MAX_PCR + 1:
        raise EvidenceFormatError(f"pcrs: expected a non-empty list of PCR indices "
                                  f"0..{MAX_PCR}")
    for index, pcr in enumerate(pcrs):
        require_int(pcr, f"pcrs[{index}]", EvidenceFormatError, minimum=0, maximum=MAX_PCR,
                    noun="PCR index")
    if len(set(pcrs)) != len(pcrs):
        raise EvidenceFormatError("pcrs: PCR indices must not repeat")
    return nonce, sorted(pcrs)


def activate_request(credential_blob: bytes, encrypted_secret: bytes) -> dict[str, Any]:
    return {"op": "activate", "credential_blob": b64encode(credential_blob),
            "encrypted_secret": b64encode(encrypted_secret)}


def parse_activate_request(request: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(credential blob, encrypted secret), each bounded."""
    return (b64decode(request.get("credential_blob"), "credential_blob",
                      limit=MAX_CREDENTIAL_BYTES),
            b64decode(request.get("encrypted_secret"), "encrypted_secret",
                      limit=MAX_CREDENTIAL_BYTES))
