"""Issuers and validators of session-bound evidence: the two interfaces the core calls.

Like Constellation's aTLS (``atls.go``), this module holds only what the sans-IO
core needs to know about attestation: the :class:`Issuer` and :class:`Validator`
protocols and the plain values they exchange. Implementations live elsewhere
(:mod:`trusted_passages.tpm`, :mod:`trusted_passages.fakes`), so the core never
loads a verifier, a registrar or a policy.

An :class:`Issuer` turns (user_data, nonce) into serialized evidence; a
:class:`Validator` checks such evidence against the nonce it expects and says
who the peer is. The binding both sides compute is :func:`binding_digest`::

    SHA-256("trusted-passages/v1\\0" || profile || "\\0" || role || "\\0" || nonce || user_data)

``role`` is the *issuer's* role, so one side's evidence cannot be reflected back
as the other's; ``nonce`` is the session binding value (docs/protocol.md) and
``user_data`` the SHA-256 of the issuer's TLS SubjectPublicKeyInfo
(:func:`spki_digest`). The result is 32 bytes, the quote's qualifying data
(TPM2B_DATA holds up to 64).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestation.evidence import Evidence
from attestation.report import VerificationReport
from trusted_passages.envelope import DIGEST_BYTES, Profile, Role
from trusted_passages.errors import ProtocolError

__all__ = [
    "BINDING_DOMAIN",
    "BatchableIssuer",
    "BindableIssuer",
    "BindingContext",
    "Issuer",
    "PeerEvidence",
    "Validator",
    "binding_digest",
    "require_context",
    "spki_digest",
]

BINDING_DOMAIN: Final = b"trusted-passages/v1\x00"


def binding_digest(profile: Profile, role: Role, nonce: bytes, user_data: bytes) -> bytes:
    """The qualifying data a quote must carry for this profile, issuer role, nonce and key."""
    # Fixed-size nonce and user_data keep the concatenation unambiguous.
    if len(nonce) != DIGEST_BYTES or len(user_data) != DIGEST_BYTES:
        raise ValueError("nonce and user_data must be 32 bytes each")
    return hashlib.sha256(BINDING_DOMAIN + profile.encode() + b"\x00" + role.encode() + b"\x00"
                          + nonce + user_data).digest()


def spki_digest(certificate: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo (DER): the user_data of its owner."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


@dataclass(frozen=True)
class BindingContext:
    """What an issuer binds besides the nonce: the session's profile and its own role."""

    profile: Profile
    role: Role


@dataclass(frozen=True)
class PeerEvidence:
    """A peer whose evidence passed validation.

    ``node`` comes from the AK registry when the validator has one
    (``node_verified``), else it is the peer's own claim, vouched for only by
    whatever AK trust the validator was given.
    """

    node: str
    role: Role
    profile: Profile
    user_data: bytes = field(repr=False)
    report: VerificationReport = field(repr=False)
    evidence: Evidence | None = field(default=None, repr=False)
    policy_name: str | None = None
    node_verified: bool = False


class Issuer(Protocol):
    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        """Serialized evidence binding ``user_data`` and ``nonce``."""
        ...


@runtime_checkable
class BindableIssuer(Issuer, Protocol):
    """An issuer configured once per node and bound per connection to a role and profile."""

    def bound(self, context: BindingContext) -> Issuer: ...


@runtime_checkable
class BatchableIssuer(Issuer, Protocol):
    """An issuer whose sessions can share one quote per window (docs/protocol.md)."""

    def batched(self, window: float) -> Issuer: ...


class Validator(Protocol):
    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        """Check ``evidence`` against ``nonce``; raise VerificationError naming the check
        (EvidenceFormatError for malformed input)."""
        ...


def require_context(context: BindingContext | None, what: str) -> BindingContext:
    """The context a bindable issuer was bound to; misuse if it never was."""
    if context is None:
        raise ProtocolError(f"{what} is not bound to a role and profile: use .bound(context) "
                            "(TrustedPassagesConnection does this)")
    return context
