"""Trusted Passages between two guest agents, relayed by the host (no VM needed).

Each guest agent runs as it does in the VM image: ``guest_agent.py`` with
``tp_extension.py`` beside it, under Debian 12's own /usr/bin/python3 with Debian's
python3-openssl 23 and python3-cryptography 38 (what the image installs), not the
project's virtualenv. Its TPM is a real swtpm measured with an OVMF-shaped boot;
the host registers the AKs, certifies the guests' TLS keys and splices their
streams (testbed/qemu/tp_relay.py). The same code runs in the VMs in
tests/test_qemu_cluster.py's demo test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.policy import dump_policy
from attestation.registrar import AkRegistry, Registrar, register
from attestation.revocation import (
    Decision,
    Reinstate,
    RevocationEvent,
    decision_args,
    encode_decision,
)
from attestation.tpm import TpmClient
from testbed.cluster.agent import AgentClient, AgentError, TcpTransport
from testbed.qemu.domain import free_port
from testbed.qemu.relay import RelayError, configure_guest, hold_channel, relay_channel
from testbed.spec.cluster_spec import BootSpec
from testbed.tpm.boot import SIM_PCRS, measure_boot, predicted_policy
from trusted_passages.pki import make_ca

REPO = Path(__file__).resolve().parents[1]
GUEST_PYTHON = "/usr/bin/python3"  # Debian's: the guest image's package versions
GOOD = BootSpec.from_content("OVMF", "vmlinuz", "initrd", "console=ttyS0 panic=-1 quiet")
TAMPERED = replace(GOOD, cmdline="console=ttyS0 panic=-1 quiet init=/bin/sh")


def _debian_versions() -> str:
    probe = subprocess.run(
        [GUEST_PYTHON, "-c", "import OpenSSL, cryptography; "
                             "print(OpenSSL.__version__, cryptography.__version__)"],
        capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.fail("Debian's python3-openssl and python3-cryptography are needed (the guest "
                    f"image's versions): run .ci/bootstrap\n{probe.stderr}")
    return probe.stdout.strip()


@dataclass
class GuestProcess:
    node: str
    agent: AgentClient
    process: subprocess.Popen[bytes]
    log: Path


def _start_guest(node: str, swtpm: Any, boot: BootSpec, tmp: Path) -> GuestProcess:
    with TpmClient(swtpm.tcti) as client:
        event_log = measure_boot(client, boot)
    log_file = tmp / f"{node}.eventlog"
    log_file.write_bytes(event_log)
    port = free_port()
    out = tmp / f"{node}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VIRTUAL_ENV", None)
    process = subprocess.Popen(
        [GUEST_PYTHON, "-u", str(REPO / "testbed/qemu/guest/agent.py"),
         "--listen", f"127.0.0.1:{port}", "--tpm", f"unix:{swtpm.socket_path}",
         "--event-log", str(log_file), "--node", node],
        stdout=out.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=tmp)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return GuestProcess(node, AgentClient(TcpTransport(port), node=node, timeout=30),
                                    process, out)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"guest agent {node} did not start:\n{out.read_text()}")


def _register(guest: GuestProcess, registrar: Registrar, registry: AkRegistry) -> None:
    ak = register(guest.agent, guest.node, registrar, registry)
    assert ak is not None
    registry.add(guest.node, ak)


@pytest.fixture
def guests(swtpm_factory: Any, swtpm_ca: Any, tmp_path: Path, request: Any
           ) -> Iterator[dict[str, GuestProcess]]:
    versions = _debian_versions()
    boots = getattr(request, "param", {"server": GOOD, "client": GOOD})
    started = {name: _start_guest(name, swtpm_factory(unique=True), boot, tmp_path)
               for name, boot in boots.items()}
    try:
        registry, registrar = AkRegistry(), Registrar(swtpm_ca.ca_bundle())
        for guest in started.values():
            _register(guest, registrar, registry)
        status = started["client"].agent.status()
        assert "trusted-passages" in status["extensions"], (versions, status)
        ca = make_ca("guest test cluster TLS CA")
        # Every node's policy is predicted from its *good* boot: tampering must show.
        policies = {name: dump_policy(predicted_policy(name, GOOD))
                    for name in boots}
        for name, guest in started.items():
            configure_guest(guest.agent, name, ca, registry_json=registry.to_json(),
                            policies=policies, pcrs=list(SIM_PCRS.indices))
        yield started
    finally:
        for guest in started.values():
            guest.process.kill()
            guest.process.wait(10)


def test_attested_channel_between_guests(guests: dict[str, GuestProcess]) -> None:
    outcome = relay_channel(guests["client"].agent, guests["server"].agent,
                            client_node="client", server_node="server", message="ping")
    assert outcome.established, outcome.to_dict()
    client, server = outcome.client_view, outcome.server_view
    assert client["reply"] == "server heard 'ping' from attested node 'client'"
    assert client["evidence"]["node"] == "server" and client["evidence"]["node_verified"]
    assert server["evidence"]["node"] == "client" and server["received"] == "ping"
    for view in (client, server):
        assert view["evidence"]["event_log_events"] > 5
        checks = set(view["evidence"]["checks"])
        assert {"signature", "qualifying_data", "pcr_digest", "event_log", "policy"} <= checks
    assert outcome.bytes_relayed > 2000  # certificates, quotes and event logs went through


@pytest.mark.parametrize("guests", [{"server": TAMPERED, "client": GOOD}], indirect=True)
def test_tampered_guest_is_refused_by_its_peer(guests: dict[str, GuestProcess]) -> None:
    outcome = relay_channel(guests["client"].agent, guests["server"].agent,
                            client_node="client", server_node="server", message="secret")
    assert not outcome.established
    error = outcome.client_view["error"]
    assert "policy" in error and "PCR 9" in error, error
    assert "received" not in outcome.server_view  # the message never reached the server


def test_unconfigured_or_bad_requests_are_refused(guests: dict[str, GuestProcess]) -> None:
    agent = guests["client"].agent
    with pytest.raises(AgentError, match="no finished channel"):
        agent.call({"op": "tp_result", "session": "00"})
    with pytest.raises(AgentError, match="certificate: not a base64 DER"):
        agent.call({"op": "tp_configure", "certificate": "", "ca_certificates": []})
    with pytest.raises(AgentError, match="unknown op"):
        agent.call({"op": "tp_nope"})
    with pytest.raises(RelayError, match="tp_connect refused"):
        relay_channel(agent, guests["server"].agent, client_node="client",
                      server_node="x" * 5000, message="m")
    # the agent still serves both kinds of requests
    assert agent.status()["node"] == "client"
    outcome = relay_channel(agent, guests["server"].agent, client_node="client",
                            server_node="server", message="still here")
    assert outcome.established, outcome.to_dict()


# --- revocation: a signed decision closes the guests' channels (docs/runtime.md) -----------


def _decision(verifier: Ed25519PrivateKey, decision: Decision) -> dict[str, Any]:
    return decision_args(decision, verifier.sign(encode_decision(decision)))


def _open(guest: GuestProcess) -> dict[str, int]:
    opened: dict[str, int] = guest.agent.call({"op": "tp_open"})["open"]
    return opened


def _wait(condition: Callable[[], bool], seconds: float) -> float:
    started = time.monotonic()
    while not condition() and time.monotonic() - started < seconds:
        time.sleep(0.01)
    return time.monotonic() - started


def test_revocation_closes_the_open_channel_within_1s_and_refuses_the_node(
        guests: dict[str, GuestProcess]) -> None:
    verifier = Ed25519PrivateKey.generate()
    pem = verifier.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for guest in guests.values():
        guest.agent.call({"op": "revocation_key", "public_key": pem})
    server, client = guests["server"], guests["client"]
    with pytest.raises(AgentError, match="hold: true or false"):
        client.agent.open_stream({"op": "tp_connect", "peer": "server", "message": "m",
                                  "hold": "yes"})
    held = hold_channel(client.agent, server.agent, server_node="server", message="hold")
    try:
        _wait(lambda: _open(server) == {"client": 1} and _open(client) == {"server": 1}, 60)
        assert _open(server) == {"client": 1} and _open(client) == {"server": 1}

        forged = _decision(Ed25519PrivateKey.generate(),
                           RevocationEvent("client", "runtime", "forged", "t", 1))
        with pytest.raises(AgentError, match="revocation: the decision is not signed"):
            server.agent.role("revoked", forged)
        assert _open(server) == {"client": 1}  # a forgery changes nothing

        event = RevocationEvent("client", "runtime", "ran /tmp/x", "t", 1)
        started = time.monotonic()
        answer = server.agent.role("revoked", _decision(verifier, event))
        assert held.wait_closed(5)  # both guests' ends closed
        closed = time.monotonic() - started
        assert answer["effects"]["trusted-passages"] == {"closed_channels": 1}
        assert closed < 1.0 and _open(server) == {} and _open(client) == {}, closed
        client_view, server_view = held.views()
        assert server_view["ended"] == "revoked" and client_view["ended"] == "closed"
        assert client_view["reply"] == "server heard 'hold' from attested node 'client'"
        assert not server.agent.role("revoked", _decision(verifier, event))["applied"]
    finally:
        held.close()

    refused = relay_channel(client.agent, server.agent, client_node="client",
                            server_node="server", message="secret")
    assert not refused.established and "received" not in refused.server_view
    assert "revocation" in refused.server_view["error"], refused.to_dict()

    server.agent.role("reinstated", _decision(verifier, Reinstate("client", "re-imaged",
                                                                   "t", 2)))
    again = relay_channel(client.agent, server.agent, client_node="client",
                          server_node="server", message="back")
    assert again.established, again.to_dict()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
