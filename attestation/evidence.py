"""The evidence bundle: everything a verifier needs about one quote, serialized.

Format ``tpm2-evidence`` version 1 is a UTF-8 JSON object (see docs/evidence.md):

    {"format": "tpm2-evidence", "version": 1,
     "attest": b64 TPMS_ATTEST, "signature": b64 TPMT_SIGNATURE,
     "ak_public": b64 TPMT_PUBLIC, "pcr_bank": "sha256",
     "pcrs": {"0": hex, ...},
     "event_log": b64 | null, "ek_public": b64 | null,
     "ek_certificate": b64 DER | null, "platform_certificate": b64 DER | null,
     "key_certification": {"attest": b64, "signature": b64, "key_public": b64} | null}

JSON keeps it inspectable with jq and trivially parsed in any language; binary
TPM structures stay in their TPM wire encoding so other tools can check them.
Decoding is strict: unknown keys, wrong types, oversized input are errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from attestation.encoding import b64decode, b64encode, describe_value, require_int
from attestation.errors import EvidenceFormatError
from attestation.tpm_types import DIGEST_SIZE

EVIDENCE_FORMAT = "tpm2-evidence"
EVIDENCE_VERSION = 1
MAX_EVIDENCE_BYTES = 4 << 20  # event logs of real firmware are tens of KiB
_REQUIRED = {"format", "version", "attest", "signature", "ak_public", "pcr_bank", "pcrs"}
_OPTIONAL = {"event_log", "ek_public", "ek_certificate", "platform_certificate",
             "key_certification"}
_PCR_KEYS = frozenset(str(i) for i in range(32))


@dataclass(frozen=True)
class KeyCertification:
    """TPM2_Certify of a TPM-resident key by the AK, and that key's TPMT_PUBLIC."""

    attest: bytes
    signature: bytes
    key_public: bytes


@dataclass(frozen=True)
class Evidence:
    """One quote and its context."""

    attest: bytes
    signature: bytes
    ak_public: bytes
    pcr_bank: str
    pcrs: dict[int, bytes]
    event_log: bytes | None = None
    ek_public: bytes | None = None
    ek_certificate: bytes | None = None
    platform_certificate: bytes | None = None
    key_certification: KeyCertification | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": EVIDENCE_FORMAT,
            "version": EVIDENCE_VERSION,
            "attest": b64encode(self.attest),
            "signature": b64encode(self.signature),
            "ak_public": b64encode(self.ak_public),
            "pcr_bank": self.pcr_bank,
            "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
            "event_log": _b64_opt(self.event_log),
            "ek_public": _b64_opt(self.ek_public),
            "ek_certificate": _b64_opt(self.ek_certificate),
            "platform_certificate": _b64_opt(self.platform_certificate),
            "key_certification": None if self.key_certification is None else {
                "attest": b64encode(self.key_certification.attest),
                "signature": b64encode(self.key_certification.signature),
                "key_public": b64encode(self.key_certification.key_public),
            },
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Evidence:
        if len(data) > MAX_EVIDENCE_BYTES:
            raise EvidenceFormatError(f"evidence of {len(data)} bytes exceeds {MAX_EVIDENCE_BYTES}")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise EvidenceFormatError(f"evidence is not JSON: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: object) -> Evidence:
        if not isinstance(doc, dict):
            raise EvidenceFormatError("evidence must be a JSON object")
        missing, unknown = _REQUIRED - doc.keys(), doc.keys() - _REQUIRED - _OPTIONAL
        if missing or unknown:
            raise EvidenceFormatError(
                f"evidence keys: missing {sorted(missing)}, unknown {sorted(unknown)}")
        if doc["format"] != EVIDENCE_FORMAT:
            raise EvidenceFormatError(f"evidence format: must be {EVIDENCE_FORMAT!r}, "
                                      f"got {describe_value(doc['format'])}")
        require_int(doc["version"], "evidence version", EvidenceFormatError,
                    exactly=EVIDENCE_VERSION)
        bank = doc["pcr_bank"]
        if not isinstance(bank, str) or bank not in DIGEST_SIZE:
            raise EvidenceFormatError(f"pcr_bank {bank!r} is not one of {sorted(DIGEST_SIZE)}")
        return cls(
            attest=b64decode(doc["attest"], "attest"),
            signature=b64decode(doc["signature"], "signature"),
            ak_public=b64decode(doc["ak_public"], "ak_public"),
            pcr_bank=bank,
            pcrs=_decode_pcrs(doc["pcrs"], DIGEST_SIZE[bank]),
            event_log=_unb64_opt(doc.get("event_log"), "event_log"),
            ek_public=_unb64_opt(doc.get("ek_public"), "ek_public"),
            ek_certificate=_unb64_opt(doc.get("ek_certificate"), "ek_certificate"),
            platform_certificate=_unb64_opt(doc.get("platform_certificate"),
                                            "platform_certificate"),
            key_certification=_decode_certification(doc.get("key_certification")),
        )


def _b64_opt(data: bytes | None) -> str | None:
    return None if data is None else b64encode(data)


def _unb64_opt(value: object, name: str) -> bytes | None:
    return None if value is None else b64decode(value, name)


def _decode_pcrs(value: object, size: int) -> dict[int, bytes]:
    if not isinstance(value, dict) or len(value) > 32:
        raise EvidenceFormatError("pcrs must be an object of at most 32 PCRs")
    pcrs = {}
    for key, digest in value.items():
        # Canonical ASCII decimal only: "²" is a digit to str.isdigit, and "00" would
        # silently overwrite "0".
        if not (isinstance(key, str) and key in _PCR_KEYS):
            raise EvidenceFormatError(f"pcrs: {key!r} is not a PCR index 0..31")
        if not isinstance(digest, str) or len(digest) != 2 * size:
            raise EvidenceFormatError(f"pcrs.{key}: expected {2 * size} hex characters")
        try:
            pcrs[int(key)] = bytes.fromhex(digest)
        except ValueError:
            raise EvidenceFormatError(f"pcrs.{key}: not hexadecimal") from None
        if pcrs[int(key)].hex() != digest:  # one spelling per value: not malleable
            raise EvidenceFormatError(f"pcrs.{key}: hex digits must be lowercase")
    return pcrs


def _decode_certification(value: object) -> KeyCertification | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"attest", "signature", "key_public"}:
        raise EvidenceFormatError("key_certification needs exactly attest, signature, key_public")
    return KeyCertification(
        b64decode(value["attest"], "key_certification.attest"),
        b64decode(value["signature"], "key_certification.signature"),
        b64decode(value["key_public"], "key_certification.key_public"),
    )
