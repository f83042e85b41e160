"""Endorsement: validate an EK certificate and bind it to the EK public area.

Path building and signature checks are ``cryptography``'s X.509 verifier. EK
certificates are not web-PKI end-entity certificates (empty subject, critical
directoryName SAN, TCG EKU), so the end-entity extension policy is relaxed; CA
certificates keep the web-PKI CA rules. The TCG-specific parts are checked here.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from attestation.errors import EndorsementError, FileInputError
from attestation.files import read_bounded
from attestation.tpm_types import PublicArea

TCG_KP_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
MAX_BUNDLE_BYTES = 1 << 20


@dataclass(frozen=True)
class ValidatedEk:
    """An EK whose certificate chains to a trusted CA and matches its public area."""

    public: PublicArea
    certificate: x509.Certificate
    chain_subjects: tuple[str, ...]
    chain: tuple[x509.Certificate, ...] = ()  # the validated path, EK certificate first

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the EK certificate (DER), the EK's stable identity for a registrar."""
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_ca_bundle(path: Path) -> list[x509.Certificate]:
    """Read a PEM bundle of CA certificates (roots and intermediates)."""
    try:
        data = read_bounded(path, MAX_BUNDLE_BYTES, what="CA bundle")
    except FileInputError as exc:
        raise EndorsementError(str(exc)) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EndorsementError(f"CA bundle {path} is not a PEM certificate list: {exc}") from None
    return certs


def parse_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EndorsementError(f"EK certificate is not valid DER X.509: {exc}") from None


def _same_key(cert: x509.Certificate, ek: PublicArea) -> bool:
    try:
        cert_key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EndorsementError(f"EK certificate's public key is unusable: {exc}") from None
    ek_key = ek.public_key()
    if isinstance(cert_key, rsa.RSAPublicKey) and isinstance(ek_key, rsa.RSAPublicKey):
        return cert_key.public_numbers() == ek_key.public_numbers()
    if isinstance(cert_key, ec.EllipticCurvePublicKey) and isinstance(
        ek_key, ec.EllipticCurvePublicKey
    ):
        return cert_key.public_numbers() == ek_key.public_numbers()
    return False


def _check_usage(cert: x509.Certificate) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # the EK profile makes the EKU optional
    except ValueError as exc:  # cryptography parses extensions only when asked
        raise EndorsementError(f"EK certificate extensions are malformed: {exc}") from None
    if TCG_KP_EK_CERTIFICATE not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise EndorsementError("EK certificate's extendedKeyUsage lacks tcg-kp-EKCertificate")


def validate_ek(
    certificate_der: bytes,
    ek_public: PublicArea,
    ca_bundle: Sequence[x509.Certificate],
    *,
    now: datetime.datetime | None = None,
) -> ValidatedEk:
    """Check the EK certificate chains to ``ca_bundle`` and certifies ``ek_public``.

    The bundle's self-signed certificates are the anchors; the others (the EK CA's
    intermediate, a hypervisor host's intermediate CA of deep attestation) only link a
    path to them, under the anchors' and their own constraints (pathLen, keyUsage):
    a certificate that is not in the bundle, or a self-made "intermediate" with a
    trusted name but another key, never completes a path.
    """
    if not ca_bundle:
        raise EndorsementError("no CA certificates configured: cannot validate any EK")
    cert = parse_certificate(certificate_der)
    try:  # imported here: Debian 12 guests (cryptography 38) use the rest of the package
        from cryptography.x509 import verification
    except ImportError:
        raise EndorsementError("EK certificate validation needs cryptography >= 45") from None
    # Self-signed certificates are the anchors; the rest are only path links, so
    # a chain always ends at a root the operator configured.
    roots = [c for c in ca_bundle if c.subject == c.issuer] or list(ca_bundle)
    links = [c for c in ca_bundle if c not in roots]
    builder = verification.PolicyBuilder().store(verification.Store(roots))
    builder = builder.extension_policies(
        ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
        ee_policy=verification.ExtensionPolicy.permit_all(),
    )
    if now is not None:
        builder = builder.time(now)
    try:
        verified = builder.build_client_verifier().verify(cert, links)
    except (verification.VerificationError, ValueError, UnsupportedAlgorithm) as exc:
        raise EndorsementError(f"EK certificate does not chain to the CA bundle: {exc}") from None
    _check_usage(cert)
    if not _same_key(cert, ek_public):
        raise EndorsementError("EK certificate's key does not match the EK public area")
    subjects = tuple(c.subject.rfc4514_string() or "(empty subject)" for c in verified.chain)
    return ValidatedEk(ek_public, cert, subjects, tuple(verified.chain))
