"""Attestation-gated release, the CryptoVM's side and the requester's side.

A key may carry a release policy: the name of a :class:`ReleasePolicy` (a reference
policy plus the AK registry that says which AK belongs to which node) and an
expected node. ``release_decrypt`` then answers only if

1. the nonce is one this CryptoVM issued to the same account, unexpired and unused
   (one-shot: consumed whether or not the rest succeeds);
2. the requester's evidence verifies with :class:`~attestation.verifier.QuoteVerifier`
   against the policy, with the registry pinned to the expected node;
3. the quote's qualifying data is ``SHA-256(nonce || SHA-256(recipient SPKI DER))``:
   the quoting TPM's owner chose the recipient key (check ``recipient_binding``);

and the plaintext goes back sealed to that recipient key (:mod:`cryptovm.wrapping`
envelope, context ``"cryptovm-release/v1\\0" || key id``). Every denial names the
check that failed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from attestation.errors import EvidenceFormatError, PolicyError
from attestation.evidence import Evidence
from attestation.policy import ReferencePolicy, dump_policy, load_policy
from attestation.registrar import AkRegistry
from attestation.verifier import ClockHistory, QuoteVerifier
from cryptovm.encoding import check_name
from cryptovm.errors import BadRequest, ReleaseDenied, StorageError

NONCE_SIZE = 32
NONCE_TTL_S = 60.0
MAX_NONCES = 4096
RELEASE_CONTEXT = b"cryptovm-release/v1\x00"


def recipient_binding(nonce: bytes, recipient_spki: bytes) -> bytes:
    """The qualifying data a requester's quote must carry."""
    return hashlib.sha256(nonce + hashlib.sha256(recipient_spki).digest()).digest()


def release_context(key_id: str) -> bytes:
    return RELEASE_CONTEXT + key_id.encode()


@dataclass(frozen=True)
class ReleasePolicy:
    """A named reference policy and the AK registry used to judge requesters."""

    name: str
    reference: ReferencePolicy
    registry: AkRegistry

    def __post_init__(self) -> None:
        check_name(self.name, "release policy name")

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "reference_policy": dump_policy(self.reference),
                "ak_registry": self.registry.to_json()}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ReleasePolicy:
        try:
            return cls(doc["name"], load_policy(doc["reference_policy"]),
                       AkRegistry.from_json(doc["ak_registry"]))
        except (KeyError, TypeError, PolicyError, EvidenceFormatError) as exc:
            raise StorageError(f"release policy document is unusable: {exc}") from None

    @classmethod
    def parse(cls, name: str, reference_yaml: str, registry_json: str) -> ReleasePolicy:
        try:
            return cls(name, load_policy(reference_yaml), AkRegistry.from_json(registry_json))
        except (PolicyError, EvidenceFormatError) as exc:
            raise BadRequest(f"release policy {name!r}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "reference_policy": self.reference.name,
                "bank": self.reference.bank, "nodes": self.registry.nodes()}


class NonceBook:
    """One-shot nonces with expiry, bound to the account that asked for them."""

    def __init__(self, ttl: float = NONCE_TTL_S, limit: int = MAX_NONCES) -> None:
        self._ttl, self._limit = ttl, limit
        self._nonces: dict[bytes, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def issue(self, account: str) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        now = time.monotonic()
        with self._lock:
            for old in [n for n, (exp, _) in self._nonces.items() if exp <= now]:
                del self._nonces[old]
            while len(self._nonces) >= self._limit:
                self._nonces.pop(next(iter(self._nonces)))  # oldest first
            self._nonces[nonce] = (now + self._ttl, account)
        return nonce

    def consume(self, nonce: bytes, account: str) -> None:
        with self._lock:
            entry = self._nonces.pop(bytes(nonce), None)
        if entry is None:
            raise ReleaseDenied("nonce", "the nonce was not issued by this CryptoVM or was "
                                "already used (nonces are one-shot)")
        expiry, owner = entry
        if time.monotonic() > expiry:
            raise ReleaseDenied("nonce", f"the nonce expired (valid {self._ttl:.0f} s)")
        if not hmac.compare_digest(owner.encode(), account.encode()):
            raise ReleaseDenied("nonce", "the nonce was issued to another account")

    @property
    def ttl(self) -> float:
        return self._ttl


def check_requester(policy: ReleasePolicy, node: str | None, evidence: Evidence, nonce: bytes,
                    recipient_spki: bytes, clock_history: ClockHistory) -> str:
    """Verify the requester's evidence; raise :class:`ReleaseDenied` naming the failed check."""
    registry = policy.registry.for_node(node) if node else policy.registry
    verifier = QuoteVerifier(ak_trust=registry, policy=policy.reference,
                             clock_history=clock_history)
    report = verifier.verify(evidence, recipient_binding(nonce, recipient_spki))
    failure = report.failure
    if failure is not None:
        if failure.name == "qualifying_data":
            raise ReleaseDenied("recipient_binding", "the quote's qualifying data is not "
                                "SHA-256(nonce || SHA-256(recipient SPKI)): it does not bind "
                                "this nonce and this recipient key")
        raise ReleaseDenied(failure.name, failure.detail)
    return f"evidence satisfies release policy {policy.name!r}" + (f" as node {node!r}"
                                                                   if node else "")


def decode_evidence(data: bytes) -> Evidence:
    try:
        return Evidence.from_json(data)
    except EvidenceFormatError as exc:
        raise ReleaseDenied("evidence", f"the requester's evidence is malformed: {exc}") from None


__all__ = [
    "NONCE_SIZE",
    "NonceBook",
    "ReleasePolicy",
    "check_requester",
    "decode_evidence",
    "recipient_binding",
    "release_context",
]
