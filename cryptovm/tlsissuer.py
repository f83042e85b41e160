"""The VSM's TLS-issuing CA: certificates signed by a key that never leaves the key store.

Keyless TLS for testbed nodes (docs/cryptovm.md): a node generates its TLS key itself and
the VSM certifies it - CN = the node name its attestation proved, short validity,
serverAuth + clientAuth. The CA key is an ordinary VSM key (``ec-p256``, usage
``sign``, not exportable), so key attestation and the audit log apply to it like to any
key. Its bytes are never handed to this module: certificates are assembled around a
signature made by the VSM's own ``sign`` operation.

``cryptography`` has no external-signer hook in its CertificateBuilder, so a certificate
is first built and signed with a throwaway key (whose signature is discarded), and its
TBSCertificate - which names ecdsa-with-SHA256, the CA key's algorithm - is signed by
the VSM and wrapped into ``Certificate ::= SEQUENCE {tbs, algorithm, BIT STRING}``. The
result is checked against the CA certificate before it is returned. What the certificates
contain (names, usages, validity) is :mod:`trusted_passages.pki`'s, like every
certificate of the project; only the signing is this module's.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from cryptovm.errors import BadRequest, CryptoOperationFailed, StorageError
from trusted_passages import pki

Signer = Callable[[bytes], bytes]
"""Signs data with the CA key inside the VSM: a DER ECDSA-SHA256 signature."""

TLS_CA_KEY = "tls-ca"
DEFAULT_VALIDITY_S = 3600
MIN_VALIDITY_S = 60
MAX_VALIDITY_S = 86400
CA_VALIDITY = datetime.timedelta(days=3650)
MAX_CSR = 16384
# AlgorithmIdentifier { ecdsa-with-SHA256 } (RFC 5758: no parameters), DER.
_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


@dataclass(frozen=True)
class IssuingCa:
    """The CA key's id in the key store and its (self-signed) certificate."""

    key_id: str
    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def to_doc(self) -> dict[str, str]:
        return {"key_id": self.key_id, "cert": self.pem.decode()}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> IssuingCa | None:
        if doc is None:
            return None
        try:
            return cls(str(doc["key_id"]), x509.load_pem_x509_certificate(doc["cert"].encode()))
        except (KeyError, ValueError, AttributeError) as exc:
            raise StorageError(f"the TLS CA entry of the configuration is damaged: {exc}"
                               ) from None


# --- DER assembly --------------------------------------------------------------------------


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


@functools.cache
def _placeholder_key() -> ec.EllipticCurvePrivateKey:
    """Signs drafts whose signature is thrown away; never signs anything that is kept."""
    return ec.generate_private_key(ec.SECP256R1())


def sign_with(builder: x509.CertificateBuilder, sign: Signer) -> x509.Certificate:
    """Finish ``builder`` with a signature made by ``sign`` (the VSM)."""
    tbs = builder.sign(_placeholder_key(), hashes.SHA256()).tbs_certificate_bytes
    der = _tlv(0x30, tbs + _ECDSA_SHA256 + _tlv(0x03, b"\x00" + sign(tbs)))
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CryptoOperationFailed(f"the assembled certificate does not parse: {exc}") from None


def check_issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> None:
    try:
        if hasattr(certificate, "verify_directly_issued_by"):
            certificate.verify_directly_issued_by(issuer)
        else:  # cryptography < 40 (Debian 12's 38 in a guest): the ECDSA check by hand
            key, algorithm = issuer.public_key(), certificate.signature_hash_algorithm
            if certificate.issuer != issuer.subject:
                raise ValueError("issuer name mismatch")
            if not isinstance(key, ec.EllipticCurvePublicKey) or algorithm is None:
                raise TypeError("not an ECDSA issuer")
            key.verify(certificate.signature, certificate.tbs_certificate_bytes,
                       ec.ECDSA(algorithm))
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CryptoOperationFailed("the VSM's signature does not verify under the CA "
                                    f"certificate ({type(exc).__name__}): is the CA key the "
                                    "certificate's key?") from None


# --- the CA certificate and node certificates ----------------------------------------------


def ca_certificate(public_key: ec.EllipticCurvePublicKey, common_name: str,
                   sign: Signer) -> x509.Certificate:
    """The self-signed CA certificate of the VSM key ``public_key``."""
    builder = pki.ca_certificate_builder(common_name, public_key, validity=CA_VALIDITY)
    certificate = sign_with(builder, sign)
    check_issued_by(certificate, certificate)
    return certificate


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A PKCS#10 request (DER or PEM) whose signature proves possession of its key."""
    if not 0 < len(data) <= MAX_CSR:
        raise BadRequest(f"a certificate request is 1..{MAX_CSR} bytes")
    try:
        csr = (x509.load_pem_x509_csr(data) if data.lstrip().startswith(b"-----BEGIN")
               else x509.load_der_x509_csr(data))
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"the certificate request does not parse: {exc}") from None
    if not valid:
        raise BadRequest("the certificate request's signature is invalid: it must be signed "
                         "by the key it asks a certificate for")
    key = csr.public_key()
    if not ((isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1")
            or (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048)):
        raise BadRequest("a TLS key must be ECC P-256 (profile tp13) or RSA >= 2048 (classic)")
    return csr


def node_certificate(ca: IssuingCa, csr: x509.CertificateSigningRequest, node: str,
                     validity_s: int, sign: Signer) -> x509.Certificate:
    """A TLS certificate for the key in ``csr``; CN/SAN ``node`` (not the request's)."""
    if not MIN_VALIDITY_S <= validity_s <= MAX_VALIDITY_S:
        raise BadRequest(f"validity must be {MIN_VALIDITY_S}..{MAX_VALIDITY_S} s")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise BadRequest("a TLS key must be ECC P-256 or RSA")
    _check_ecc_ca(ca)
    builder = pki.tls_certificate_builder(ca.certificate, node, key,
                                          validity=datetime.timedelta(seconds=validity_s))
    certificate = sign_with(builder, sign)
    check_issued_by(certificate, ca.certificate)
    return certificate


def _check_ecc_ca(ca: IssuingCa) -> None:
    # sign_with names ecdsa-with-SHA256: the CA key must be an ECC key.
    if not isinstance(ca.certificate.public_key(), ec.EllipticCurvePublicKey):
        raise StorageError("the TLS CA certificate does not hold an ECC key")


def spki_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def _validity(certificate: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after), timezone-aware; cryptography < 42 has only naive UTC."""
    if hasattr(certificate, "not_valid_after_utc"):
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return (certificate.not_valid_before.replace(tzinfo=datetime.UTC),
            certificate.not_valid_after.replace(tzinfo=datetime.UTC))


def _iso(moment: datetime.datetime) -> str:
    """The project's one output time format: ISO 8601 UTC with ``Z``."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_info(certificate: x509.Certificate) -> dict[str, Any]:
    """What a log or a report may show of a certificate (public data only)."""
    def cn(name: x509.Name) -> str:
        values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(values[0].value) if values else name.rfc4514_string()

    not_before, not_after = _validity(certificate)
    return {"subject": cn(certificate.subject), "issuer": cn(certificate.issuer),
            "serial": format(certificate.serial_number, "x"),
            "not_before": _iso(not_before), "not_after": _iso(not_after),
            "validity_s": int((not_after - not_before).total_seconds()),
            "spki_sha256": hashlib.sha256(spki_der(certificate)).hexdigest(),
            "sha256": certificate.fingerprint(hashes.SHA256()).hex()}


__all__ = [
    "DEFAULT_VALIDITY_S",
    "TLS_CA_KEY",
    "IssuingCa",
    "Signer",
    "ca_certificate",
    "certificate_info",
    "check_issued_by",
    "load_csr",
    "node_certificate",
    "sign_with",
    "spki_der",
]
