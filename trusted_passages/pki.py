"""The project's one certificate builder: CAs and the TLS certificates they issue.

Test and demo PKI for Trusted Passages (a CA, node certificates naming the node in
CN and DNS SAN) and the base of cryptovm's CAs, which add only what is theirs
(Python ``ssl`` contexts, account certificates, a CA key held by the VSM). Keys stay
in memory as ``cryptography`` objects. Node keys are ECDSA P-256 for the tp13
profile and RSA-2048 for classic (RSA key transport needs an RSA key). Runs with
cryptography 38 (Debian 12 guests).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trusted_passages.envelope import Profile

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
DEFAULT_VALIDITY = datetime.timedelta(days=7)
CLOCK_SKEW = datetime.timedelta(minutes=5)  # certificates are valid from this long ago
TLS_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


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
    """A CA with a fresh P-256 key, kept in memory."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = ca_certificate_builder(name, key.public_key(), validity=validity)
    return CertificateAuthority(certificate.sign(key, hashes.SHA256()), key)


def issue_certificate(ca: CertificateAuthority, common_name: str, key: PrivateKey, *,
                      validity: datetime.timedelta = DEFAULT_VALIDITY) -> x509.Certificate:
    """A node certificate for ``key``: CN and DNS SAN ``common_name``, server+client auth."""
    return certify_public_key(ca, common_name, key.public_key(), validity=validity)


def certify_public_key(ca: CertificateAuthority, common_name: str, key: PublicKey, *,
                       validity: datetime.timedelta = DEFAULT_VALIDITY,
                       usages: Sequence[x509.ObjectIdentifier] = TLS_USAGES,
                       alt_names: Sequence[x509.GeneralName] | None = None
                       ) -> x509.Certificate:
    """:func:`issue_certificate` for a key whose private half is elsewhere (a guest's)."""
    builder = tls_certificate_builder(ca.certificate, common_name, key, validity=validity,
                                      usages=usages, alt_names=alt_names)
    return builder.sign(ca.private_key, hashes.SHA256())


# --- the certificates themselves, unsigned: whoever holds the CA key signs them ----------
# (cryptovm's VSM signs with a key that never leaves its key store.)


def ca_certificate_builder(common_name: str, public_key: PublicKey, *,
                           validity: datetime.timedelta) -> x509.CertificateBuilder:
    """A self-issued CA certificate for ``public_key``: certificate and CRL signing only,
    no intermediate CAs below it."""
    return (
        _builder(_name(common_name), _name(common_name), public_key, validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def tls_certificate_builder(ca_certificate: x509.Certificate, common_name: str,
                            public_key: PublicKey, *, validity: datetime.timedelta,
                            usages: Sequence[x509.ObjectIdentifier] = TLS_USAGES,
                            alt_names: Sequence[x509.GeneralName] | None = None
                            ) -> x509.CertificateBuilder:
    """An end-entity TLS certificate for ``public_key``, issued by ``ca_certificate``.

    ``usages``: the extended key usages (default server and client auth).
    ``alt_names``: the subjectAltName (default the DNS name ``common_name``; empty: none).
    Key usage: signatures, plus key encipherment for RSA (the classic profile's RSA key
    transport).
    """
    names = [x509.DNSName(common_name)] if alt_names is None else list(alt_names)
    builder = (
        _builder(_name(common_name), ca_certificate.subject, public_key, validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True,
                                  key_encipherment=isinstance(public_key, rsa.RSAPublicKey)),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            _issuer_key(ca_certificate)), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder


def _builder(subject: x509.Name, issuer: x509.Name, public_key: PublicKey,
             validity: datetime.timedelta) -> x509.CertificateBuilder:
    """Names, key, a random serial and the validity window (back-dated for clock skew)."""
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + validity))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, digital_signature: bool = False, key_encipherment: bool = False,
               key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=False,
                         key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=key_cert_sign, encipher_only=False, decipher_only=False)


def _issuer_key(ca_certificate: x509.Certificate) -> PublicKey:
    key = ca_certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise ValueError("a CA certificate here holds an ECC or RSA key")
    return key
