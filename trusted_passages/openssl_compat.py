"""pyOpenSSL across versions: the project's (>= 24.3) and Debian 12's (23.0, in guests).

pyOpenSSL 24.3 takes and returns ``cryptography`` objects and deprecates its own
``X509``/``PKey``; 23.0 knows only those. Each helper tries the current API and
falls back on the ``TypeError`` the old one raises, so neither version warns.
"""

from __future__ import annotations

from cryptography import x509
from OpenSSL import SSL, crypto

from trusted_passages.pki import PrivateKey

__all__ = ["add_client_ca", "own_certificate", "peer_certificate", "use_certificate",
           "use_private_key"]


def use_certificate(context: SSL.Context, certificate: x509.Certificate) -> None:
    try:
        context.use_certificate(certificate)
    except TypeError:
        context.use_certificate(crypto.X509.from_cryptography(certificate))


def use_private_key(context: SSL.Context, key: PrivateKey) -> None:
    try:
        context.use_privatekey(key)
    except TypeError:
        context.use_privatekey(crypto.PKey.from_cryptography_key(key))


def add_client_ca(context: SSL.Context, certificate: x509.Certificate) -> None:
    try:
        context.add_client_ca(certificate)
    except TypeError:
        context.add_client_ca(crypto.X509.from_cryptography(certificate))


def peer_certificate(connection: SSL.Connection) -> x509.Certificate | None:
    try:
        return connection.get_peer_certificate(as_cryptography=True)
    except TypeError:
        legacy = connection.get_peer_certificate()
        return None if legacy is None else legacy.to_cryptography()


def own_certificate(connection: SSL.Connection) -> x509.Certificate | None:
    try:
        return connection.get_certificate(as_cryptography=True)
    except TypeError:
        legacy = connection.get_certificate()
        return None if legacy is None else legacy.to_cryptography()
