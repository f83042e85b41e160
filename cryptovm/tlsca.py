"""The CryptoVM's own CA: server certificates and per-account client certificates.

The CA key is part of the encrypted configuration; the server's TLS key is generated
at every start and exists only in memory (loaded into OpenSSL through a memfd, since
Python's ``ssl`` cannot load a key from bytes). Client certificates name the account
(CN); the server maps a client certificate to an account by its SHA-256 fingerprint,
which the account record holds, so removing the fingerprint revokes it at once.
Certificates are built by :mod:`trusted_passages.pki`; what is this module's own is
which names and usages they carry, and the Python ``ssl`` contexts of CVM1.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from trusted_passages import pki

SERVER_NAME = "cryptovm"
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=30)
CLIENT_VALIDITY = datetime.timedelta(days=365)
SERVER_ALT_NAMES = (x509.DNSName(SERVER_NAME), x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


class CertificateAuthority(pki.CertificateAuthority):
    """The CryptoVM's CA: the shared one, plus how the encrypted configuration stores it."""

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_der(self) -> bytes:
        return self.private_key.private_bytes(serialization.Encoding.DER,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    @classmethod
    def load(cls, cert_pem: bytes, key_der: bytes) -> CertificateAuthority:
        key = serialization.load_der_private_key(key_der, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an ECC key")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)


def make_ca(label: str) -> CertificateAuthority:
    ca = pki.make_ca(f"CryptoVM CA {label}", validity=CA_VALIDITY)
    return CertificateAuthority(ca.certificate, ca.private_key)


def issue_server(ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The server's certificate: the names a client may dial it by, server auth only."""
    return pki.certify_public_key(ca, SERVER_NAME, key.public_key(), validity=SERVER_VALIDITY,
                                  usages=[ExtendedKeyUsageOID.SERVER_AUTH],
                                  alt_names=SERVER_ALT_NAMES)


def issue_client(ca: CertificateAuthority, account: str
                 ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh key and its certificate for ``account`` (CN): client auth only, no SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = pki.certify_public_key(ca, account, key.public_key(),
                                         validity=CLIENT_VALIDITY,
                                         usages=[ExtendedKeyUsageOID.CLIENT_AUTH], alt_names=())
    return certificate, key


def fingerprint(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@contextmanager
def _memfd(data: bytes) -> Iterator[str]:
    """A path to ``data`` that exists only in memory (Linux memfd)."""
    fd = os.memfd_create("cryptovm-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def load_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    with _memfd(cert_pem + key_pem) as path:
        context.load_cert_chain(path)


def server_context(ca: CertificateAuthority) -> ssl.SSLContext:
    """TLS 1.3 server: a fresh in-memory key; client certificates optional (PSK auth
    otherwise), verified against the CryptoVM CA when presented."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_server(ca, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    load_chain(context, cert.public_bytes(serialization.Encoding.PEM), pem_key(key))
    context.load_verify_locations(cadata=ca.pem.decode())
    context.verify_mode = ssl.CERT_OPTIONAL
    context.options |= ssl.OP_NO_TICKET  # no session resumption: every connection authenticates
    context.num_tickets = 0
    return context


def client_context(ca_pem: bytes, cert_pem: bytes | None = None,
                   key_pem: bytes | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=ca_pem.decode())
    if cert_pem is not None and key_pem is not None:
        load_chain(context, cert_pem, key_pem)
    return context
