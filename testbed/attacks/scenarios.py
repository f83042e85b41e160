"""The attack scenarios of the Trusted Passages paper (seed 003), each run twice:
against plain mutual TLS with CA-valid certificates, and against Trusted Passages.

A scenario's attack *succeeds* when the attacker's goal is met: the victim's
secret reaches the wrong machine, or the attacker's connection is accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attestation.errors import TestbedError
from testbed.attacks.lab import AV_CURRENT, AV_STALE, GOOD_BOOT, INSECURE_BOOT, Lab
from testbed.attacks.lab import random_secret as _secret
from testbed.attacks.plain import PlainProxy, PlainServer, PlainTlsError, exchange
from trusted_passages import (
    AttestationRejected,
    AttestedChannel,
    BindingContext,
    ChannelConfig,
    Issuer,
    connect,
    serve,
)
from trusted_passages.attester import spki_digest

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


def _plain_ctx(config: ChannelConfig, role: str) -> Any:
    return config.ssl_context("server" if role == "server" else "client")


def _caught(exc: AttestationRejected | None, server: _TpServer | None,
            client_side: str, server_side: str) -> Outcome:
    """Attribute a refusal to whichever side noticed first."""
    detected = [r for r in (server.refused if server else []) if not r.by_peer]
    if detected:
        return Outcome(False, detected[0].reason, detected[0].check, server_side)
    if exc is not None and not exc.by_peer:
        return Outcome(False, exc.reason, exc.check, client_side)
    if exc is not None:
        return Outcome(False, exc.reason, exc.check, server_side)
    return Outcome(True, "the connection was accepted")


# --- scenarios -----------------------------------------------------------------------


def toctou(lab: Lab) -> ScenarioResult:
    """After Bob's customer attested his VM, Alice redirects later connections to an
    insecure VM holding a CA-valid certificate for the same name."""
    key, cert = lab.certificate_for("server")
    insecure = lab.tp_config("insecure", peer="client", certificate=cert, key=key)
    victim = lab.tp_config("client", peer="server")
    secret = _secret()
    with PlainServer(_plain_ctx(insecure, "server"), lambda m: b"ok") as evil:
        exchange(HOST, evil.port, _plain_ctx(victim, "client"), secret)
        plain = Outcome(secret in evil.received, "the client sent its secret to the insecure "
                        "VM, whose certificate is CA-valid for 'server'")
    server = _TpServer(insecure)
    try:
        exc = _tp_attempt(victim, server.port, secret)
    finally:
        server.close()
    return ScenarioResult("toctou", "TOCTOU: later connections redirected to an insecure VM",
                          plain, _caught(exc, None, "client", "insecure VM"))


def mitm(lab: Lab) -> ScenarioResult:
    """Alice sits between client and server with CA-valid certificates for both names."""
    front_key, front_cert = lab.certificate_for("server")
    back_key, back_cert = lab.certificate_for("client")
    front = lab.tp_config("evil", peer="client", certificate=front_cert, key=front_key)
    back = lab.tp_config("evil", peer="server", certificate=back_cert, key=back_key)
    victim = lab.tp_config("client", peer="server")
    real = lab.tp_config("server", peer="client")
    secret = _secret()
    with PlainServer(_plain_ctx(real, "server"), lambda m: b"ok") as target, \
            PlainProxy(_plain_ctx(front, "server"), _plain_ctx(back, "client"),
                       (HOST, target.port)) as proxy:
        exchange(HOST, proxy.port, _plain_ctx(victim, "client"), secret)
        plain = Outcome(any(secret in s for s in proxy.seen) and secret in target.received,
                        "both ends accepted; the proxy read the secret in transit")
    server = _TpServer(real)
    try:
        with PlainProxy(_plain_ctx(front, "server"), _plain_ctx(back, "client"),
                        (HOST, server.port)) as proxy:
            exc = _tp_attempt(victim, proxy.port, secret)
    finally:
        server.close()
    return ScenarioResult("mitm", "MITM by the provider with CA-valid certificates for both ends",
                          plain, _caught(exc, server, "client", "server"))


def impersonation(lab: Lab) -> ScenarioResult:
    """An evil VM with a CA-valid certificate for 'client' connects to Bob's server."""
    key, cert = lab.certificate_for("client")
    evil = lab.tp_config("evil", peer="server", certificate=cert, key=key)
    real = lab.tp_config("server", peer="client")
    with PlainServer(_plain_ctx(real, "server"), lambda m: b"account data") as target:
        reply = exchange(HOST, target.port, _plain_ctx(evil, "client"), b"GET /account")
        plain = Outcome(reply == b"account data", "the server served the evil VM as 'client'")
    return ScenarioResult("impersonation", "Client impersonation by an evil VM", plain,
                          _tp_against_server(real, evil))


def _tp_against_server(real: ChannelConfig, attacker: ChannelConfig) -> Outcome:
    server = _TpServer(real)
    try:
        exc = _tp_attempt(attacker, server.port, b"GET /account")
    finally:
        server.close()
    return _caught(exc, server, "attacker", "server")


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
                             issuer=_ReplayIssuer(recorded))  # type: ignore[arg-type]
    real = lab.tp_config("server", peer="client")
    with PlainServer(_plain_ctx(real, "server"), lambda m: b"account data") as target:
        reply = exchange(HOST, target.port, _plain_ctx(attacker, "client"), b"GET /account")
        plain = Outcome(reply == b"account data", "plain mTLS has no evidence to replay: the "
                        "CA-valid certificate alone gets the attacker in")
    return ScenarioResult("replay", "Replay of old evidence", plain,
                          _tp_against_server(real, attacker))


def cuckoo(lab: Lab) -> ScenarioResult:
    """Alice poses as the server and relays the quote to another genuine TPM she controls."""
    key, cert = lab.certificate_for("server")
    relay = lab.nodes["bystander"].issuer  # a genuine, registered TPM, good boot
    attacker = lab.tp_config("evil", peer="client", certificate=cert, key=key, issuer=relay)
    victim = lab.tp_config("client", peer="server")
    secret = _secret()
    with PlainServer(_plain_ctx(attacker, "server"), lambda m: b"ok") as evil:
        exchange(HOST, evil.port, _plain_ctx(victim, "client"), secret)
        plain = Outcome(secret in evil.received, "the client sent its secret to Alice")
    server = _TpServer(attacker)
    try:
        exc = _tp_attempt(victim, server.port, secret)
    finally:
        server.close()
    return ScenarioResult("cuckoo", "Evidence relayed from another genuine TPM (cuckoo)",
                          plain, _caught(exc, None, "client", "attacker"))


def tampered_boot(lab: Lab) -> ScenarioResult:
    """Bob's server VM is rebooted into another kernel (no HyperSafe)."""
    server = lab.nodes["server"]
    secret = _secret()
    server.reboot(INSECURE_BOOT)
    try:
        real = lab.tp_config("server", peer="client")
        victim = lab.tp_config("client", peer="server")
        with PlainServer(_plain_ctx(real, "server"), lambda m: b"ok") as target:
            exchange(HOST, target.port, _plain_ctx(victim, "client"), secret)
            plain = Outcome(secret in target.received, "the client talked to the tampered "
                            "server: its certificate did not change")
        tp_server = _TpServer(real)
        try:
            exc = _tp_attempt(victim, tp_server.port, secret)
        finally:
            tp_server.close()
    finally:
        server.reboot(GOOD_BOOT)
    return ScenarioResult("tampered-boot", "Tampered boot: another kernel (PCR mismatch)", plain,
                          _caught(exc, None, "client", "server"))


def key_copy(lab: Lab) -> ScenarioResult:
    """Alice copies the server's TLS key and certificate to a machine of hers."""
    server = lab.nodes["server"]
    stolen = lab.tp_config("evil", peer="client", certificate=server.certificate,
                           key=server.key)
    victim = lab.tp_config("client", peer="server")
    secret = _secret()
    with PlainServer(_plain_ctx(stolen, "server"), lambda m: b"ok") as evil:
        exchange(HOST, evil.port, _plain_ctx(victim, "client"), secret)
        plain = Outcome(secret in evil.received, "the copied key is the server's key: the "
                        "client cannot tell")
    tp_server = _TpServer(stolen)
    try:
        exc = _tp_attempt(victim, tp_server.port, secret)
    finally:
        tp_server.close()
    return ScenarioResult("key-copy", "Server key copied to an unmeasured machine", plain,
                          _caught(exc, None, "client", "server"))


def third_party(lab: Lab) -> ScenarioResult:
    """Bob's service attests its customer's claim 'antivirus signatures up to date',
    measured into a runtime PCR; a customer with stale signatures is refused."""
    client = lab.nodes["client"]
    real = lab.tp_config("server", peer="client")
    victim = lab.tp_config("client", peer="server")
    client.measure_runtime(AV_STALE)
    try:
        with PlainServer(_plain_ctx(real, "server"), lambda m: b"ok") as target:
            exchange(HOST, target.port, _plain_ctx(victim, "client"), b"transfer 100")
            plain = Outcome(b"transfer 100" in target.received, "Bob served a customer whose "
                            "antivirus signatures are stale: plain TLS cannot know")
        tp = _tp_against_server(real, victim)
    finally:
        client.measure_runtime(AV_CURRENT)
    return ScenarioResult("third-party", "Third party: Bob attests the customer's antivirus "
                          "claim (runtime PCR 23)", plain, tp)


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

