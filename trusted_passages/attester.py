"""Issuers and validators of session-bound evidence (Constellation aTLS style).

An :class:`Issuer` turns (user_data, nonce) into serialized evidence; a
:class:`Validator` checks such evidence against the nonce it expects and says
who the peer is. The binding both sides compute is :func:`binding_digest`::

    SHA-256("trusted-passages/v1\\0" || profile || "\\0" || role || "\\0" || nonce || user_data)

``role`` is the *issuer's* role, so one side's evidence cannot be reflected back
as the other's; ``nonce`` is the session binding value (docs/protocol.md) and
``user_data`` the SHA-256 of the issuer's TLS SubjectPublicKeyInfo. The result is
32 bytes, the quote's qualifying data (TPM2B_DATA holds up to 64).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestation.errors import EvidenceFormatError, VerificationError
from attestation.evidence import Evidence
from attestation.policy import ReferencePolicy
from attestation.registrar import AkTrust
from attestation.report import CheckResult, VerificationReport
from attestation.tpm_types import PcrSelection, PublicArea, parse_public
from attestation.verifier import ClockHistory, QuoteVerifier
from trusted_passages.envelope import (
    DIGEST_BYTES,
    Envelope,
    Profile,
    Role,
    check_node_name,
    decode_envelope,
)
from trusted_passages.errors import ProtocolError

if TYPE_CHECKING:  # tpm2-pytss is not in Debian 12 guests, which use the rest of the package
    from attestation.tpm import KeyAlgorithm, QuoteResult, TpmClient, TpmKey

__all__ = [
    "BindableIssuer",
    "BindingContext",
    "FakeIssuer",
    "FakeValidator",
    "Issuer",
    "PeerEvidence",
    "TpmIssuer",
    "TpmValidator",
    "Validator",
    "binding_digest",
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


class Validator(Protocol):
    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        """Check ``evidence`` against ``nonce``; raise VerificationError naming the check
        (EvidenceFormatError for malformed input)."""
        ...


def _require_context(context: BindingContext | None, what: str) -> BindingContext:
    if context is None:
        raise ProtocolError(f"{what} is not bound to a role and profile: use .bound(context) "
                            "(TrustedPassagesConnection does this)")
    return context


# --- TPM ---------------------------------------------------------------------------------


class _TpmAccess:
    """One TpmClient shared by every bound copy of a TpmIssuer, serialized by one lock.

    swtpm serves a single command stream and TpmClient is not thread-safe, while
    a server issues evidence from many connection threads at once.
    """

    def __init__(self, client: TpmClient, algorithm: KeyAlgorithm) -> None:
        self.client = client
        self.algorithm = algorithm
        self.lock = threading.Lock()
        self._ak: TpmKey | None = None

    def quote(self, selection: PcrSelection, qualifying_data: bytes,
              event_log: Callable[[], bytes | None]) -> tuple[QuoteResult, bytes, bytes | None]:
        with self.lock:
            if self._ak is None:
                self._ak = self.client.attestation_key(self.algorithm)
            result = self.client.quote(self._ak, selection, qualifying_data)
            # Read the log under the same lock, so a measurer extending PCRs under
            # TpmIssuer.tpm_lock can never land between the quote and its log.
            return result, self._ak.public, event_log()

    def close(self) -> None:
        with self.lock:
            if self._ak is not None:
                self.client.flush(self._ak)  # persistent AK: only the ESYS handle is closed
                self._ak = None


class TpmIssuer:
    """Quotes the node's PCRs with its AK, binding the session (see binding_digest).

    ``event_log`` is the node's event log: bytes, or a callable read at every
    quote (runtime events appended after boot), or None. The AK is the TPM's
    persistent one (created on first use); nothing persistent is ever flushed.
    """

    def __init__(self, client: TpmClient, node: str, selection: PcrSelection,
                 event_log: Callable[[], bytes | None] | bytes | None = None,
                 ak_algorithm: KeyAlgorithm = "ecc", *,
                 context: BindingContext | None = None) -> None:
        self.node = check_node_name(node)
        self.selection = selection
        self.context = context
        self._event_log = event_log if callable(event_log) else (lambda: event_log)
        self._tpm = _TpmAccess(client, ak_algorithm)

    @property
    def tpm_lock(self) -> threading.Lock:
        """Hold this while extending PCRs and appending to the event log at runtime."""
        return self._tpm.lock

    def bound(self, context: BindingContext) -> TpmIssuer:
        twin = copy.copy(self)  # shares the TPM access and its lock
        twin.context = context
        return twin

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        ctx = _require_context(self.context, "TpmIssuer")
        qualifying = binding_digest(ctx.profile, ctx.role, nonce, user_data)
        quote, ak_public, log = self._tpm.quote(self.selection, qualifying, self._event_log)
        evidence = Evidence(attest=quote.attest, signature=quote.signature, ak_public=ak_public,
                            pcr_bank=self.selection.bank, pcrs=quote.pcrs, event_log=log)
        return Envelope(self.node, ctx.role, ctx.profile, user_data,
                        evidence.to_dict()).to_json()

    def close(self) -> None:
        """Release the AK's ESYS handle (the TpmClient stays the caller's)."""
        self._tpm.close()


@runtime_checkable
class _NodeDirectory(Protocol):
    """AK trust that also knows which node an AK belongs to (AkRegistry)."""

    def node_of(self, ak: PublicArea) -> str | None: ...


class TpmValidator:
    """Validates a TpmIssuer envelope: QuoteVerifier against the recomputed binding."""

    def __init__(self, ak_trust: AkTrust, policy: ReferencePolicy | None = None,
                 clock_history: ClockHistory | None = None) -> None:
        self._ak_trust = ak_trust
        self._policy = policy
        self._verifier = QuoteVerifier(ak_trust=ak_trust, policy=policy,
                                       clock_history=clock_history)

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        envelope = decode_envelope(evidence)
        bundle = Evidence.from_dict(envelope.evidence)
        expected = binding_digest(envelope.profile, envelope.role, nonce, envelope.user_data)
        report = self._verifier.verify(bundle, expected)
        report.raise_for_failure()
        node, verified = self._node(envelope, bundle)
        return PeerEvidence(node=node, role=envelope.role, profile=envelope.profile,
                            user_data=envelope.user_data, report=report, evidence=bundle,
                            policy_name=None if self._policy is None else self._policy.name,
                            node_verified=verified)

    def _node(self, envelope: Envelope, bundle: Evidence) -> tuple[str, bool]:
        if not isinstance(self._ak_trust, _NodeDirectory):
            return envelope.node, False
        registered = self._ak_trust.node_of(parse_public(bundle.ak_public))
        if registered is None:
            return envelope.node, False
        if registered != envelope.node:
            raise VerificationError("ak_trust", f"the evidence claims node {envelope.node!r} "
                                    f"but its AK is registered to {registered!r}")
        return registered, True


# --- fakes for protocol tests ----------------------------------------------------------


FAKE_FORMAT: Final = "fake-evidence (HMAC, NOT an attestation)"


class FakeIssuer:
    """A stand-in issuer for tests of the protocol without a TPM. Proves nothing.

    "Evidence" is an HMAC with a key shared with :class:`FakeValidator` over the
    node, its claimed ``state`` and the binding digest. A state the validator
    does not accept plays the part of a tampered boot (check ``policy``).
    """

    def __init__(self, key: bytes, node: str, *, state: str = "good",
                 context: BindingContext | None = None) -> None:
        self._key = key
        self.node = check_node_name(node)
        self.state = state
        self.context = context
        self.issued: list[tuple[BindingContext, bytes]] = []  # shared with bound copies

    def __repr__(self) -> str:
        return f"FakeIssuer(node={self.node!r}, state={self.state!r}, context={self.context})"

    def bound(self, context: BindingContext) -> FakeIssuer:
        twin = copy.copy(self)
        twin.context = context
        return twin

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        ctx = _require_context(self.context, "FakeIssuer")
        qualifying = binding_digest(ctx.profile, ctx.role, nonce, user_data)
        self.issued.append((ctx, nonce))
        fake = {"format": FAKE_FORMAT, "state": self.state, "qualifying_data": qualifying.hex(),
                "mac": _fake_mac(self._key, self.node, self.state, qualifying).hex()}
        return Envelope(self.node, ctx.role, ctx.profile, user_data, fake).to_json()


class FakeValidator:
    """Checks FakeIssuer evidence with the same named checks a quote would fail."""

    def __init__(self, key: bytes, *, accepted_states: frozenset[str] = frozenset({"good"})
                 ) -> None:
        self._key = key
        self.accepted_states = accepted_states
        self.validated: list[bytes] = []  # nonces seen, for tests

    def __repr__(self) -> str:
        return f"FakeValidator(accepted_states={sorted(self.accepted_states)})"

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        self.validated.append(nonce)
        envelope = decode_envelope(evidence)
        state, qualifying, mac = _decode_fake(envelope.evidence)
        if not hmac.compare_digest(mac, _fake_mac(self._key, envelope.node, state, qualifying)):
            raise VerificationError("signature", "fake evidence MAC does not verify")
        expected = binding_digest(envelope.profile, envelope.role, nonce, envelope.user_data)
        if not hmac.compare_digest(qualifying, expected):
            raise VerificationError("qualifying_data", "bound to another session, role or key")
        if state not in self.accepted_states:
            raise VerificationError("policy", f"fake state {state!r} is not accepted")
        report = VerificationReport((CheckResult("fake", True, "fake evidence accepted"),))
        return PeerEvidence(node=envelope.node, role=envelope.role, profile=envelope.profile,
                            user_data=envelope.user_data, report=report,
                            policy_name="fake", node_verified=False)


def _fake_mac(key: bytes, node: str, state: str, qualifying: bytes) -> bytes:
    message = b"\x00".join((FAKE_FORMAT.encode(), node.encode(), state.encode(), qualifying))
    return hmac.new(key, message, hashlib.sha256).digest()


def _decode_fake(doc: dict[str, object]) -> tuple[str, bytes, bytes]:
    if set(doc) != {"format", "state", "qualifying_data", "mac"} or doc["format"] != FAKE_FORMAT:
        raise EvidenceFormatError("not fake evidence")
    state, qualifying, mac = doc["state"], doc["qualifying_data"], doc["mac"]
    if not (isinstance(state, str) and isinstance(qualifying, str) and isinstance(mac, str)):
        raise EvidenceFormatError("fake evidence fields must be strings")
    try:
        return state, bytes.fromhex(qualifying), bytes.fromhex(mac)
    except ValueError:
        raise EvidenceFormatError("fake evidence is not hexadecimal") from None

