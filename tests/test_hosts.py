"""Hypervisor hosts on this machine (testbed.hosts): real network and mount namespaces, a
real sshd, libvirtd and swtpm per host, the lab reaching each only over SSH (paramiko)
and libvirt's qemu+ssh, and host attestation against predicted host policies.

One lab for the module (bridge and subnet of its own, never the default ones): up costs
~7 s, down ~4 s.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.errors import TestbedError
from testbed.cli.main import main as cli_main
from testbed.cluster.agent import AgentClient, AgentError, AgentUnavailable
from testbed.core.errors import UsageError
from testbed.hosts import lifecycle, network, remote
from testbed.hosts.agent import HostAttester, handle
from testbed.hosts.attest import attest_host
from testbed.hosts.layout import HostsError, LabPaths, LabState
from testbed.hosts.measured import HOST_PCRS, STACK_PCR
from testbed.hosts.remote import (
    HostKeyRefused,
    HostUnreachable,
    SshAgentTransport,
    SshSession,
    agent_client,
    libvirt_uri,
    libvirt_version,
)

BRIDGE, SUBNET = network.scratch_network("tbt")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    workdir = tmp_path_factory.mktemp("hosts")
    subnet = SUBNET
    try:
        yield workdir, subnet
    finally:
        lifecycle.down(workdir)  # idempotent: the last test already took it down


@pytest.fixture(scope="module")
def two_hosts(lab: tuple[Path, str]) -> list[lifecycle.HostUp]:
    workdir, subnet = lab
    return lifecycle.up(workdir, 2, bridge=BRIDGE, subnet=subnet)


def _session(workdir: Path, host: str) -> SshSession:
    state = LabState.load(LabPaths(workdir))
    assert state is not None
    return SshSession(state.hosts[host].address, LabPaths(workdir))


def _run(session: SshSession, command: str) -> str:
    channel = session.exec(command, 10.0)
    with channel:
        out = b""
        while chunk := channel.recv(65536):
            out += chunk
    return out.decode().strip()


def test_two_hosts_up_attested_and_libvirt_answers_over_qemu_ssh(
        lab: tuple[Path, str], two_hosts: list[lifecycle.HostUp]) -> None:
    workdir, _ = lab
    assert [h.action for h in two_hosts] == ["started", "started"]
    for host in two_hosts:
        assert host.verdict is not None and host.verdict.trusted, host.verdict
    state, rows = lifecycle.status(workdir)
    assert state is not None and state.bridge == BRIDGE
    for row in rows:
        assert row.state == "running"
        assert set(row.components.values()) == {"running"}, row.components
        assert row.libvirt.count(".") == 2, row.libvirt  # a version: libvirt answered
        assert row.attestation is not None and row.attestation.trusted and row.trusted
    # Each qemu+ssh connection lands in its own host (its UTS namespace, its libvirtd).
    lab_paths = LabPaths(workdir)
    for host in two_hosts:
        conn = libvirt.open(libvirt_uri(lab_paths, host.address))
        try:
            assert conn.getHostname() == host.name
        finally:
            conn.close()


def test_isolation_each_host_sees_only_its_own_dirs_and_tpm(
        lab: tuple[Path, str], two_hosts: list[lifecycle.HostUp]) -> None:
    workdir, _ = lab
    keys = {}
    for host in two_hosts:
        session = _session(workdir, host.name)
        try:
            assert _run(session, "hostname") == host.name
            keys[host.name] = _run(session, "cat /root/.ssh/authorized_keys")
            # The TPM socket exists in the host's /run only; from the lab it is empty.
            assert "swtpm.sock" in _run(session, "ls /run/testbed-host/tpm")
            assert _run(session, "ss -Hltn | awk '{print $4}'") == f"{host.address}:22"
        finally:
            session.close()
    assert not list(Path("/run/testbed-host").glob("tpm/*"))
    assert all(k.startswith("restrict ssh-ed25519 ") for k in keys.values())


def test_up_again_keeps_running_hosts(lab: tuple[Path, str],
                                      two_hosts: list[lifecycle.HostUp]) -> None:
    workdir, subnet = lab
    again = lifecycle.up(workdir, 2, bridge=BRIDGE, subnet=subnet)
    assert [h.action for h in again] == ["kept", "kept"]
    assert all(h.verdict is not None and h.verdict.trusted for h in again)
    with pytest.raises(UsageError, match="running untampered"):
        lifecycle.up(workdir, 2, bridge=BRIDGE, subnet=subnet, tamper_qemu=["host2"])


def test_an_unknown_host_key_is_refused(lab: tuple[Path, str],
                                        two_hosts: list[lifecycle.HostUp]) -> None:
    workdir, _ = lab
    paths = LabPaths(workdir)
    original = paths.known_hosts.read_text()
    lines = dict(line.split(" ", 1) for line in original.splitlines())
    a, b = two_hosts[0].address, two_hosts[1].address
    swapped = f"{a} {lines[b]}\n{b} {lines[a]}\n"  # each address with the other's key
    try:
        paths.known_hosts.write_text(swapped)
        with pytest.raises(HostKeyRefused, match="another SSH host key"):
            _session(workdir, "host1").client()
        paths.known_hosts.write_text(f"{b} {lines[b]}\n")  # host1 not known at all
        with pytest.raises(HostKeyRefused, match="not in"):
            _session(workdir, "host1").client()
        with pytest.raises(HostUnreachable):  # OpenSSH under libvirt refuses it too
            libvirt_version(libvirt_uri(paths, a))
    finally:
        paths.known_hosts.write_text(original)


@pytest.mark.parametrize(("command", "error"), [
    ("printf 'not a frame at all'", "exceeds"),  # read as a huge length: refused unread
    ("printf '\\000\\000\\000\\005hello'", "not JSON"),
    ("printf '\\000\\000\\000\\100short'", "closed after"),
    ("printf '\\000\\000\\000\\002[]'", "JSON object"),
    ("true", "closed the connection"),
    ("exec sleep 30", "did not answer"),
])
def test_a_host_agent_answering_garbage_is_one_clear_error(
        lab: tuple[Path, str], two_hosts: list[lifecycle.HostUp], command: str,
        error: str) -> None:
    workdir, _ = lab
    session = _session(workdir, "host1")
    agent = AgentClient(SshAgentTransport(session, ("sh", "-c", f"cat >/dev/null & {command}")),
                        node="host1", timeout=2.0)
    try:
        with pytest.raises(TestbedError, match=error) as caught:
            agent.identity()
        assert isinstance(caught.value, TestbedError)
    finally:
        session.close()


def test_one_agent_process_serves_a_session_until_a_request_fails(
        lab: tuple[Path, str], two_hosts: list[lifecycle.HostUp]) -> None:
    workdir, _ = lab
    session = _session(workdir, "host1")
    agent = AgentClient(SshAgentTransport(session), node="host1", timeout=10.0)
    try:
        first, second = agent.status(), agent.status()
        assert first["agent_pid"] == second["agent_pid"] and first["tpm"] == "answers"
        with pytest.raises(AgentError, match="unknown op"):
            agent.call({"op": "nosuch"})
        assert agent.status()["agent_pid"] != first["agent_pid"]  # never reused after it
    finally:
        session.close()


def test_a_replayed_host_quote_is_rejected_by_name(
        lab: tuple[Path, str], two_hosts: list[lifecycle.HostUp], tmp_path: Path) -> None:
    """A host that answers every quote with one it recorded earlier (a fresh quote of its
    own, for an old nonce) is untrusted: qualifying_data."""
    workdir, _ = lab
    session = _session(workdir, "host1")
    try:
        old = agent_client(session, "host1").quote(os.urandom(32), HOST_PCRS.indices)
        body = json.dumps(old.to_dict()).encode()
        frame = tmp_path / "frame"
        frame.write_bytes(len(body).to_bytes(4, "big") + body)
        replaying = AgentClient(SshAgentTransport(session, ("sh", "-c", f"head -c 4 >/dev/null; "
                                                                          f"cat {frame}")),
                                node="host1", timeout=10.0)
        verdict = attest_host(LabPaths(workdir), "host1", replaying)
        assert not verdict.trusted and verdict.failed_check == "qualifying_data", verdict
    finally:
        session.close()
    assert lifecycle.attest(workdir, "host1").trusted  # the genuine host is trusted again


def test_a_silent_ssh_server_is_one_clear_error(
        lab: tuple[Path, str], two_hosts: list[lifecycle.HostUp],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Something on the lab network that accepts TCP and never speaks SSH."""
    workdir, _ = lab
    state = LabState.load(LabPaths(workdir))
    assert state is not None
    monkeypatch.setattr(remote, "SSH_TIMEOUT_S", 1.0)
    with socket.create_server((state.lab_address, 0)) as server:
        session = SshSession(state.lab_address, LabPaths(workdir),
                             port=server.getsockname()[1])
        with pytest.raises(HostUnreachable, match="SSH to"):
            session.client()


def test_an_unreachable_host_is_one_clear_error(lab: tuple[Path, str],
                                                two_hosts: list[lifecycle.HostUp],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    workdir, subnet = lab
    monkeypatch.setattr(remote, "SSH_TIMEOUT_S", 1.0)  # no ARP answer: a timeout
    nobody = str(ipaddress.IPv4Network(subnet).network_address + 200)  # on our bridge, unused
    session = SshSession(nobody, LabPaths(workdir))
    agent = AgentClient(SshAgentTransport(session), node="nowhere", timeout=2.0)
    with pytest.raises(AgentUnavailable, match=re.escape(f"SSH to {nobody}:22 failed")):
        agent.status()


def test_a_tampered_qemu_fails_host_attestation_by_name(
        lab: tuple[Path, str], two_hosts: list[lifecycle.HostUp],
        capsys: pytest.CaptureFixture[str]) -> None:
    workdir, subnet = lab
    results = lifecycle.up(workdir, 3, bridge=BRIDGE, subnet=subnet, tamper_qemu=["host3"])
    assert [r.action for r in results] == ["kept", "kept", "started"]
    verdict = results[2].verdict
    assert verdict is not None and not verdict.trusted
    assert verdict.failed_check == "policy"
    assert f"PCR {STACK_PCR}" in verdict.message and "qemu-system-x86_64" in verdict.message
    assert cli_main(["hosts", "attest", "host3", "--workdir", str(workdir), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "untrusted" and out["failed_check"] == "policy"
    assert cli_main(["hosts", "attest", "host1", "--workdir", str(workdir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "trusted"


def test_status_names_a_failed_libvirtd_and_an_unresponsive_tpm(
        lab: tuple[Path, str], two_hosts: list[lifecycle.HostUp],
        monkeypatch: pytest.MonkeyPatch) -> None:
    workdir, _ = lab
    info = json.loads((LabPaths(workdir).host("host3").machine).read_text())
    os.kill(info["processes"]["libvirtd"], 9)
    _, rows = lifecycle.status(workdir)
    row = next(r for r in rows if r.name == "host3")
    assert row.components["libvirtd"].startswith(("failed", "unresponsive")), row.components
    assert row.libvirt.startswith("unresponsive"), row.libvirt
    assert row.components["sshd"] == "running"
    # A TPM that runs but does not answer: stopped (SIGSTOP), it is "unresponsive".
    monkeypatch.setattr(lifecycle, "PROBE_TIMEOUT_S", 2.0)
    os.kill(info["processes"]["swtpm"], signal.SIGSTOP)
    try:
        _, rows = lifecycle.status(workdir)
    finally:
        os.kill(info["processes"]["swtpm"], signal.SIGCONT)
    row = next(r for r in rows if r.name == "host3")
    assert row.components["swtpm"].startswith("unresponsive"), row.components


def test_a_bridge_the_lab_did_not_make_is_refused(tmp_path: Path) -> None:
    name = f"tbx{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        with pytest.raises(HostsError, match="not made by this lab"):
            lifecycle.up(tmp_path, 1, bridge=name, subnet="10.213.254.0/24")
        assert network.bridge_exists(name)
    finally:
        network.delete_link(name)


def test_a_damaged_lab_file_is_a_state_error(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path)
    paths.root.mkdir()
    for text in ("{", "[]", '{"format": "testbed-hosts-lab", "hosts": {"a": 1}, '
                 '"bridge": "tb", "subnet": "10.1.0.0/24"}'):
        paths.state.write_text(text)
        with pytest.raises(TestbedError):
            LabState.load(paths)


# At most 50 cases each (the profile may ask for fewer): the lab tests use most of this
# module's time budget.
_FEW = settings(max_examples=min(50, settings().max_examples))
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=20)


@_FEW
@given(doc=st.dictionaries(st.sampled_from(["format", "bridge", "subnet", "hosts",
                                            "created_bridge"]), _JSON))
def test_any_lab_file_loads_or_is_one_state_error(tmp_path_factory: pytest.TempPathFactory,
                                                  doc: dict[str, object]) -> None:
    paths = LabPaths(tmp_path_factory.getbasetemp() / "lab-property")
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.state.write_text(json.dumps({"format": "testbed-hosts-lab", **doc}))
    with contextlib.suppress(TestbedError):
        LabState.load(paths)


@_FEW
@given(body=st.binary(max_size=200) | _JSON.map(lambda d: json.dumps(d).encode())
       | st.fixed_dictionaries({"op": st.sampled_from(["identity", "activate", "quote",
                                                      "status", "nope"])}, optional={
           "nonce": _JSON, "pcrs": _JSON, "credential_blob": _JSON,
           "encrypted_secret": _JSON, "x": _JSON}).map(lambda d: json.dumps(d).encode()))
def test_the_host_agent_answers_any_request_with_a_result_or_an_error(body: bytes) -> None:
    # Outside a host there is no host TPM: every request that needs it is an error too.
    answer = handle(HostAttester(), body)
    assert isinstance(answer, dict)
    assert "error" in answer or answer["tpm"].startswith("unresponsive")


def test_down_leaves_no_process_namespace_or_bridge(
        lab: tuple[Path, str], two_hosts: list[lifecycle.HostUp]) -> None:
    workdir, _ = lab
    state = LabState.load(LabPaths(workdir))
    assert state is not None
    result = lifecycle.down(workdir)
    assert result["left"] == []
    assert not network.bridge_exists(BRIDGE)
    for record in state.hosts.values():
        assert not network.netns_exists(record.netns)
        assert not network.bridge_exists(record.veth)
    leftovers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(workdir).encode() in cmdline:
                leftovers.append(cmdline)
    assert leftovers == []
    assert lifecycle.down(workdir) == {"hosts": {}, "removed": [], "left": []}


def test_a_host_that_comes_back_keeps_its_tpm_and_registration(
        lab: tuple[Path, str]) -> None:
    workdir, subnet = lab  # after the module's down: same files, no process
    registry = LabPaths(workdir).registry.read_text()
    (again,) = lifecycle.up(workdir, 1, bridge=BRIDGE, subnet=subnet)
    assert again.action == "started" and again.verdict is not None and again.verdict.trusted
    assert LabPaths(workdir).registry.read_text() == registry  # the same AK, not re-added
    lifecycle.down(workdir)
