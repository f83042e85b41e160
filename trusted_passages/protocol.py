"""The sans-IO core: a TLS connection (OpenSSL via memory BIOs) plus the attestation
exchange, exposed only as bytes in, bytes out and events (h11 style).

Flow (docs/protocol.md): TLS handshake with mutual certificate verification ->
server sends EVIDENCE -> client validates it (fail closed) and sends its EVIDENCE
-> server validates and sends FINISHED -> client is Established. Before
Established no application data moves in either direction; after it, the TLS
stream carries the application's bytes unchanged.

With ALPN ``tpv1.2`` (concurrent evidence) the client's EVIDENCE may leave as soon as
its quote is done, before it has validated the server's, so that both sides validate
at once. FINISHED then means "I accept your evidence" both ways: each side sends it
once the peer's evidence passed, and is Established when its own validation passed and
the peer's FINISHED arrived. ``tpv1.1`` adds only the pipelined first message.

Profiles:

``tp13``
    TLS 1.3 only. Both quotes bind the RFC 8446 exporter
    ``EXPORTER-trusted-passages-v1`` (32 bytes, empty context), which depends on
    the whole handshake transcript: both key shares and both certificates.
``classic``
    The 2011 paper as written (legacy, no forward secrecy): TLS 1.2 with RSA key
    transport. The server's quote binds ClientHello.random; the client's binds
    SHA-256 of the EncryptedPreMasterSecret of its ClientKeyExchange, as seen
    on the wire (:mod:`trusted_passages.records`).

Every quote also binds SHA-256 of its issuer's TLS SubjectPublicKeyInfo, which
the receiver compares with the certificate the TLS handshake verified.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from attestation.cache import BoundedCache
from attestation.errors import EvidenceFormatError, TestbedError, VerificationError
from trusted_passages.envelope import PROFILES, ROLES, Profile, Role
from trusted_passages.errors import ProtocolError
from trusted_passages.events import (
    ApplicationData,
    AttestationFailed,
    ConnectionClosed,
    Established,
    Event,
    HandshakeComplete,
    PeerVerified,
)
from trusted_passages.frames import (
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    error_payload,
    parse_error_payload,
)
from trusted_passages.interfaces import (
    BindingContext,
    Issuer,
    PeerEvidence,
    Validator,
    spki_digest,
)
from trusted_passages.openssl_compat import own_certificate, peer_certificate
from trusted_passages.records import (
    HandshakeScanner,
    HandshakeType,
    client_hello_random,
    encrypted_premaster_secret,
)

EXPORTER_LABEL: Final = b"EXPORTER-trusted-passages-v1"
# ALPN of TPv1 with the client's first application bytes allowed right behind its
# EVIDENCE (docs/protocol.md, "Pipelined first message"); without it, such bytes are a
# protocol error, as in plain TPv1.
PIPELINING_ALPN: Final = b"tpv1.1"
# TPv1 + the pipelined first message + the client's evidence sent as soon as it is made,
# confirmed by a client FINISHED (docs/protocol.md, "Concurrent evidence").
CONCURRENT_ALPN: Final = b"tpv1.2"
BINDING_BYTES: Final = 32
TLS_VERSIONS: Final[dict[str, str]] = {"tp13": "TLSv1.3", "classic": "TLSv1.2"}
# RSA key transport only: the classic binding needs an EncryptedPreMasterSecret.
CLASSIC_CIPHERS: Final = ("AES128-GCM-SHA256", "AES256-GCM-SHA384")
RECV_CHUNK: Final = 16384
_OUT_CHUNK: Final = 65536


Submit = Callable[[Callable[[], bytes]], Future[bytes]]  # an executor's submit


class State(Enum):
    HANDSHAKING = "handshaking"
    AWAIT_EVIDENCE = "awaiting evidence"
    AWAIT_FINISHED = "awaiting FINISHED"
    ESTABLISHED = "established"
    CLOSED = "closed"


class TrustedPassagesConnection:
    """One side of one attested channel. Not thread-safe: one caller at a time.

    ``issuer`` and ``validator`` are called synchronously from
    :meth:`receive_data` (a TPM quote takes milliseconds); adapters that must
    not block run that call in a worker thread.
    """

    def __init__(self, role: Role, profile: Profile, ssl_context: SSL.Context,
                 issuer: Issuer, validator: Validator, *,
                 expected_peer: str | None = None, own_spki: bytes | None = None) -> None:
        if role not in ROLES or profile not in PROFILES:
            raise ValueError(f"role must be one of {ROLES}, profile one of {PROFILES}")
        self.role: Role = role
        self.profile: Profile = profile
        self.expected_peer = expected_peer
        self.peer: PeerEvidence | None = None
        self.peer_certificate: x509.Certificate | None = None
        self._peer_role: Role = "client" if role == "server" else "server"
        context = BindingContext(profile, role)
        # BindableIssuer's test, without typing's slow runtime protocol check per connection.
        bound = getattr(issuer, "bound", None)
        self._issuer: Issuer = bound(context) if callable(bound) else issuer
        self._validator = validator
        self._state = State.HANDSHAKING
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._own_binding = self._peer_binding = b""
        self._peer_facts = CertificateFacts(b"", frozenset())  # the peer's, once known
        # The SPKI digest of the context's own certificate, when the caller knows it
        # (ChannelConfig does): not re-derived from the session per connection.
        self._own_spki = own_spki or b""
        self._scanner = self._classic_scanner() if profile == "classic" else None
        # The client's evidence, produced early by prepare_evidence() and held back
        # until the server's evidence has passed (fail closed).
        self._prepared: bytes | None = None
        self._evidence_sent = False
        self._prepare_error: TestbedError | None = None
        self._preparing: Future[bytes] | None = None  # prepare_evidence(submit=...)
        self._scan_error: str | None = None
        self._first: bytes | None = None  # the client's first message, see send_first()
        # This side's checks of the completed session (and the server's quote) may wait
        # until the adapter sent the handshake's last TLS bytes (finish_handshake): a
        # client's Finished, which the server then verifies meanwhile; a server's
        # session tickets, which the client then reads while the server quotes.
        self.checks_after_finished = False
        self._checks_pending = False
        self.pipelined = False  # the peer negotiated PIPELINING_ALPN or CONCURRENT_ALPN
        self.concurrent = False  # the peer negotiated CONCURRENT_ALPN
        self._tls = SSL.Connection(ssl_context, None)
        # Mutual verification is not optional, whatever the context says.
        self._tls.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        if role == "client":
            self._tls.set_connect_state()
            self._start_handshake()
        else:
            self._tls.set_accept_state()

    def __repr__(self) -> str:
        return (f"TrustedPassagesConnection(role={self.role!r}, profile={self.profile!r}, "
                f"state={self._state.value!r})")

    # --- public API -------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def established(self) -> bool:
        return self._state is State.ESTABLISHED

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def evidence_wanted(self) -> bool:
        """True when :meth:`prepare_evidence` would do work (client, after the handshake)."""
        return (self.role == "client" and self._state is State.AWAIT_EVIDENCE
                and self._prepared is None and self._prepare_error is None
                and self._preparing is None)

    def prepare_evidence(self, submit: Submit | None = None) -> None:
        """Produce this client's evidence now: with ``tpv1.2`` (:attr:`concurrent`) it
        is sent at once (made here, :meth:`data_to_send` holds it), else once the
        server's has passed.

        The client's quote binds only the session and its own key, both fixed when
        the handshake completes. Adapters call this right after flushing the
        client's TLS Finished, so the client's TPM quotes while the server's does
        (a round of quote latency saved). Calling it is optional: without it the
        evidence is made on demand, after the server's has passed.

        ``submit`` (an executor's ``submit``) runs the issuer in another thread, so that
        the server's evidence can be received and validated while this quote runs; the
        thread sees only the issuer and two byte strings, never the connection, and
        the connection waits for its result when the evidence is due.
        """
        if not self.evidence_wanted:
            return
        issue = functools.partial(self._issuer.issue, self._own_spki, self._own_binding)
        if submit is not None:
            self._preparing = submit(issue)
            return
        try:
            self._prepared = issue()
        except TestbedError as exc:
            self._prepare_error = exc  # reported when the evidence would be sent
            return
        if self.concurrent:
            self._send_frame(FrameType.EVIDENCE, self._prepared)
            self._evidence_sent = True

    @property
    def waiting_for(self) -> str:
        """What this side is waiting for, in words (timeouts name it)."""
        peer = f"the {self._peer_role}'s"
        return {
            State.HANDSHAKING: "the TLS handshake",
            State.AWAIT_EVIDENCE: f"{peer} evidence",
            State.AWAIT_FINISHED: f"{peer} FINISHED",
            State.ESTABLISHED: "application data",
            State.CLOSED: "nothing (closed)",
        }[self._state]

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the network (b"" for EOF); returns what happened."""
        events: list[Event] = []
        if self._state is State.CLOSED:
            return events
        if self._checks_pending:
            events += self.finish_handshake()
        if not data:
            self._on_eof(events)
        else:
            self._scan(data, incoming=True)
            self._tls.bio_write(data)
            if self._state is State.HANDSHAKING:
                self._advance_handshake(events)
            if self._state not in (State.HANDSHAKING, State.CLOSED):
                self._read_plaintext(events)
        self._pump_out()
        return events

    def data_to_send(self) -> bytes:
        """Bytes for the network, in order; empty when there is nothing to send."""
        self._pump_out()
        out = bytes(self._out)
        self._out.clear()
        return out

    def send(self, app_data: bytes) -> None:
        if self._state is not State.ESTABLISHED:
            raise ProtocolError(f"cannot send application data: the channel is "
                                f"{self._state.value}, not established")
        try:
            self._tls.sendall(app_data)
        except SSL.Error as exc:
            self._state = State.CLOSED
            raise ProtocolError(f"the TLS session is broken: {_ssl_reason(exc)}") from None
        self._pump_out()

    def send_first(self, app_data: bytes) -> None:
        """Client, before Established: the first application bytes, sent right behind this
        client's EVIDENCE when the server negotiated it (ALPN ``tpv1.1``), else as soon
        as the channel is Established. Either way they go only to a server whose
        evidence passed, and the server hands them to its application only once the
        client's evidence has passed too (a refused client's bytes are dropped unread).
        Saves the round trip of waiting for FINISHED before a request."""
        if self.role != "client" or self._first is not None or \
                self._state in (State.ESTABLISHED, State.CLOSED):
            raise ProtocolError("send_first is for a client, once, before it is established "
                                "(then use send)")
        self._first = bytes(app_data)
        self._release_first()

    def close(self) -> None:
        """Send TLS close_notify and stop; data_to_send() then holds the last bytes."""
        if self._state is not State.CLOSED:
            self._shutdown_tls()
            self._state = State.CLOSED
            self._pump_out()

    def timeout(self) -> list[Event]:
        """The peer took too long: refuse the channel, telling the peer why."""
        events: list[Event] = []
        if self._state not in (State.ESTABLISHED, State.CLOSED):
            self._fail("timeout", f"timeout waiting for {self.waiting_for}", events)
        return events

    # --- TLS --------------------------------------------------------------------------

    def _start_handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            raise ProtocolError(f"cannot start the TLS handshake: {_ssl_reason(exc)}") from None
        self._pump_out()

    def _advance_handshake(self, events: list[Event]) -> None:
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as exc:
            self._fail("tls", f"TLS handshake failed: {_ssl_reason(exc)}", events,
                       by_peer=_is_alert(exc), notify=False)
            return
        if self.checks_after_finished:
            self._checks_pending = True  # data_to_send() holds the last TLS bytes now
            return
        self._on_handshake_complete(events)

    def finish_handshake(self) -> list[Event]:
        """With :attr:`checks_after_finished`: this side's checks of the completed TLS
        session (profile, certificates, bindings), and then the server's evidence, once
        the adapter sent the handshake's last TLS bytes. Nothing of this side's evidence
        or data goes out before them. An adapter that sets the flag calls this once it
        sent :meth:`data_to_send`'s bytes (a server's peer may send nothing until it has
        the server's evidence); a client's pending checks also run first on its next
        :meth:`receive_data`."""
        events: list[Event] = []
        if self._checks_pending:
            self._checks_pending = False
            self._on_handshake_complete(events)
            if self._state is not State.CLOSED:
                self._read_plaintext(events)
            self._pump_out()
        return events

    def _on_handshake_complete(self, events: list[Event]) -> None:
        self._state = State.AWAIT_EVIDENCE  # the TLS channel is up: failures can be told
        try:
            peer_cert = self._check_session()
            self._own_binding, self._peer_binding = self._bindings()
        except VerificationError as exc:
            self._fail(exc.check, exc.reason, events)
            return
        if not self._own_spki:
            own_cert = own_certificate(self._tls)
            assert own_cert is not None  # the handshake completed with it
            self._own_spki = certificate_facts(own_cert).spki_digest
        self.peer_certificate = peer_cert
        alpn = self._tls.get_alpn_proto_negotiated()
        self.concurrent = alpn == CONCURRENT_ALPN
        self.pipelined = alpn in (PIPELINING_ALPN, CONCURRENT_ALPN)
        self._peer_facts = certificate_facts(peer_cert)
        events.append(HandshakeComplete(self._tls.get_protocol_version_name(),
                                        self._tls.get_cipher_name() or "", peer_cert))
        if self.role == "server":
            self._send_evidence(events)

    def _check_session(self) -> x509.Certificate:
        """Fail closed if the context negotiated something this profile does not allow."""
        version = self._tls.get_protocol_version_name()
        if version != TLS_VERSIONS[self.profile]:
            raise VerificationError("tls", f"profile {self.profile} needs "
                                    f"{TLS_VERSIONS[self.profile]}, negotiated {version}")
        cipher = self._tls.get_cipher_name()
        if self.profile == "classic" and cipher not in CLASSIC_CIPHERS:
            raise VerificationError("tls", f"profile classic needs RSA key transport "
                                    f"({', '.join(CLASSIC_CIPHERS)}), negotiated {cipher}")
        peer = peer_certificate(self._tls)
        if peer is None:
            raise VerificationError("tls", "the peer presented no certificate")
        return peer

    def _bindings(self) -> tuple[bytes, bytes]:
        """(nonce our quote binds, nonce the peer's quote must bind)."""
        if self.profile == "tp13":
            exported = self._tls.export_keying_material(EXPORTER_LABEL, BINDING_BYTES, b"")
            return exported, exported
        random, epms_hash = self._classic_values()
        return (random, epms_hash) if self.role == "server" else (epms_hash, random)

    def _classic_values(self) -> tuple[bytes, bytes]:
        try:
            if self._scan_error is not None:
                raise ProtocolError(self._scan_error)
            assert self._scanner is not None
            hello = self._scanner.messages.get(HandshakeType.CLIENT_HELLO)
            exchange = self._scanner.messages.get(HandshakeType.CLIENT_KEY_EXCHANGE)
            if hello is None or exchange is None:
                raise ProtocolError("no plaintext ClientHello and ClientKeyExchange seen")
            random = client_hello_random(hello)
            epms = encrypted_premaster_secret(exchange)
        except ProtocolError as exc:
            raise VerificationError("protocol", f"classic binding: {exc}") from None
        # The scanner read the same bytes OpenSSL did; disagreeing means a scanner bug.
        if not hmac.compare_digest(random, self._tls.client_random() or b""):
            raise VerificationError("protocol", "scanned ClientHello.random differs from the "
                                    "session's")
        return random, hashlib.sha256(epms).digest()

    def _classic_scanner(self) -> HandshakeScanner:
        # Client: its own outgoing bytes. Server: the bytes it received.
        return HandshakeScanner(frozenset({HandshakeType.CLIENT_HELLO,
                                           HandshakeType.CLIENT_KEY_EXCHANGE}))

    def _scan(self, data: bytes, *, incoming: bool) -> None:
        scanner = self._scanner
        if scanner is None or scanner.done or incoming != (self.role == "server"):
            return
        if self._scan_error is None:
            try:
                scanner.feed(data)
            except ProtocolError as exc:  # reported when the bindings are computed
                self._scan_error = str(exc)

    def _read_plaintext(self, events: list[Event]) -> None:
        while self._state is not State.CLOSED:
            try:
                chunk = self._tls.recv(RECV_CHUNK)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self._on_close_notify(events)
                return
            except SSL.Error as exc:
                self._on_tls_error(exc, events)
                return
            self._on_plaintext(chunk, events)

    def _on_tls_error(self, exc: SSL.Error, events: list[Event]) -> None:
        if self._state is State.ESTABLISHED:
            self._state = State.CLOSED
            events.append(ConnectionClosed(clean=False))
        else:
            self._fail("tls", _ssl_reason(exc), events, by_peer=_is_alert(exc), notify=False)

    def _pump_out(self) -> None:
        while True:
            try:
                chunk = self._tls.bio_read(_OUT_CHUNK)
            except SSL.WantReadError:
                return
            self._scan(chunk, incoming=False)
            self._out += chunk
            if len(chunk) < _OUT_CHUNK:  # a memory BIO gives all it has: drained
                return

    def _shutdown_tls(self) -> None:
        with contextlib.suppress(SSL.Error):  # after a fatal alert there is no session left
            self._tls.shutdown()

    # --- attestation exchange -------------------------------------------------------

    def _on_plaintext(self, chunk: bytes, events: list[Event]) -> None:
        if self._state is State.ESTABLISHED:
            events.append(ApplicationData(chunk))
            return
        try:
            self._decoder.feed(chunk)
            while self._state in (State.AWAIT_EVIDENCE, State.AWAIT_FINISHED):
                frame = self._decoder.next_frame()
                if frame is None:
                    return
                self._on_frame(frame, events)
        except ProtocolError as exc:
            self._fail("protocol", str(exc), events)
            return
        if self.established:  # (a property: mypy narrowed _state inside the loop)
            rest = self._decoder.take_remainder()
            if rest:  # sent by the server after its FINISHED: legitimately established
                events.append(ApplicationData(rest))

    def _on_frame(self, frame: Frame, events: list[Event]) -> None:
        if frame.type is FrameType.ERROR:
            check, reason = parse_error_payload(frame.payload)
            self._fail(check, reason, events, by_peer=True)
            return
        expected = (FrameType.EVIDENCE if self._state is State.AWAIT_EVIDENCE
                    else FrameType.FINISHED)
        if frame.type is not expected:
            raise ProtocolError(f"unexpected {frame.type.name} frame while waiting for "
                                f"{self.waiting_for}")
        if frame.type is FrameType.EVIDENCE:
            self._on_peer_evidence(frame.payload, events)
        else:
            self._on_finished(frame.payload, events)

    def _on_peer_evidence(self, payload: bytes, events: list[Event]) -> None:
        try:
            peer = self._verify_peer(payload)
        except VerificationError as exc:
            self._fail(exc.check, exc.reason, events)
            return
        except EvidenceFormatError as exc:
            self._fail("evidence_format", str(exc), events)
            return
        except TestbedError as exc:
            self._fail("validator", str(exc), events)
            return
        self.peer = peer
        events.append(PeerVerified(peer))
        if self.role == "client":
            # With the server verified: the client's evidence (unless tpv1.2 sent it
            # already), its confirmation (tpv1.2), then a pipelined first message.
            if self._evidence_sent or self._send_evidence(events):
                self._state = State.AWAIT_FINISHED
                if self.concurrent:  # a pipelined first message rides in the same record
                    self._send_frame(FrameType.FINISHED, trailer=self._take_first())
                else:
                    self._release_first()
            return
        if self.concurrent:  # accepted; established once the client accepts us too
            self._send_frame(FrameType.FINISHED)
            self._state = State.AWAIT_FINISHED
            return
        if self._decoder.buffered and not self.pipelined:
            raise ProtocolError("the client sent data after its evidence, before FINISHED "
                                f"(allowed only with ALPN {PIPELINING_ALPN.decode()})")
        self._establish_server(peer, events)

    def _establish_server(self, peer: PeerEvidence, events: list[Event]) -> None:
        # Pipelined bytes stay in the decoder until now, and go to the application only
        # as the ApplicationData after Established (_on_plaintext).
        self._send_frame(FrameType.FINISHED)
        self._state = State.ESTABLISHED
        events.append(Established(peer))

    def _on_finished(self, payload: bytes, events: list[Event]) -> None:
        if payload:
            raise ProtocolError("FINISHED carries no payload")
        assert self.peer is not None  # AWAIT_FINISHED is only entered after PeerVerified
        self._state = State.ESTABLISHED
        self._release_first()
        events.append(Established(self.peer))

    def _take_first(self) -> bytes:
        first, self._first = self._first or b"", None
        return first

    def _release_first(self) -> None:
        """Send the client's first message once it may go (see send_first)."""
        ready = self._state is State.ESTABLISHED or (
            self._state is State.AWAIT_FINISHED and self.pipelined)
        if self._first is not None and ready:
            self._tls.sendall(self._first)
            self._first = None

    def _verify_peer(self, payload: bytes) -> PeerEvidence:
        peer = self._validator.validate(payload, self._peer_binding)
        if peer.role != self._peer_role:
            raise VerificationError("role", f"the evidence was issued by a {peer.role}, this "
                                    f"peer is the {self._peer_role} (reflected evidence)")
        if peer.profile != self.profile:
            raise VerificationError("profile", f"the evidence is for profile {peer.profile}, "
                                    f"this session is {self.profile}")
        if not hmac.compare_digest(peer.user_data, self._peer_facts.spki_digest):
            raise VerificationError("key_binding", "the evidence binds another TLS key than "
                                    "the certificate the peer presented")
        if self.expected_peer is not None:
            self._check_expected_peer(peer)
        return peer

    def _check_expected_peer(self, peer: PeerEvidence) -> None:
        if peer.node != self.expected_peer:
            raise VerificationError("expected_peer", f"the attested node is {peer.node!r}, "
                                    f"expected {self.expected_peer!r}")
        names = self._peer_facts.names
        if self.expected_peer not in names:
            raise VerificationError("expected_peer", f"the TLS certificate names "
                                    f"{sorted(names)}, not {self.expected_peer!r}")

    def _send_evidence(self, events: list[Event]) -> bool:
        if self._preparing is not None:
            preparing, self._preparing = self._preparing, None
            try:
                self._prepared = preparing.result()
            except TestbedError as exc:
                self._prepare_error = exc
        try:
            if self._prepare_error is not None:
                raise self._prepare_error
            evidence = self._prepared
            if evidence is None:
                evidence = self._issuer.issue(self._own_spki, self._own_binding)
            self._send_frame(FrameType.EVIDENCE, evidence)
        except TestbedError as exc:
            # The detail stays local; the peer only learns that we failed.
            self._fail("issuer", f"could not produce evidence: {exc}", events,
                       peer_reason="the peer could not produce evidence")
            return False
        return True

    def _send_frame(self, frame_type: FrameType, payload: bytes = b"", *,
                    trailer: bytes = b"") -> None:
        """One frame (and ``trailer``, application bytes behind it) in one TLS write."""
        self._tls.sendall(encode_frame(frame_type, payload) + trailer)

    # --- endings ----------------------------------------------------------------------

    def _fail(self, check: str, reason: str, events: list[Event], *, by_peer: bool = False,
              notify: bool = True, peer_reason: str | None = None) -> None:
        """Refuse the channel: tell the peer (unless it told us), close, report."""
        if self._state is State.CLOSED:
            return
        events.append(AttestationFailed(check, reason, by_peer))
        if notify and not by_peer and self._state is not State.HANDSHAKING:
            with contextlib.suppress(SSL.Error):  # a broken session: closing is all that is left
                self._send_frame(FrameType.ERROR, error_payload(check, peer_reason or reason))
        self._shutdown_tls()
        self._state = State.CLOSED
        events.append(ConnectionClosed(clean=False))

    def _on_eof(self, events: list[Event]) -> None:
        if self._state is State.ESTABLISHED:
            self._state = State.CLOSED  # no close_notify: possibly truncated
            events.append(ConnectionClosed(clean=False))
        else:
            self._fail("protocol", f"connection closed while waiting for {self.waiting_for}",
                       events, notify=False)

    def _on_close_notify(self, events: list[Event]) -> None:
        if self._state is State.ESTABLISHED:
            self._shutdown_tls()
            self._state = State.CLOSED
            events.append(ConnectionClosed(clean=True))
        else:
            self._fail("protocol", f"the peer closed TLS while waiting for {self.waiting_for}",
                       events, notify=False)


# The same peers come back handshake after handshake: what is derived from their
# certificate is cached, keyed by the certificate itself (cryptography hashes and
# compares certificates by their parsed DER, so another certificate, even for the same
# key or name, is another key; cheaper than serializing the DER again).
CERTIFICATE_CACHE_SIZE: Final = 256


@dataclass(frozen=True)
class CertificateFacts:
    spki_digest: bytes  # interfaces.spki_digest
    names: frozenset[str]  # certificate_names


_CERTIFICATES: BoundedCache[x509.Certificate, CertificateFacts] = BoundedCache(
    CERTIFICATE_CACHE_SIZE)


def certificate_facts(certificate: x509.Certificate) -> CertificateFacts:
    """The SPKI digest and names of ``certificate``, cached."""
    return _CERTIFICATES.get_or_compute(certificate, lambda: CertificateFacts(
        spki_digest(certificate), frozenset(certificate_names(certificate))))


def certificate_names(certificate: x509.Certificate) -> set[str]:
    """The subject CNs and DNS SANs of a certificate."""
    names = {str(a.value) for a in certificate.subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)}
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return names
    return names | set(san.value.get_values_for_type(x509.DNSName))


def _ssl_reason(exc: SSL.Error) -> str:
    """OpenSSL's error queue as one line (pyOpenSSL gives a list of (lib, func, reason))."""
    queue = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(entry[-1]) for entry in queue if isinstance(entry, tuple) and entry]
    return "; ".join(reasons) or f"{type(exc).__name__}: {exc}"[:200]


def _is_alert(exc: SSL.Error) -> bool:
    # OpenSSL names received alerts "... alert ..." (e.g. "tlsv13 alert certificate required").
    return "alert" in _ssl_reason(exc)
