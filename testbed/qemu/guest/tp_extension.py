"""Trusted Passages inside a guest: the guest agent's role extension.

Runs in the guest with Debian 12's python3 (python3-openssl 23, python3-cryptography
38), the project's ``attestation`` and ``trusted_passages`` packages copied into the
image beside ``guest_agent.py``, and nothing of ``testbed`` (so no import from it).

The TLS key is generated here and never leaves the guest. The host only ever sees
its public key (to have it certified by the cluster's TLS CA) and the TLS records it
relays between two guests. Quotes come from this guest's own vTPM through the
agent's TPM connection; peers are validated here, against the AK registry and the
reference policies the host delivered (``tp_configure``): the lab operator's trust
anchors, as in the sim backend, where nodes read them from the cluster directory.

Ops added to the agent::

    {"op": "tp_init", "node": NAME}          -> {"public_key": b64 SPKI DER}
    {"op": "tp_configure", "certificate": b64 DER, "ca_certificates": [b64 DER],
     "registry": AkRegistry JSON text, "policies": {node: policy YAML},
     "pcrs": [int], "profile": "tp13"}       -> {"configured": true}
    {"op": "tp_result", "session": hex}      -> what that channel verified (or its error)
    {"op": "tp_open"}                        -> {"open": {peer node: open channels}}

Stream ops: answered with ``{"session": hex}``, then the connection carries the TLS
records of one channel (the host splices it to the other guest's)::

    {"op": "tp_accept"}                      server side: answers each message until
                                             the peer closes, idles or is revoked
    {"op": "tp_connect", "peer": NAME, "message": TEXT, "hold": false}
                                             with hold: the channel stays open after
                                             the reply, until the peer closes or is revoked
    {"op": "tp_enroll", "peer": CRYPTOVM, "validity": seconds}
        keyless TLS (docs/cryptovm.md): over an attested channel to the CryptoVM guest, a
        certificate for a fresh key made here; used only once it chains to the CA whose
        key attestation verified; from then on the channels use it and trust that CA only

:meth:`GuestTrustedPassages.serve_channel` is the server side of one channel for another
extension (the CryptoVM's ``cvm_attested``).

Revocation (docs/runtime.md): the agent's ledger verifies the verifier's decisions; this
extension listens. Every open channel is tracked by its peer node; a revocation closes
those to or from the revoked node (a served channel's thread notices within
:data:`POLL_S`), and the validator refuses a revoked node with check ``revocation``
before any other check, in both directions, until it is reinstated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, TestbedError, VerificationError
from attestation.policy import ReferencePolicy, load_policy
from attestation.registrar import AkRegistry
from attestation.revocation import DecisionLedger, Reinstate, RevocationEvent
from attestation.verifier import QuoteVerifier
from cryptovm.attested import StreamClient
from cryptovm.keyattest import KeyAttestation, verify_key_attestation
from cryptovm.tlsissuer import certificate_info, check_issued_by, spki_der
from trusted_passages.blocking import AttestedChannel, establish
from trusted_passages.config import ChannelConfig
from trusted_passages.envelope import Envelope, check_node_name, decode_envelope
from trusted_passages.errors import ProtocolError as ChannelError
from trusted_passages.interfaces import BindingContext, Issuer, PeerEvidence, binding_digest
from trusted_passages.summary import summarize
from trusted_passages.tpm import TpmValidator

__all__ = ["GuestIssuer", "GuestTrustedPassages", "PeersValidator", "install"]

TIMEOUT_S = 30.0  # TCG guests are slow: a quote plus a validation take a few seconds
MAX_MESSAGE = 4096
MAX_RESULTS = 64  # finished channels whose summary the host may still fetch
MAX_CAS = 8
DEFAULT_VALIDITY_S = 3600
IDLE_S = 60.0  # an open channel with no message for this long is closed
POLL_S = 0.2  # how often a channel's thread notices that a revocation closed it
PROFILE: Final = "tp13"


SendFrame = Callable[[socket.socket, dict[str, Any]], None]


class GuestAgent(Protocol):
    """What this module uses of guest_agent.Agent."""

    stream_handlers: dict[str, Any]
    handlers: dict[str, Any]
    revocations: DecisionLedger
    revocation_listeners: dict[str, Any]

    def quote(self, request: dict[str, Any]) -> dict[str, Any]: ...


class GuestIssuer:
    """Quotes through the guest agent's vTPM for one connection's binding."""

    def __init__(self, agent: GuestAgent, node: str, pcrs: list[int],
                 context: BindingContext | None = None) -> None:
        self._agent, self._node, self._pcrs, self._context = agent, node, pcrs, context

    def bound(self, context: BindingContext) -> Issuer:
        return GuestIssuer(self._agent, self._node, self._pcrs, context)

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        if self._context is None:
            raise TestbedError("GuestIssuer used without a binding context")
        qualifying = binding_digest(self._context.profile, self._context.role, nonce, user_data)
        evidence = self._agent.quote({"nonce": qualifying.hex(), "pcrs": self._pcrs})
        return Envelope(self._node, self._context.role, self._context.profile, user_data,
                        evidence).to_json()


class PeersValidator:
    """Validates a peer against *its* registry entry and policy (the claim only selects);
    a node the verifier revoked is refused first."""

    def __init__(self, registry: AkRegistry, policies: dict[str, ReferencePolicy],
                 revocations: DecisionLedger) -> None:
        self._registry, self._policies = registry, policies
        self._revocations = revocations

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        claimed = decode_envelope(evidence).node
        if self._revocations.is_revoked(claimed):
            raise VerificationError("revocation", f"node {claimed!r} is revoked by the "
                                    "verifier")
        policy = self._policies.get(claimed)
        if policy is None:
            raise VerificationError("ak_trust", f"{claimed!r} is not a node this guest knows")
        return TpmValidator(self._registry.for_node(claimed), policy).validate(evidence, nonce)


@dataclass
class _Ending:
    how: str = "closed"  # or "revoked": a revocation closed the channel


@dataclass
class _Configured:
    config: ChannelConfig
    node: str
    registry: AkRegistry
    policies: dict[str, ReferencePolicy]
    keyless: dict[str, Any] | None = None  # the enrollment, once the CryptoVM certified
    # The cluster-CA identity of tp_configure, kept after a keyless enrollment: the
    # CryptoVM guest's own certificate is a cluster-CA one (guest-side disks use it).
    bootstrap: ChannelConfig | None = None


class GuestTrustedPassages:
    """The guest's TLS key, channel configuration and finished channels."""

    def __init__(self, agent: GuestAgent, send_frame: SendFrame) -> None:
        self._agent = agent
        self._send_frame = send_frame
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._node: str | None = None
        self._configured: _Configured | None = None
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        # Every open channel by its peer node: a revocation closes them.
        self._open: dict[str, set[AttestedChannel]] = {}
        self._closed: set[int] = set()  # ids of the channels a revocation closed

    # --- request ops -----------------------------------------------------------------------

    def init(self, request: dict[str, Any]) -> dict[str, Any]:
        node = request.get("node")
        if not isinstance(node, str):
            raise ValueError("tp_init needs node: NAME")
        check_node_name(node)
        with self._lock:
            if self._key is None or self._node != node:
                self._key = ec.generate_private_key(ec.SECP256R1())
                self._node, self._configured = node, None
            spki = self._key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return {"public_key": b64encode(spki)}

    def configure(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._key is None or self._node is None:
                raise ValueError("tp_configure before tp_init: there is no key to certify")
            key, node = self._key, self._node
        certificate = _certificate(request.get("certificate"), "certificate")
        cas = request.get("ca_certificates")
        if not isinstance(cas, list) or not 0 < len(cas) <= MAX_CAS:
            raise ValueError(f"ca_certificates: 1 to {MAX_CAS} base64 DER certificates")
        authorities = [_certificate(c, "ca_certificates") for c in cas]
        registry, policies = _registry(request), _policies(request)
        validator = PeersValidator(registry, policies, self._agent.revocations)
        pcrs = request.get("pcrs")
        if not isinstance(pcrs, list) or not all(isinstance(p, int) and 0 <= p < 24
                                                 for p in pcrs) or not pcrs:
            raise ValueError("pcrs: a list of PCR indices")
        if request.get("profile", PROFILE) != PROFILE:
            raise ValueError(f"only the {PROFILE} profile runs in guests")
        config = ChannelConfig(certificate=certificate, private_key=key,
                               ca_certificates=authorities,
                               issuer=GuestIssuer(self._agent, node, sorted(pcrs)),
                               validator=validator, profile=PROFILE, timeout=TIMEOUT_S)
        with self._lock:
            self._configured = _Configured(config, node, registry, policies, bootstrap=config)
        return {"configured": True, "node": node}

    def result(self, request: dict[str, Any]) -> dict[str, Any]:
        session = request.get("session")
        with self._lock:
            found = self._results.get(session) if isinstance(session, str) else None
        if found is None:
            raise ValueError(f"no finished channel {str(session)[:40]!r}")
        return found

    # --- stream ops ------------------------------------------------------------------------

    def accept(self, request: dict[str, Any], conn: socket.socket) -> None:
        configured = self._ready(conn)
        if configured is None:
            return
        session = self._open_session(conn)

        def run() -> dict[str, Any]:
            channel = establish(conn, configured.config.connection("server"), TIMEOUT_S)
            peer = channel.peer.node
            summary: dict[str, Any] = {"role": "server", "evidence": summarize(channel.peer)}
            received = []
            with self._tracked(peer, channel) as ending:
                while data := self._next_message(channel):
                    text = data.decode(errors="replace")[:MAX_MESSAGE]
                    received.append(text)
                    channel.send(f"{configured.node} heard {text!r} from attested node "
                                 f"{peer!r}".encode())
            summary.update(received=received[0] if received else None,
                           messages=len(received), ended=ending.how)
            return summary
        self._finish(session, run)

    def connect(self, request: dict[str, Any], conn: socket.socket) -> None:
        peer, message = request.get("peer"), request.get("message", "hello")
        hold = request.get("hold", False)
        if not isinstance(peer, str) or not isinstance(message, str) or \
                len(message) > MAX_MESSAGE or not _valid_node_name(peer) or \
                not isinstance(hold, bool):
            self._answer_error(conn, "tp_connect needs peer: NODE, a short message and "
                               "hold: true or false")
            return
        configured = self._ready(conn)
        if configured is None:
            return
        session = self._open_session(conn)

        def run() -> dict[str, Any]:
            config = configured.config.with_expected_peer(peer)
            channel = establish(conn, config.connection("client"), TIMEOUT_S)
            channel.send(message.encode())
            reply = channel.recv().decode(errors="replace")
            summary = {"role": "client", "peer": peer, "sent": message, "reply": reply,
                       "evidence": summarize(channel.peer)}
            if hold:  # open until the peer closes, idles out, or is revoked
                with self._tracked(peer, channel) as ending:
                    while self._next_message(channel):
                        pass  # a held channel is not asked anything
                summary["ended"] = ending.how
            channel.close()
            return summary
        self._finish(session, run)

    def enroll(self, request: dict[str, Any], conn: socket.socket) -> None:
        """Keyless TLS: a certificate from the CryptoVM guest ``peer`` for a fresh key."""
        peer, validity = request.get("peer"), request.get("validity", DEFAULT_VALIDITY_S)
        if not isinstance(peer, str) or not _valid_node_name(peer) or \
                not isinstance(validity, int) or isinstance(validity, bool) or validity <= 0:
            self._answer_error(conn, "tp_enroll needs peer: CRYPTOVM NODE (and validity: "
                               "seconds)")
            return
        configured = self._ready(conn)
        if configured is None:
            return
        session = self._open_session(conn)

        def run() -> dict[str, Any]:
            config = configured.config.with_expected_peer(peer)
            channel = establish(conn, config.connection("client"), TIMEOUT_S)
            try:
                key, certificate, ca, summary = _enroll(channel, configured, peer, validity)
            finally:
                channel.close()
            keyless = {"certificate": certificate_info(certificate), "ca": summary,
                       "cryptovm": peer}
            enrolled = dataclasses.replace(configured.config, certificate=certificate,
                                           private_key=key, ca_certificates=[ca])
            with self._lock:  # from now on: the VSM certificate, and only the VSM CA
                self._key = key
                self._configured = dataclasses.replace(configured, config=enrolled,
                                                       keyless=keyless)
            return {"role": "enroll", **keyless}
        self._finish(session, run)

    def serve_channel(self, conn: socket.socket,
                      serve: Callable[[AttestedChannel], dict[str, Any]]) -> None:
        """The server side of one attested channel for another extension: ``serve`` it
        once the peer's attestation passed; its summary is kept for ``tp_result``."""
        configured = self._ready(conn)
        if configured is None:
            return
        session = self._open_session(conn)

        def run() -> dict[str, Any]:
            channel = establish(conn, configured.config.connection("server"), TIMEOUT_S)
            try:
                return serve(channel)
            finally:
                channel.close()
        self._finish(session, run)

    def client_channel(self, conn: socket.socket, peer: str,
                       use: Callable[[AttestedChannel], dict[str, Any]]) -> None:
        """The client side of one attested channel to ``peer`` (the CryptoVM guest) with the
        cluster-CA identity, for another extension (guest-side disks): ``use`` it once the
        peer's attestation passed; its summary is kept for ``tp_result``."""
        configured = self._ready(conn)
        if configured is None:
            return
        bootstrap = configured.bootstrap or configured.config
        session = self._open_session(conn)

        def run() -> dict[str, Any]:
            config = bootstrap.with_expected_peer(peer)
            channel = establish(conn, config.connection("client"), TIMEOUT_S)
            try:
                return use(channel)
            finally:
                channel.close()
        self._finish(session, run)

    # --- open channels and revocation ----------------------------------------------------

    def open_channels(self) -> dict[str, int]:
        with self._lock:
            return {peer: len(channels) for peer, channels in self._open.items() if channels}

    @contextlib.contextmanager
    def _tracked(self, peer: str, channel: AttestedChannel) -> Iterator[_Ending]:
        """Track ``channel`` while it is open; at the end, closed, with how it ended."""
        ending = _Ending()
        with self._lock:
            if self._agent.revocations.is_revoked(peer):  # revoked during the handshake
                self._closed.add(id(channel))
            self._open.setdefault(peer, set()).add(channel)
        try:
            yield ending
        finally:
            with self._lock:
                self._open.get(peer, set()).discard(channel)
                if id(channel) in self._closed:
                    self._closed.discard(id(channel))
                    ending.how = "revoked"
            with contextlib.suppress(ChannelError, OSError):
                channel.close()

    def revoked(self, event: RevocationEvent) -> dict[str, Any]:
        """Close every channel to or from the revoked node (new ones: the validator
        refuses it from now on)."""
        with self._lock:
            channels = list(self._open.pop(event.node, set()))
            self._closed.update(id(c) for c in channels)
        for channel in channels:
            with contextlib.suppress(ChannelError, OSError):  # the peer may be gone
                channel.close()
        return {"closed_channels": len(channels)}

    def reinstated(self, decision: Reinstate) -> dict[str, Any]:
        return {"accepts": decision.node}

    def _next_message(self, channel: AttestedChannel) -> bytes:
        """The next message; b"" at the channel's end, after IDLE_S, or once a
        revocation closed it (noticed within POLL_S)."""
        deadline = time.monotonic() + IDLE_S
        while time.monotonic() < deadline:
            with self._lock:
                if id(channel) in self._closed:
                    return b""
            try:
                return channel.recv(timeout=POLL_S)
            except (ChannelError, OSError) as exc:
                # blocking.py's wording for "no data yet": poll again; else it is over.
                if not str(exc).startswith("timeout waiting"):
                    return b""
        return b""

    def _ready(self, conn: socket.socket) -> _Configured | None:
        with self._lock:
            configured = self._configured
        if configured is None:
            self._answer_error(conn, "Trusted Passages is not configured: tp_init, "
                               "then tp_configure")
        return configured

    def _answer_error(self, conn: socket.socket, message: str) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(conn, {"error": message})

    def _open_session(self, conn: socket.socket) -> str:
        session = os.urandom(8).hex()
        self._send_frame(conn, {"session": session})
        return session

    def _finish(self, session: str, run: Callable[[], dict[str, Any]]) -> None:
        try:
            summary = run()
        except Exception as exc:  # the channel's outcome, whatever failed: the host asks
            summary = {"error": f"{type(exc).__name__}: {exc}"}
        with self._lock:
            self._results[session] = summary
            while len(self._results) > MAX_RESULTS:
                self._results.popitem(last=False)


def _enroll(channel: AttestedChannel, configured: _Configured, cryptovm: str, validity: int
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, x509.Certificate,
                       dict[str, Any]]:
    """tls_enroll and attest over ``channel``; checked as the sim nodes check them
    (testbed/roles/enrollment.py): the certificate is for this key and name and chains to
    the CA, and the CA key's attestation verifies against the CryptoVM's AK and policy."""
    node = configured.node
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
           .sign(key, hashes.SHA256()))
    nonce = os.urandom(32)
    vsm = StreamClient(channel.recv, channel.send)
    issued = vsm.call("tls_enroll", csr=csr.public_bytes(serialization.Encoding.DER),
                      validity=validity)
    attested = vsm.call("attest", key_id=issued["ca_key_id"], nonce=nonce)
    certificate = x509.load_pem_x509_certificate(issued["certificate"])
    ca = x509.load_pem_x509_certificate(issued["ca_certificate"])
    check_issued_by(certificate, ca)
    own = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    if spki_der(certificate) != own or certificate_info(certificate)["subject"] != node:
        raise VerificationError("certificate", "the CryptoVM certified another key or name")
    policy = configured.policies.get(cryptovm)
    if policy is None:
        raise VerificationError("policy", f"no policy for the CryptoVM node {cryptovm!r}")
    attestation = KeyAttestation.from_dict(attested["attestation"])
    verifier = QuoteVerifier(ak_trust=configured.registry.for_node(cryptovm), policy=policy)
    report = verify_key_attestation(attestation, nonce, verifier,
                                    expected_key_id=issued["ca_key_id"])
    if not report.ok or attestation.public != spki_der(ca):
        failure = report.failure
        raise VerificationError(failure.name if failure else "key_attestation",
                                "the CA key's attestation failed: its certificate is not used")
    return key, certificate, ca, {
        "issuer": certificate_info(ca)["subject"], "key_id": issued["ca_key_id"],
        "attested_by": cryptovm, "key_attestation": "verified", "non_exportable": True,
        "checks": [c.name for c in report.checks if c.passed]}


def _valid_node_name(name: str) -> bool:
    try:
        check_node_name(name)
    except TestbedError:
        return False
    return True


def _registry(request: dict[str, Any]) -> AkRegistry:
    text = request.get("registry")
    if not isinstance(text, str):
        raise ValueError("registry: the cluster's AK registry as JSON text")
    return AkRegistry.from_json(text)


def _policies(request: dict[str, Any]) -> dict[str, ReferencePolicy]:
    docs = request.get("policies")
    if not isinstance(docs, dict) or not docs:
        raise ValueError("policies: {node: reference policy YAML}")
    policies = {}
    for node, text in docs.items():
        check_node_name(node)
        if not isinstance(text, str):
            raise ValueError(f"policies[{node}] is not YAML text")
        policies[node] = load_policy(text)
    return policies


def _certificate(value: object, name: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(b64decode(value, name))
    except (ValueError, EvidenceFormatError):
        raise ValueError(f"{name}: not a base64 DER X.509 certificate") from None


def install(agent: GuestAgent, send_frame: SendFrame) -> GuestTrustedPassages:
    """Add the Trusted Passages ops to ``agent``; ``send_frame`` is the agent's framing."""
    service = GuestTrustedPassages(agent, send_frame)
    agent.handlers.update({"tp_init": service.init, "tp_configure": service.configure,
                           "tp_result": service.result,
                           "tp_open": lambda _request: {"open": service.open_channels()}})
    agent.stream_handlers.update({"tp_accept": service.accept, "tp_connect": service.connect,
                                  "tp_enroll": service.enroll})
    agent.revocation_listeners["trusted-passages"] = service
    setattr(agent, "trusted_passages", service)  # noqa: B010 (for cvm_attested)
    return service
