"""Base64 as the project's JSON documents carry bytes: one encoder, one strict decoder.

Standard library only: the guest image runs this with Debian's python3.
"""

from __future__ import annotations

import base64
import binascii

from attestation.errors import EvidenceFormatError

__all__ = ["b64decode", "b64encode"]


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(value: object, what: str, *, limit: int | None = None) -> bytes:
    """Strict base64 (no stray characters) of at most ``limit`` decoded bytes.

    Raises :class:`EvidenceFormatError` naming ``what``; the length is checked before
    decoding, so an oversized string costs nothing.
    """
    if not isinstance(value, str):
        raise EvidenceFormatError(f"{what} must be a base64 string")
    if limit is not None and len(value) > 4 * (limit // 3 + 1):
        raise EvidenceFormatError(f"{what} is longer than {limit} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceFormatError(f"{what} is not valid base64") from None
    if limit is not None and len(data) > limit:
        raise EvidenceFormatError(f"{what} is {len(data)} bytes; at most {limit} are allowed")
    return data
