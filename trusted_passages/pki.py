"""Test and demo PKI: a CA and node certificates naming the node (CN and DNS SAN).

Keys stay in memory as ``cryptography`` objects. Node keys are ECDSA P-256 for
the tp13 profile and RSA-2048 for classic (RSA key transport needs an RSA key).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trusted_passages.envelope import Profile

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
DEFAULT_VALIDITY = datetime.timedelta(days=7)
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateAuthority:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)


def generate_key(profile: Profile = "tp13") -> PrivateKey:
    """A fresh TLS key for a node: P-256 for tp13, RSA-2048 for classic."""
    if profile == "classic":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(name: str, *, validity: datetime.timedelta = DEFAULT_VALIDITY
            ) -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(certificate, key)


def issue_certificate(ca: CertificateAuthority, common_name: str, key: PrivateKey, *,
                      validity: datetime.timedelta = DEFAULT_VALIDITY) -> x509.Certificate:
    """A node certificate for ``key``: CN and DNS SAN ``common_name``, server+client auth."""
    return certify_public_key(ca, common_name, key.public_key(), validity=validity)


def certify_public_key(ca: CertificateAuthority, common_name: str, key: PublicKey, *,
                       validity: datetime.timedelta = DEFAULT_VALIDITY) -> x509.Certificate:
    """:func:`issue_certificate` for a key whose private half is elsewhere (a guest's)."""
    now = datetime.datetime.now(datetime.UTC)
    rsa_key = isinstance(key, rsa.RSAPublicKey)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject).public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=rsa_key, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.private_key.public_key()), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
