"""Trusted Passages end to end: real swtpm quotes, real loopback TCP, both profiles and
both adapters, and the paper's attacks (MITM relay, replay, tampered boot, cuckoo,
classic EPMS substitution), plus the real ``openssl s_client`` binary.

One module-scoped lab: four swtpm nodes, each AK activated against its EK
certificate (exactly as tests/attestation_helpers.activate does) and registered in
an AkRegistry. "server", "mallory" and "tampered" are distinct TPMs
(unique=True); "client" is a template copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from attestation.eventlog import EV_NO_ACTION, EventLogBuilder, parse_event_log, replay
from attestation.policy import ReferencePolicy, policy_from_evidence
from attestation.registrar import AkRegistry, Registrar
from attestation.tpm import TpmClient
from attestation.tpm_types import PcrSelection, parse_public
from attestation.verifier import ClockHistory
from testbed.spec.cluster_spec import BootSpec
from testbed.tpm.boot import measure_boot
from testbed.tpm.localca import LocalCA
from testbed.tpm.pytest_plugin import SwtpmFactory
from tests.attestation_helpers import activate
from tests.test_tp_protocol import RawTls
from trusted_passages import (
    AttestationRejected,
    AttestedChannel,
    BindingContext,
    ChannelConfig,
    PeerEvidence,
    TpmIssuer,
    TpmValidator,
    connect,
    open_channel,
    serve,
    start_server,
)
from trusted_passages.aio import AsyncAttestedChannel
from trusted_passages.blocking import Server
from trusted_passages.pki import CertificateAuthority, generate_key, issue_certificate, make_ca

BOOT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 9)
RUNTIME_PCR = 15  # reserved by this deployment for runtime measurements (antivirus state)
SERVER_SELECTION = PcrSelection("sha256", BOOT_PCRS)
CLIENT_SELECTION = PcrSelection("sha256", (*BOOT_PCRS, RUNTIME_PCR))
GOOD_BOOT = BootSpec.from_content(firmware="OVMF firmware volume (tp)", kernel="vmlinuz-6.1.0-tp",
                      initrd="initrd.img-6.1.0-tp", cmdline="console=ttyS0 quiet ro")
TAMPERED_BOOT = replace(GOOD_BOOT, cmdline="console=ttyS0 quiet ro init=/bin/sh")
EV_EVENT_TAG = 0x6
AV_CURRENT = b"antivirus signatures 2025-06-01: up to date"
AV_NEWER = b"antivirus signatures 2025-06-02: up to date"
PROFILES = ["tp13", "classic"]
LOCALHOST = "127.0.0.1"


# --- the lab ------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    client: TpmClient
    log: bytes
    issuer: TpmIssuer
    keys: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lab:
    ca: CertificateAuthority
    registry: AkRegistry
    nodes: dict[str, Node]
    server_policy: ReferencePolicy
    client_policy: ReferencePolicy
    newer_av_policy: ReferencePolicy

    def key(self, node: str, profile: str) -> Any:
        keys = self.nodes[node].keys
        if profile not in keys:
            keys[profile] = generate_key(profile)  # type: ignore[arg-type]
        return keys[profile]

    def config(self, node: str, profile: str = "tp13", *, role: str = "server",
               issuer: Any = None, validator: Any = None, expected_peer: str | None = None,
               cert_name: str | None = None, pin: str | None = None,
               client_policy: ReferencePolicy | None = None,
               timeout: float = 5.0) -> ChannelConfig:
        """``role``: the role this node plays, which decides the policy it applies to peers."""
        key = self.key(node, profile)
        peer_policy = (client_policy or self.client_policy) if role == "server" \
            else self.server_policy
        trust = self.registry.for_node(pin) if pin else self.registry
        return ChannelConfig(
            issue_certificate(self.ca, cert_name or node, key), key, [self.ca.certificate],
            issuer or self.nodes[node].issuer,
            validator or TpmValidator(trust, peer_policy, ClockHistory()),
            profile=profile, expected_peer=expected_peer, timeout=timeout)  # type: ignore[arg-type]


def with_runtime_event(boot_log: bytes, data: bytes) -> tuple[bytes, dict[str, bytes]]:
    """The boot log plus one runtime measurement (as an agent would log it), and its digests."""
    builder = EventLogBuilder(startup_locality=0)
    for event in parse_event_log(boot_log).events:
        if event.event_type != EV_NO_ACTION:
            builder.add_digests(event.pcr, event.event_type, event.data, event.digests)
    runtime = builder.add(RUNTIME_PCR, EV_EVENT_TAG, data)
    return builder.to_bytes(), runtime.digests


def _node(name: str, tpm_tcti: str, registrar: Registrar, registry: AkRegistry,
          chain: BootSpec, runtime: bytes | None = None) -> Node:
    client = TpmClient(tpm_tcti)
    log = measure_boot(client, chain)
    if runtime is not None:
        log, digests = with_runtime_event(log, runtime)
        client.extend_pcr(RUNTIME_PCR, digests)
    ak = client.attestation_key("ecc")
    activate(client, registrar, ak)
    registry.add(name, parse_public(ak.public))
    client.flush(ak)
    selection = CLIENT_SELECTION if runtime is not None else SERVER_SELECTION
    return Node(name, client, log, TpmIssuer(client, name, selection, log))


def _policies(nodes: dict[str, Node]) -> tuple[ReferencePolicy, ...]:
    server, client = nodes["server"], nodes["client"]
    server_pcrs = server.client.read_pcrs("sha256", BOOT_PCRS)
    client_pcrs = client.client.read_pcrs("sha256", CLIENT_SELECTION.indices)
    newer_log, _ = with_runtime_event(server.log, AV_NEWER)  # the same boot, newer signatures
    newer_pcrs = {i: v for i, v in replay(parse_event_log(newer_log)).items()
                  if i in CLIENT_SELECTION.indices}
    return (
        policy_from_evidence(server_pcrs, parse_event_log(server.log), name="tp-server"),
        policy_from_evidence(client_pcrs, parse_event_log(client.log), name="tp-client-av"),
        policy_from_evidence(newer_pcrs, parse_event_log(newer_log), name="tp-client-av-new"),
    )


@pytest.fixture(scope="module")
def lab(swtpm_ca: LocalCA, swtpm_template: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    factory = SwtpmFactory(swtpm_ca, swtpm_template, tmp_path_factory.mktemp("tp-tpms"))
    registrar, registry = Registrar(swtpm_ca.ca_bundle()), AkRegistry()
    nodes: dict[str, Node] = {}
    try:
        for name, unique, chain, runtime in [
            ("server", True, GOOD_BOOT, None),
            ("client", False, GOOD_BOOT, AV_CURRENT),
            ("mallory", True, GOOD_BOOT, None),
            ("tampered", True, TAMPERED_BOOT, None),
        ]:
            nodes[name] = _node(name, factory(unique=unique).tcti, registrar, registry, chain,
                                runtime)
        yield Lab(make_ca("tp-lab-ca"), registry, nodes, *_policies(nodes))
    finally:
        for node in nodes.values():
            node.issuer.close()
            node.client.close()
        factory.stop_all()


# --- running servers -----------------------------------------------------------------------


@dataclass
class Observed:
    """What a server saw: rejections and the peers it served."""

    failures: list[AttestationRejected] = field(default_factory=list)
    peers: list[PeerEvidence] = field(default_factory=list)
    event: threading.Event = field(default_factory=threading.Event)

    def on_failure(self, exc: AttestationRejected) -> None:
        self.failures.append(exc)
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(5), "the server reported nothing"


def echo(observed: Observed) -> Callable[[AttestedChannel], None]:
    def handler(channel: AttestedChannel) -> None:
        observed.peers.append(channel.peer)
        observed.event.set()
        data = channel.recv()
        channel.send(b"echo " + data + b" from " + channel.peer.node.encode())
    return handler


@pytest.fixture
def running() -> Iterator[Callable[[ChannelConfig], tuple[Server, Observed]]]:
    servers: list[Server] = []

    def start(config: ChannelConfig) -> tuple[Server, Observed]:
        observed = Observed()
        server = serve(LOCALHOST, 0, config, echo(observed), on_failure=observed.on_failure)
        servers.append(server)
        return server, observed

    yield start
    for server in servers:
        server.close()


# --- success ----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_blocking_mutual_attestation(lab: Lab, running: Any, profile: str) -> None:
    server, observed = running(lab.config("server", profile))
    client_config = lab.config("client", profile, role="client", expected_peer="server",
                               pin="server")
    with connect(*server.address, client_config) as channel:
        peer = channel.peer
        assert (peer.node, peer.role, peer.profile, peer.node_verified) == \
            ("server", "server", profile, True)
        assert peer.policy_name == "tp-server" and peer.report.ok
        assert peer.report.check("qualifying_data").passed
        assert "registered to node 'server'" in peer.report.check("ak_trust").detail
        assert peer.evidence is not None and set(peer.evidence.pcrs) == set(BOOT_PCRS)
        channel.send(b"hello")
        assert channel.recv() == b"echo hello from client"
    observed.wait()
    seen = observed.peers[0]
    assert (seen.node, seen.policy_name) == ("client", "tp-client-av")
    assert seen.evidence is not None and RUNTIME_PCR in seen.evidence.pcrs


@pytest.mark.parametrize("profile", PROFILES)
def test_asyncio_mutual_attestation(lab: Lab, profile: str) -> None:
    async def scenario() -> tuple[bytes, PeerEvidence]:
        async def handler(channel: AsyncAttestedChannel) -> None:
            data = await channel.recv()
            await channel.send(data.upper() + b" " + channel.peer.node.encode())

        server = await start_server(LOCALHOST, 0, lab.config("server", profile), handler)
        port = server.sockets[0].getsockname()[1]
        try:
            config = lab.config("client", profile, role="client", expected_peer="server")
            async with await open_channel(LOCALHOST, port, config) as channel:
                await channel.send(b"hello")
                return await channel.recv(), channel.peer
        finally:
            server.close()
            await server.wait_closed()

    reply, peer = asyncio.run(scenario())
    assert reply == b"HELLO client" and peer.node == "server" and peer.node_verified


# --- attacks ----------------------------------------------------------------------------------


class RelayProxy:
    """The provider's MITM: CA-valid certificates for both names, two TLS sessions, and
    every plaintext byte (the evidence frames included) relayed between them."""

    def __init__(self, upstream: tuple[str, int], down: ChannelConfig, up: ChannelConfig
                 ) -> None:
        self.upstream, self.down_config, self.up_config = upstream, down, up
        self.listener = socket.create_server((LOCALHOST, 0))
        self.listener.settimeout(5)
        self.relayed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return LOCALHOST, self.listener.getsockname()[1]

    def _run(self) -> None:
        with self.listener:
            self._relay()

    def _relay(self) -> None:
        down_sock, _ = self.listener.accept()
        up_sock = socket.create_connection(self.upstream, timeout=5)
        sessions = {down_sock: RawTls(self.down_config, "server"),
                    up_sock: RawTls(self.up_config, "client")}
        other = {down_sock: up_sock, up_sock: down_sock}
        pending: dict[socket.socket, bytes] = {down_sock: b"", up_sock: b""}
        with selectors.DefaultSelector() as sel, down_sock, up_sock:
            for sock in sessions:
                sel.register(sock, selectors.EVENT_READ)
            self._flush(sessions)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                for key, _ in sel.select(0.1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    data = sock.recv(65536)
                    if not data:
                        return
                    pending[other[sock]] += b"".join(sessions[sock].receive_data(data))
                for sock, session in sessions.items():
                    if pending[sock] and session.handshake_done:
                        self.relayed += len(pending[sock])
                        session.send(pending[sock])
                        pending[sock] = b""
                self._flush(sessions)

    @staticmethod
    def _flush(sessions: dict[socket.socket, RawTls]) -> None:
        for sock, session in sessions.items():
            data = session.data_to_send()
            if data:
                sock.sendall(data)


@pytest.mark.parametrize("profile", PROFILES)
def test_mitm_relaying_evidence_is_caught_by_qualifying_data(
        lab: Lab, running: Any, profile: str) -> None:
    server, observed = running(lab.config("server", profile))
    # The provider holds CA-valid certificates named "server" and "client", its own keys.
    proxy = RelayProxy(server.address,
                       down=lab.config("mallory", profile, cert_name="server"),
                       up=lab.config("mallory", profile, cert_name="client", role="client"))
    config = lab.config("client", profile, role="client", expected_peer="server", pin="server")
    with pytest.raises(AttestationRejected) as caught:
        connect(*proxy.address, config)
    assert caught.value.check == "qualifying_data" and not caught.value.by_peer
    observed.wait()
    # The server catches it too: with concurrent evidence (tpv1.2) the client's relayed
    # evidence reaches it before the client's refusal does, and its own check fails.
    assert observed.failures[0].check == "qualifying_data"
    assert proxy.relayed > 0 and observed.peers == []


class CapturingValidator:
    def __init__(self, inner: TpmValidator) -> None:
        self.inner = inner
        self.seen: list[bytes] = []

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        self.seen.append(evidence)
        return self.inner.validate(evidence, nonce)


class ReplayIssuer:
    def __init__(self, evidence: bytes) -> None:
        self.evidence = evidence

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        return self.evidence


def test_replayed_evidence_from_an_earlier_session_is_caught(lab: Lab, running: Any) -> None:
    genuine, _ = running(lab.config("server"))
    capture = CapturingValidator(TpmValidator(lab.registry.for_node("server"),
                                              lab.server_policy))
    config = lab.config("client", role="client", validator=capture, expected_peer="server")
    with connect(*genuine.address, config) as channel:
        channel.send(b"x")
        channel.recv()
    # The server's TLS key copied to an unmeasured machine, replaying old evidence.
    impostor, observed = running(lab.config("server", issuer=ReplayIssuer(capture.seen[0])))

    async def attempt() -> None:
        await open_channel(*impostor.address, lab.config(
            "client", role="client", expected_peer="server", pin="server"))

    with pytest.raises(AttestationRejected) as caught:
        asyncio.run(attempt())
    assert caught.value.check == "qualifying_data"
    observed.wait()
    assert observed.failures[0].by_peer


def test_tampered_boot_server_is_caught_by_policy(lab: Lab, running: Any) -> None:
    server, observed = running(lab.config("tampered"))
    with pytest.raises(AttestationRejected) as caught:
        connect(*server.address, lab.config("client", role="client"))
    assert caught.value.check == "policy"
    assert "PCR 9" in caught.value.reason and "tp-server" in caught.value.reason
    observed.wait()
    assert observed.failures[0].check == "policy" and observed.failures[0].by_peer


def test_tampered_boot_client_is_caught_by_the_server(lab: Lab, running: Any) -> None:
    server, observed = running(lab.config("server"))
    tampered = lab.config("tampered", role="client", expected_peer="server")
    with pytest.raises(AttestationRejected) as caught:
        connect(*server.address, tampered)
    assert (caught.value.check, caught.value.by_peer) == ("policy", True)
    observed.wait()
    assert observed.failures[0].check == "policy" and not observed.failures[0].by_peer


@pytest.mark.parametrize("claimed,pin,check", [
    ("server", "server", "ak_trust"),   # a registry pinned to the expected node
    ("server", None, "ak_trust"),       # the registry knows whose AK it is
    ("mallory", None, "expected_peer"),  # honest about the node, but not the one expected
])
def test_cuckoo_quote_from_another_registered_tpm_is_caught(
        lab: Lab, running: Any, claimed: str, pin: str | None, check: str) -> None:
    # The attacker's unmeasured server holds a CA-valid certificate for "server" and has
    # mallory's genuine, registered, well-booted TPM quote for its own session.
    relay_issuer = TpmIssuer(lab.nodes["mallory"].client, claimed, SERVER_SELECTION,
                             lab.nodes["mallory"].log)
    server, _ = running(lab.config("mallory", cert_name="server", issuer=relay_issuer))
    config = lab.config("client", role="client", expected_peer="server", pin=pin)
    with pytest.raises(AttestationRejected) as caught:
        connect(*server.address, config)
    assert caught.value.check == check


class OtherEpmsIssuer:
    """A classic client whose quote binds another EncryptedPreMasterSecret."""

    def __init__(self, inner: TpmIssuer) -> None:
        self.inner = inner

    def bound(self, context: BindingContext) -> OtherEpmsIssuer:
        return OtherEpmsIssuer(self.inner.bound(context))

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        return self.inner.issue(user_data, hashlib.sha256(b"some other EPMS").digest())


def test_classic_server_rejects_a_client_quote_for_another_epms(lab: Lab, running: Any) -> None:
    server, observed = running(lab.config("server", "classic"))
    config = lab.config("client", "classic", role="client",
                        issuer=OtherEpmsIssuer(lab.nodes["client"].issuer))
    with pytest.raises(AttestationRejected) as caught:
        connect(*server.address, config)
    assert (caught.value.check, caught.value.by_peer) == ("qualifying_data", True)
    observed.wait()
    assert observed.failures[0].check == "qualifying_data"


def test_third_party_runtime_event_is_checked_by_the_server_policy(
        lab: Lab, running: Any) -> None:
    # Bob's server accepts customers whose antivirus database is current...
    server, observed = running(lab.config("server"))
    with connect(*server.address, lab.config("client", role="client")) as channel:
        channel.send(b"order")
        assert channel.recv() == b"echo order from client"
    # ...and refuses them once the policy demands the next signature release.
    strict, observed = running(lab.config("server", client_policy=lab.newer_av_policy))
    with pytest.raises(AttestationRejected) as caught:
        connect(*strict.address, lab.config("client", role="client"))
    assert caught.value.check == "policy" and caught.value.by_peer
    observed.wait()
    assert f"PCR {RUNTIME_PCR}" in observed.failures[0].reason


# --- a plain TLS client ---------------------------------------------------------------------


def test_openssl_s_client_completes_tls_then_reads_the_clear_text_refusal(
        lab: Lab, running: Any, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl binary is needed"
    server, observed = running(lab.config("server"))
    key = lab.key("client", "tp13")
    (tmp_path / "client.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert = issue_certificate(lab.ca, "client", key)
    (tmp_path / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.crt").write_bytes(lab.ca.certificate.public_bytes(
        serialization.Encoding.PEM))
    result = subprocess.run(
        [openssl, "s_client", "-connect", f"{LOCALHOST}:{server.address[1]}", "-tls1_3",
         "-cert", str(tmp_path / "client.crt"), "-key", str(tmp_path / "client.key"),
         "-CAfile", str(tmp_path / "ca.crt"), "-verify_return_error", "-quiet", "-ign_eof"],
        input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=15, check=False)
    assert b"attestation failed: protocol: bytes b'GET '" in result.stdout, result
    assert b"verify return:1" in result.stderr  # TLS, certificates included, succeeded
    observed.wait()
    assert observed.failures[0].check == "protocol"
