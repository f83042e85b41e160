"""Named stand-ins for a TPM: :class:`FakeIssuer` and :class:`FakeValidator`.

For tests and benchmarks of the protocol without a TPM. They prove nothing: the
"evidence" is an HMAC under a key both sides share, labelled as such on the wire
(:data:`FAKE_FORMAT`), so it can never pass for a quote. They fail with the same
named checks a quote would (``signature``, ``qualifying_data``, ``policy``).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
from typing import Final

from attestation.errors import EvidenceFormatError, VerificationError
from attestation.report import CheckResult, VerificationReport
from trusted_passages.envelope import Envelope, check_node_name, decode_envelope
from trusted_passages.interfaces import (
    BindingContext,
    PeerEvidence,
    binding_digest,
    require_context,
)

__all__ = ["FAKE_FORMAT", "FakeIssuer", "FakeValidator"]

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
        ctx = require_context(self.context, "FakeIssuer")
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
        report = VerificationReport((CheckResult("fake", "passed", "fake evidence accepted"),))
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
