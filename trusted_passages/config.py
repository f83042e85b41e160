"""Channel configuration: one node's TLS identity, trust anchors and attestation roles.

Role-independent: the same :class:`ChannelConfig` serves (``serve``) and
connects (``connect``). The private key stays a ``cryptography`` object in
memory; it is handed to OpenSSL directly, never serialized, and hidden from repr.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL, crypto

from trusted_passages.envelope import PROFILES, Profile, Role
from trusted_passages.interfaces import BatchableIssuer, Issuer, Validator, spki_digest
from trusted_passages.openssl_compat import add_client_ca, use_certificate, use_private_key
from trusted_passages.pki import PrivateKey
from trusted_passages.protocol import (
    CLASSIC_CIPHERS,
    CONCURRENT_ALPN,
    PIPELINING_ALPN,
    TrustedPassagesConnection,
)

DEFAULT_TIMEOUT = 10.0
_TLS_VERSION = {"tp13": SSL.TLS1_3_VERSION, "classic": SSL.TLS1_2_VERSION}
# Resumption would skip the certificates (and, in TLS 1.2, the ClientKeyExchange
# the classic profile binds); renegotiation would hide a second handshake.
_OPTIONS = SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
_VERIFY_DEPTH = 4


@dataclass(frozen=True)
class ChannelConfig:
    """Everything one node needs for attested channels, whichever side it plays."""

    certificate: x509.Certificate
    private_key: PrivateKey = field(repr=False)
    ca_certificates: Sequence[x509.Certificate]
    issuer: Issuer
    validator: Validator
    profile: Profile = "tp13"
    expected_peer: str | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds per wait: connect, each protocol step, recv
    # Seconds: sessions arriving within it share one quote (docs/protocol.md, "Batched
    # quotes"); None quotes once per session. The issuer must batch (TpmIssuer does).
    batch_window: float | None = None
    # Offer/accept ALPN tpv1.2: the client's evidence leaves as soon as its quote is done,
    # before it validated the server's (docs/protocol.md, "Concurrent evidence"): one
    # validation less on the handshake's critical path. False keeps it until then.
    concurrent_evidence: bool = True
    _contexts: dict[str, SSL.Context] = field(default_factory=dict, init=False, repr=False,
                                              compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)
    _derived: dict[str, bytes] = field(default_factory=dict, init=False, repr=False,
                                       compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ca_certificates", tuple(self.ca_certificates))
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}")
        if not self.ca_certificates:
            raise ValueError("at least one CA certificate is needed to verify peers")
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")
        if self.profile == "classic" and not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise ValueError("the classic profile needs an RSA key (RSA key transport)")
        if _spki(self.certificate.public_key()) != _spki(self.private_key.public_key()):
            raise ValueError("the certificate is not for this private key")
        if self.batch_window is not None:
            if not isinstance(self.issuer, BatchableIssuer):
                raise ValueError("batch_window needs an issuer that can batch (TpmIssuer)")
            object.__setattr__(self, "issuer", self.issuer.batched(self.batch_window))

    def with_expected_peer(self, node: str | None) -> ChannelConfig:
        return replace(self, expected_peer=node)

    def ssl_context(self, role: Role) -> SSL.Context:
        """The OpenSSL context for ``role`` (built once, shared by connections)."""
        with self._lock:
            if role not in self._contexts:
                self._contexts[role] = self._build_context(role)
            return self._contexts[role]

    def connection(self, role: Role) -> TrustedPassagesConnection:
        return TrustedPassagesConnection(role, self.profile, self.ssl_context(role),
                                         self.issuer, self.validator,
                                         expected_peer=self.expected_peer,
                                         own_spki=self._own_spki)

    @property
    def _own_spki(self) -> bytes:
        """SHA-256 of this node's certificate's SPKI (what its quotes bind), once."""
        with self._lock:
            if "own_spki" not in self._derived:
                self._derived["own_spki"] = spki_digest(self.certificate)
            return self._derived["own_spki"]

    def _build_context(self, role: Role) -> SSL.Context:
        method = SSL.TLS_SERVER_METHOD if role == "server" else SSL.TLS_CLIENT_METHOD
        context = SSL.Context(method)
        version = _TLS_VERSION[self.profile]
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        if self.profile == "classic":
            context.set_cipher_list(":".join(CLASSIC_CIPHERS).encode())
        context.set_options(_OPTIONS)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        use_certificate(context, self.certificate)
        use_private_key(context, self.private_key)
        context.check_privatekey()
        store = context.get_cert_store()
        assert store is not None  # every SSL_CTX has one
        for ca in self.ca_certificates:
            store.add_cert(crypto.X509.from_cryptography(ca))
            if role == "server":
                add_client_ca(context, ca)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        context.set_verify_depth(_VERIFY_DEPTH)
        # Offer / accept concurrent evidence and the pipelined first message
        # (TrustedPassagesConnection.send_first), best first.
        accepted = [CONCURRENT_ALPN, PIPELINING_ALPN] if self.concurrent_evidence \
            else [PIPELINING_ALPN]
        if role == "client":
            context.set_alpn_protos(accepted)
        else:
            context.set_alpn_select_callback(
                lambda _connection, offered: _select(accepted, offered))
        return context


def _select(accepted: list[bytes], offered: list[bytes]) -> Any:
    # Any: pyOpenSSL types its "no overlap" sentinel with a private class.
    return next((alpn for alpn in accepted if alpn in offered), SSL.NO_OVERLAPPING_PROTOCOLS)


def _spki(key: object) -> bytes:
    """DER SubjectPublicKeyInfo: compared as bytes, as cryptography < 41 keys lack ``==``."""
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined,no-any-return]
                            serialization.PublicFormat.SubjectPublicKeyInfo)
