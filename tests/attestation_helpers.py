"""Test helpers that drive a real swtpm through the attester API."""

from __future__ import annotations

from attestation.evidence import Evidence, KeyCertification
from attestation.registrar import Registrar
from attestation.tpm import KeyAlgorithm, TpmClient, TpmKey
from attestation.tpm_types import PcrSelection, parse_public

PCRS = PcrSelection("sha256", tuple(range(0, 11)))


def quote_evidence(client: TpmClient, ak: TpmKey, nonce: bytes,
                   selection: PcrSelection = PCRS, event_log: bytes | None = None) -> Evidence:
    q = client.quote(ak, selection, nonce)
    return Evidence(attest=q.attest, signature=q.signature, ak_public=ak.public,
                    pcr_bank=selection.bank, pcrs=q.pcrs, event_log=event_log)


def activate(client: TpmClient, registrar: Registrar, ak: TpmKey,
             ek_algorithm: KeyAlgorithm = "rsa") -> None:
    ek = client.endorsement_key(ek_algorithm)
    assert ek.certificate is not None
    challenge = registrar.challenge(ek.certificate, ek.public, ak.public)
    secret = client.activate_credential(ak, ek_algorithm, challenge)
    registrar.complete(parse_public(ak.public).name, secret)


def certification(client: TpmClient, key: TpmKey, ak: TpmKey, nonce: bytes) -> KeyCertification:
    attest, signature = client.certify(key, ak, nonce)
    return KeyCertification(attest, signature, key.public)
