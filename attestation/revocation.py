"""The verifier's signed revocation decisions, and verifying them (docs/runtime.md).

One definition for every receiver: sim nodes (``testbed/roles/revocation.py`` adds
persistence) and the guest agent inside a VM (``testbed/qemu/guest/agent.py``, which
runs under Debian's python3 and cannot import ``testbed``). A decision is canonical
JSON signed with the verifier's Ed25519 key: a :class:`RevocationEvent` when a node
failed its attestation, a :class:`Reinstate` when the operator decided to trust it
again, both with one increasing ``sequence``.

:class:`DecisionLedger` verifies a decision with the verifier's public key (pinned at the
first decision it accepts), ignores one whose sequence is not above the last applied
(a replay, or a stale decision), and keeps the set of revoked nodes. The module imports
only the standard library; ``cryptography`` is loaded at the first signature check, so
the guest agent's core stays standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from attestation.encoding import b64decode, b64encode, require_int
from attestation.errors import EvidenceFormatError, VerificationError

__all__ = [
    "ACTIONS",
    "MAX_DECISION",
    "MAX_KEY_PEM",
    "Decision",
    "DecisionLedger",
    "Reinstate",
    "RevocationEvent",
    "decision_args",
    "decode_decision",
    "encode_decision",
]

FORMAT = "testbed-revocation"
MAX_DECISION = 4096  # bytes of one signed decision
MAX_KEY_PEM = 4096  # bytes of the verifier's public key (PEM)
MAX_TEXT = 1024
ACTIONS = ("revoked", "reinstated")  # the role actions an agent routes to its ledger
Kind = Literal["revoked", "reinstated"]


@dataclass(frozen=True)
class RevocationEvent:
    """``node`` failed ``check`` (why: ``reason``) at ``time``: its peers stop trusting it."""

    kind: ClassVar[Kind] = "revoked"
    node: str
    check: str
    reason: str
    time: str
    sequence: int


@dataclass(frozen=True)
class Reinstate:
    """An explicit policy decision: ``node`` is trusted again (it must still attest)."""

    kind: ClassVar[Kind] = "reinstated"
    node: str
    reason: str
    time: str
    sequence: int


Decision = RevocationEvent | Reinstate


def encode_decision(decision: Decision) -> bytes:
    """The canonical bytes that are signed: sorted-key compact JSON."""
    body = {"format": FORMAT, "version": 1, "kind": decision.kind, **asdict(decision)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode_decision(data: bytes) -> Decision:
    """Parse signed bytes back; EvidenceFormatError for anything not exactly a decision."""
    if len(data) > MAX_DECISION:
        raise EvidenceFormatError(f"a revocation decision is at most {MAX_DECISION} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise EvidenceFormatError("a revocation decision is JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != 1:
        raise EvidenceFormatError(f"not a {FORMAT} version 1 document")
    kind = doc.get("kind")
    cls: type[Decision] = RevocationEvent if kind == "revoked" else Reinstate
    fields = {f.name for f in dataclasses.fields(cls)}
    if kind not in ACTIONS or set(doc) != fields | {"format", "version", "kind"}:
        raise EvidenceFormatError(f"a {FORMAT} document has exactly the fields of its kind "
                                  "(revoked: node check reason time sequence; reinstated: "
                                  "node reason time sequence)")
    for name in fields - {"sequence"}:
        if not isinstance(doc[name], str) or len(doc[name]) > MAX_TEXT:
            raise EvidenceFormatError(f"{name}: a text of at most {MAX_TEXT} characters")
    sequence = require_int(doc["sequence"], "sequence", EvidenceFormatError, minimum=1)
    values = {name: doc[name] for name in fields - {"sequence"}}
    decision = cls(sequence=sequence, **values)
    if encode_decision(decision) != data:
        raise EvidenceFormatError("a revocation decision is in canonical form")
    return decision


def decision_args(decision: Decision, signature: bytes) -> dict[str, Any]:
    """The role-action args that carry a signed decision."""
    return {"decision": b64encode(encode_decision(decision)), "signature": b64encode(signature)}


def verify_signature(public_key_pem: str, data: bytes, signature: bytes) -> None:
    """VerificationError (check ``revocation``) unless the verifier's Ed25519 key signed."""
    # lazy: cryptography is loaded at the first decision, so that the guest agent's core
    # (which imports this module) runs with the standard library alone.
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(public_key_pem.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise VerificationError("revocation", "the verifier key is not a PEM public "
                                "key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise VerificationError("revocation", "the verifier key is not Ed25519")
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise VerificationError("revocation", "the decision is not signed by the "
                                "cluster's verifier key") from None


class DecisionLedger:
    """A receiver's view of the verifier's decisions: verified, in order, applied.

    ``verifier_key`` gives the verifier's public key (PEM) the first time one is needed;
    the key that verified the first accepted decision is pinned from then on. Subclasses
    persist in :meth:`_record` (called under the lock after every applied decision).
    """

    def __init__(self, verifier_key: Callable[[], str], *, pinned: str | None = None,
                 sequence: int = 0, revoked: Mapping[str, dict[str, Any]] | None = None
                 ) -> None:
        self._key_source = verifier_key
        self._pinned = pinned
        self.sequence = sequence
        self.revoked: dict[str, dict[str, Any]] = dict(revoked or {})
        self._lock = threading.Lock()

    @property
    def pinned_key(self) -> str | None:
        return self._pinned

    def is_revoked(self, node: str | None) -> bool:
        return node is not None and node in self.revoked

    def receive(self, action: str, args: Mapping[str, Any]) -> Decision | None:
        """The decision in ``args`` once verified and applied; None for a replay or a
        stale decision (its sequence is not above the last one applied)."""
        decision, applied = self.receive_verified(action, args)
        return decision if applied else None

    def receive_verified(self, action: str, args: Mapping[str, Any]
                         ) -> tuple[Decision, bool]:
        """The verified decision in ``args``, and whether it was applied (False: its
        sequence is not above the last one applied). Raises for anything not signed by
        the verifier's key, malformed, or sent under the other action."""
        if not isinstance(args, Mapping) or set(args) != {"decision", "signature"}:
            raise EvidenceFormatError(f"{action} takes args {{decision: base64, "
                                      "signature: base64}")
        data = b64decode(args["decision"], "decision", limit=MAX_DECISION)
        signature = b64decode(args["signature"], "signature", limit=64)
        with self._lock:
            pem = self._pinned or self._key_source()[:MAX_KEY_PEM]
            verify_signature(pem, data, signature)
            self._pinned = pem
            decision = decode_decision(data)
            if decision.kind != action:
                raise VerificationError("revocation", f"a {decision.kind} decision sent as "
                                        f"{action!r}")
            if decision.sequence <= self.sequence:
                return decision, False
            self._apply(decision)
            self._record()
        return decision, True

    def _apply(self, decision: Decision) -> None:
        self.sequence = decision.sequence
        if isinstance(decision, RevocationEvent):
            self.revoked[decision.node] = asdict(decision)
        else:
            self.revoked.pop(decision.node, None)

    def _record(self) -> None:
        """Persist the ledger (nothing here: a VM's ledger lives as long as its boot)."""
