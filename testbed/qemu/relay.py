"""Trusted Passages between guests: the host provisions them and carries their records.

The guests' networks are isolated (restrict=on: no route to each other or out), so
the host is their network: for one channel it opens a ``tp_connect`` stream to the
client guest and a ``tp_accept`` stream to the server guest and splices the two.
TLS and the attestation exchange run end to end between the guests
(testbed/qemu/guest/tp_extension.py); the host sees only records, like any router on the
path, and can neither read nor forge them (the attack lab's ``mitm`` scenario shows
what happens when it tries).

Provisioning: each guest generates its TLS key inside and returns the public key;
the cluster's TLS CA certifies it (testbed/roles/trust.py, as for sim nodes); the
guest receives its certificate, the AK registry ``testbed up`` wrote, and every
node's reference policy, and validates its peers itself.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, TestbedError
from testbed.cluster.agent import AgentClient, AgentError, AgentUnavailable
from testbed.core.errors import StateError
from trusted_passages.pki import CertificateAuthority, certify_public_key

__all__ = ["ChannelOutcome", "HeldChannel", "RelayError", "configure_guest", "enroll_guest",
           "hold_channel", "relay_channel", "relay_to_cryptovm"]

RELAY_TIMEOUT_S = 120.0  # two quotes and two validations inside TCG guests
RESULT_WAIT_S = 10.0
_CHUNK = 1 << 16


class RelayError(StateError):
    """A guest could not open its end of a channel, or the channel never finished."""


@dataclass(frozen=True)
class ChannelOutcome:
    """Both guests' own account of one channel, and what the host carried."""

    client: str
    server: str
    client_view: dict[str, Any]  # what the client guest verified, or {"error": ...}
    server_view: dict[str, Any]
    bytes_relayed: int
    seconds: float

    @property
    def established(self) -> bool:
        return "error" not in self.client_view and "error" not in self.server_view

    def to_dict(self) -> dict[str, Any]:
        return {"client": self.client, "server": self.server,
                "established": self.established, "client_view": self.client_view,
                "server_view": self.server_view, "bytes_relayed": self.bytes_relayed,
                "seconds": round(self.seconds, 3)}


def configure_guest(agent: AgentClient, node: str, ca: CertificateAuthority, *,
                    registry_json: str, policies: Mapping[str, str],
                    pcrs: Sequence[int]) -> x509.Certificate:
    """Have ``node``'s guest make its TLS key, certify it, and give it the trust anchors."""
    public = b64decode(agent.call({"op": "tp_init", "node": node}).get("public_key"), "public_key")
    key = serialization.load_der_public_key(public)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise EvidenceFormatError(f"node {node!r}: its TLS key is not an EC key")
    certificate = certify_public_key(ca, node, key)
    der = certificate.public_bytes(serialization.Encoding.DER)
    ca_der = ca.certificate.public_bytes(serialization.Encoding.DER)
    agent.call({"op": "tp_configure", "certificate": b64encode(der),
                "ca_certificates": [b64encode(ca_der)], "registry": registry_json,
                "policies": dict(policies), "pcrs": list(pcrs), "profile": "tp13"})
    return certificate


def relay_channel(client: AgentClient, server: AgentClient, *, client_node: str,
                  server_node: str, message: str) -> ChannelOutcome:
    """One attested channel from ``client_node``'s guest to ``server_node``'s."""
    started = time.monotonic()
    server_sock, server_session = _open_stream(server, {"op": "tp_accept"})
    try:
        client_sock, client_session = _open_stream(
            client, {"op": "tp_connect", "peer": server_node, "message": message})
    except BaseException:
        server_sock.close()
        raise
    with server_sock, client_sock:
        relayed = _splice(client_sock, server_sock, RELAY_TIMEOUT_S)
    return ChannelOutcome(client_node, server_node, _result(client, client_session),
                          _result(server, server_session), relayed,
                          time.monotonic() - started)


def enroll_guest(node: AgentClient, cryptovm: AgentClient, *, node_name: str,
                 cryptovm_name: str) -> ChannelOutcome:
    """Keyless TLS for ``node_name``'s guest: one attested channel to the CryptoVM guest
    (``tp_enroll`` spliced to ``cvm_attested``), on which the node's guest asks for a
    certificate for a key it made and checks it (testbed/qemu/guest/tp_extension.py)."""
    return relay_to_cryptovm(node, cryptovm, {"op": "tp_enroll", "peer": cryptovm_name},
                             node_name=node_name, cryptovm_name=cryptovm_name)


def relay_to_cryptovm(node: AgentClient, cryptovm: AgentClient, request: dict[str, Any], *,
                      node_name: str, cryptovm_name: str) -> ChannelOutcome:
    """One attested channel from ``node_name``'s guest (its stream op ``request``, e.g.
    ``tp_enroll`` or ``svd_unlock``) to the CryptoVM guest's ``cvm_attested``."""
    started = time.monotonic()
    server_sock, server_session = _open_stream(cryptovm, {"op": "cvm_attested"})
    try:
        client_sock, client_session = _open_stream(node, request)
    except BaseException:
        server_sock.close()
        raise
    with server_sock, client_sock:
        relayed = _splice(client_sock, server_sock, RELAY_TIMEOUT_S)
    return ChannelOutcome(node_name, cryptovm_name, _result(node, client_session),
                          _result(cryptovm, server_session), relayed,
                          time.monotonic() - started)


@dataclass
class HeldChannel:
    """A channel the client guest holds open (``tp_connect`` with ``hold``), relayed by a
    thread until one of the guests closes it (e.g. on a revocation)."""

    client: AgentClient
    server: AgentClient
    client_session: str
    server_session: str
    sockets: tuple[socket.socket, socket.socket]
    relay: threading.Thread

    def wait_closed(self, timeout: float) -> bool:
        """Whether both guests closed their ends within ``timeout``."""
        self.relay.join(timeout)
        return not self.relay.is_alive()

    def views(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The client's and the server's account, once they closed the channel."""
        return _result(self.client, self.client_session), _result(self.server,
                                                                  self.server_session)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.relay.join(5)


def hold_channel(client: AgentClient, server: AgentClient, *, server_node: str,
                 message: str) -> HeldChannel:
    """An attested channel from ``client``'s guest to ``server_node``'s that stays open;
    the host relays it in a thread (close it with :meth:`HeldChannel.close`)."""
    server_sock, server_session = _open_stream(server, {"op": "tp_accept"})
    try:
        client_sock, client_session = _open_stream(
            client, {"op": "tp_connect", "peer": server_node, "message": message,
                     "hold": True})
    except BaseException:
        server_sock.close()
        raise
    relay = threading.Thread(target=_splice, args=(client_sock, server_sock, RELAY_TIMEOUT_S),
                             daemon=True, name=f"relay-{server_node}")
    relay.start()
    return HeldChannel(client, server, client_session, server_session,
                       (client_sock, server_sock), relay)


def _open_stream(agent: AgentClient, request: dict[str, Any]) -> tuple[socket.socket, str]:
    try:
        sock, answer = agent.open_stream(request)
    except AgentUnavailable as exc:
        raise RelayError(f"{exc}; is the VM up (`testbed status`)?") from None
    except TestbedError as exc:
        raise RelayError(f"node {agent.node!r}: {request['op']} refused: {exc}") from None
    if not isinstance(answer.get("session"), str):
        sock.close()
        raise RelayError(f"node {agent.node!r}: {request['op']} refused: no session")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, answer["session"]


def _splice(a: socket.socket, b: socket.socket, timeout: float) -> int:
    """Copy both ways until both sides closed (or timeout); returns the bytes carried."""
    peers = {a: b, b: a}
    open_reads = {a, b}
    total = 0
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for sock in peers:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while open_reads and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                source = key.fileobj
                assert isinstance(source, socket.socket)
                data = _read(source)
                if data is None:
                    continue
                if data:
                    total += len(data)
                    _write_all(peers[source], data, deadline)
                    continue
                selector.unregister(source)
                open_reads.discard(source)
                with contextlib.suppress(OSError):
                    peers[source].shutdown(socket.SHUT_WR)
    return total


def _read(sock: socket.socket) -> bytes | None:
    """Data, b"" at end of stream (or reset), None when nothing is there after all."""
    try:
        return sock.recv(_CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _write_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
            continue
        except OSError:
            return  # the other side is gone: its reader sees EOF and the splice ends
        view = view[sent:]


def _result(agent: AgentClient, session: str) -> dict[str, Any]:
    """The guest's summary of a channel; it is stored just after the guest closes it."""
    deadline = time.monotonic() + RESULT_WAIT_S
    while True:
        try:
            return agent.call({"op": "tp_result", "session": session})
        except AgentError as exc:
            if "no finished channel" not in str(exc) or time.monotonic() > deadline:
                return {"error": str(exc)}
        time.sleep(0.1)
