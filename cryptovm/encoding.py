"""Small shared encodings: canonical JSON and identifiers.

Base64 is the project's one codec, :mod:`attestation.encoding`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cryptovm.errors import BadRequest

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                              allow_nan=False)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, ASCII only.

    Used wherever bytes are hashed or authenticated (AAD, attestation attributes,
    audit entries), so both sides compute the same bytes from the same values.
    """
    return _CANONICAL.encode(value).encode()


def check_name(value: object, what: str) -> str:
    """Key ids, account and record names: 1-64 of [A-Za-z0-9_.-], not starting with . - _"""
    if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
        raise BadRequest(f"{what} {str(value)[:80]!r} is not 1-64 characters of "
                         "[A-Za-z0-9_.-] starting with a letter or digit")
    return value

