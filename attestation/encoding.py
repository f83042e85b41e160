"""The values of the project's documents (evidence JSON, agent frames, policies, cluster
specs, image recipes), decoded strictly and in one place: base64 (one encoder, one strict
decoder) and integers (:func:`require_int`).

Standard library only: the guest image runs this with Debian's python3.
"""

from __future__ import annotations

import base64
import binascii

from attestation.errors import EvidenceFormatError, TestbedError

__all__ = ["b64decode", "b64encode", "describe_value", "require_int"]


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
    if base64.b64encode(data).decode("ascii") != value:
        # The last character's unused bits are ignored by decoders: one value, many
        # spellings. Only the canonical one is accepted, so a document is not malleable.
        raise EvidenceFormatError(f"{what} is not canonical base64 (unused bits set)")
    return data


def require_int(value: object, field: str, error: type[TestbedError], *,
                exactly: int | None = None, minimum: int | None = None,
                maximum: int | None = None, noun: str = "") -> int:
    """``value`` if it is an integer (within bounds), else ``error`` naming ``field``.

    JSON and YAML both have booleans and floats, and Python lets ``True == 1`` and
    ``1.0 == 1``: neither is an integer here, nor is the string ``"1"``. The message
    names the field (and ``noun``, what the integer is) and what was given:
    "version: must be the integer 1, got a string '1'";
    "pcrs.24: PCR index must be an integer 0..23, got the integer 24".
    """
    if exactly is not None:
        wanted = f"the integer {exactly}"
        minimum = maximum = exactly
    elif minimum is not None and maximum is not None:
        wanted = f"an integer {minimum}..{maximum}"
    elif minimum is not None:
        wanted = f"an integer >= {minimum}"
    else:
        wanted = "an integer"
    ok = type(value) is int and (minimum is None or value >= minimum) and (
        maximum is None or value <= maximum)
    if not ok:
        subject = f"{noun} must" if noun else "must"
        raise error(f"{field}: {subject} be {wanted}, got {describe_value(value)}")
    assert isinstance(value, int)
    return value


def describe_value(value: object) -> str:
    """What a document value is, for messages: "a string '1'", "a boolean true"."""
    if isinstance(value, bool):
        return f"a boolean {str(value).lower()}"
    if value is None:
        return "nothing (null)"
    if isinstance(value, int):
        return f"the integer {value}" if abs(value) < 10**30 else "a huge integer"
    if isinstance(value, float):
        return f"a float {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:39] + "…"
        return f"a string {shown!r}"
    names: dict[type, str] = {dict: "a mapping", list: "a list", bytes: "bytes"}
    return names.get(type(value), f"a {type(value).__name__}")
