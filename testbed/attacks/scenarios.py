"""The attack scenarios of the Trusted Passages paper (seed 003), each run twice:
against plain mutual TLS with CA-valid certificates, and against Trusted Passages.

A scenario's attack *succeeds* when the attacker's goal is met: the victim's
secret reaches the wrong machine, or the attacker's connection is accepted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from OpenSSL import SSL

from attestation.errors import EndorsementError, TestbedError, VerificationError
from attestation.evidence import Evidence
from attestation.ima import IMA_PCR, check_entries
from attestation.registrar import AkRegistry, register
from attestation.tpm import LocalAttester, TpmClient
from attestation.tpm_types import PcrSelection, parse_public
from attestation.verifier import QuoteVerifier
from cryptovm.errors import ReleaseDenied
from testbed.attacks.lab import AV_CURRENT, AV_STALE, GOOD_BOOT, INSECURE_BOOT, Lab
from testbed.attacks.lab import random_secret as _secret
from testbed.attacks.plain import PlainProxy, PlainServer, PlainTlsError, exchange
from testbed.attacks.svd import MARKER, OWNER, SvdWorld, svd_world
from testbed.cluster.runtime import RuntimeState, explaining_prefix
from testbed.hosts import deep
from testbed.hosts import lifecycle as hosts
from testbed.hosts.layout import LabPaths
from testbed.hosts.network import scratch_network
from testbed.hosts.remote import libvirt_uri, libvirt_version
from testbed.roles.revocation import (
    RevocationEvent,
    RevocationGate,
    decision_args,
    encode_decision,
    public_key_pem,
)
from testbed.svd.volumes import DiskFiles
from testbed.tpm.runtime import RuntimeLog, default_policy
from testbed.tpm.swtpm import Swtpm
from trusted_passages import (
    AttestationRejected,
    AttestedChannel,
    BindingContext,
    ChannelConfig,
    Issuer,
    connect,
    serve,
    spki_digest,
)
from trusted_passages.blocking import establish
from trusted_passages.signing import Proof, SignReceiver, SignSender, build_signed_data
from trusted_passages.tctp import (
    HalecClient,
    HalecTable,
    InnerRequest,
    TctpError,
    encode_body,
    handshake_in_memory,
    parse_body,
)
from trusted_passages.tpm_signing import TpmKeyChecker, TpmSigner, verify_proof

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Outcome:
    attack_succeeded: bool
    detail: str
    caught_by: str | None = None  # the failed check, for Trusted Passages
    caught_at: str | None = None  # which side noticed


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    title: str
    plain: Outcome
    trusted_passages: Outcome

    @property
    def as_expected(self) -> bool:
        return self.plain.attack_succeeded and not self.trusted_passages.attack_succeeded

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.name, "title": self.title,
                "plain_mtls": {"attack_succeeded": self.plain.attack_succeeded,
                               "detail": self.plain.detail},
                "trusted_passages": {"attack_succeeded": self.trusted_passages.attack_succeeded,
                                     "caught_by": self.trusted_passages.caught_by,
                                     "caught_at": self.trusted_passages.caught_at,
                                     "detail": self.trusted_passages.detail},
                "as_expected": self.as_expected}


# --- running one side ----------------------------------------------------------------


class _TpServer:
    """A Trusted Passages server that records what reached it and what it refused."""

    def __init__(self, config: ChannelConfig) -> None:
        self.received: list[bytes] = []
        self.refused: list[AttestationRejected] = []
        self._server = serve(HOST, 0, config, self._handle, on_failure=self.refused.append)

    def _handle(self, channel: AttestedChannel) -> None:
        self.received.append(channel.recv())
        channel.send(b"ok")

    @property
    def port(self) -> int:
        return self._server.address[1]

    def close(self) -> None:
        self._server.close(timeout=2)


def _tp_attempt(config: ChannelConfig, port: int, message: bytes) -> AttestationRejected | None:
    """Connect and talk; the refusal if the channel was refused, None if it was accepted."""
    try:
        with connect(HOST, port, config) as channel:
            channel.send(message)
            channel.recv()
        return None
    except AttestationRejected as exc:
        return exc


def _plain_ctx(config: ChannelConfig, role: Literal["server", "client"]) -> SSL.Context:
    return config.ssl_context(role)


def _plain_run(server: ChannelConfig, client: ChannelConfig, message: bytes,
               reply: bytes = b"ok") -> tuple[list[bytes], bytes]:
    """One plain mTLS exchange: what reached the server, and what the client got back."""
    with PlainServer(_plain_ctx(server, "server"), lambda _: reply) as target:
        answer = exchange(HOST, target.port, _plain_ctx(client, "client"), message)
        return target.received, answer


def _tp_run(server: ChannelConfig, client: ChannelConfig, message: bytes, *,
            client_side: str = "client", server_side: str = "server",
            proxy: tuple[ChannelConfig, ChannelConfig] | None = None) -> Outcome:
    """One Trusted Passages attempt (optionally through a MITM proxy), attributed to
    whichever side detected the failure."""
    tp_server = _TpServer(server)
    try:
        if proxy is None:
            exc = _tp_attempt(client, tp_server.port, message)
        else:
            front, back = proxy
            with PlainProxy(_plain_ctx(front, "server"), _plain_ctx(back, "client"),
                            (HOST, tp_server.port)) as relay:
                exc = _tp_attempt(client, relay.port, message)
    finally:
        tp_server.close()
    return _caught(exc, tp_server, client_side, server_side)


def _caught(exc: AttestationRejected | None, server: _TpServer,
            client_side: str, server_side: str) -> Outcome:
    detected = [r for r in server.refused if not r.by_peer]
    if detected:
        return Outcome(False, detected[0].reason, detected[0].check, server_side)
    if exc is not None:
        side = server_side if exc.by_peer else client_side
        return Outcome(False, exc.reason, exc.check, side)
    return Outcome(True, "the connection was accepted")


# --- scenarios -----------------------------------------------------------------------


def toctou(lab: Lab) -> ScenarioResult:
    """After Bob's customer attested his VM, Alice redirects later connections to an
    insecure VM holding a CA-valid certificate for the same name."""
    key, cert = lab.certificate_for("server")
    insecure = lab.tp_config("insecure", peer="client", certificate=cert, key=key)
    victim = lab.tp_config("client", peer="server")
    secret = _secret()
    received, _ = _plain_run(insecure, victim, secret)
    plain = Outcome(secret in received, "the client sent its secret to the insecure VM, "
                    "whose certificate is CA-valid for 'server'")
    return ScenarioResult("toctou", "TOCTOU: later connections redirected to an insecure VM",
                          plain, _tp_run(insecure, victim, secret, server_side="insecure VM"))


def mitm(lab: Lab) -> ScenarioResult:
    """Alice sits between client and server with CA-valid certificates for both names."""
    front_key, front_cert = lab.certificate_for("server")
    back_key, back_cert = lab.certificate_for("client")
    front = lab.tp_config("evil", peer="client", certificate=front_cert, key=front_key)
    back = lab.tp_config("evil", peer="server", certificate=back_cert, key=back_key)
    victim = lab.tp_config("client", peer="server")
    real = lab.tp_config("server", peer="client")
    secret = _secret()
    with PlainServer(_plain_ctx(real, "server"), lambda _: b"ok") as target, \
            PlainProxy(_plain_ctx(front, "server"), _plain_ctx(back, "client"),
                       (HOST, target.port)) as relay:
        exchange(HOST, relay.port, _plain_ctx(victim, "client"), secret)
        plain = Outcome(any(secret in s for s in relay.seen) and secret in target.received,
                        "both ends accepted; the proxy read the secret in transit")
    return ScenarioResult("mitm", "MITM by the provider with CA-valid certificates for both ends",
                          plain, _tp_run(real, victim, secret, proxy=(front, back)))


def impersonation(lab: Lab) -> ScenarioResult:
    """An evil VM with a CA-valid certificate for 'client' connects to Bob's server."""
    key, cert = lab.certificate_for("client")
    evil = lab.tp_config("evil", peer="server", certificate=cert, key=key)
    real = lab.tp_config("server", peer="client")
    _, reply = _plain_run(real, evil, b"GET /account", reply=b"account data")
    plain = Outcome(reply == b"account data", "the server served the evil VM as 'client'")
    return ScenarioResult("impersonation", "Client impersonation by an evil VM", plain,
                          _tp_run(real, evil, b"GET /account", client_side="attacker"))


class _ReplayIssuer:
    """Presents evidence recorded from an earlier, genuine session."""

    def __init__(self, recorded: bytes) -> None:
        self._recorded = recorded

    def bound(self, context: BindingContext) -> Issuer:
        return self

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        return self._recorded


def replay(lab: Lab) -> ScenarioResult:
    """Alice replays the customer's evidence from an earlier session (e.g. from logs)."""
    client = lab.nodes["client"]
    recorded = client.issuer.bound(BindingContext("tp13", "client")).issue(
        spki_digest(client.certificate), b"\x42" * 32)
    key, cert = lab.certificate_for("client")
    attacker = lab.tp_config("evil", peer="server", certificate=cert, key=key,
                             issuer=_ReplayIssuer(recorded))
    real = lab.tp_config("server", peer="client")
    _, reply = _plain_run(real, attacker, b"GET /account", reply=b"account data")
    plain = Outcome(reply == b"account data", "plain mTLS has no evidence to replay: the "
                    "CA-valid certificate alone gets the attacker in")
    return ScenarioResult("replay", "Replay of old evidence", plain,
                          _tp_run(real, attacker, b"GET /account", client_side="attacker"))


def cuckoo(lab: Lab) -> ScenarioResult:
    """Alice poses as the server and relays the quote to another genuine TPM she controls."""
    key, cert = lab.certificate_for("server")
    relay = lab.nodes["bystander"].issuer  # a genuine, registered TPM, good boot
    attacker = lab.tp_config("evil", peer="client", certificate=cert, key=key, issuer=relay)
    victim = lab.tp_config("client", peer="server")
    secret = _secret()
    received, _ = _plain_run(attacker, victim, secret)
    plain = Outcome(secret in received, "the client sent its secret to Alice")
    return ScenarioResult("cuckoo", "Evidence relayed from another genuine TPM (cuckoo)",
                          plain, _tp_run(attacker, victim, secret, server_side="attacker"))


def tampered_boot(lab: Lab) -> ScenarioResult:
    """Bob's server VM is rebooted into another kernel (no HyperSafe)."""
    server = lab.nodes["server"]
    secret = _secret()
    server.reboot(INSECURE_BOOT)
    try:
        real = lab.tp_config("server", peer="client")
        victim = lab.tp_config("client", peer="server")
        received, _ = _plain_run(real, victim, secret)
        plain = Outcome(secret in received, "the client talked to the tampered server: its "
                        "certificate did not change")
        tp = _tp_run(real, victim, secret)
    finally:
        server.reboot(GOOD_BOOT)
    return ScenarioResult("tampered-boot", "Tampered boot: another kernel (PCR mismatch)", plain,
                          tp)


def key_copy(lab: Lab) -> ScenarioResult:
    """Alice copies the server's TLS key and certificate to a machine of hers."""
    server = lab.nodes["server"]
    stolen = lab.tp_config("evil", peer="client", certificate=server.certificate,
                           key=server.key)
    victim = lab.tp_config("client", peer="server")
    secret = _secret()
    received, _ = _plain_run(stolen, victim, secret)
    plain = Outcome(secret in received, "the copied key is the server's key: the client "
                    "cannot tell")
    return ScenarioResult("key-copy", "Server key copied to an unmeasured machine", plain,
                          _tp_run(stolen, victim, secret, server_side="attacker"))


def third_party(lab: Lab) -> ScenarioResult:
    """Bob's service attests its customer's claim 'antivirus signatures up to date',
    measured into a runtime PCR; a customer with stale signatures is refused."""
    client = lab.nodes["client"]
    real = lab.tp_config("server", peer="client")
    victim = lab.tp_config("client", peer="server")
    client.measure_runtime(AV_STALE)
    try:
        received, _ = _plain_run(real, victim, b"transfer 100")
        plain = Outcome(b"transfer 100" in received, "Bob served a customer whose antivirus "
                        "signatures are stale: plain TLS cannot know")
        tp = _tp_run(real, victim, b"transfer 100")
    finally:
        client.measure_runtime(AV_CURRENT)
    return ScenarioResult("third-party", "Third party: Bob attests the customer's antivirus "
                          "claim (runtime PCR 23)", plain, tp)


class _SubstitutingIssuer:
    """Presents a genuine batched quote with a path taken from other sessions, re-bound
    to the attacker's TLS key (the envelope's user_data is the attacker's)."""

    def __init__(self, captured: bytes, batch: dict[str, Any] | None = None) -> None:
        self._doc = json.loads(captured)
        if batch is not None:
            self._doc["batch"] = batch

    def bound(self, context: BindingContext) -> Issuer:
        return self

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        return json.dumps({**self._doc, "user_data": user_data.hex()}).encode()


def _captured_batch(lab: Lab) -> list[bytes]:
    """Two of the customer's sessions that shared one batched quote (seen on the wire)."""
    client = lab.nodes["client"]
    issuer = client.issuer.batched(0.05, eager=False).bound(BindingContext("tp13", "client"))
    spki = spki_digest(client.certificate)
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda nonce: issuer.issue(spki, nonce),
                             [os.urandom(32), os.urandom(32)]))


def batch_substitution(lab: Lab) -> ScenarioResult:
    """Alice, with a CA-valid certificate for 'client', presents the customer's genuine
    batched quote: with the path of another session of that batch, or with her own
    session's leaf spliced onto another leaf's path."""
    first, second = _captured_batch(lab)
    key, cert = lab.certificate_for("client")
    real = lab.tp_config("server", peer="client")
    _, reply = _plain_run(real, lab.tp_config("evil", peer="server", certificate=cert,
                                              key=key), b"GET /account", reply=b"account data")
    plain = Outcome(reply == b"account data", "plain mTLS has no batch to check: the "
                    "CA-valid certificate alone gets Alice in")
    attempts = {"another session's quote and path": _SubstitutingIssuer(first),
                "another leaf's path": _SubstitutingIssuer(first, json.loads(second)["batch"])}
    outcomes = []
    for what, issuer in attempts.items():
        attacker = lab.tp_config("evil", peer="server", certificate=cert, key=key,
                                 issuer=issuer)
        outcome = _tp_run(real, attacker, b"GET /account", client_side="attacker")
        outcomes.append(replace(outcome, detail=f"{what}: {outcome.detail}"))
    accepted = [o for o in outcomes if o.attack_succeeded]
    tp = accepted[0] if accepted else replace(
        outcomes[0], detail="; ".join(o.detail for o in outcomes))
    return ScenarioResult("batch-substitution", "Batched quote: another session's quote and "
                          "path, or another leaf's path", plain, tp)


# --- TCTP (seed 000): HALECs whose TLS records travel in HTTP bodies ---------------------
# The attacker is an HTTP intermediary (a routing proxy, a cache): it sees every header,
# URL and body. The HALECs here are driven in memory (trusted_passages.tctp, the same
# sans-IO code the HTTP server runs); tests/test_tctp.py runs them through nginx.


def _halec(lab: Lab, client: str = "client") -> tuple[HalecTable, HalecClient]:
    server = lab.tp_config("server", peer="client")
    table = HalecTable(lambda: server.connection("server"), "/records")
    halec = HalecClient(lab.tp_config(client, peer="server").connection("client"),
                        "/records/halecs")
    handshake_in_memory(table, halec)
    return table, halec


def _tctp_refused(table: HalecTable, body: bytes, target: str) -> Outcome:
    try:
        table.open_request(body, "POST", target)
    except TctpError as exc:
        return Outcome(False, exc.reason, "tctp_record", "server")
    return Outcome(True, "the server accepted the body")


def proxy_reads_body(lab: Lab) -> ScenarioResult:
    """An HTTP intermediary between customer and service tries to read a request body,
    then to alter it."""
    secret = _secret()
    plain_body = b"POST /records/7 HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (
        len(secret), secret)  # what an intermediary relays for plain HTTP (or TLS it ends)
    plain = Outcome(secret in plain_body, "the intermediary read the patient record in "
                    "the body it relayed, and could have changed it")
    table, halec = _halec(lab)
    sealed = halec.seal_request(InnerRequest("POST", "/records/7", "text/plain", secret))
    if secret in sealed:
        return ScenarioResult("proxy-reads-body", _PROXY_TITLE, plain,
                              Outcome(True, "the secret is visible in the TCTP body"))
    altered = bytearray(sealed)
    altered[-20] ^= 0x01  # one bit of the TLS record carrying the body
    tp = _tctp_refused(table, bytes(altered), "/records/7")
    if not tp.attack_succeeded:
        tp = Outcome(False, f"the body is TLS records (no plaintext); the altered copy: "
                     f"{tp.detail}", tp.caught_by, tp.caught_at)
    return ScenarioResult("proxy-reads-body", _PROXY_TITLE, plain, tp)


_PROXY_TITLE = "TCTP: an HTTP intermediary reads or alters a body"


def halec_hijack(lab: Lab) -> ScenarioResult:
    """Alice saw the customer's HALEC URL in transit and sends her own request on it."""
    sessions = {"session-4f1c": "client"}  # the plain baseline: a bearer session id
    plain = Outcome(sessions.get("session-4f1c") == "client", "the stolen session id "
                    "(visible to every intermediary) made the server act for the customer")
    table, victim = _halec(lab)
    # The customer's genuine request, which Alice records in transit and lets pass ...
    recorded = victim.seal_request(InnerRequest("POST", "/records/transfer", None,
                                                b"100 to Bob"))
    table.open_request(recorded, "POST", "/records/transfer")
    # ... then sends again on the customer's HALEC URL, as her own request.
    forged = encode_body(*parse_body(recorded))
    tp = _tctp_refused(table, forged, "/records/transfer")
    if not tp.attack_succeeded:
        tp = Outcome(False, f"Alice has no key of the HALEC: her request on its URL: "
                     f"{tp.detail}", tp.caught_by, tp.caught_at)
    return ScenarioResult("halec-hijack", "TCTP: a request on another client's HALEC URL",
                          plain, tp)
def _attested_pair(lab: Lab) -> tuple[AttestedChannel, AttestedChannel]:
    """The customer ("client") and Bob ("server") on one attested channel."""
    client_sock, server_sock = socket.socketpair()
    ends: dict[str, AttestedChannel] = {}
    server = lab.tp_config("server", peer="client")
    thread = threading.Thread(target=lambda: ends.setdefault("server", establish(
        server_sock, server.connection("server"), server.timeout)))
    thread.start()
    client = lab.tp_config("client", peer="server")
    ends["client"] = establish(client_sock, client.connection("client"), client.timeout)
    thread.join(client.timeout)
    return ends["client"], ends["server"]


def _signed_order(lab: Lab, order: bytes) -> Proof:
    """The customer signs ``order`` with TLS Sign; Bob keeps the proof."""
    node = lab.nodes["client"]
    signer = TpmSigner(node.client, "client", node.selection, node.event_log,
                       lock=node.issuer.tpm_lock)
    client_end, server_end = _attested_pair(lab)
    try:
        sender = threading.Thread(target=lambda: SignSender.open(client_end, signer)
                                  .sign_send(order))
        sender.start()
        receiver = SignReceiver.accept(server_end, TpmKeyChecker(lab.policies["client"]),
                                       "server")
        _, proof = receiver.sign_recv()
        sender.join(5)
        return proof
    finally:
        signer.close()
        client_end.close()
        server_end.close()


def _plain_signature_accepts(lab: Lab, data: bytes, signature: bytes,
                             certificate: x509.Certificate) -> bool:
    """The baseline: a signature sent over TLS, checked against a CA-valid certificate."""
    key = certificate.public_key()
    try:
        certificate.verify_directly_issued_by(lab.provider_ca.certificate)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def sign_forgery(lab: Lab) -> ScenarioResult:
    """A signed order is altered, or re-signed by a key that is not in the customer's TPM
    (Alice holds a CA-valid certificate for the customer's name)."""
    order, forged = b"transfer 100 to Bob", b"transfer 100000 to Alice"
    alice_key, alice_cert = lab.certificate_for("client")
    assert isinstance(alice_key, ec.EllipticCurvePrivateKey)
    signature = alice_key.sign(forged, ec.ECDSA(hashes.SHA256()))
    plain = Outcome(_plain_signature_accepts(lab, forged, signature, alice_cert),
                    "Alice's re-signed order verifies: her certificate for 'client' is CA-valid")

    proof = _signed_order(lab, order)
    der = alice_cert.public_bytes(serialization.Encoding.DER)

    def alice_signs(message: bytes) -> bytes:
        return alice_key.sign(message, ec.ECDSA(hashes.SHA256()))

    re_signed = build_signed_data(forged, der, alice_signs, proof.session, 1,
                                  datetime.now(UTC).replace(microsecond=0))
    altered = proof.cms.replace(order, forged.ljust(len(order))[:len(order)])
    caught = []
    for cms in (re_signed, altered):
        result = verify_proof(replace(proof, cms=cms).to_json(),
                              lab.registry.for_node("client"), lab.policies["client"])
        caught.append(result.report.failure)
    if any(failure is None for failure in caught):
        return ScenarioResult("sign-forgery", _SIGN_TITLE, plain,
                              Outcome(True, "a forged proof verified"))
    names = [failure.name for failure in caught if failure is not None]
    tp = Outcome(False, f"re-signed: {names[0]}; altered: {names[1]} (genuine proof: "
                 f"{'ok' if verify_proof(proof.to_json()).report.ok else 'REJECTED'})",
                 names[0], "third party")
    return ScenarioResult("sign-forgery", _SIGN_TITLE, plain, tp)


_SIGN_TITLE = "TLS Sign: a signed order altered or re-signed by a non-TPM key"


class _HeldServer:
    """A Trusted Passages server whose channels stay open, answering each message; the
    client side tracks its channel by peer, and a revocation of that peer closes it."""

    def __init__(self, config: ChannelConfig) -> None:
        self.received: list[bytes] = []
        self._server = serve(HOST, 0, config, self._handle)

    def _handle(self, channel: AttestedChannel) -> None:
        with contextlib.suppress(TestbedError):
            while data := channel.recv(timeout=5):
                self.received.append(data)
                channel.send(b"ok")

    @property
    def port(self) -> int:
        return self._server.address[1]

    def close(self) -> None:
        self._server.close(timeout=2)


def _quote_pcr10(lab: Lab, name: str) -> bytes:
    """The verifier quotes ``name``'s PCR 10 with a fresh nonce and checks the quote."""
    node, nonce = lab.nodes[name], os.urandom(32)
    with node.issuer.tpm_lock:
        # The persistent AK's ESYS handle is the issuer's too (ESYS keeps one per
        # handle): used, never closed here.
        ak = node.client.attestation_key("ecc")
        result = node.client.quote(ak, PcrSelection("sha256", (IMA_PCR,)), nonce)
    evidence = Evidence(result.attest, result.signature, ak.public, "sha256", result.pcrs)
    QuoteVerifier(ak_trust=lab.registry.for_node(name)).verify(evidence, nonce) \
        .raise_for_failure()
    return evidence.pcrs[IMA_PCR]


def runtime_tamper(lab: Lab) -> ScenarioResult:
    """Bob's server, attested and talking to its customer, executes a binary its runtime
    policy does not list. The verifier's next quote catches it (check ``runtime``) and its
    signed revocation makes the customer close the channel before the secret leaves."""
    server = lab.nodes["server"]
    real = lab.tp_config("server", peer="client")
    victim = lab.tp_config("client", peer="server")
    secret = _secret()
    directory = Path(tempfile.mkdtemp(prefix="runtime-tamper-", dir=lab.root))
    log = RuntimeLog(directory / "runtime.log")
    last_good = RuntimeState((0, 0), 0, _quote_pcr10(lab, "server"))  # the server attested
    with server.issuer.tpm_lock:  # ... then executes an unlisted binary
        log.measure(server.client, "/usr/local/bin/cryptominer", b"unlisted binary")
    received, _ = _plain_run(real, victim, secret)
    plain = Outcome(secret in received, "nothing happens: the customer's mTLS session "
                    "cannot see what the server runs, and the secret reached it")
    held = _HeldServer(real)
    try:
        with connect(HOST, held.port, victim) as channel:
            channel.send(b"hello Bob")
            channel.recv()
            tp = _revoke_and_send(lab, directory, log, last_good, channel, secret)
        tp = replace(tp, attack_succeeded=secret in held.received)
    finally:
        held.close()
        shutil.rmtree(directory, ignore_errors=True)
    return ScenarioResult("runtime-tamper", "Runtime tamper: an unlisted binary runs after "
                          "attestation", plain, tp)


def _revoke_and_send(lab: Lab, directory: Path, log: RuntimeLog, last_good: RuntimeState,
                     channel: AttestedChannel, secret: bytes) -> Outcome:
    """The verifier judges the new log entries; on a failure it revokes the server, and the
    customer, holding the channel, closes it; then the customer tries to send."""
    quoted = _quote_pcr10(lab, "server")
    entries, _ = explaining_prefix(log.read, last_good, quoted)
    try:
        check_entries(default_policy("server-runtime"), entries)
    except VerificationError as exc:
        caught = exc
    else:
        channel.send(secret)
        channel.recv()
        return Outcome(True, "the verifier's runtime check passed")
    key = Ed25519PrivateKey.generate()
    (directory / "verifier.pub").write_text(public_key_pem(key.public_key()))
    gate = RevocationGate(directory / "revocations.json", directory / "verifier.pub")
    event = RevocationEvent("server", caught.check, caught.reason, "now", 1)
    gate.receive("revoked", decision_args(event, key.sign(encode_decision(event))))
    if gate.is_revoked(channel.peer.node):
        channel.close()  # what the customer's Trusted Passages service does on revocation
    with contextlib.suppress(TestbedError, OSError):
        channel.send(secret)
    return Outcome(False, f"{caught.reason}; revoked: the customer closed its channel to "
                   "the server", caught.check, "verifier")


# --- the Secure Virtual Device (encrypted disks, docs/svd.md) --------------------------------


def _release_refused(world: SvdWorld, files: DiskFiles, requester: str) -> Outcome:
    """``requester``'s host tries to unlock ``files`` through the CryptoVM."""
    try:
        data = world.unlock(files, world.lab.nodes[requester])
    except ReleaseDenied as exc:
        return Outcome(False, f"no key: {exc.reason}", exc.check, "cryptovm")
    return Outcome(MARKER in data, f"{requester} unlocked the disk and read "
                   f"{'the marker' if MARKER in data else 'something else'}")


def stolen_disk(lab: Lab) -> ScenarioResult:
    """Alice copies Bob's server's disk image off the host and attaches it to her VM."""
    world = svd_world(lab)
    plain_image = world.root / "plain-data.img"
    plain_image.write_bytes(MARKER + bytes(4096))  # the same data on a plain disk
    stolen = plain_image.read_bytes()
    plain = Outcome(MARKER in stolen, "the copied plain image holds the customer's data")
    copy = world.copy_disk("evil")
    if MARKER in copy.image.read_bytes():
        return ScenarioResult("stolen-disk", "Disk image copied off the host", plain,
                              Outcome(True, "the marker is in the encrypted image"))
    svd = _release_refused(world, copy, "evil")
    svd = replace(svd, detail="the copied image is LUKS ciphertext (no marker in it); "
                  f"attached to Alice's VM: {svd.detail}")
    return ScenarioResult("stolen-disk", "Disk image copied off the host", plain, svd)


def unattested_host(lab: Lab) -> ScenarioResult:
    """Bob's server host boots another kernel and asks for the disk key."""
    world = svd_world(lab)
    server = lab.nodes[OWNER]
    server.reboot(INSECURE_BOOT)
    try:
        data = world.open_with(world.files(OWNER), world.plain_release())
        plain = Outcome(MARKER in data, "a key store without attestation released the key to "
                        "the tampered host: the disk opened")
        svd = _release_refused(world, world.files(OWNER), OWNER)
    finally:
        server.reboot(GOOD_BOOT)
    return ScenarioResult("unattested-host", "Disk key asked for by a host failing its policy",
                          plain, svd)


def disk_swap(lab: Lab) -> ScenarioResult:
    """Alice attaches Bob's server's disk to another VM of the same (good) boot."""
    world = svd_world(lab)
    swapped = world.copy_disk("bystander")
    data = world.open_with(swapped, world.plain_release())
    plain = Outcome(MARKER in data, "the key store released the disk key by its id: the other "
                    "VM reads the server's disk")
    return ScenarioResult("disk-swap", "Another VM's disk attached", plain,
                          _release_refused(world, swapped, "bystander"))


def tampered_host(lab: Lab) -> ScenarioResult:
    """Alice's hypervisor host runs another QEMU binary (one byte changed) beneath the VMs.

    A real host (namespaces, sshd, libvirtd, host TPM; docs/hosts.md) whose mount
    namespace shows the modified binary at QEMU's path. Plain: the lab reaches its
    libvirt over qemu+ssh, host key checked, and would place VMs on it. Attested hosts:
    the host's quote carries the binary's digest in PCR 14 and its policy refuses it.
    """
    workdir = lab.root / "tampered-host"
    bridge, subnet = scratch_network("tbatk")
    try:
        (host,) = hosts.up(workdir, 1, bridge=bridge, subnet=subnet, tamper_qemu=["host1"])
        version = libvirt_version(libvirt_uri(LabPaths(workdir), host.address))
        plain = Outcome(True, f"libvirt {version} on the tampered host answered over "
                        "qemu+ssh (host key checked): a lab without host attestation "
                        "places VMs there")
        verdict = host.verdict
        if verdict is None or verdict.trusted:
            tp = Outcome(True, "the tampered host was attested as trusted")
        else:
            tp = Outcome(False, f"host untrusted: {verdict.message}", verdict.failed_check,
                         "verifier")
    finally:
        hosts.down(workdir)
    return ScenarioResult("tampered-host", "Tampered hypervisor host: another QEMU binary",
                          plain, tp)


def rogue_vtpm(lab: Lab) -> ScenarioResult:
    """Alice manufactures a vTPM outside any attested host and makes its EK certificate
    herself: signed by a self-made "host intermediate" with the name of a real one under
    the lab CA's name, or by a self-made root named like the lab CA (docs/hosts.md, deep
    attestation). Plain libvirt/mTLS never looks at a VM's EK: her VM gets a CA-valid
    certificate like any other and the client's secret. The verifier validates the EK
    chain (lab CA, and the intermediates of attested hosts only) before any AK of it is
    activated."""
    key, cert = lab.certificate_for("server")
    secret = _secret()
    received, _ = _plain_run(lab.tp_config("evil", peer="client", certificate=cert, key=key),
                             lab.tp_config("client", peer="server"), secret)
    plain = Outcome(secret in received, "the VM on the rogue vTPM got a CA-valid certificate "
                    "and the client's secret: nobody checked its EK")
    state = deep.manufacture_uncertified_vtpm(
        Path(tempfile.mkdtemp(prefix="rogue-vtpm-", dir=lab.root)), lab.ek_ca)
    refusals = []
    with Swtpm(state) as tpm, TpmClient(tpm.tcti) as client:
        ek = client.endorsement_key("rsa")
        intermediate, self_made_root = _rogue_ek_certificates(lab, ek.public)
        deep.write_ek_certificate(client, intermediate)
        for label, attempt in (
                ("self-made host intermediate", lambda: register(
                    LocalAttester(client), "rogue", lab.registrar, AkRegistry())),
                ("self-made root", lambda: lab.registrar.challenge(
                    self_made_root, ek.public, client.attestation_key("ecc").public))):
            try:
                attempt()
                return ScenarioResult("rogue-vtpm", ROGUE_TITLE, plain, Outcome(
                    True, f"the rogue vTPM's EK ({label}) was accepted"))
            except EndorsementError as exc:
                refusals.append(f"{label}: {exc}")
    return ScenarioResult("rogue-vtpm", ROGUE_TITLE, plain, Outcome(
        False, "; ".join(refusals), "ek_certificate", "verifier"))


ROGUE_TITLE = "Rogue vTPM: made outside any attested host, EK certificate self-made"


def _rogue_ek_certificates(lab: Lab, ek_public: bytes) -> tuple[bytes, bytes]:
    """Alice's two EK certificates: under a fake host intermediate, and a fake root."""
    root = lab.ek_ca.ca_bundle()[0]
    ek = parse_public(ek_public).public_key()
    certificates = []
    for subject, issuer, path_length in (
            (deep.intermediate_name("host1"), root.subject, 0),
            (root.subject, root.subject, None)):
        alice = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        fake = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(alice.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(alice.public_key()),
                               critical=False)
                .sign(alice, hashes.SHA256()))
        certificates.append(deep.build_ek_certificate(fake, ek, deep.DEFAULT_IDENTITY,
                                                      _signer(alice)))
    return certificates[0], certificates[1]


def _signer(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    return lambda tbs: key.sign(tbs, ec.ECDSA(hashes.SHA256()))


def genuine(lab: Lab) -> tuple[bool, str]:
    """No attack: the customer and Bob's server attest each other and talk."""
    real = lab.tp_config("server", peer="client")
    victim = lab.tp_config("client", peer="server")
    server = _TpServer(real)
    try:
        with connect(HOST, server.port, victim) as channel:
            channel.send(b"hello Bob")
            reply = channel.recv()
            peer = channel.peer
    except TestbedError as exc:
        return False, str(exc)
    finally:
        server.close()
    return reply == b"ok", f"established with {peer.node!r} (policy {peer.policy_name!r})"


SCENARIOS: dict[str, Callable[[Lab], ScenarioResult]] = {
    "toctou": toctou,
    "mitm": mitm,
    "impersonation": impersonation,
    "replay": replay,
    "cuckoo": cuckoo,
    "tampered-boot": tampered_boot,
    "key-copy": key_copy,
    "third-party": third_party,
    "proxy-reads-body": proxy_reads_body,
    "halec-hijack": halec_hijack,
    "sign-forgery": sign_forgery,
    "batch-substitution": batch_substitution,
    "runtime-tamper": runtime_tamper,
    "stolen-disk": stolen_disk,
    "unattested-host": unattested_host,
    "disk-swap": disk_swap,
    "tampered-host": tampered_host,
    "rogue-vtpm": rogue_vtpm,
}


def run(lab: Lab, names: list[str]) -> list[ScenarioResult]:
    results = []
    for name in names:
        try:
            results.append(SCENARIOS[name](lab))
        except PlainTlsError as exc:
            failed = Outcome(False, f"plain mTLS attack could not be staged: {exc}")
            results.append(ScenarioResult(name, name, failed, Outcome(False, "not run")))
    return results

