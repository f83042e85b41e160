"""Key attestation: evidence that a key lives in this VSM, with these attributes.

The CryptoVM's TPM quotes its measured state (the configured PCR selection) with
its attestation key, and the quote's qualifying data commits to the key::

    qualifying_data = SHA-256("cryptovm-key-attestation/v1\\0" || nonce
                              || SHA-256(public) || canonical JSON(attributes))

``public`` is the key's SPKI DER (for an AES key, a one-way commitment to it);
``attributes`` are the key version's metadata (id, version, algorithm, usage,
``exportable``, ``origin``: generated in the VSM or imported, owner, release policy).
A verifier who trusts the CryptoVM's AK and reference state therefore learns that
a CryptoVM in that state holds this key with these attributes - e.g. that it was
generated inside and is not exportable - which is what a tenant checks before
wrapping a key to it (:meth:`~cryptovm.vsm.VsmSession.import_wrapped`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, VerificationError
from attestation.evidence import Evidence
from attestation.report import VerificationReport, run_checks
from attestation.verifier import QuoteVerifier
from cryptovm.encoding import canonical_json

KEY_ATTESTATION_LABEL = b"cryptovm-key-attestation/v1\x00"
MAX_NONCE = 64


def key_attestation_data(nonce: bytes, public: bytes, attributes: dict[str, Any]) -> bytes:
    return hashlib.sha256(KEY_ATTESTATION_LABEL + nonce + hashlib.sha256(public).digest()
                          + canonical_json(attributes)).digest()


@dataclass(frozen=True)
class KeyAttestation:
    evidence: Evidence
    attributes: dict[str, Any]
    public: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"format": "cryptovm-key-attestation", "version": 1,
                "evidence": self.evidence.to_dict(), "attributes": self.attributes,
                "public": b64encode(self.public)}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_dict(cls, doc: object) -> KeyAttestation:
        if not isinstance(doc, dict) or doc.get("format") != "cryptovm-key-attestation":
            raise EvidenceFormatError("not a cryptovm-key-attestation document")
        if not isinstance(doc.get("attributes"), dict):
            raise EvidenceFormatError("key attestation attributes must be an object")
        public = b64decode(doc.get("public"), "key attestation public key")
        return cls(Evidence.from_dict(doc.get("evidence")), doc["attributes"], public)

    @classmethod
    def from_json(cls, data: bytes) -> KeyAttestation:
        try:
            return cls.from_dict(json.loads(data))
        except (ValueError, RecursionError) as exc:
            raise EvidenceFormatError(f"key attestation is not JSON: {exc}") from None


def verify_key_attestation(attestation: KeyAttestation, nonce: bytes, verifier: QuoteVerifier,
                           *, require_generated: bool = True,
                           require_non_exportable: bool = True,
                           expected_key_id: str | None = None) -> VerificationReport:
    """Quote checks (the verifier's AK trust and policy) plus the key's attributes.

    The quote's ``qualifying_data`` check is what binds the key: it fails unless the
    quote commits to this nonce, this public key and exactly these attributes.
    """
    expected = key_attestation_data(nonce, attestation.public, attestation.attributes)
    quote = verifier.verify(attestation.evidence, expected)
    attrs = attestation.attributes

    def key_id() -> str:
        if expected_key_id is not None and attrs.get("key_id") != expected_key_id:
            raise VerificationError("key_id", f"attested key is {attrs.get('key_id')!r}, "
                                    f"expected {expected_key_id!r}")
        return f"key {attrs.get('key_id')!r} version {attrs.get('version')}"

    def origin() -> str:
        if require_generated and attrs.get("origin") != "generated":
            raise VerificationError("origin", f"key origin is {attrs.get('origin')!r}, not "
                                    "generated inside the VSM")
        return f"origin {attrs.get('origin')}"

    def exportable() -> str:
        if require_non_exportable and attrs.get("exportable") is not False:
            raise VerificationError("exportable", "the key is exportable")
        return "non-exportable" if attrs.get("exportable") is False else "exportable"

    if not quote.ok:
        return quote
    extra = run_checks([("key_id", key_id), ("origin", origin), ("exportable", exportable)])
    return VerificationReport(quote.checks + extra.checks)
