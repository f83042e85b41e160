"""A VM's guest keeps the verifier's revocations in RAM, for one boot: when a VM's agent
comes up again (a reboot is a new agent with an empty ledger), the host re-sends the
signed revocations still in force (testbed.roles.revocation.provision_vm), and the guest
refuses the same peers again. The guest agent runs on the host against a real swtpm,
served over TCP and driven by the host's AgentClient, as tests/test_qemu_guest_agent.py
does; no VM is booted."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attestation.errors import VerificationError
from attestation.registrar import AkRegistry
from attestation.revocation import Reinstate, RevocationEvent
from attestation.tpm_raw import Tpm, UnixSocketTransport
from testbed.cluster.agent import AgentClient, TcpTransport
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.qemu.guest import agent as guest_agent
from testbed.qemu.guest.agent import Agent
from testbed.qemu.guest.tp_extension import PeersValidator
from testbed.roles.revocation import DECISIONS, provision_vm, revocations_in_force
from testbed.verifier.revocation import next_sequence, publish, verifier_key_dir
from trusted_passages import BindingContext, FakeIssuer

FAKE_KEY = b"not a TPM: only the envelope's node name is read here"


@contextlib.contextmanager
def _booted(swtpm: Any) -> Iterator[tuple[Agent, AgentClient]]:
    """A fresh guest agent (an empty ledger, as after a reboot), served over TCP."""
    tpm = Tpm(UnixSocketTransport(str(swtpm.socket_path)))
    agent = Agent(tpm, None, "vm0", "generic")
    ports: list[int] = []
    ready = threading.Event()
    server = threading.Thread(target=guest_agent.serve, args=(agent, "127.0.0.1", 0),
                              kwargs={"listening": lambda p: (ports.append(p), ready.set())},
                              daemon=True)
    server.start()
    try:
        assert ready.wait(10)
        yield agent, AgentClient(TcpTransport(ports[0]), node="vm0", timeout=10)
    finally:
        agent.stopping.set()
        server.join(5)
        tpm.transport.close()


def _refusal(agent: Agent, peer: str) -> str:
    """The check by which the guest's Trusted Passages validator refuses ``peer``."""
    issuer = FakeIssuer(FAKE_KEY, peer).bound(BindingContext("tp13", "client"))
    evidence = issuer.issue(b"\x01" * 32, b"\x02" * 32)
    with pytest.raises(VerificationError) as caught:
        PeersValidator(AkRegistry(), {}, agent.revocations).validate(evidence, b"\x02" * 32)
    return caught.value.check


def test_a_rebooted_guest_refuses_the_peers_revoked_before(swtpm: Any, tmp_path: Path) -> None:
    paths = ClusterPaths(tmp_path / "work", "lab")
    # Signed and kept while the VM was down (no node running: nothing delivered).
    for decision in (RevocationEvent("client", "runtime", "ran /tmp/x", "t1", next_sequence(paths)),
                     RevocationEvent("other", "policy", "old kernel", "t2", next_sequence(paths)),
                     Reinstate("other", "re-imaged", "t3", next_sequence(paths))):
        assert publish(paths, decision) == {}
    assert [json.loads(base64.b64decode(a["decision"]))["node"]
            for a in revocations_in_force(paths)] == ["client"]

    for _boot in range(2):  # the first boot, then a reboot with an empty ledger
        with _booted(swtpm) as (agent, client):
            assert not agent.revocations.revoked
            assert _refusal(agent, "client") == "ak_trust"  # not yet told: merely unknown
            provision_vm(paths, "vm0", client)
            assert set(agent.revocations.revoked) == {"client"}
            assert agent.revocations.sequence == 1
            assert _refusal(agent, "client") == "revocation"
            assert _refusal(agent, "other") == "ak_trust"  # reinstated: not refused as revoked
            provision_vm(paths, "vm0", client)  # provisioned twice: replays change nothing
            assert agent.revocations.sequence == 1


def test_a_damaged_decisions_file_is_one_clear_error(tmp_path: Path) -> None:
    paths = ClusterPaths(tmp_path / "work", "lab")
    publish(paths, RevocationEvent("client", "runtime", "x", "t", next_sequence(paths)))
    (verifier_key_dir(paths) / DECISIONS).write_text('{"client": {"decision": "!!"}}')
    with pytest.raises(StateError, match="is damaged"):
        revocations_in_force(paths)
    # A new decision is still delivered to the running nodes (none here), and the
    # error says it is not kept.
    with pytest.raises(StateError, match=r"delivered to the running nodes .* not kept"):
        publish(paths, RevocationEvent("other", "runtime", "y", "t", next_sequence(paths)))
