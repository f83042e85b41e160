"""Events the sans-IO core returns from ``receive_data`` (h11 style), and the one
reading of them both adapters share once a channel is established (:class:`Inbox`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509

from trusted_passages.errors import AttestationRejected
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


# --- for the adapters --------------------------------------------------------------------


@dataclass
class Inbox:
    """Application data an established channel has received and not yet handed out.

    Fed every event list the core returns from Established on, the events that came
    with Established included: a peer may send data and close in the same flight.
    """

    chunks: list[bytes] = field(default_factory=list)
    ended: bool = False  # the connection closed: nothing more will arrive

    def absorb(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, ApplicationData):
                self.chunks.append(event.data)
            elif isinstance(event, ConnectionClosed):
                self.ended = True

    @property
    def waiting(self) -> bool:
        """Nothing to hand out yet: no data, and the connection is still open."""
        return not self.chunks and not self.ended

    def take(self) -> bytes:
        """The next chunk received; b"" once the connection has closed."""
        return self.chunks.pop(0) if self.chunks else b""


def established(events: list[Event]) -> tuple[PeerEvidence, Inbox] | None:
    """The verified peer and what arrived with it, if ``events`` hold Established."""
    for index, event in enumerate(events):
        if isinstance(event, Established):
            inbox = Inbox()
            inbox.absorb(events[index + 1:])
            return event.peer, inbox
    return None


def rejected(event: AttestationFailed) -> AttestationRejected:
    return AttestationRejected(event.check, event.reason, by_peer=event.by_peer)


def raise_failure(events: list[Event]) -> None:
    """Raise AttestationRejected if the core refused the channel in ``events``."""
    for event in events:
        if isinstance(event, AttestationFailed):
            raise rejected(event)
