"""The VM network (docs/svd.md, "The VM network"): WireGuard between attested VMs.

Host side, fast: the guest's network extension inside the real guest agent on an swtpm
(its key quote verified as the host verifies it; the ``ip``/``wg`` commands recorded,
since this host's kernel has no wireguard module), its ``net_sync`` against a real
CryptoVm on a second swtpm over a CVM1 stream (the peers are what the CryptoVM
releases), hostile requests, the AF_PACKET capture on real sockets, the lab bridge.
Then one module of real VMs (cryptovm, server, client): the peers each guest has are
what the CryptoVM serves, the capture on the lab bridge shows the marker in plain text
over the plain lab addresses and never over WireGuard, and a revoked VM is dropped by
its peer and by the CryptoVM, which refuses its own sync.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.evidence import Evidence
from attestation.registrar import Registrar
from attestation.revocation import (
    Decision,
    Reinstate,
    RevocationEvent,
    decision_args,
    encode_decision,
)
from attestation.tpm_raw import Tpm, UnixSocketTransport
from attestation.tpm_types import parse_public
from attestation.verifier import QuoteVerifier
from cryptovm.vsm import CryptoVm, node_account
from testbed.cluster.agent import AgentError
from testbed.core.paths import ClusterPaths
from testbed.qemu.accel import AccelChoice
from testbed.qemu.backend import QemuBackend
from testbed.qemu.domain import LAB_MAC, VmSpec, domain_xml
from testbed.qemu.guest.agent import Agent
from testbed.qemu.guest.net_extension import WG_PORT, GuestNetwork, key_binding_nonce
from testbed.qemu.guest.net_extension import install as net_install
from testbed.qemu.image.build import _resolve_inside
from testbed.qemu.network import (
    NO_CRYPTOVM,
    Capture,
    Member,
    NetworkError,
    _save_members,
    _sync_rounds,
    bridge_name,
    cryptovm_sync,
    ensure_bridge,
    load_members,
    provision,
    remove_bridge,
    remove_member,
)
from testbed.verifier.revocation import revoke
from tests.test_cryptovm_network import stream
from tests.vm_lab import REPO, CliRunner, cli_json, new_workdir, require_root_and_libvirt

FIGURES_ENV = os.environ.get("TESTBED_FIGURES")  # a file to write the figures to, if set


# --- the guest extension in the real guest agent ------------------------------------------


class Recorder:
    """Stands in for ``ip``/``wg`` (no wireguard module on this host): records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], bytes | None]] = []
        self.peers: list[str] = []

    def __call__(self, argv: list[str], stdin: bytes | None) -> str:
        self.calls.append((argv, stdin))
        if argv[:4] == ["wg", "show", "wg0", "peers"]:
            return "\n".join(self.peers)
        return ""


@pytest.fixture
def guest(swtpm: Any) -> Iterator[tuple[Agent, GuestNetwork, Recorder]]:
    tpm = Tpm(UnixSocketTransport(str(swtpm.socket_path)))
    agent = Agent(tpm, None, "vm0", "server")
    recorder = Recorder()
    network = GuestNetwork(agent, recorder)
    agent.handlers.update({"net_init": network.init})
    agent.revocation_listeners["network"] = network
    yield agent, network, recorder
    tpm.transport.close()


def _call(agent: Agent, request: dict[str, Any]) -> dict[str, Any]:
    return agent.handle(json.dumps(request).encode())


INIT = {"op": "net_init", "lab_address": "10.77.0.2/24", "lab_mac": "52:54:00:7b:01:01",
        "wg_address": "10.78.0.2/24", "pcrs": list(range(10))}


def _registered(agent: Agent, swtpm_ca: Any) -> Registrar:
    identity = _call(agent, {"op": "identity"})
    b = base64.b64decode
    registrar = Registrar(swtpm_ca.ca_bundle())
    challenge = registrar.challenge(b(identity["ek_certificate"]), b(identity["ek_public"]),
                                    b(identity["ak_public"]))
    secret = _call(agent, {"op": "activate",
                           "credential_blob": base64.b64encode(challenge.credential_blob).decode(),
                           "encrypted_secret":
                               base64.b64encode(challenge.encrypted_secret).decode()})
    registrar.complete(parse_public(b(identity["ak_public"])).name, b(secret["secret"]))
    return registrar


def test_wireguard_key_is_made_in_the_guest_and_vouched_for_by_its_tpm(
        guest: tuple[Agent, GuestNetwork, Recorder], swtpm_ca: Any) -> None:
    agent, _, recorder = guest
    registrar = _registered(agent, swtpm_ca)
    nonce = os.urandom(32)
    answer = _call(agent, {**INIT, "nonce": nonce.hex()})
    assert "error" not in answer, answer
    public = base64.b64decode(answer["public_key"])
    evidence = Evidence.from_dict(answer["evidence"])
    verifier = QuoteVerifier(ak_trust=registrar)
    assert verifier.verify(evidence, key_binding_nonce(nonce, public)).ok
    # A key swapped on the way (the host path is untrusted) does not match the quote.
    other = bytes(32)
    report = verifier.verify(evidence, key_binding_nonce(nonce, other))
    assert not report.ok and report.failure is not None
    assert report.failure.name == "qualifying_data"
    # The private key went to `wg` through stdin only: on no command line, in no file.
    commands = [argv for argv, _ in recorder.calls]
    assert ["ip", "link", "add", "dev", "wg0", "type", "wireguard"] in commands
    keyed = [(argv, stdin) for argv, stdin in recorder.calls if "private-key" in argv]
    assert len(keyed) == 1 and keyed[0][0][-1] == "/proc/self/fd/0"
    assert keyed[0][1] is not None
    private = keyed[0][1]
    assert all(private.strip().decode() not in " ".join(argv) for argv in commands)
    # Asked again (a kept VM, a new `up`): the same key, a fresh quote, no new interface.
    again = _call(agent, {**INIT, "nonce": os.urandom(32).hex()})
    assert again["public_key"] == answer["public_key"]
    assert sum(argv[:3] == ["ip", "link", "add"] for argv in
               (a for a, _ in recorder.calls)) == 1


@pytest.fixture
def cryptovm(swtpm_factory: Any, tmp_path: Path) -> Iterator[CryptoVm]:
    """A real CryptoVm on its own swtpm (the guest agent holds the first)."""
    vm, _ = CryptoVm.initialize(tmp_path / "cvm", swtpm_factory().tcti, pcrs="sha256:0-7")
    try:
        yield vm
    finally:
        vm.close()


@contextmanager
def attested_stream(vm: CryptoVm, node: str) -> Iterator[Any]:
    """What the CryptoVM guest serves to ``node`` on its attested channel (CVM1 frames
    as node.<name>), over a socket pair: the guest's ``call``."""
    with stream(vm, vm.attested_session(node)) as client:
        yield client.call


OTHER = base64.b64encode(b"\x02" * 32).decode()


def test_peers_are_exactly_what_the_cryptovm_releases(
        guest: tuple[Agent, GuestNetwork, Recorder], cryptovm: CryptoVm) -> None:
    agent, network, recorder = guest
    with attested_stream(cryptovm, "server") as call, \
            pytest.raises(ValueError, match="net_sync before net_init"):
        network.sync_with(call)
    answer = _call(agent, {**INIT, "nonce": os.urandom(32).hex()})
    cryptovm.attested_session("client").net_join(OTHER, "10.78.0.3", "10.77.0.3:51820")
    stale = base64.b64encode(b"\x01" * 32).decode()
    recorder.peers = [stale]
    with attested_stream(cryptovm, "server") as call:
        synced = network.sync_with(call)
    assert synced == {"role": "network", "peers": ["client"], "removed": 1,
                      "refused_revoked": [], "released": [GOOD_PEER]}
    commands = [argv for argv, _ in recorder.calls]
    assert ["wg", "set", "wg0", "peer", stale, "remove"] in commands
    assert ["wg", "set", "wg0", "peer", OTHER, "endpoint", "10.77.0.3:51820", "allowed-ips",
            "10.78.0.3/32", "persistent-keepalive", "off"] in commands
    # The guest registered its own key, address and endpoint, under its channel's name.
    server = cryptovm.attested_session("client").net_peers()["peers"]
    assert server == [{"node": "server", "public_key": answer["public_key"],
                       "endpoint": "10.77.0.2:51820", "allowed_ip": "10.78.0.2/32"}]
    # The client's account disabled (revoked): the CryptoVM no longer releases it.
    cryptovm.local_root().account_enable(node_account("client"), False)
    recorder.peers = [OTHER]
    with attested_stream(cryptovm, "server") as call:
        assert network.sync_with(call)["peers"] == []
    assert recorder.calls[-1][0] == ["wg", "set", "wg0", "peer", OTHER, "remove"]


def test_the_host_has_no_op_to_set_peers(guest: tuple[Agent, GuestNetwork, Recorder]) -> None:
    agent, _, recorder = guest
    installed = Agent(agent.tpm, None, "vm1", "server")
    net_install(installed, lambda *_: None)
    assert "net_peers" not in installed.handlers and "net_sync" in installed.stream_handlers
    answer = _call(installed, {"op": "net_peers", "peers": [GOOD_PEER]})
    assert "error" in answer and not recorder.calls


def _decide(agent: Agent, key: Ed25519PrivateKey, decision: Decision) -> dict[str, Any]:
    """The verifier's signed decision, delivered as `testbed revoke` delivers it."""
    args = decision_args(decision, key.sign(encode_decision(decision)))
    return _call(agent, {"op": "role", "action": decision.kind, "args": args})


def test_a_revoked_node_leaves_the_peer_table_and_is_not_added_again(
        guest: tuple[Agent, GuestNetwork, Recorder]) -> None:
    agent, network, recorder = guest
    _call(agent, {**INIT, "nonce": os.urandom(32).hex()})
    assert not network.apply([GOOD_PEER])["refused_revoked"]
    verifier = Ed25519PrivateKey.generate()
    pem = verifier.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    assert _call(agent, {"op": "revocation_key", "public_key": pem.decode()})["pinned"]
    applied = _decide(agent, verifier, RevocationEvent("client", "runtime", "ran x", "t1", 1))
    assert applied["applied"] and applied["effects"]["network"] == {"removed_peer": True}
    assert recorder.calls[-1][0] == ["wg", "set", "wg0", "peer", GOOD_PEER["public_key"],
                                     "remove"]
    before = len(recorder.calls)  # a list still naming it (a stale CryptoVM): refused
    again = network.apply([GOOD_PEER])
    assert again == {"peers": [], "removed": 0, "refused_revoked": ["client"]}
    assert not any("endpoint" in argv for argv, _ in recorder.calls[before:])
    _decide(agent, verifier, Reinstate("client", "operator decision", "t2", 2))
    assert network.apply([GOOD_PEER])["peers"] == ["client"]


GOOD_PEER = {"node": "client", "public_key": base64.b64encode(b"\x02" * 32).decode(),
             "endpoint": "10.77.0.3:51820", "allowed_ip": "10.78.0.3/32"}


@pytest.mark.parametrize(("request_", "message"), [
    ({"op": "net_init", "lab_address": "10.77.0.2", "lab_mac": "52:54:00:7b:01:01",
      "wg_address": "10.78.0.2/24", "nonce": "00" * 32, "pcrs": [0]}, "lab_address"),
    ({**INIT, "lab_mac": "52:54:00:7b:01:01; reboot", "nonce": "00" * 32}, "lab_mac"),
    ({**INIT, "wg_address": "-1/24", "nonce": "00" * 32}, "wg_address"),
    ({**INIT, "nonce": "zz" * 32}, "nonce: not hexadecimal"),
    ({**INIT, "nonce": "00"}, "nonce: 16 to 64 bytes"),
    ({**INIT, "nonce": "00" * 32, "extra": 1}, "unknown keys"),
])
def test_hostile_network_requests_are_one_clear_error(
        guest: tuple[Agent, GuestNetwork, Recorder], request_: dict[str, Any],
        message: str) -> None:
    agent, _, recorder = guest
    answer = _call(agent, request_)
    assert message in answer.get("error", ""), answer
    assert not recorder.calls


@pytest.mark.parametrize(("released", "message"), [
    ("all", "peers: a list"),
    ([GOOD_PEER] * 201, "at most 200"),
    ([{**GOOD_PEER, "allowed_ip": "0.0.0.0/0"}], "one address"),
    ([{**GOOD_PEER, "public_key": "AAAA"}], "32 bytes"),
    ([{**GOOD_PEER, "endpoint": "evil"}], "IP:PORT"),
    ([{**GOOD_PEER, "endpoint": "10.0.0.1:99999"}], "port"),
    ([{**GOOD_PEER, "node": "../x"}], "a node name"),
    ([{**GOOD_PEER, "more": 1}], "{node, public_key"),
])
def test_a_malformed_peer_list_changes_nothing(
        guest: tuple[Agent, GuestNetwork, Recorder], released: object,
        message: str) -> None:
    """Even the CryptoVM's answer is checked before the kernel's table is touched."""
    agent, network, recorder = guest
    _call(agent, {**INIT, "nonce": os.urandom(32).hex()})
    before = len(recorder.calls)

    def call(op: str, **_args: Any) -> dict[str, Any]:
        return {"peers": released} if op == "net_peers" else {}
    with pytest.raises(ValueError, match=re.escape(message)):
        network.sync_with(call)
    assert not any("remove" in argv or "endpoint" in argv
                   for argv, _ in recorder.calls[before:])


def test_net_sync_requests_are_checked(guest: tuple[Agent, GuestNetwork, Recorder]) -> None:
    _, network, _ = guest
    for request, message in [({"op": "net_sync"}, "cryptovm:"),
                             ({"op": "net_sync", "cryptovm": "../x"}, "cryptovm:"),
                             ({"op": "net_sync", "cryptovm": "c", "peers": []}, "unknown keys")]:
        near, far = socket.socketpair()
        sent: list[dict[str, Any]] = []
        with near, far:
            network.sync(request, far, lambda _conn, doc, sent=sent: sent.append(doc))
        assert message in sent[0]["error"], sent


# --- the lab side: who joins, and in which rounds ------------------------------------------


def test_without_a_cryptovm_there_is_no_vm_network(tmp_path: Path) -> None:
    paths = ClusterPaths(tmp_path, "netlab")
    paths.root.mkdir(parents=True)

    def no_agent(node: str) -> Any:
        raise AssertionError(f"{node}'s guest is not asked for anything")
    done = provision(paths, {"server": True, "client": True, "bad": False}, no_agent,
                     ["server", "client", "bad"], cryptovm=None)
    assert done.members == [] and done.refused == {
        "server": NO_CRYPTOVM, "client": NO_CRYPTOVM,
        "bad": "it is not attested (rejected, or not up)"}
    assert load_members(paths) == []


def test_two_rounds_give_every_member_all_the_others(tmp_path: Path) -> None:
    """A stand-in CryptoVM: each sync joins the node and answers the members so far."""
    paths = ClusterPaths(tmp_path, "netlab")
    paths.root.mkdir(parents=True)
    joined: list[str] = []
    calls: list[str] = []

    def sync(node: str) -> dict[str, Any]:
        calls.append(node)
        if node == "rogue":
            raise NetworkError("node 'rogue': cryptovm released no peers: AccessDenied")
        if node not in joined:
            joined.append(node)
        return {"peers": [n for n in joined if n != node], "removed": 0}
    keyed = [Member(n, i, OTHER) for i, n in enumerate(["a", "rogue", "b", "c"], start=2)]
    refused: dict[str, str] = {}
    members, peers, syncs = _sync_rounds(keyed, sync, refused)
    assert [m.node for m in members] == ["a", "b", "c"] and "AccessDenied" in refused["rogue"]
    assert calls == ["a", "rogue", "b", "c", "a", "b"] and syncs == 6  # c had them all
    assert peers == {"a": "2 peers, 0 removed", "b": "2 peers, 0 removed",
                     "c": "2 peers, 0 removed"}
    # A revocation: the remaining members sync again (the stand-in drops the node).
    _save_members(paths, members, "cryptovm")
    joined.remove("c")
    answered = remove_member(paths, RevocationEvent("c", "runtime", "x", "t", 1),
                             lambda node: None, sync)  # type: ignore[arg-type,return-value]
    assert answered == {"a": "1 peers, 0 removed", "b": "1 peers, 0 removed"}
    assert [m.node for m in load_members(paths)] == ["a", "b"]


# --- the capture and the bridge (real sockets, real links) --------------------------------


def test_capture_sees_a_plain_marker_and_counts_wireguard_frames() -> None:
    marker = os.urandom(8).hex().encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        with Capture("lo", marker) as capture, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"plain " + marker, ("127.0.0.1", port))
            sender.sendto(b"\x01" + bytes(40), ("127.0.0.1", WG_PORT))  # nobody listens
    stats = capture.stats
    assert stats.marker_frames >= 1 and stats.wireguard_frames >= 1
    assert stats.frames >= 2


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def test_capture_on_a_bridge_sees_frames_forwarded_between_its_ports() -> None:
    """Two network namespaces on a bridge (veth ports), as two VMs on the lab bridge: a
    datagram from one to the other crosses the capture on the bridge device."""
    tag = f"{os.getpid() % 100000:05d}"
    bridge, spaces = f"tbcap{tag}", [f"tbcap{tag}a", f"tbcap{tag}b"]
    marker = os.urandom(8).hex().encode()
    try:
        ensure_bridge(bridge)
        for index, space in enumerate(spaces, start=1):
            _ip("netns", "add", space)
            _ip("link", "add", f"tbv{tag}{index}", "type", "veth", "peer", "name", "eth0",
                "netns", space)
            _ip("link", "set", f"tbv{tag}{index}", "master", bridge, "up")
            _ip("-n", space, "addr", "add", f"10.99.0.{index}/24", "dev", "eth0")
            _ip("-n", space, "link", "set", "eth0", "up")
        send = ("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                f".sendto({marker!r}, ('10.99.0.2', 5000))")
        with Capture(bridge, marker) as capture:
            subprocess.run(["ip", "netns", "exec", spaces[0], sys.executable, "-c", send],
                           check=True, timeout=30)
        assert capture.stats.marker_frames >= 1, capture.stats
    finally:
        for space in spaces:
            subprocess.run(["ip", "netns", "del", space], capture_output=True, check=False)
        remove_bridge(bridge)


def test_capture_on_a_missing_interface_is_one_error() -> None:
    with pytest.raises(NetworkError, match="cannot capture on tbnosuch0"), \
            Capture("tbnosuch0", b"x"):
        pass


def test_lab_bridge_lifecycle_and_the_lab_nic_in_the_domain(tmp_path: Path) -> None:
    paths = ClusterPaths(tmp_path, "netlab")
    name = bridge_name(paths)
    assert name.startswith("tblab") and len(name) <= 15
    assert bridge_name(ClusterPaths(tmp_path / "other", "netlab")) != name
    ensure_bridge(name)
    try:
        ensure_bridge(name)  # idempotent
        assert Path(f"/sys/class/net/{name}/bridge").is_dir()
    finally:
        assert remove_bridge(name)
    assert not remove_bridge(name)
    spec = VmSpec(name="testbed-x", kernel=Path("/k"), initrd=Path("/i"), cmdline="",
                  run_dir=tmp_path, agent_port=1, guest_port=2,
                  accel=AccelChoice("tcg", "test"), uuid="0" * 8 + "-0000-0000-0000-" + "0" * 12)
    on_bridge = domain_xml(VmSpec(**{**spec.__dict__, "lab_bridge": name}))
    alone = domain_xml(spec)
    assert f"<source bridge=\"{name}\"" in on_bridge and "type=\"ethernet\"" in alone
    for xml in (on_bridge, alone):  # the firmware sees the same NIC either way
        assert f'<mac address="{LAB_MAC}"' in xml and '<rom enabled="no"' in xml


def test_kept_programs_resolve_inside_the_image(tmp_path: Path) -> None:
    """iproute2's /usr/sbin/ip -> /bin/ip (absolute) in a merged-/usr image: the image's
    /usr/bin/ip, not the host's."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "usr/sbin").mkdir()
    (rootfs / "bin").symlink_to("usr/bin")
    (rootfs / "usr/bin/ip").write_bytes(b"\x7fELF")
    (rootfs / "usr/sbin/ip").symlink_to("/bin/ip")
    assert _resolve_inside(rootfs, rootfs / "usr/sbin/ip") == (rootfs / "usr/bin/ip").resolve()


# --- real VMs -------------------------------------------------------------------------------

SPEC = """version: 1
name: netlab
backend: qemu
image: {image}
nodes:
  - name: cryptovm
    role: cryptovm
    boot: {{cmdline: "{cmdline}"}}
  - name: server
    role: server
    boot: {{cmdline: "{cmdline}"}}
  - name: client
    role: client
    boot: {{cmdline: "{cmdline}"}}
"""
# no_timer_check: under TCG on a loaded machine the kernel's IO-APIC timer check can fail
# and panic the guest; the command line is measured and the policies predicted from it.
CMDLINE = "console=ttyS0 panic=-1 quiet no_timer_check"


_cli = CliRunner(timeout=900)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[ClusterPaths, dict[str, Any]]]:
    require_root_and_libvirt("the VM network test needs root and libvirt (see docs/qemu.md)")
    workdir = new_workdir("network-")
    spec = workdir / "netlab.yaml"
    spec.write_text(SPEC.format(image=REPO / "images" / "guest.yaml", cmdline=CMDLINE))
    try:
        started = time.monotonic()
        r = _cli(workdir, "up", "--backend", "qemu", str(spec), "--json")
        if r.returncode == 4:  # a VM did not come up (TCG on a loaded machine): `up` again
            r = _cli(workdir, "up", "--backend", "qemu", str(spec), "--json")  # boots it anew
        up = cli_json(r)
        up["seconds_up"] = time.monotonic() - started
        assert r.returncode == 0 and up["all_attested"], r.stdout[-3000:]
        yield ClusterPaths(workdir, "netlab"), up
    finally:
        down = _cli.purge(workdir)  # asserted, unlike vm_workdir's: no bridge may be left
        shutil.rmtree(workdir, ignore_errors=True)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not Path(f"/sys/class/net/{bridge_name(ClusterPaths(workdir, 'netlab'))}").exists()


def _net(backend: QemuBackend, node: str, request: dict[str, Any]) -> dict[str, Any]:
    return backend.agent(node, timeout=120).call(request)


def _exchange(backend: QemuBackend, bridge: str, address: str, port: int, marker: str,
              repeat: int = 1) -> tuple[dict[str, Any], Any]:
    """client -> server at ``address``, the lab bridge captured meanwhile."""
    _net(backend, "server", {"op": "net_listen", "address": address, "port": port})
    with Capture(bridge, marker.encode()) as capture:
        sent = _net(backend, "client", {"op": "net_send", "address": address, "port": port,
                                        "message": marker, "repeat": repeat})
    return sent, capture.stats


@pytest.mark.slow
def test_marker_crosses_the_lab_bridge_only_as_wireguard(
        cluster: tuple[ClusterPaths, dict[str, Any]]) -> None:
    paths, up = cluster
    network = up["network"]
    assert sorted(network["members"]) == ["client", "server"] and not network["refused"]
    assert network["cryptovm"] == "cryptovm", network  # it releases; it is no member
    members = {m.node: m for m in load_members(paths)}
    backend = QemuBackend(paths)
    bridge = bridge_name(paths)
    sync = cryptovm_sync(lambda node: backend.agent(node, timeout=120), "cryptovm")
    for node, other in (("server", "client"), ("client", "server")):
        # What the CryptoVM serves this node now (a sync of our own, relayed as `up` does)
        released = sync(node)["released"]
        assert [(p["node"], p["public_key"]) for p in released] == \
            [(other, members[other].public_key)]
        status = _net(backend, node, {"op": "net_status"})
        assert status["public_key"] == members[node].public_key
        assert [p["public_key"] for p in status["peers"]] == [released[0]["public_key"]]
        assert status["peers"][0]["allowed_ips"] == released[0]["allowed_ip"]

    marker = "MARKER-" + os.urandom(8).hex()
    first = time.monotonic()
    sent, over_wg = _exchange(backend, bridge, members["server"].wg_ip, 7101, marker)
    first_s = time.monotonic() - first
    assert marker in sent["reply"], sent
    assert over_wg.marker_frames == 0 and over_wg.wireguard_frames > 0, over_wg
    # The control: the same exchange over the plain lab addresses is readable on the bridge.
    sent, plain = _exchange(backend, bridge, members["server"].lab_ip, 7102, marker)
    assert marker in sent["reply"] and plain.marker_frames > 0, plain

    # Throughput in the same run (1 MiB each way of 4 KiB messages).
    block = "x" * 4096
    wg_run, _ = _exchange(backend, bridge, members["server"].wg_ip, 7103, block, 256)
    plain_run, _ = _exchange(backend, bridge, members["server"].lab_ip, 7104, block, 256)
    figures = {"accel": up.get("accel"), "up_seconds": round(up["seconds_up"], 1),
               "network_provision_seconds": network["seconds"],
               "network_syncs": network["syncs"],
               "first_wg_exchange_seconds": round(first_s, 2),
               "wg_mib_per_s": round(wg_run["bytes"] / wg_run["seconds"] / 2**20, 2),
               "plain_mib_per_s": round(plain_run["bytes"] / plain_run["seconds"] / 2**20, 2),
               "load": os.getloadavg()[0]}
    print(f"\nVM network figures: {figures}")
    if FIGURES_ENV:
        Path(FIGURES_ENV).write_text(json.dumps(figures) + "\n")


@pytest.mark.slow
def test_revoked_vm_is_dropped_by_its_peers(
        cluster: tuple[ClusterPaths, dict[str, Any]]) -> None:
    """`testbed revoke client`: the verifier's signed decision reaches the guests; the
    server's guest removes the client's WireGuard peer itself, the CryptoVM guest
    disables node.client, and no sync brings it back."""
    paths, _ = cluster
    backend = QemuBackend(paths)
    members = {m.node: m for m in load_members(paths)}
    event, delivered = revoke(paths, "client", "runtime", "test: revoked")
    deadline = time.monotonic() + 60  # a TCG guest may apply it after the delivery window
    while _net(backend, "server", {"op": "net_status"})["peers"] and \
            time.monotonic() < deadline:
        time.sleep(1)
    assert _net(backend, "server", {"op": "net_status"})["peers"] == [], delivered
    # The members re-sync from the CryptoVM: it no longer releases the client (its
    # account disabled by the same decision), so the server's list is empty.
    answered = remove_member(paths, event, lambda node: backend.agent(node, timeout=120))
    assert answered == {"server": "0 peers, 0 removed"}
    assert [m.node for m in load_members(paths)] == ["server"]
    # The client's own sync is refused: its channel by the CryptoVM guest (revoked), and
    # behind it its VSM account node.client is disabled (test_cryptovm_network.py).
    sync = cryptovm_sync(lambda node: backend.agent(node, timeout=120), "cryptovm")
    with pytest.raises(NetworkError, match=r"revoked|disabled") as refused:
        sync("client")
    print(f"\nthe revoked client's net_sync: {refused.value}")
    _net(backend, "server", {"op": "net_listen", "address": members["server"].wg_ip,
                             "port": 7105})
    with pytest.raises(AgentError):  # its handshakes go unanswered: no key on the server
        _net(backend, "client", {"op": "net_send", "address": members["server"].wg_ip,
                                 "port": 7105, "message": "still there?"})
