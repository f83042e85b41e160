"""The guest agent's raw TPM commands against a real swtpm (no VM needed).

The agent runs inside the guest on /dev/tpmrm0; here the same code drives an
swtpm's data channel (its unix socket), and the host side (Registrar, QuoteVerifier) checks
what it produced, exactly as it checks a VM's answers.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from attestation.agent_wire import recv_frame, send_frame
from attestation.evidence import Evidence
from attestation.registrar import Registrar
from attestation.tpm import AK_ATTRIBUTES as HOST_AK_ATTRIBUTES
from attestation.tpm import TpmClient
from attestation.tpm_raw import AK_ATTRIBUTES, AK_HANDLE, Tpm, UnixSocketTransport
from attestation.tpm_types import ObjectAttributes, parse_public
from attestation.verifier import QuoteVerifier
from testbed.qemu.guest import agent as guest_agent
from testbed.qemu.guest.agent import Agent


@pytest.fixture
def agent(swtpm: Any) -> Iterator[Agent]:
    tpm = Tpm(UnixSocketTransport(str(swtpm.socket_path)))
    yield Agent(tpm, None, "vm0", "generic")
    tpm.transport.close()


def _call(agent: Agent, request: dict[str, Any]) -> dict[str, Any]:
    response = agent.handle(json.dumps(request).encode())
    assert "error" not in response, response
    return response


def _b(response: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(response[key])


def test_identity_activate_quote_verify(agent: Agent, swtpm_ca: Any) -> None:
    identity = _call(agent, {"op": "identity"})
    registrar = Registrar(swtpm_ca.ca_bundle())
    challenge = registrar.challenge(_b(identity, "ek_certificate"), _b(identity, "ek_public"),
                                    _b(identity, "ak_public"))
    b64 = base64.b64encode
    secret = _call(agent, {"op": "activate",
                           "credential_blob": b64(challenge.credential_blob).decode(),
                           "encrypted_secret": b64(challenge.encrypted_secret).decode()})
    registrar.complete(parse_public(_b(identity, "ak_public")).name, _b(secret, "secret"))
    nonce = os.urandom(32)
    evidence = Evidence.from_dict(_call(agent, {"op": "quote", "nonce": nonce.hex(),
                                                "pcrs": list(range(10))}))
    report = QuoteVerifier(ak_trust=registrar).verify(evidence, nonce)
    assert report.ok, report
    assert sorted(evidence.pcrs) == list(range(10))


def test_ak_is_persistent_and_stable(agent: Agent) -> None:
    first = _call(agent, {"op": "identity"})["ak_public"]
    assert _call(agent, {"op": "identity"})["ak_public"] == first
    assert agent.tpm.exists(AK_HANDLE)


def test_guest_ak_is_the_host_ak_noda_included(swtpm_factory: Any) -> None:
    """Same template both sides: two copies of one TPM give the very same AK, noDA set."""
    guest_side, host_side = swtpm_factory(), swtpm_factory()  # clones: same seeds
    raw = Tpm(UnixSocketTransport(str(guest_side.socket_path)))
    try:
        guest_public = raw.ensure_ak()
    finally:
        raw.transport.close()
    with TpmClient(host_side.tcti) as client:
        host_public = client.attestation_key("ecc").public
    assert guest_public == host_public
    assert parse_public(guest_public).attributes & ObjectAttributes.NO_DA
    assert int(HOST_AK_ATTRIBUTES) == AK_ATTRIBUTES


def test_wrong_credential_is_an_error_not_a_crash(agent: Agent) -> None:
    _call(agent, {"op": "identity"})
    response = agent.handle(json.dumps({"op": "activate", "credential_blob": "AAAA",
                                        "encrypted_secret": "AAAA"}).encode())
    assert "error" in response and "ActivateCredential" in response["error"]
    assert "error" not in agent.handle(b'{"op": "status"}')  # still serving, no leaked session


@pytest.mark.parametrize("body", [b"[]", b"{}", b'{"op": "nope"}', b"not json",
                                  b'{"op": "quote", "nonce": "zz", "pcrs": [0]}',
                                  b'{"op": "quote", "nonce": "00", "pcrs": [99]}'])
def test_bad_requests_get_errors(agent: Agent, body: bytes) -> None:
    assert "error" in agent.handle(body)


def test_tcp_framing_round_trip(agent: Agent) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve_one() -> None:
        conn, _ = server.accept()
        guest_agent.serve_connection(agent, conn)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        send_frame(sock, {"op": "status"})
        reply = recv_frame(sock)
        assert reply is not None and json.loads(reply)["state"] == "running"
        send_frame(sock, {"op": "shutdown"})
        assert json.loads(recv_frame(sock) or b"{}") == {"stopping": True}
    thread.join(5)
    server.close()
