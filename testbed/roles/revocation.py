"""Signed revocation decisions and how a node receives them (docs/runtime.md).

The verifier signs each decision with its Ed25519 key (``clusters/C/verifier/``, the
private key 0600 in a 0700 directory): a :class:`RevocationEvent` when a node failed its
attestation, a :class:`Reinstate` when the operator decided to trust it again. Both carry
one increasing ``sequence``. A node's agent hands the signed bytes to its
:class:`RevocationGate`, which verifies the signature with the verifier's public key
(pinned at the first decision the node accepts, kept in the node's state), ignores a
decision whose sequence is not above the last one it applied (a replay), and keeps the
set of revoked nodes in ``state/revocations.json`` so a restarted node still refuses them.
Role services that act on it (Trusted Passages closes channels, the CryptoVM stops
serving) implement :class:`RevocationAware`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from attestation.encoding import b64decode, b64encode, require_int
from attestation.errors import EvidenceFormatError, VerificationError
from testbed.core.errors import StateError
from testbed.core.files import read_json, write_json
from testbed.core.paths import ClusterPaths

__all__ = [
    "ACTIONS",
    "MAX_DECISION",
    "Decision",
    "Reinstate",
    "RevocationAware",
    "RevocationEvent",
    "RevocationGate",
    "decision_args",
    "decode_decision",
    "encode_decision",
    "public_key_pem",
    "verifier_key_dir",
]

FORMAT = "testbed-revocation"
MAX_DECISION = 4096  # bytes of one signed decision
MAX_TEXT = 1024
ACTIONS = ("revoked", "reinstated")  # the role actions a node's agent routes to the gate
Kind = Literal["revoked", "reinstated"]
PUBLIC_KEY = "revocation-key.pub"


def verifier_key_dir(paths: ClusterPaths) -> Path:
    """Where the verifier's signing key (0600) and its public key (0644) live."""
    return paths.root / "verifier"


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


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@runtime_checkable
class RevocationAware(Protocol):
    """A role service that acts when a node is revoked or reinstated."""

    def revoked(self, event: RevocationEvent) -> dict[str, Any]: ...

    def reinstated(self, decision: Reinstate) -> dict[str, Any]: ...


class RevocationGate:
    """A node's view of the verifier's decisions: verified, in order, persisted."""

    def __init__(self, state_file: Path, verifier_key_file: Path) -> None:
        self._file = state_file
        self._key_file = verifier_key_file  # read once, at the first decision: then pinned
        self._lock = threading.Lock()
        doc = read_json(state_file) or {}
        damaged = StateError(f"{state_file} is damaged: remove it (the node then trusts the "
                             "verifier key it next sees)")
        try:
            self.sequence = require_int(doc.get("sequence", 0), "sequence", StateError)
            self._pinned: str | None = doc.get("verifier_key")
            self.revoked: dict[str, dict[str, Any]] = dict(doc.get("revoked", {}))
        except (AttributeError, TypeError, ValueError):
            raise damaged from None
        if not isinstance(self._pinned, str | None) or not all(
                isinstance(event, dict) and {"time", "sequence", "check"} <= set(event)
                for event in self.revoked.values()):
            raise damaged

    def is_revoked(self, node: str | None) -> bool:
        return node is not None and node in self.revoked

    def receive(self, action: str, args: Mapping[str, Any]) -> Decision | None:
        """The decision in ``args`` once verified and recorded; None for a replay."""
        if set(args) != {"decision", "signature"}:
            raise StateError(f"{action} takes args {{decision: base64, signature: base64}}")
        data = b64decode(args["decision"], "decision", limit=MAX_DECISION)
        signature = b64decode(args["signature"], "signature", limit=64)
        with self._lock:
            self._verify(data, signature)
            decision = decode_decision(data)
            if decision.kind != action:
                raise VerificationError("revocation", f"a {decision.kind} decision sent as "
                                        f"{action!r}")
            if decision.sequence <= self.sequence:
                return None  # replayed or stale: the node already applied a later one
            self._apply(decision)
        return decision

    def _verify(self, data: bytes, signature: bytes) -> None:
        pem = self._pinned or self._read_key()
        key = serialization.load_pem_public_key(pem.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise VerificationError("revocation", "the verifier key is not Ed25519")
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise VerificationError("revocation", "the decision is not signed by the "
                                    "cluster's verifier key") from None
        self._pinned = pem

    def _read_key(self) -> str:
        try:
            return self._key_file.read_text()[:MAX_DECISION]
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"the verifier's public key is unreadable: {exc}") from None

    def _apply(self, decision: Decision) -> None:
        self.sequence = decision.sequence
        if isinstance(decision, RevocationEvent):
            self.revoked[decision.node] = asdict(decision)
        else:
            self.revoked.pop(decision.node, None)
        write_json(self._file, {"sequence": self.sequence, "verifier_key": self._pinned,
                                "revoked": self.revoked})


def decision_args(decision: Decision, signature: bytes) -> dict[str, Any]:
    """The role-action args that carry a signed decision."""
    return {"decision": b64encode(encode_decision(decision)), "signature": b64encode(signature)}
