"""The lab network's membership in the CryptoVM (cryptovm/network.py): WireGuard keys
registered and released only over attested node sessions, on a real CryptoVm (swtpm)."""

from __future__ import annotations

import base64
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptovm.attested import StreamClient, serve_stream
from cryptovm.audit import read_entries
from cryptovm.errors import (
    AccessDenied,
    AlreadyExists,
    AuthenticationFailed,
    BadRequest,
    CryptoVmError,
    NotFound,
)
from cryptovm.keystore import StateCipher
from cryptovm.network import MAX_MEMBERS, NetworkRegistry, parse_join
from cryptovm.vsm import CryptoVm, VsmSession, node_account
from testbed.tpm.swtpm import Swtpm

PCRS = "sha256:0-7"


def key(seed: int) -> str:
    return base64.b64encode(bytes([seed]) * 32).decode()


@pytest.fixture
def vm(swtpm: Swtpm, tmp_path: Path) -> Iterator[CryptoVm]:
    vm, _ = CryptoVm.initialize(tmp_path / "state", swtpm.tcti, pcrs=PCRS)
    try:
        yield vm
    finally:
        vm.close()


def join(session: VsmSession, seed: int) -> dict[str, object]:
    return session.net_join(key(seed), f"10.78.0.{seed}", f"10.77.0.{seed}:51820")


def test_members_see_each_other_and_only_enabled_accounts(vm: CryptoVm) -> None:
    server, client = vm.attested_session("server"), vm.attested_session("client")
    assert join(server, 2)["members"] == 1
    assert server.net_peers() == {"peers": []}
    assert join(client, 3)["members"] == 2
    assert client.net_peers()["peers"] == [{"node": "server", "public_key": key(2),
                                            "endpoint": "10.77.0.2:51820",
                                            "allowed_ip": "10.78.0.2/32"}]
    assert [p["node"] for p in server.net_peers()["peers"]] == ["client"]
    # A node re-registers itself only: a new key replaces its own entry.
    assert join(server, 4)["members"] == 2
    assert client.net_peers()["peers"][0]["public_key"] == key(4)
    # Revoked (its account disabled): it drops out of the others' lists, its own session
    # is refused; reinstated: it comes back.
    root = vm.local_root()
    root.account_enable(node_account("client"), False)
    assert server.net_peers() == {"peers": []}
    with pytest.raises(AuthenticationFailed, match="disabled"):
        client.net_peers()
    with pytest.raises(AuthenticationFailed, match="disabled"):
        vm.attested_session("client")
    root.account_enable(node_account("client"), True)
    assert [p["node"] for p in server.net_peers()["peers"]] == ["client"]
    ops = [(e["account"], e["op"], e["outcome"]) for e in read_entries(vm.audit.path)]
    assert ("node.server", "net_join", "ok") in ops
    assert ("node.client", "net_peers", "denied") in ops  # the refusal is audited too


def test_refusals_are_one_clear_error(vm: CryptoVm) -> None:
    server, client = vm.attested_session("server"), vm.attested_session("client")
    with pytest.raises(NotFound, match="net_join first"):
        server.net_peers()
    join(server, 2)
    with pytest.raises(AlreadyExists, match="held by node 'server'"):
        client.net_join(key(9), "10.78.0.2", "10.77.0.9:51820")
    with pytest.raises(AlreadyExists, match="registered by node 'server'"):
        client.net_join(key(2), "10.78.0.9", "10.77.0.9:51820")
    with pytest.raises(AccessDenied, match="attested"):  # root, PSK or certificate: no
        vm.local_root().net_join(key(5), "10.78.0.5", "10.77.0.5:51820")
    for args, what in [((key(7), "10.79.0.7", "10.77.0.7:1"), "not a host address"),
                       ((key(7), "10.78.0.255", "10.77.0.7:1"), "not a host address"),
                       ((key(7), "10.78.0.7/32", "10.77.0.7:1"), "not an IPv4"),
                       (("AAAA", "10.78.0.7", "10.77.0.7:1"), "32 bytes"),
                       ((key(7), "10.78.0.7", "10.77.0.7:0"), "port"),
                       ((key(7), "10.78.0.7", "host:51820"), "IPv4:PORT"),
                       ((key(7) * 3, "10.78.0.7", "10.77.0.7:1"), "1-64")]:
        with pytest.raises(BadRequest, match=what):
            client.net_join(*args)
    assert vm.network.nodes() == ["server"]


def test_the_members_survive_a_restart_sealed(vm: CryptoVm, swtpm: Swtpm,
                                              tmp_path: Path) -> None:
    join(vm.attested_session("server"), 2)
    join(vm.attested_session("client"), 3)
    sealed = (tmp_path / "state" / "network.enc").read_bytes()
    assert key(2).encode() not in sealed and b"10.78.0.2" not in sealed  # encrypted
    vm.close()
    again = CryptoVm.open(tmp_path / "state", swtpm.tcti)
    try:
        assert [p["node"] for p in again.attested_session("server").net_peers()["peers"]] \
            == ["client"]
    finally:
        again.close()
    vm.state.lock()  # the fixture closes it once more


def test_the_membership_is_bounded(tmp_path: Path) -> None:
    registry = NetworkRegistry(tmp_path / "network.enc", StateCipher(os.urandom(32)))
    for n in range(MAX_MEMBERS):
        registry.join(parse_join(f"n{n}", base64.b64encode(n.to_bytes(32, "big")).decode(),
                                 f"10.78.0.{n + 1}", f"10.77.0.1:{n + 1}"))
    with pytest.raises(BadRequest, match="full"):
        registry.join(parse_join("late", key(255), "10.78.0.254", "10.77.0.1:9"))


@contextmanager
def stream(vm: CryptoVm, session: VsmSession) -> Iterator[StreamClient]:
    near, far = socket.socketpair()
    near.settimeout(10)

    def serve() -> None:
        with far:
            serve_stream(vm, session, lambda: far.recv(65536), far.sendall)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        yield StreamClient(lambda: near.recv(65536), near.sendall)
    finally:
        near.close()
        worker.join(5)


def test_over_the_attested_stream_the_identity_is_the_channels(vm: CryptoVm) -> None:
    join(vm.attested_session("server"), 2)
    with stream(vm, vm.attested_session("client")) as client:
        answer = client.call("net_join", public_key=key(3), wg_address="10.78.0.3",
                             endpoint="10.77.0.3:51820")
        assert answer["node"] == "client"
        assert [p["node"] for p in client.call("net_peers")["peers"]] == ["server"]
        with pytest.raises(BadRequest, match="argument 'wg_address' must be a string"):
            client.call("net_join", public_key=key(3), wg_address=3, endpoint="x")
        with pytest.raises(BadRequest, match="unknown arguments"):
            client.call("net_join", public_key=key(3), wg_address="10.78.0.3",
                        endpoint="10.77.0.3:1", node="server")
    assert vm.network.nodes() == ["client", "server"]


_text = st.one_of(st.text(max_size=80), st.sampled_from(
    [key(1), "10.78.0.1", "10.77.0.1:51820", "10.78.0.0", "::1", "1.2.3.4:-1", "=" * 44]))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(public_key=_text, wg_address=_text, endpoint=_text)
def test_hostile_join_arguments_are_a_cryptovm_error_or_a_member(
        vm: CryptoVm, public_key: str, wg_address: str, endpoint: str) -> None:
    session = vm.attested_session("fuzz")
    try:
        answer = session.net_join(public_key, wg_address, endpoint)
    except CryptoVmError:
        return
    assert answer["node"] == "fuzz" and answer["members"] == 1
