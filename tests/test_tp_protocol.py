"""The sans-IO Trusted Passages core, without a TPM: two cores (or a core and a raw,
misbehaving TLS peer) exchanging bytes in memory. Every attack is a unit test here;
tests/test_tp_tpm.py repeats the important ones with real swtpm quotes and sockets."""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL

import trusted_passages
from attestation.errors import EvidenceFormatError, TestbedError
from attestation.registrar import PinnedAk
from trusted_passages import (
    AttestationRejected,
    BindingContext,
    ChannelConfig,
    FakeIssuer,
    FakeValidator,
    ProtocolError,
    TpmValidator,
    TrustedPassagesConnection,
    binding_digest,
)
from trusted_passages.envelope import MAX_ENVELOPE_BYTES, decode_envelope
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
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    FrameDecoder,
    FrameType,
    encode_frame,
    error_payload,
    parse_error_payload,
)
from trusted_passages.interfaces import PeerEvidence, spki_digest
from trusted_passages.pki import CertificateAuthority, generate_key, issue_certificate, make_ca
from trusted_passages.protocol import EXPORTER_LABEL, PIPELINING_ALPN, State
from trusted_passages.records import (
    HandshakeScanner,
    HandshakeType,
    client_hello_random,
    encrypted_premaster_secret,
)

KEY = b"fake-attestation-key-for-tests!!"
PROFILES = ["tp13", "classic"]


# --- PKI and configs -------------------------------------------------------------------


@dataclass
class Pki:
    ca: CertificateAuthority
    rogue_ca: CertificateAuthority
    keys: dict[tuple[str, str], Any] = field(default_factory=dict)

    def config(self, node: str, profile: str = "tp13", *, issuer: Any = None,
               validator: Any = None, expected_peer: str | None = None,
               cert_name: str | None = None, ca: CertificateAuthority | None = None,
               state: str = "good") -> ChannelConfig:
        key = self.keys.get((node, profile))
        if key is None:
            key = self.keys[(node, profile)] = generate_key(profile)  # type: ignore[arg-type]
        cert = issue_certificate(ca or self.ca, cert_name or node, key)
        return ChannelConfig(cert, key, [self.ca.certificate],
                             issuer or FakeIssuer(KEY, node, state=state),
                             validator or FakeValidator(KEY), profile=profile,  # type: ignore[arg-type]
                             expected_peer=expected_peer)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(make_ca("tp-test-ca"), make_ca("rogue-ca"))


# --- moving bytes ------------------------------------------------------------------------


class RawTls:
    """A TLS endpoint with no Trusted Passages logic: the misbehaving peer of the tests."""

    def __init__(self, config: ChannelConfig, role: str, *,
                 alpn: list[bytes] | None = None) -> None:
        self.config = config
        self.tls = SSL.Connection(config.ssl_context(role), None)  # type: ignore[arg-type]
        if alpn is not None:  # instead of the context's offer (tpv1.1)
            self.tls.set_alpn_protos(alpn)
        if role == "client":
            self.tls.set_connect_state()
            self._handshake()
        else:
            self.tls.set_accept_state()
        self.plaintext = b""

    handshake_done = False

    def _handshake(self) -> bool:
        if not self.handshake_done:
            try:
                self.tls.do_handshake()
            except SSL.WantReadError:
                return False
            self.handshake_done = True
        return True

    def receive_data(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        self.tls.bio_write(data)
        if not self._handshake():
            return []
        chunks = []
        while True:
            try:
                chunks.append(self.tls.recv(65536))
            except (SSL.WantReadError, SSL.ZeroReturnError):
                break
        self.plaintext += b"".join(chunks)
        return chunks

    def data_to_send(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.tls.bio_read(65536)
            except SSL.WantReadError:
                return out

    def send(self, plain: bytes) -> None:
        self.tls.sendall(plain)

    def exporter(self) -> bytes:
        return self.tls.export_keying_material(EXPORTER_LABEL, 32, b"")

    def own_evidence(self, role: str, node: str = "server") -> bytes:
        """Valid fake evidence for this TLS session (tp13), as an honest peer would send."""
        cert = self.tls.get_certificate(as_cryptography=True)
        assert cert is not None
        issuer = FakeIssuer(KEY, node).bound(BindingContext("tp13", role))  # type: ignore[arg-type]
        return issuer.issue(spki_digest(cert), self.exporter())


Endpoint = TrustedPassagesConnection | RawTls


def pump(a: Endpoint, b: Endpoint, rounds: int = 30) -> tuple[list[Any], list[Any]]:
    """Move bytes both ways until quiet; return what a and b each reported."""
    got: tuple[list[Any], list[Any]] = ([], [])
    for _ in range(rounds):
        moved = False
        for src, dst, sink in ((a, b, got[1]), (b, a, got[0])):
            data = src.data_to_send()
            if data:
                moved = True
                sink += dst.receive_data(data)
        if not moved:
            break
    return got


def pair(pki: Pki, profile: str = "tp13", *, server: dict[str, Any] | None = None,
         client: dict[str, Any] | None = None
         ) -> tuple[TrustedPassagesConnection, TrustedPassagesConnection]:
    s = pki.config("server", profile, **(server or {})).connection("server")
    c = pki.config("client", profile, **(client or {})).connection("client")
    return s, c


def failure(events: list[Event]) -> AttestationFailed:
    failures = [e for e in events if isinstance(e, AttestationFailed)]
    assert len(failures) == 1, events
    return failures[0]


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def handshake_raw_server(pki: Pki) -> tuple[TrustedPassagesConnection, RawTls]:
    """A client core and a raw TLS server, with the TLS handshake done."""
    raw = RawTls(pki.config("server"), "server")
    core = pki.config("client").connection("client")
    client_events, _ = pump(core, raw)
    assert kinds(client_events) == ["HandshakeComplete"]
    return core, raw


def handshake_raw_client(pki: Pki, *, alpn: list[bytes] | None = None
                         ) -> tuple[TrustedPassagesConnection, RawTls, bytes]:
    """A server core and a raw TLS client that received the server's evidence frame."""
    core = pki.config("server").connection("server")
    raw = RawTls(pki.config("client"), "client", alpn=alpn)
    _, server_events = pump(raw, core)
    assert kinds(server_events) == ["HandshakeComplete"]
    assert core.state is State.AWAIT_EVIDENCE
    return core, raw, raw.plaintext


# --- the honest run ------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_mutual_attestation_then_application_data(pki: Pki, profile: str) -> None:
    server, client = pair(pki, profile, client={"expected_peer": "server"})
    client_events, server_events = pump(client, server)
    assert kinds(client_events) == ["HandshakeComplete", "PeerVerified", "Established"]
    assert kinds(server_events) == ["HandshakeComplete", "PeerVerified", "Established"]
    assert isinstance(client_events[0], HandshakeComplete)
    assert client_events[0].tls_version == ("TLSv1.3" if profile == "tp13" else "TLSv1.2")
    assert isinstance(client_events[2], Established) and client_events[2].peer.node == "server"
    assert isinstance(server_events[2], Established) and server_events[2].peer.node == "client"
    assert client.peer is not None and client.peer.profile == profile
    client.send(b"ping")
    _, to_server = pump(client, server)
    server.send(b"pong")
    to_client, _ = pump(client, server)
    assert to_server == [ApplicationData(b"ping")] and to_client == [ApplicationData(b"pong")]
    client.close()
    _, closing = pump(client, server)
    assert closing == [ConnectionClosed(clean=True)] and server.closed


def test_server_application_data_right_after_finished_is_delivered(pki: Pki) -> None:
    server, client = pair(pki)
    server_events: list[Event] = []
    while True:  # one direction at a time, up to the client's EVIDENCE
        server_events += server.receive_data(client.data_to_send())
        if server.established:
            break
        client.receive_data(server.data_to_send())
    assert kinds(server_events)[-1] == "Established" and not client.established
    server.send(b"early but legitimate")  # the server is established: FINISHED went first
    more = client.receive_data(server.data_to_send())
    assert kinds(more) == ["Established", "ApplicationData"]


def test_the_two_quotes_bind_the_same_exporter_but_different_roles(pki: Pki) -> None:
    server, client = pair(pki)
    pump(client, server)
    issued_client = pki_issuer(client).issued
    issued_server = pki_issuer(server).issued
    assert issued_client[-1][1] == issued_server[-1][1]  # the same 32-byte exporter
    assert issued_client[-1][0].role == "client" and issued_server[-1][0].role == "server"


def pki_issuer(core: TrustedPassagesConnection) -> FakeIssuer:
    issuer = core._issuer
    assert isinstance(issuer, FakeIssuer)
    return issuer


def test_send_before_established_is_refused(pki: Pki) -> None:
    core = pki.config("client").connection("client")
    with pytest.raises(ProtocolError, match="not established"):
        core.send(b"too early")
    core, raw = handshake_raw_server(pki)
    assert core.state is State.AWAIT_EVIDENCE
    with pytest.raises(ProtocolError, match="awaiting evidence"):
        core.send(b"still too early")
    raw.send(encode_frame(FrameType.EVIDENCE, raw.own_evidence("server")))
    pump(core, raw)
    assert core.state is State.AWAIT_FINISHED
    with pytest.raises(ProtocolError, match="awaiting FINISHED"):
        core.send(b"and still")


# --- attacks and failures -------------------------------------------------------------------


class ReflectingIssuer:
    """A malicious client that answers with the server's own evidence."""

    def __init__(self, captured: list[bytes]) -> None:
        self.captured = captured

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        return self.captured[-1]


class CapturingValidator(FakeValidator):
    def __init__(self) -> None:
        super().__init__(KEY)
        self.seen: list[bytes] = []

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        self.seen.append(evidence)
        return super().validate(evidence, nonce)


def test_reflected_server_evidence_is_caught_by_role(pki: Pki) -> None:
    capture = CapturingValidator()
    server, client = pair(pki, client={"issuer": ReflectingIssuer(capture.seen),
                                       "validator": capture})
    client_events, server_events = pump(client, server)
    rejected = failure(server_events)
    assert rejected.check == "role" and not rejected.by_peer
    assert failure(client_events).check == "role" and failure(client_events).by_peer
    assert "Established" not in kinds(server_events)


class ReplayIssuer:
    def __init__(self, evidence: bytes) -> None:
        self.evidence = evidence

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        return self.evidence


@pytest.mark.parametrize("profile", PROFILES)
def test_evidence_from_another_session_is_caught_by_qualifying_data(
        pki: Pki, profile: str) -> None:
    capture = CapturingValidator()
    server, client = pair(pki, profile, client={"validator": capture})
    pump(client, server)
    old = capture.seen[-1]
    server, client = pair(pki, profile, server={"issuer": ReplayIssuer(old)})
    client_events, server_events = pump(client, server)
    assert failure(client_events).check == "qualifying_data"
    assert failure(server_events).by_peer and failure(server_events).check == "qualifying_data"


def test_client_fails_closed_and_never_reveals_its_evidence(pki: Pki) -> None:
    issuer = FakeIssuer(KEY, "client")
    server, client = pair(pki, server={"state": "tampered"}, client={"issuer": issuer})
    client_events, server_events = pump(client, server)
    assert failure(client_events).check == "policy"
    assert issuer.issued == []
    assert kinds(client_events) == ["HandshakeComplete", "AttestationFailed", "ConnectionClosed"]
    peer_view = failure(server_events)
    assert peer_view.by_peer and peer_view.check == "policy"
    assert "not accepted" in peer_view.reason


@pytest.mark.parametrize("profile", PROFILES)
def test_tampered_client_is_rejected_by_the_server(pki: Pki, profile: str) -> None:
    server, client = pair(pki, profile, client={"state": "tampered"})
    client_events, server_events = pump(client, server)
    assert failure(server_events).check == "policy"
    assert failure(client_events).check == "policy" and failure(client_events).by_peer
    assert not client.established and not server.established


class OtherKeyIssuer:
    """Evidence for another TLS key: what a relay holding its own certificate would send."""

    def __init__(self, node: str) -> None:
        self.inner = FakeIssuer(KEY, node).bound(BindingContext("tp13", "server"))

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        return self.inner.issue(hashlib.sha256(b"another key").digest(), nonce)


def test_evidence_bound_to_another_tls_key_is_caught_by_key_binding(pki: Pki) -> None:
    server, client = pair(pki, server={"issuer": OtherKeyIssuer("server")})
    client_events, _ = pump(client, server)
    assert failure(client_events).check == "key_binding"


def test_expected_peer_is_checked_against_the_attested_node(pki: Pki) -> None:
    server, client = pair(pki, client={"expected_peer": "server-2"})
    client_events, _ = pump(client, server)
    assert failure(client_events).check == "expected_peer"
    assert "attested node is 'server'" in failure(client_events).reason


def test_expected_peer_is_checked_against_the_certificate(pki: Pki) -> None:
    server, client = pair(pki, server={"cert_name": "mallory"},
                          client={"expected_peer": "server"})
    client_events, _ = pump(client, server)
    assert failure(client_events).check == "expected_peer"
    assert "mallory" in failure(client_events).reason


class FixedContextIssuer:
    """Not bindable: always issues for the given context (a misconfigured peer)."""

    def __init__(self, node: str, context: BindingContext) -> None:
        self.inner = FakeIssuer(KEY, node, context=context)

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        return self.inner.issue(user_data, nonce)


def test_evidence_for_another_profile_is_refused(pki: Pki) -> None:
    issuer = FixedContextIssuer("server", BindingContext("classic", "server"))
    server, client = pair(pki, server={"issuer": issuer})
    client_events, _ = pump(client, server)
    assert failure(client_events).check == "profile"


def test_client_certificate_from_another_ca_fails_the_tls_handshake(pki: Pki) -> None:
    server, client = pair(pki, client={"ca": pki.rogue_ca})
    client_events, server_events = pump(client, server)
    assert failure(server_events).check == "tls"
    assert "certificate" in failure(server_events).reason
    assert failure(client_events).check == "tls" and failure(client_events).by_peer
    assert "HandshakeComplete" not in kinds(server_events)


def test_server_certificate_from_another_ca_fails_the_tls_handshake(pki: Pki) -> None:
    server, client = pair(pki, server={"ca": pki.rogue_ca})
    client_events, _ = pump(client, server)
    assert failure(client_events).check == "tls"
    assert "certificate verify failed" in failure(client_events).reason


def test_a_context_negotiating_the_wrong_tls_version_is_refused(pki: Pki) -> None:
    config = pki.config("client", "classic")
    loose = SSL.Context(SSL.TLS_CLIENT_METHOD)  # no version pinning: TLS 1.3 wins
    loose.use_certificate(config.certificate)
    loose.use_privatekey(config.private_key)
    store = loose.get_cert_store()
    assert store is not None
    from OpenSSL import crypto
    store.add_cert(crypto.X509.from_cryptography(pki.ca.certificate))
    client = TrustedPassagesConnection("client", "classic", loose, config.issuer,
                                       config.validator)
    server = pki.config("server", "tp13").connection("server")
    client_events, server_events = pump(client, server)
    assert failure(client_events).check == "tls"
    assert "needs TLSv1.2" in failure(client_events).reason
    told = failure(server_events)  # the TLS channel was up: the refusal went through it
    assert (told.check, told.by_peer) == ("tls", True)


class OtherEpmsIssuer:
    """A classic client whose quote binds another EncryptedPreMasterSecret."""

    def __init__(self) -> None:
        self.inner = FakeIssuer(KEY, "client").bound(BindingContext("classic", "client"))

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        return self.inner.issue(user_data, hashlib.sha256(b"another EPMS").digest())


def test_classic_server_rejects_a_client_quote_binding_another_epms(pki: Pki) -> None:
    server, client = pair(pki, "classic", client={"issuer": OtherEpmsIssuer()})
    _, server_events = pump(client, server)
    assert failure(server_events).check == "qualifying_data"


def test_classic_bindings_are_the_wire_values(pki: Pki) -> None:
    server, client = pair(pki, "classic")
    pump(client, server)
    (_server_ctx, server_nonce), = pki_issuer(server).issued
    (_client_ctx, client_nonce), = pki_issuer(client).issued
    assert server_nonce == client._tls.client_random()  # ClientHello.random
    assert client_nonce == server._peer_binding != server_nonce  # SHA-256(EPMS) both sides


# --- framing violations from a raw TLS peer ------------------------------------------------


@pytest.mark.parametrize("plaintext,reason", [
    (b"HTTP/1.1 200 OK\r\n\r\nhello", "not a TPv1 frame"),
    (b"TPv2" + bytes(5), "not a TPv1 frame"),
    (HEADER.pack(MAGIC, 9, 0), "unknown frame type 9"),
    (HEADER.pack(MAGIC, FrameType.EVIDENCE, MAX_PAYLOAD + 1), "exceeds"),
    (encode_frame(FrameType.FINISHED), "unexpected FINISHED frame while waiting for the "
                                       "server's evidence"),
    (encode_frame(FrameType.EVIDENCE, b"{not json"), "not JSON"),
])
def test_client_rejects_framing_violations(pki: Pki, plaintext: bytes, reason: str) -> None:
    core, raw = handshake_raw_server(pki)
    raw.send(plaintext)
    events, told = pump(core, raw)
    rejected = failure(events)
    assert rejected.check in ("protocol", "evidence_format") and reason in rejected.reason
    assert b"".join(told).startswith(MAGIC)
    check, text = parse_error_payload(b"".join(told)[HEADER.size:])
    assert (check, text) == (rejected.check, rejected.reason[:1024])
    assert core.closed and core.receive_data(b"more") == []


def test_application_data_before_established_is_a_violation_on_the_server(pki: Pki) -> None:
    core, raw, _ = handshake_raw_client(pki)
    raw.send(b"GET / HTTP/1.1\r\n\r\n")
    _, events = pump(raw, core)
    assert failure(events).check == "protocol"
    assert b"attestation failed: protocol: bytes b'GET ' are not a TPv1 frame" in raw.plaintext


@pytest.mark.parametrize("alpn", [[b"h2"], [b"tpv1.0"]])
def test_data_after_client_evidence_is_a_violation_without_tpv1_1(
        pki: Pki, alpn: list[bytes]) -> None:
    core, raw, _ = handshake_raw_client(pki, alpn=alpn)
    assert not core.pipelined
    raw.send(encode_frame(FrameType.EVIDENCE, raw.own_evidence("client", "client"))
             + b"piggybacked")
    _, events = pump(raw, core)
    assert kinds(events)[:1] == ["PeerVerified"] and failure(events).check == "protocol"
    assert "allowed only with ALPN tpv1.1" in failure(events).reason
    assert not core.established


def test_pipelined_data_reaches_the_application_only_after_the_evidence_passed(
        pki: Pki) -> None:
    core, raw, _ = handshake_raw_client(pki, alpn=[PIPELINING_ALPN])  # a tpv1.1 client
    assert core.pipelined and not core.concurrent
    raw.send(encode_frame(FrameType.EVIDENCE, raw.own_evidence("client", "client"))
             + b"piggybacked")
    _, events = pump(raw, core)
    assert events == [events[0], events[1], ApplicationData(b"piggybacked")]
    assert kinds(events) == ["PeerVerified", "Established", "ApplicationData"]


def test_pipelined_data_of_a_refused_client_is_dropped_unread(pki: Pki) -> None:
    core, raw, _ = handshake_raw_client(pki)
    forged = FakeIssuer(b"another key, not the verifier's!", "client").bound(
        BindingContext("tp13", "client"))
    cert = raw.tls.get_certificate(as_cryptography=True)
    assert cert is not None
    raw.send(encode_frame(FrameType.EVIDENCE, forged.issue(spki_digest(cert), raw.exporter()))
             + b"secret request")
    _, events = pump(raw, core)
    assert failure(events) and "ApplicationData" not in kinds(events) and core.closed


@pytest.mark.parametrize("pipelined", [True, False])
def test_send_first_goes_behind_the_evidence_or_after_finished(pki: Pki,
                                                               pipelined: bool) -> None:
    client = pki.config("client").connection("client")
    server_config = pki.config("server")
    context = server_config._build_context("server")
    if not pipelined:  # a TPv1 server: it selects no ALPN
        context.set_alpn_select_callback(lambda _c, _o: SSL.NO_OVERLAPPING_PROTOCOLS)
    server = TrustedPassagesConnection("server", "tp13", context, server_config.issuer,
                                       server_config.validator)
    client.send_first(b"GET /")
    with pytest.raises(ProtocolError, match="once"):
        client.send_first(b"again")
    client_events, server_events = pump(client, server)
    assert client.pipelined is server.pipelined is pipelined
    assert kinds(client_events) == ["HandshakeComplete", "PeerVerified", "Established"]
    # Pipelined: it came with the evidence; else after FINISHED: the same events either way.
    assert server_events[-1] == ApplicationData(b"GET /")
    assert kinds(server_events) == ["HandshakeComplete", "PeerVerified", "Established",
                                    "ApplicationData"]
    with pytest.raises(ProtocolError, match="send_first is for a client"):
        server.send_first(b"x")


def test_a_second_evidence_frame_is_out_of_order(pki: Pki) -> None:
    core, raw = handshake_raw_server(pki)
    evidence = encode_frame(FrameType.EVIDENCE, raw.own_evidence("server"))
    raw.send(evidence + evidence)
    events, _ = pump(core, raw)
    assert kinds(events)[0] == "PeerVerified"
    assert "unexpected EVIDENCE frame while waiting for the server's FINISHED" in \
        failure(events).reason


def test_finished_with_a_payload_is_a_violation(pki: Pki) -> None:
    core, raw = handshake_raw_server(pki)
    raw.send(encode_frame(FrameType.EVIDENCE, raw.own_evidence("server")))
    pump(core, raw)
    raw.send(encode_frame(FrameType.FINISHED, b"x"))
    events, _ = pump(core, raw)
    assert failure(events).check == "protocol" and "no payload" in failure(events).reason


def test_frames_split_across_tls_records_are_reassembled(pki: Pki) -> None:
    core, raw = handshake_raw_server(pki)
    frame = encode_frame(FrameType.EVIDENCE, raw.own_evidence("server"))
    for i in range(0, len(frame), 7):
        raw.send(frame[i : i + 7])
    events, _ = pump(core, raw)
    assert kinds(events) == ["PeerVerified"]


def test_an_error_frame_from_the_peer_is_reported_as_its_rejection(pki: Pki) -> None:
    core, raw = handshake_raw_server(pki)
    raw.send(encode_frame(FrameType.ERROR, error_payload("policy", "PCR 4\x1b[31m differs")))
    events, _ = pump(core, raw)
    rejected = failure(events)
    assert (rejected.check, rejected.by_peer) == ("policy", True)
    assert rejected.reason == "PCR 4 [31m differs"  # control characters neutralized
    assert kinds(events) == ["AttestationFailed", "ConnectionClosed"]
    assert b"attestation failed" not in raw.plaintext  # no ERROR answered with an ERROR


@pytest.mark.parametrize("cut", [0, 3, HEADER.size + 10])
def test_eof_mid_exchange_is_a_failure(pki: Pki, cut: int) -> None:
    core, raw = handshake_raw_server(pki)
    if cut:
        raw.send(encode_frame(FrameType.EVIDENCE, raw.own_evidence("server"))[:cut])
        pump(core, raw)
    events = core.receive_data(b"")
    assert failure(events).check == "protocol"
    assert "closed while waiting for the server's evidence" in failure(events).reason
    assert isinstance(events[-1], ConnectionClosed) and not events[-1].clean


def test_close_notify_mid_exchange_is_a_failure(pki: Pki) -> None:
    core, raw = handshake_raw_server(pki)
    raw.tls.shutdown()
    events, _ = pump(core, raw)
    assert failure(events).check == "protocol" and "closed TLS" in failure(events).reason


def test_eof_after_established_is_an_unclean_close(pki: Pki) -> None:
    server, client = pair(pki)
    pump(client, server)
    assert client.receive_data(b"") == [ConnectionClosed(clean=False)]


def test_timeout_tells_the_peer_what_was_awaited(pki: Pki) -> None:
    core, raw, _ = handshake_raw_client(pki)
    events = core.timeout()
    assert failure(events).check == "timeout"
    pump(raw, core)
    assert b"attestation failed: timeout: timeout waiting for the client's evidence\n" in \
        raw.plaintext


def test_issuer_failure_is_local_detail_and_generic_to_the_peer(pki: Pki) -> None:
    class Broken:
        def issue(self, user_data: bytes, nonce: bytes) -> bytes:
            raise TestbedError("TPM unreachable at swtpm:port=1")

    server, client = pair(pki, server={"issuer": Broken()})
    client_events, server_events = pump(client, server)
    assert "swtpm:port=1" in failure(server_events).reason
    assert failure(client_events).reason == "the peer could not produce evidence"


# --- configuration -----------------------------------------------------------------------


def test_config_keeps_the_private_key_out_of_repr(pki: Pki) -> None:
    config = pki.config("server")
    assert "private_key" not in repr(config) and "PRIVATE" not in repr(config)
    assert "key=" not in repr(FakeIssuer(KEY, "n")) and KEY.hex() not in repr(FakeIssuer(KEY, "n"))


def test_config_rejects_inconsistent_settings(pki: Pki) -> None:
    config = pki.config("server")
    with pytest.raises(ValueError, match="RSA key"):
        ChannelConfig(config.certificate, config.private_key, [pki.ca.certificate],
                      config.issuer, config.validator, profile="classic")
    with pytest.raises(ValueError, match="not for this private key"):
        ChannelConfig(config.certificate, generate_key(), [pki.ca.certificate],
                      config.issuer, config.validator)
    with pytest.raises(ValueError, match="CA certificate"):
        ChannelConfig(config.certificate, config.private_key, [], config.issuer,
                      config.validator)


def test_unbound_issuers_refuse_to_guess_their_role() -> None:
    with pytest.raises(ProtocolError, match="not bound"):
        FakeIssuer(KEY, "n").issue(bytes(32), bytes(32))


def test_binding_digest_separates_roles_profiles_nonces_and_keys() -> None:
    nonce, key = bytes(32), b"\x01" * 32
    digests = {binding_digest(p, r, n, k)  # type: ignore[arg-type]
               for p in ("tp13", "classic") for r in ("server", "client")
               for n, k in ((nonce, key), (key, nonce))}
    assert len(digests) == 8
    with pytest.raises(ValueError):
        binding_digest("tp13", "server", b"short", key)


def test_attestation_rejected_is_a_verification_error() -> None:
    from attestation.errors import VerificationError
    exc = AttestationRejected("policy", "PCR 9", by_peer=True)
    assert isinstance(exc, VerificationError) and exc.check == "policy"
    assert "peer rejected us" in str(exc)


# --- fuzzing the parsers -----------------------------------------------------------------


frame_types = st.sampled_from(list(FrameType))


@given(frames=st.lists(st.tuples(frame_types, st.binary(max_size=300)), max_size=5),
       cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=30))
def test_frame_decoder_reassembles_any_split(frames: list[tuple[FrameType, bytes]],
                                             cuts: list[int]) -> None:
    stream = b"".join(encode_frame(t, p) for t, p in frames)
    decoder, got, pos = FrameDecoder(), [], 0
    for size in [*cuts, len(stream)]:
        decoder.feed(stream[pos : pos + size])
        pos += size
        while (frame := decoder.next_frame()) is not None:
            got.append((frame.type, frame.payload))
    assert got == frames and decoder.buffered == 0


@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(1, 64), max_size=20))
def test_frame_decoder_raises_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    decoder, pos = FrameDecoder(max_payload=256), 0
    try:
        for size in [*cuts, len(data)]:
            decoder.feed(data[pos : pos + size])
            pos += size
            while decoder.next_frame() is not None:
                pass
    except ProtocolError:
        pass
    assert decoder.buffered <= len(data)


@given(st.binary(max_size=5000))
def test_error_payload_parsing_never_fails(payload: bytes) -> None:
    check, reason = parse_error_payload(payload)
    assert check and check.isprintable() and reason.isprintable() and len(reason) <= 1024


@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                              lambda c: st.lists(c, max_size=4)
                              | st.dictionaries(st.text(max_size=10), c, max_size=6),
                              max_leaves=30).map(lambda d: json.dumps(d).encode())))
def test_envelope_decoding_raises_only_format_errors(data: bytes) -> None:
    with contextlib.suppress(EvidenceFormatError):
        decode_envelope(data)


b64 = st.binary(max_size=160).map(lambda b: base64.b64encode(b).decode())
evidence_docs = st.fixed_dictionaries({
    "format": st.sampled_from(["tpm2-evidence", "other"]), "version": st.sampled_from([1, 2]),
    "attest": b64, "signature": b64, "ak_public": b64,
    "pcr_bank": st.sampled_from(["sha256", "sha1", "md5"]),
    "pcrs": st.dictionaries(st.sampled_from(["0", "7", "99", "x"]),
                            st.sampled_from(["00" * 32, "zz" * 32, "00"]), max_size=3),
}, optional={"event_log": st.one_of(st.none(), b64), "bogus": st.integers()})


@given(evidence=evidence_docs, role=st.sampled_from(["server", "client"]))
def test_tpm_validator_raises_only_project_errors(evidence: dict[str, Any], role: str) -> None:
    trust = PinnedAk([ec.generate_private_key(ec.SECP256R1()).public_key()])
    envelope = {"v": 1, "node": "n", "role": role, "profile": "tp13",
                "user_data": "00" * 32, "evidence": evidence}
    with pytest.raises(TestbedError):
        TpmValidator(trust).validate(json.dumps(envelope).encode(), bytes(32))


def test_envelope_decoding_is_bounded_and_strict() -> None:
    with pytest.raises(EvidenceFormatError, match="exceeds"):
        decode_envelope(b" " * (MAX_ENVELOPE_BYTES + 1))
    with pytest.raises(EvidenceFormatError, match="not JSON"):
        decode_envelope(b"[" * 100000)
    good = {"v": 1, "node": "n", "role": "server", "profile": "tp13", "user_data": "00" * 32,
            "evidence": {}}
    assert decode_envelope(json.dumps(good).encode()).node == "n"
    for key, value in [("v", True), ("node", "../x"), ("role", "admin"), ("user_data", "0"),
                       ("profile", "tls12"), ("evidence", [])]:
        with pytest.raises(EvidenceFormatError):
            decode_envelope(json.dumps({**good, key: value}).encode())


def record(content_type: int, payload: bytes, version: bytes = b"\x03\x03") -> bytes:
    return struct.pack(">B2sH", content_type, version, len(payload)) + payload


def handshake(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3) + body


@given(random=st.binary(min_size=32, max_size=32), epms=st.binary(min_size=1, max_size=300),
       filler=st.binary(max_size=400), record_size=st.integers(1, 200),
       cuts=st.lists(st.integers(1, 100), max_size=40), tail=st.binary(max_size=50))
def test_record_scanner_finds_the_bound_values_however_split(
        random: bytes, epms: bytes, filler: bytes, record_size: int, cuts: list[int],
        tail: bytes) -> None:
    messages = (handshake(1, b"\x03\x03" + random + b"\x00\x00\x02\x00\x9c\x01\x00")
                + handshake(11, filler)  # Certificate: skipped, not buffered
                + handshake(16, len(epms).to_bytes(2) + epms)
                + handshake(15, filler))
    stream = b"".join(record(22, messages[i : i + record_size])
                      for i in range(0, len(messages), record_size))
    stream = record(21, b"\x01\x00") + stream + record(20, b"\x01") + tail  # tail: encrypted
    scanner, pos = HandshakeScanner(frozenset({1, 16})), 0
    for size in [*cuts, len(stream)]:
        scanner.feed(stream[pos : pos + size])
        pos += size
    assert scanner.done
    assert client_hello_random(scanner.messages[HandshakeType.CLIENT_HELLO]) == random
    assert encrypted_premaster_secret(scanner.messages[HandshakeType.CLIENT_KEY_EXCHANGE]) == epms


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(1, 64), max_size=20))
def test_record_scanner_raises_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    scanner, pos = HandshakeScanner(frozenset({1, 16})), 0
    try:
        for size in [*cuts, len(data)]:
            scanner.feed(data[pos : pos + size])
            pos += size
        for body in scanner.messages.values():
            for parse in (client_hello_random, encrypted_premaster_secret):
                with contextlib.suppress(ProtocolError):
                    parse(body)
    except ProtocolError:
        pass


def test_record_scanner_bounds() -> None:
    with pytest.raises(ProtocolError, match="not a TLS record"):
        HandshakeScanner(frozenset({1})).feed(struct.pack(">BBBH", 22, 3, 3, (1 << 14) + 2049))
    with pytest.raises(ProtocolError, match="too large"):
        HandshakeScanner(frozenset({1})).feed(record(22, b"\x01\x01\x00\x01"))
    with pytest.raises(ProtocolError, match="before ChangeCipherSpec"):
        HandshakeScanner(frozenset({1})).feed(record(23, b"x"))
    with pytest.raises(ProtocolError, match="middle of a handshake"):
        HandshakeScanner(frozenset({1})).feed(record(22, b"\x0b\x00\x00\x09abc")
                                              + record(20, b"\x01"))
    with pytest.raises(ProtocolError):
        encrypted_premaster_secret(b"\x00\x05abc")
    with pytest.raises(ProtocolError):
        client_hello_random(b"\x03\x03short")


def test_server_sees_unbindable_classic_traffic_as_a_failure(pki: Pki) -> None:
    core = pki.config("server", "classic").connection("server")
    events = core.receive_data(record(22, handshake(1, b"\x03\x03" + bytes(10))))
    assert failure(events).check == "tls"  # OpenSSL refuses it first; the scanner never binds


def test_rejected_helper_keeps_who_rejected() -> None:
    from trusted_passages.blocking import rejected
    exc = rejected(AttestationFailed("timeout", "timeout waiting for x", by_peer=False))
    assert isinstance(exc, AttestationRejected) and not exc.by_peer


def test_peer_verified_precedes_established_for_both(pki: Pki) -> None:
    server, client = pair(pki)
    client_events, server_events = pump(client, server)
    for events in (client_events, server_events):
        verified = next(e for e in events if isinstance(e, PeerVerified))
        established = next(e for e in events if isinstance(e, Established))
        assert verified.peer == established.peer



# --- the package's import rule (trusted_passages/__init__.py) ----------------------------

REPO = Path(trusted_passages.__file__).resolve().parents[1]
VERIFIER_SIDE = {"attestation.verifier", "attestation.registrar", "attestation.policy",
                 "trusted_passages.tpm"}


def _source(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()),
                None)


def _imports(module: str) -> set[str]:
    """The project modules ``module`` names in import statements, TYPE_CHECKING ones too
    (as import-linter counts them: ``from package import submodule`` names the submodule)."""
    path = _source(module)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())) if path else ():
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{a.name}" for a in node.names}
            found |= {m for m in submodules if _source(m)} or {node.module}
    return {m for m in found if m.split(".")[0] in {"attestation", "trusted_passages"}}


def _reachable(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in _imports(todo.pop()) - seen:
            seen.add(name)
            todo.append(name)
    return seen


@pytest.mark.parametrize("module", sorted(p.stem for p in (REPO / "trusted_passages").glob("*.py")
                                          if p.stem not in {"__init__", "tpm", "tpm_signing"}))
def test_only_the_tpm_module_reaches_the_verifier_side(module: str) -> None:
    assert _reachable(f"trusted_passages.{module}") & VERIFIER_SIDE == set()


def test_the_import_rule_check_sees_the_tpm_module() -> None:
    assert _reachable("trusted_passages.tpm") >= VERIFIER_SIDE - {"trusted_passages.tpm"}
    assert "trusted_passages.tpm" in _reachable("trusted_passages")


# --- concurrent evidence (ALPN tpv1.2) -------------------------------------------------------


def to_client_finished(server: TrustedPassagesConnection,
                       client: TrustedPassagesConnection) -> None:
    """Up to the client's TLS handshake done (its Finished not yet delivered)."""
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.state is State.AWAIT_EVIDENCE


def test_tpv1_2_server_accepts_then_is_established_only_on_the_clients_finished(pki: Pki) -> None:
    core, raw, _ = handshake_raw_client(pki)  # offers tpv1.2, as ChannelConfig does
    assert core.concurrent and core.pipelined
    raw.send(encode_frame(FrameType.EVIDENCE, raw.own_evidence("client", "client")))
    _, events = pump(raw, core)
    assert kinds(events) == ["PeerVerified"] and core.state is State.AWAIT_FINISHED
    assert raw.plaintext.endswith(encode_frame(FrameType.FINISHED))  # it accepts the client
    assert core.waiting_for == "the client's FINISHED"
    with pytest.raises(ProtocolError, match="not established"):
        core.send(b"too early")
    raw.send(encode_frame(FrameType.FINISHED) + b"request")
    _, events = pump(raw, core)
    assert kinds(events) == ["Established", "ApplicationData"]
    assert events[1] == ApplicationData(b"request")


@pytest.mark.parametrize("after_evidence", [b"data before FINISHED", b""])
def test_tpv1_2_client_finished_out_of_order_is_a_protocol_failure(
        pki: Pki, after_evidence: bytes) -> None:
    core, raw, _ = handshake_raw_client(pki)
    if after_evidence:  # bytes that are no frame where the client's FINISHED belongs
        raw.send(encode_frame(FrameType.EVIDENCE, raw.own_evidence("client", "client"))
                 + after_evidence)
    else:  # FINISHED before any evidence
        raw.send(encode_frame(FrameType.FINISHED))
    _, events = pump(raw, core)
    assert failure(events).check == "protocol" and not core.established and core.closed


def test_tpv1_2_client_sends_its_evidence_as_soon_as_it_is_made(pki: Pki) -> None:
    issuer = FakeIssuer(KEY, "client")
    server, client = pair(pki, client={"issuer": issuer})
    client.send_first(b"GET /")
    to_client_finished(server, client)
    assert client.concurrent and client.state is State.AWAIT_EVIDENCE
    client.prepare_evidence()
    assert len(issuer.issued) == 1  # its EVIDENCE leaves behind its TLS Finished, before
    server_events = server.receive_data(client.data_to_send())  # the server's was seen
    assert kinds(server_events) == ["HandshakeComplete", "PeerVerified"]
    assert server.state is State.AWAIT_FINISHED  # validated while the client validates
    client_events, more = pump(client, server)
    assert kinds(client_events) == ["PeerVerified", "Established"]
    assert kinds(server_events + more) == ["HandshakeComplete", "PeerVerified", "Established",
                                           "ApplicationData"]
    assert more[-1] == ApplicationData(b"GET /")


def test_tpv1_2_client_refusing_the_server_leaves_it_unestablished(pki: Pki) -> None:
    server, client = pair(pki, server={"state": "tampered"})
    to_client_finished(server, client)
    client.prepare_evidence()
    server.receive_data(client.data_to_send())
    assert server.state is State.AWAIT_FINISHED  # the client's evidence passed
    assert not server.established
    client_events, server_events = pump(client, server)
    assert failure(client_events).check == "policy"
    assert failure(server_events).by_peer and not server.established and server.closed


@pytest.mark.parametrize("concurrent_side", ["client", "server"])
def test_a_side_without_concurrent_evidence_gets_tpv1_1(pki: Pki, concurrent_side: str) -> None:
    issuer = FakeIssuer(KEY, "client")
    configs = {role: replace(pki.config(role, issuer=issuer if role == "client" else None),
                             concurrent_evidence=role == concurrent_side)
               for role in ("client", "server")}
    server, client = configs["server"].connection("server"), configs["client"].connection(
        "client")
    to_client_finished(server, client)
    assert client.pipelined and not client.concurrent and not server.concurrent
    finished = client.data_to_send()  # its TLS Finished only
    client.prepare_evidence()
    assert len(issuer.issued) == 1 and client.data_to_send() == b""  # held back
    server_events = server.receive_data(finished)
    client_events, more = pump(client, server)
    assert kinds(client_events) == ["PeerVerified", "Established"]
    assert kinds(server_events + more) == ["HandshakeComplete", "PeerVerified", "Established"]


# --- the client's Finished before its own checks (checks_after_finished) ------------------


def test_a_client_may_send_its_finished_before_its_own_checks(pki: Pki) -> None:
    """The blocking adapter's order: the TLS Finished leaves, then the client checks the
    session (so the server works on the Finished meanwhile); nothing else leaves first."""
    issuer = FakeIssuer(KEY, "client")
    server, client = pair(pki, client={"issuer": issuer})
    client.checks_after_finished = True
    server.receive_data(client.data_to_send())
    assert client.receive_data(server.data_to_send()) == []
    assert client.state is State.HANDSHAKING and client.data_to_send()  # the Finished
    client.prepare_evidence()
    assert issuer.issued == [] and client.data_to_send() == b""  # nothing before the checks
    events = client.finish_handshake()
    assert kinds(events) == ["HandshakeComplete"] and client.state is State.AWAIT_EVIDENCE
    assert client.finish_handshake() == []  # once


def test_checks_left_pending_run_first_on_the_next_bytes(pki: Pki) -> None:
    server, client = pair(pki)
    client.checks_after_finished = True
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client_events, server_events = pump(client, server)  # never calls finish_handshake
    assert kinds(client_events) == ["HandshakeComplete", "PeerVerified", "Established"]
    assert kinds(server_events)[-1] == "Established"


def test_a_server_sends_its_session_tickets_before_its_checks_and_quote(pki: Pki) -> None:
    """The adapters' order on the server: the TLS bytes that end the handshake (session
    tickets) leave first, so the client reads them while the server quotes; nothing of
    the server's evidence leaves before its own checks of the session."""
    issuer = FakeIssuer(KEY, "server")
    server, client = pair(pki, server={"issuer": issuer})
    server.checks_after_finished = True
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert server.receive_data(client.data_to_send()) == []
    tickets = server.data_to_send()
    assert server.state is State.HANDSHAKING and tickets and issuer.issued == []
    assert client.receive_data(tickets) == []  # TLS only: no frame yet
    events = server.finish_handshake()
    assert kinds(events) == ["HandshakeComplete"] and len(issuer.issued) == 1
    assert server.state is State.AWAIT_EVIDENCE and server.finish_handshake() == []
    client_events, server_events = pump(client, server)
    assert kinds(client_events)[-1] == "Established"
    assert kinds(server_events)[-1] == "Established"

