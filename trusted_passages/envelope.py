"""The evidence envelope: one side's attestation, bound to its role, profile and TLS key.

Version 1 is a UTF-8 JSON object (docs/protocol.md)::

    {"v": 1, "node": "server-1", "role": "server", "profile": "tp13",
     "user_data": "<64 hex: SHA-256 of the issuer's TLS SubjectPublicKeyInfo>",
     "evidence": {...}}

``evidence`` is an :class:`attestation.evidence.Evidence` dict for TPM
issuers (another object for the test fakes). A batched quote adds one key,
``"batch": {"index": i, "size": n, "path": ["<64 hex>", ...]}``: where this
session's binding sits in the Merkle tree whose root the quote covers
(:mod:`trusted_passages.batch`). Decoding is strict and bounded:
anything unexpected is an :class:`EvidenceFormatError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from attestation.errors import EvidenceFormatError
from trusted_passages.batch import BatchProof

Role = Literal["server", "client"]
Profile = Literal["tp13", "classic"]
ROLES: Final = ("server", "client")
PROFILES: Final = ("tp13", "classic")

ENVELOPE_VERSION: Final = 1
MAX_ENVELOPE_BYTES: Final = 1 << 20  # one frame; firmware event logs are tens of KiB
DIGEST_BYTES: Final = 32
_KEYS: Final = frozenset({"v", "node", "role", "profile", "user_data", "evidence"})
_OPTIONAL_KEYS: Final = frozenset({"batch"})
# Node names double as certificate CN / DNS SAN, so keep them DNS-label-like.
_NODE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def check_node_name(node: str) -> str:
    if not _NODE_NAME.fullmatch(node):
        raise EvidenceFormatError(f"node name {node[:40]!r} is not 1-253 characters of "
                                  "letters, digits, '.', '_' and '-'")
    return node


@dataclass(frozen=True)
class Envelope:
    """A decoded envelope; ``evidence`` is still the issuer-specific JSON object."""

    node: str
    role: Role
    profile: Profile
    user_data: bytes
    evidence: dict[str, Any]
    batch: BatchProof | None = None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "v": ENVELOPE_VERSION, "node": self.node, "role": self.role,
            "profile": self.profile, "user_data": self.user_data.hex(),
            "evidence": self.evidence,
        }
        if self.batch is not None:
            doc["batch"] = self.batch.to_dict()
        data = json.dumps(doc, separators=(",", ":")).encode()
        if len(data) > MAX_ENVELOPE_BYTES:
            raise EvidenceFormatError(f"envelope of {len(data)} bytes exceeds "
                                      f"{MAX_ENVELOPE_BYTES} (event log too large?)")
        return data


def decode_envelope(data: bytes) -> Envelope:
    """Strictly decode an envelope; never raises anything but EvidenceFormatError."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EvidenceFormatError(f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise EvidenceFormatError(f"envelope is not JSON: {str(exc)[:80]}") from None
    if not isinstance(doc, dict) or not _KEYS <= set(doc) <= _KEYS | _OPTIONAL_KEYS:
        keys = sorted(doc)[:8] if isinstance(doc, dict) else type(doc).__name__
        raise EvidenceFormatError(f"envelope must be an object with keys {sorted(_KEYS)}, "
                                  f"got {keys}")
    if type(doc["v"]) is not int or doc["v"] != ENVELOPE_VERSION:
        raise EvidenceFormatError(f"envelope version {str(doc['v'])[:20]!r} is not "
                                  f"{ENVELOPE_VERSION}")
    return Envelope(
        node=check_node_name(_string(doc["node"], "node")),
        role=cast(Role, _choice(doc["role"], "role", ROLES)),
        profile=cast(Profile, _choice(doc["profile"], "profile", PROFILES)),
        user_data=_digest(doc["user_data"], "user_data"),
        evidence=_object(doc["evidence"], "evidence"),
        batch=BatchProof.from_dict(doc["batch"]) if "batch" in doc else None,
    )


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise EvidenceFormatError(f"envelope {name} must be a string")
    return value


def _choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise EvidenceFormatError(f"envelope {name} {str(value)[:20]!r} is not one of "
                                  f"{list(choices)}")
    return str(value)


def _digest(value: object, name: str) -> bytes:
    text = _string(value, name)
    if len(text) != 2 * DIGEST_BYTES:
        raise EvidenceFormatError(f"envelope {name} must be {2 * DIGEST_BYTES} hex characters")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise EvidenceFormatError(f"envelope {name} is not hexadecimal") from None


def _object(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EvidenceFormatError(f"envelope {name} must be an object")
    return value
