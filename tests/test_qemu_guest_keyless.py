"""Keyless TLS between guest agents, relayed by the host (no VM needed).

Three guest agents run as in the VM image, under Debian 12's own /usr/bin/python3 (the
image's python3-openssl 23 and python3-cryptography 38) on real swtpms with an
OVMF-shaped measured boot: a CryptoVM guest (``cryptovm_extension``, its store sealed to
its swtpm, its TLS CA created inside) and a server and a client guest. The host
registers the AKs, gives each guest its bootstrap identity and trust anchors, and
splices ``tp_enroll`` to ``cvm_attested`` (testbed/qemu/relay.py): each guest's TLS
certificate then comes from the CryptoVM's CA, for a key made in the guest, and its
channels trust only that CA. A tampered guest is refused by the CryptoVM.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from attestation.policy import dump_policy
from attestation.registrar import AkRegistry, Registrar, register
from attestation.tpm import TpmClient
from testbed.cluster.agent import AgentClient, TcpTransport
from testbed.qemu.domain import free_port
from testbed.qemu.relay import RelayError, configure_guest, enroll_guest, relay_channel
from testbed.spec.cluster_spec import BootSpec
from testbed.tpm.boot import SIM_PCRS, measure_boot, predicted_policy
from trusted_passages.pki import make_ca

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "testbed/qemu/guest"
GUEST_PYTHON = "/usr/bin/python3"  # Debian's: the guest image's package versions
GOOD = BootSpec.from_content("OVMF", "vmlinuz", "initrd", "console=ttyS0 panic=-1 quiet")
TAMPERED = replace(GOOD, cmdline="console=ttyS0 panic=-1 quiet init=/bin/sh")
# The guest agent as the image runs it, with the CryptoVM's listener on loopback and its
# store in the test's directory instead of the guest's NIC and /run.
LAUNCH = """import sys
from pathlib import Path
sys.path.insert(0, {guest!r})
import cryptovm_extension
cryptovm_extension.GuestCryptoVm.__init__.__kwdefaults__.update(
    state_dir=Path({state!r}), host="127.0.0.1", port={port})
import agent
sys.exit(agent.main(sys.argv[1:]))
"""


@dataclass
class GuestProcess:
    node: str
    agent: AgentClient
    process: subprocess.Popen[bytes]
    log: Path


def _start_guest(node: str, role: str, swtpm: Any, boot: BootSpec, tmp: Path) -> GuestProcess:
    with TpmClient(swtpm.tcti) as client:
        event_log = measure_boot(client, boot)
    (tmp / f"{node}.eventlog").write_bytes(event_log)
    port, out = free_port(), tmp / f"{node}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VIRTUAL_ENV", None)
    script = LAUNCH.format(guest=str(GUEST), state=str(tmp / node / "cryptovm"),
                           port=free_port())
    process = subprocess.Popen(
        [GUEST_PYTHON, "-u", "-c", script, "--listen", f"127.0.0.1:{port}",
         "--tpm", f"unix:{swtpm.socket_path}", "--event-log", str(tmp / f"{node}.eventlog"),
         "--node", node, "--role", role],
        stdout=out.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=tmp)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return GuestProcess(node, AgentClient(TcpTransport(port), node=node,
                                                      timeout=60), process, out)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"guest agent {node} did not start:\n{out.read_text()}")


@pytest.fixture
def guests(swtpm_factory: Any, swtpm_ca: Any, tmp_path: Path, request: Any
           ) -> Iterator[dict[str, GuestProcess]]:
    boots = getattr(request, "param", {"server": GOOD, "client": GOOD})
    roles = {"cryptovm": "cryptovm", "server": "server", "client": "client"}
    started: dict[str, GuestProcess] = {}
    try:
        for name, boot in {"cryptovm": GOOD, **boots}.items():
            started[name] = _start_guest(name, roles[name], swtpm_factory(unique=True), boot,
                                         tmp_path)
        registry, registrar = AkRegistry(), Registrar(swtpm_ca.ca_bundle())
        for guest in started.values():
            ak = register(guest.agent, guest.node, registrar, registry)
            assert ak is not None
            registry.add(guest.node, ak)
        started["cryptovm"].agent.call({"op": "cvm_start", "pcrs": "sha256:0-7,9"})
        ca = make_ca("guest test cluster TLS CA")
        policies = {name: dump_policy(predicted_policy(name, GOOD)) for name in started}
        for name, guest in started.items():
            configure_guest(guest.agent, name, ca, registry_json=registry.to_json(),
                            policies=policies, pcrs=list(SIM_PCRS.indices))
        yield started
    finally:
        for guest in started.values():
            guest.process.kill()
            guest.process.wait(10)


def test_guests_get_their_tls_certificates_from_the_cryptovm_guest(
        guests: dict[str, GuestProcess]) -> None:
    cvm = guests["cryptovm"].agent
    assert cvm.call({"op": "cvm_status"})["running"]
    for node in ("server", "client"):
        outcome = enroll_guest(guests[node].agent, cvm, node_name=node,
                               cryptovm_name="cryptovm")
        assert outcome.established, outcome.to_dict()
        view = outcome.client_view
        assert view["certificate"]["subject"] == node
        assert view["ca"]["key_attestation"] == "verified" and view["ca"]["non_exportable"]
        assert view["certificate"]["issuer"] == view["ca"]["issuer"]
        assert outcome.server_view["peer"] == node and outcome.server_view["answered"] == 2
    # Both now hold VSM certificates and trust only the VSM CA: their channel still works,
    # and each side's peer certificate chains to the CryptoVM's CA.
    outcome = relay_channel(guests["client"].agent, guests["server"].agent,
                            client_node="client", server_node="server", message="ping")
    assert outcome.established, outcome.to_dict()


@pytest.mark.parametrize("guests", [{"server": TAMPERED, "client": GOOD}], indirect=True)
def test_tampered_guest_gets_no_certificate(guests: dict[str, GuestProcess]) -> None:
    outcome = enroll_guest(guests["server"].agent, guests["cryptovm"].agent,
                           node_name="server", cryptovm_name="cryptovm")
    assert not outcome.established
    assert "policy" in str(outcome.server_view.get("error")), outcome.to_dict()
    assert "certificate" not in outcome.client_view


def test_enrollment_naming_a_bad_peer_is_refused(guests: dict[str, GuestProcess]) -> None:
    with pytest.raises(RelayError, match="tp_enroll refused"):
        enroll_guest(guests["client"].agent, guests["cryptovm"].agent, node_name="client",
                     cryptovm_name="../x")
