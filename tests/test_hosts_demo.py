"""The demo across hosts (docs/hosts.md, "The demo across hosts"): a real run.

One lab of two hosts for the module (bridge tbm2, 10.213.12.0/24, both trusted) and the
smallest spec that shows the demo across them: the server VM on host1, the client VM and
the CryptoVM on host2 (three small TCG VMs, testbed/examples/two-hosts.yaml). One boot
serves the module: ``demo --spec --keep`` brings the cluster up and leaves it; the VMs on
the two hosts exchange a marker over WireGuard across the VM segment (VXLAN through the
lab's bridge), captured; ``demo --spec`` again finds the cluster up, uses it as it is
(each VM attested afresh) and leaves it up, which is what the Ansible playbook runs
after ``testbed up SPEC``. The CryptoVM, whose CVM1 port is on host2's loopback, is
reached from the lab through a one-connection listener on the lab's loopback and an SSH
relay. ``down`` leaves no bridge or VXLAN port of the cluster, here or on the hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.hosts.layout import HostsError
from testbed.hosts.placement import forward_to_host
from testbed.qemu.backend import QemuBackend
from testbed.qemu.network import Capture, bridge_name, load_members, segment_port
from testbed.roles.cryptovm import PublishedCryptoVm, cryptovm_endpoint
from tests.vm_lab import CliRunner, cli_json, hosts_lab

BRIDGE, SUBNET = "tbm2", "10.213.12.0/24"
EXAMPLE = Path(__file__).resolve().parent.parent / "testbed" / "examples" / "two-hosts.yaml"


_cli = CliRunner(timeout=400)


@pytest.fixture(scope="module")
def lab() -> Iterator[Path]:
    with hosts_lab(_cli, "hosts-demo-", 2, BRIDGE, SUBNET,
                   need="the demo across hosts needs root and libvirt (docs/qemu.md)") as workdir:
        yield workdir


def _check_demo(demo: dict[str, Any]) -> None:
    assert demo["ok"] is True, json.dumps(demo, indent=1)[-3000:]
    assert demo["hosts"] == {"server": "host1", "client": "host2", "cryptovm": "host2"}
    assert all(n["attested"] for n in demo["up"]["nodes"]), demo["up"]
    assert [(c["from"], c["to"]) for c in demo["channels"]] == [("client", "server"),
                                                                 ("server", "client")]
    assert all(c["established"] for c in demo["channels"])
    assert set(demo["certificates"]) == {"server", "client"}
    assert demo["cryptovm"]["ok"] is True and demo["cryptovm"]["node"] == "cryptovm"
    assert demo["cryptovm"]["key_attestation"] == "verified"


@pytest.fixture(scope="module")
def kept(lab: Path) -> Iterator[tuple[dict[str, Any], float]]:
    """``demo --spec --keep``: brought up on the two hosts, the demo run, left up."""
    started = time.monotonic()
    r = _cli(lab, "demo", "--backend", "qemu", "--spec", str(EXAMPLE), "--keep", "--json")
    seconds = time.monotonic() - started
    try:
        assert r.returncode == 0, (r.stderr or r.stdout)[-3000:]
        yield cli_json(r, stderr_tail=None), seconds
    finally:
        r = _cli(lab, "down", "--json")
        assert r.returncode == 0, r.stderr
        tag = bridge_name(ClusterPaths(lab, "two-hosts"))[5:]
        assert not list(Path("/sys/class/net").glob(f"tb*{tag}*"))  # bridge, VXLAN ports
        for host in ("host1", "host2"):  # nor the hosts' ends of the VM segment
            links = subprocess.run(["ip", "-n", f"{BRIDGE}-{host}", "-o", "link"],
                                   capture_output=True, text=True, check=True).stdout
            assert tag not in links, links


def test_demo_across_two_hosts(kept: tuple[dict[str, Any], float]) -> None:
    demo, seconds = kept
    _check_demo(demo)
    assert demo["reused"] is False
    assert {n["name"]: n["host"] for n in demo["up"]["nodes"]} == demo["hosts"]
    # The CryptoVM VM releases the network's peers and is no member (docs/svd.md).
    assert sorted(demo["up"]["network"]["members"]) == ["client", "server"]
    print(f"\ndemo across two hosts, brought up: {seconds:.1f} s (up "
          f"{demo['up']['seconds']} s)")


def test_cryptovm_on_host2_reached_through_ssh(lab: Path,
                                               kept: tuple[dict[str, Any], float]) -> None:
    paths = ClusterPaths(lab, "two-hosts")
    published = PublishedCryptoVm.load(paths, "cryptovm")
    assert published.lab_host == "host2" and published.host == "127.0.0.1"
    endpoint = cryptovm_endpoint(paths, "cryptovm")
    assert "on host2 (through SSH)" in endpoint.describe()
    with endpoint.client() as vsm:  # another client: each has a relay of its own
        assert len(vsm.random(16)) == 16
    with endpoint.client() as vsm:
        assert len(vsm.random(16)) == 16


def _exchange(backend: QemuBackend, address: str, port: int, marker: str,
              interfaces: tuple[str, ...]) -> tuple[dict[str, Any], list[Any]]:
    """client (host2) -> server (host1) at ``address``, ``interfaces`` captured."""
    backend.agent("server", timeout=120).call({"op": "net_listen", "address": address,
                                               "port": port})
    with contextlib.ExitStack() as stack:
        captures = [stack.enter_context(Capture(i, marker.encode())) for i in interfaces]
        sent = backend.agent("client", timeout=120).call(
            {"op": "net_send", "address": address, "port": port, "message": marker,
             "repeat": 1})
    return sent, [c.stats for c in captures]


def test_wireguard_between_vms_on_two_hosts(lab: Path,
                                            kept: tuple[dict[str, Any], float]) -> None:
    """The server VM on host1 and the client VM on host2 are peers on one segment (the
    hosts' bridges are VXLAN ports of the lab's): a marker sent over WireGuard is never
    seen in clear, neither on the cluster's VM bridge on the lab nor on the lab network
    (tbm2, which carries the VXLAN); the control over the plain addresses is."""
    paths = ClusterPaths(lab, "two-hosts")
    members = {m.node: m for m in load_members(paths)}
    backend = QemuBackend(paths)
    try:
        status = backend.agent("client", timeout=120).call({"op": "net_status"})
        assert members["server"].public_key in [p["public_key"] for p in status["peers"]]
        where = (bridge_name(paths), BRIDGE)
        marker = "MARKER-" + os.urandom(8).hex()
        started = time.monotonic()
        sent, over_wg = _exchange(backend, members["server"].wg_ip, 7201, marker, where)
        first_s = time.monotonic() - started
        assert marker in sent["reply"], sent
        assert all(c.marker_frames == 0 for c in over_wg), over_wg
        assert over_wg[0].wireguard_frames > 0 and over_wg[1].frames > 0, over_wg
        sent, plain = _exchange(backend, members["server"].lab_ip, 7202, marker, where)
        assert marker in sent["reply"] and all(c.marker_frames > 0 for c in plain), plain
    finally:
        backend.close()
    print(f"\nfirst WireGuard exchange host2 -> host1 (handshake included): {first_s:.2f} s")


def test_demo_uses_the_running_cluster_and_leaves_it_up(
        lab: Path, kept: tuple[dict[str, Any], float]) -> None:
    """What the Ansible playbook runs after `testbed up SPEC --backend qemu`."""
    started = time.monotonic()
    r = _cli(lab, "demo", "--backend", "qemu", "--spec", str(EXAMPLE), "--json")
    assert r.returncode == 0, (r.stderr or r.stdout)[-3000:]
    again = cli_json(r, stderr_tail=None)
    seconds = time.monotonic() - started
    _check_demo(again)
    assert again["reused"] is True and "teardown_clean" not in again
    status = cli_json(_cli(lab, "status", "--json"), stderr_tail=None)
    assert {row["name"]: (row["state"], row["host"]) for row in status["nodes"]} == {
        "server": ("running", "host1"), "client": ("running", "host2"),
        "cryptovm": ("running", "host2")}, status
    print(f"\ndemo across two hosts on the running cluster: {seconds:.1f} s")


def test_forward_refuses_what_it_cannot_reach(lab: Path, tmp_path: Path) -> None:
    with pytest.raises(HostsError, match="host7 is not in the hosts lab"):
        forward_to_host(lab, "host7", 9302)
    with pytest.raises(HostsError, match="not in the hosts lab"):
        forward_to_host(tmp_path, "host1", 9302)
    # Nothing listens on that port of host1's loopback: the relay's SSH channel opens,
    # the relay ends at once, and the client sees the connection end (no hang).
    address, port = forward_to_host(lab, "host1", 1)
    assert address == "127.0.0.1"
    with socket.create_connection((address, port), timeout=10) as conn:
        conn.settimeout(20)
        assert conn.recv(16) == b""


def test_demo_spec_usage_and_bad_values(tmp_path: Path) -> None:
    r = _cli(tmp_path, "demo", "--spec", str(EXAMPLE), "--json")
    assert r.returncode == 2 and "--backend qemu" in r.stderr, r.stderr
    only = tmp_path / "only-server.yaml"
    only.write_text("version: 1\nname: one\nbackend: qemu\nimage: default\n"
                    "nodes:\n  - {name: server, role: server, host: host1}\n")
    r = _cli(tmp_path, "demo", "--backend", "qemu", "--spec", str(only), "--json")
    assert r.returncode == 3 and "role client" in r.stderr, r.stderr
    r = _cli(tmp_path, "demo", "--backend", "qemu", "--spec", str(tmp_path / "none.yaml"))
    assert r.returncode == 3, r.stderr
    damaged = ClusterPaths(tmp_path, "c")
    damaged.node("cvm").run.mkdir(parents=True)
    (damaged.node("cvm").run / "cryptovm.json").write_text(json.dumps({
        "node": "cvm", "host": "127.0.0.1", "wire_port": 1, "ca_pem":
        "-----BEGIN CERTIFICATE-----", "pcr_selection": "sha256:0-9", "in_vm": True,
        "lab_host": ["host1"]}))
    with pytest.raises(StateError, match="damaged"):
        PublishedCryptoVm.load(damaged, "cvm")


@given(st.from_regex(r"[a-z][a-z0-9-]{0,29}", fullmatch=True))
@settings(max_examples=50, deadline=None)
def test_segment_ports_fit_and_differ_per_host(cluster: str) -> None:
    paths = ClusterPaths(Path("/tmp/w"), cluster)
    ports = [segment_port(paths, f"host{n}") for n in range(1, 17)]
    assert len({p.vni for p in ports}) == 16 and all(0 < p.vni < 1 << 24 for p in ports)
    assert len({p.lab_device for p in ports}) == 16
    for port in ports:  # interface names: at most 15 characters, what the hosts accept
        for name in (port.lab_device, port.host_device, bridge_name(paths)):
            assert len(name) <= 15 and re.fullmatch(r"tb[a-z0-9]{1,13}", name), name
