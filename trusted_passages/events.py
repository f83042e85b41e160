"""Events the sans-IO core returns from ``receive_data`` (h11 style)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509

from trusted_passages.interfaces import PeerEvidence


class Event:
    """Base class of every event."""


@dataclass(frozen=True)
class HandshakeComplete(Event):
    """The TLS handshake finished; the peer's certificate chain passed CA verification.

    Nothing is attested yet: no application data may flow.
    """

    tls_version: str
    cipher: str
    peer_certificate: x509.Certificate = field(repr=False)


@dataclass(frozen=True)
class PeerVerified(Event):
    """The peer's evidence passed validation and is bound to this session and its key."""

    peer: PeerEvidence


@dataclass(frozen=True)
class Established(Event):
    """Both directions verified: the peer's evidence passed here and the peer accepted ours."""

    peer: PeerEvidence


@dataclass(frozen=True)
class ApplicationData(Event):
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class AttestationFailed(Event):
    """The channel was refused. ``by_peer``: the peer sent an ERROR frame."""

    check: str
    reason: str
    by_peer: bool = False


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """No more data either way. ``clean``: closed by TLS close_notify after Established."""

    clean: bool = False
