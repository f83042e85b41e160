"""TLS Sign with a TPM: :class:`TpmSigner` (the signer's TPM-resident key, certified by
its attested AK), :class:`TpmKeyChecker` (the receiver's check of that key during the
negotiation) and :func:`verify_proof` (anyone's offline check of a proof).

Like :mod:`trusted_passages.tpm`, this module imports the verifier side of
``attestation``; the formats are in :mod:`trusted_passages.signing`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from attestation.errors import EvidenceFormatError, VerificationError
from attestation.evidence import Evidence, KeyCertification
from attestation.policy import ReferencePolicy
from attestation.registrar import AkTrust, PinnedAk
from attestation.report import CheckSkipped, VerificationReport, run_checks
from attestation.tpm_types import (
    PcrSelection,
    PublicArea,
    parse_attest,
    parse_public,
    parse_signature,
)
from attestation.verifier import QuoteVerifier, check_signature
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.signing import (
    KeyCredentials,
    Proof,
    SignedMessage,
    certify_digest,
    quote_digest,
    read_signed_data,
    self_signed_certificate,
    signer_key,
    verify_signed_data,
)

if TYPE_CHECKING:  # tpm2-pytss is needed only by whoever builds the TpmClient
    from attestation.tpm import TpmClient, TpmKey

__all__ = ["ProofResult", "TpmKeyChecker", "TpmSigner", "verify_credentials", "verify_proof"]


class TpmSigner:
    """Signs with an ECC P-256 key generated in the TPM's endorsement hierarchy (the AK's).

    One key per signer object, created on first use and flushed by :meth:`close`; each
    signing session certifies it afresh (TPM2_Certify by the AK) and quotes the PCRs,
    both bound to that session. ``lock``: share the TpmIssuer's ``tpm_lock`` when the
    same TpmClient also serves the channel's attestation.
    """

    def __init__(self, client: TpmClient, node: str, selection: PcrSelection,
                 event_log: Callable[[], bytes | None] | bytes | None = None, *,
                 lock: threading.Lock | None = None) -> None:
        self._client = client
        self.node = node
        self._selection = selection
        self._event_log = event_log if callable(event_log) else (lambda: event_log)
        self._lock = lock or threading.Lock()
        self._key: TpmKey | None = None

    def credentials(self, session: bytes) -> KeyCredentials:
        with self._lock:
            key = self._signing_key()
            ak = self._client.attestation_key("ecc")
            attest, signature = self._client.certify(key, ak, certify_digest(session))
            name = parse_public(key.public).name
            quote = self._client.quote(ak, self._selection, quote_digest(session, name))
            evidence = Evidence(attest=quote.attest, signature=quote.signature,
                                ak_public=ak.public, pcr_bank=self._selection.bank,
                                pcrs=quote.pcrs, event_log=self._event_log())
            # The AK's ESYS handle stays open: ESYS hands out one object per persistent
            # handle, shared with a TpmIssuer on the same client (closing it breaks that).
        public = parse_public(key.public).public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)  # created as ECC above
        certificate = self_signed_certificate(public, self.node, self.sign,
                                              int.from_bytes(os.urandom(8)) >> 1)
        return KeyCredentials(self.node, certificate, attest, signature, key.public,
                              evidence.to_dict())

    def sign(self, message: bytes) -> bytes:
        digest = hashlib.sha256(message).digest()
        with self._lock:
            signature = parse_signature(self._client.sign_digest(self._signing_key(), digest))
        return utils.encode_dss_signature(int.from_bytes(signature.r),
                                          int.from_bytes(signature.s))

    def close(self) -> None:
        with self._lock:
            if self._key is not None:
                self._client.flush(self._key)
                self._key = None

    def _signing_key(self) -> TpmKey:
        if self._key is None:
            self._key = self._client.create_signing_key("ecc", hierarchy="endorsement")
        return self._key


# --- checks ------------------------------------------------------------------------------


def _prefixed(prefix: str, report: VerificationReport) -> str:
    """Fold a sub-report into one check: raise naming its failed check, else summarize."""
    failure = report.failure
    if failure is not None:
        raise VerificationError(prefix, f"{failure.name}: {failure.detail}")
    return "; ".join(f"{c.name}: {c.detail}" for c in report.checks if c.passed)


@dataclass
class _Parsed:
    evidence: Evidence | None = None
    ak: PublicArea | None = None
    key: PublicArea | None = None


def credential_checks(credentials: KeyCredentials, session: bytes, ak_trust: AkTrust | None,
                      policy: ReferencePolicy | None) -> tuple[list[tuple[str, Callable[[], str]]],
                                                               _Parsed]:
    """The named checks of a signer's key credentials for ``session``."""
    p = _Parsed()

    def structure() -> str:
        p.evidence = Evidence.from_dict(credentials.evidence)
        p.ak = parse_public(p.evidence.ak_public)
        p.key = parse_public(credentials.key_public)
        return "evidence, AK and signing key decode"

    def trusted() -> str:
        if ak_trust is None:
            raise CheckSkipped("no AK trust given: the signer is the AK named in the facts; "
                               "pin it (--ak) or use a registry to know whose it is")
        return ak_trust.trust(_get(p.ak))

    def own_ak() -> QuoteVerifier:
        # The AK's trust is the check above; these verify signatures and bindings with it.
        return QuoteVerifier(ak_trust=PinnedAk([_get(p.ak).public_key()], "the proof's AK"),
                             policy=policy)

    def certified() -> str:
        certification = KeyCertification(credentials.certify_attest,
                                          credentials.certify_signature, credentials.key_public)
        return _prefixed("certify", own_ak().verify_certification(
            certification, _get(p.evidence).ak_public, certify_digest(session)))

    def quoted() -> str:
        return _prefixed("quote", own_ak().verify(
            _get(p.evidence), quote_digest(session, _get(p.key).name)))

    def certificate_key() -> str:
        if _spki(signer_key(credentials)) != _spki(_get(p.key).public_key()):
            raise VerificationError("signer_certificate", "the CMS signer certificate holds "
                                    "another key than the TPM-certified one")
        return "the signer certificate's key is the certified TPM key"

    return [("structure", structure), ("ak_trust", trusted), ("key_certification", certified),
            ("platform_quote", quoted), ("signer_certificate", certificate_key)], p


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[no-any-return]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _get(value: Any) -> Any:
    if value is None:
        raise VerificationError("structure", "an earlier check did not decode it")
    return value


def verify_credentials(credentials: KeyCredentials, session: bytes, ak_trust: AkTrust | None,
                       policy: ReferencePolicy | None) -> VerificationReport:
    checks, _ = credential_checks(credentials, session, ak_trust, policy)
    return run_checks(checks)


class TpmKeyChecker:
    """The receiver: the signing key must be certified by the very AK that attested the
    channel's peer, in a platform state its policy accepts."""

    def __init__(self, policy: ReferencePolicy | None = None) -> None:
        self._policy = policy

    def check(self, credentials: KeyCredentials, session: bytes, peer: PeerEvidence) -> None:
        if peer.evidence is None:
            raise VerificationError("sign_ak", "the channel's peer showed no TPM evidence")
        channel_ak = parse_public(peer.evidence.ak_public).public_key()
        trust = PinnedAk([channel_ak], f"AK that attested {peer.node!r} on this channel")
        verify_credentials(credentials, session, trust, self._policy).raise_for_failure()


# --- the offline verifier ------------------------------------------------------------------


@dataclass(frozen=True)
class ProofResult:
    """The named checks, and what a passing proof establishes."""

    report: VerificationReport
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "establishes": self.facts}


def verify_proof(data: bytes, ak_trust: AkTrust | None = None,
                 policy: ReferencePolicy | None = None) -> ProofResult:
    """Check a proof offline. A malformed file raises EvidenceFormatError (exit 3); a
    failed check is in the report (exit 1)."""
    proof = Proof.from_json(data)
    session = proof.session
    checks, parsed = credential_checks(proof.credentials, session, ak_trust, policy)
    message: list[SignedMessage] = []

    def cms_signer() -> str:
        named, _, _ = read_signed_data(proof.cms)
        if named.certificate != proof.credentials.certificate:
            raise VerificationError("cms_signer", "the CMS names another signer certificate "
                                    "than the one of the TPM-certified key")
        return "the CMS signer is the certified key's certificate"

    def cms_signature() -> str:
        message.append(verify_signed_data(proof.cms, signer_key(proof.credentials)))
        return "CMS SignedData verifies with the certified TPM key; messageDigest matches"

    def cms_session() -> str:
        if message[0].session != session:
            raise VerificationError("cms_session", "the signed session attribute names "
                                    "another signing session than the proof's nonces")
        return f"message {message[0].sequence} of session {session.hex()[:16]}..."

    def handshake() -> str:
        return _check_handshake(proof, _get(parsed.ak))

    report = run_checks([*checks, ("cms_signer", cms_signer), ("cms_signature", cms_signature),
                         ("cms_session", cms_session), ("handshake_evidence", handshake)])
    facts = _facts(proof, parsed, message[0] if message else None, policy) if report.ok else {}
    return ProofResult(report, facts)


def _check_handshake(proof: Proof, ak: PublicArea) -> str:
    if proof.handshake_evidence is None:
        raise CheckSkipped("the proof carries no handshake evidence")
    evidence = Evidence.from_dict(proof.handshake_evidence)
    if parse_public(evidence.ak_public).raw != ak.raw:
        raise VerificationError("handshake_evidence", "the TLS session was attested by "
                                "another AK than the one that certified the signing key")
    check_signature(ak, parse_signature(evidence.signature), evidence.attest)
    return ("the channel's handshake quote is signed by the same AK (its binding to the TLS "
            "exporter can only be checked by the two endpoints)")


def _facts(proof: Proof, parsed: _Parsed, message: SignedMessage | None,
           policy: ReferencePolicy | None) -> dict[str, Any]:
    evidence, ak = _get(parsed.evidence), _get(parsed.ak)
    clock = parse_attest(proof.credentials.certify_attest).clock_info
    assert message is not None  # report.ok: cms_signature passed
    return {
        "who": {"node": proof.credentials.node, "ak_name": ak.name.hex(),
                "signing_key_name": _get(parsed.key).name.hex()},
        "platform_state": {"pcr_bank": evidence.pcr_bank,
                           "pcrs": {str(i): v.hex() for i, v in sorted(evidence.pcrs.items())},
                           "policy": None if policy is None else policy.name},
        "session": {"id": proof.session.hex(), "sequence": message.sequence,
                    "receiver": proof.receiver},
        "when": {"signing_time": message.signing_time.isoformat(),
                 "tpm_clock_ms": clock.clock, "tpm_reset_count": clock.reset_count,
                 "received_at": proof.received_at},
        "data_sha256": hashlib.sha256(message.data).hexdigest(),
        "data_size": len(message.data),
    }


def load_ak_pin(pem: bytes) -> PinnedAk:
    """An AK pinned from a PEM public key (``testbed sign verify --ak``)."""
    try:
        return PinnedAk.from_pem(pem, "pinned AK")
    except VerificationError as exc:
        raise EvidenceFormatError(exc.reason) from None
