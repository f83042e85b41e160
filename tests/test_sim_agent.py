"""The agent API against a stand-in backend: framing, request validation, fuzzing.

No TPM and no node process: the real thing is covered by test_sim_cluster.py.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attestation.agent_wire import MAX_FRAME, recv_frame
from attestation.credential import CredentialChallenge
from attestation.errors import TpmError
from attestation.evidence import Evidence
from attestation.tpm_types import PcrSelection
from testbed.cluster.agent import (
    AgentClient,
    AgentError,
    AgentUnavailable,
    UnixTransport,
    sockaddr,
)
from testbed.core.errors import StateError
from testbed.sim.agent_server import AgentServer
from testbed.sim.node_info import NodeInfo


def unix_client(path: Path, node: str = "n1") -> AgentClient:
    return AgentClient(UnixTransport(path), node=node)


class FakeBackend:
    def __init__(self) -> None:
        self.quotes: list[tuple[bytes, PcrSelection]] = []
        self.stopped = False

    def identity(self) -> dict[str, Any]:
        enc = base64.b64encode
        return {"node": "n1", "role": "generic", "ek_algorithm": "rsa",
                "ek_certificate": enc(b"cert").decode(), "ek_public": enc(b"ek").decode(),
                "ak_public": enc(b"ak").decode()}

    def activate(self, challenge: CredentialChallenge) -> bytes:
        if challenge.credential_blob == b"fail":
            raise TpmError("TPM2_ActivateCredential failed: integrity")
        return challenge.credential_blob[::-1]

    def quote(self, nonce: bytes, selection: PcrSelection) -> Evidence:
        self.quotes.append((nonce, selection))
        return Evidence(attest=b"a", signature=b"s", ak_public=b"k", pcr_bank=selection.bank,
                        pcrs={i: bytes(32) for i in selection.indices}, event_log=b"log")

    def status(self) -> dict[str, Any]:
        return {"node": "n1", "state": "ready"}

    def shutdown(self) -> None:
        self.stopped = True


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def server(backend: FakeBackend, tmp_path: Path) -> Iterator[AgentServer]:
    # Deeper than sun_path allows: the /proc/self/fd fallback must be used.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    agent = AgentServer(backend, deep / "agent.sock")
    agent.start()
    try:
        yield agent
    finally:
        agent.close()


def test_client_round_trips_over_a_long_socket_path(server: AgentServer,
                                                    backend: FakeBackend) -> None:
    assert len(str(server.socket_path)) > 107
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o600
    client = unix_client(server.socket_path)
    identity = client.identity()
    assert (identity.ek_certificate, identity.ak_public) == (b"cert", b"ak")
    assert client.activate(CredentialChallenge(b"abc", b"xyz")) == b"cba"
    evidence = client.quote(b"\x01" * 32, [9, 0, 4])
    assert evidence.pcr_bank == "sha256" and sorted(evidence.pcrs) == [0, 4, 9]
    assert backend.quotes == [(b"\x01" * 32, PcrSelection("sha256", (0, 4, 9)))]
    assert client.status()["state"] == "ready"
    client.shutdown()
    assert backend.stopped


def test_errors_become_exceptions_on_the_client(server: AgentServer, tmp_path: Path) -> None:
    client = unix_client(server.socket_path)
    with pytest.raises(AgentError, match="node 'n1': activate: TPM2_ActivateCredential failed"):
        client.activate(CredentialChallenge(b"fail", b"x"))
    with pytest.raises(AgentUnavailable, match="no agent at"):
        unix_client(tmp_path / "absent.sock").status()


def test_close_removes_the_socket(backend: FakeBackend, tmp_path: Path) -> None:
    agent = AgentServer(backend, tmp_path / "a.sock")
    agent.start()
    agent.close()
    assert not (tmp_path / "a.sock").exists()
    stale = AgentServer(backend, tmp_path / "a.sock")  # a killed node's socket is replaced
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "a.sock"))
    sock.close()
    stale.start()
    assert unix_client(tmp_path / "a.sock").status()["node"] == "n1"
    stale.close()


def test_oversized_frames_are_refused_before_reading(server: AgentServer) -> None:
    sock = socket.socket(socket.AF_UNIX)
    with sock, sockaddr(server.socket_path) as address:
        sock.connect(address)
        sock.sendall(struct.pack(">I", 0xFFFFFFFF))
        body = recv_frame(sock)
        assert body is not None and "exceeds" in json.loads(body)["error"]
    assert unix_client(server.socket_path).status()["node"] == "n1"


# --- request handling never raises, whatever the bytes ---------------------------------------

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=10)
_requests = st.fixed_dictionaries(
    {"op": st.sampled_from(["identity", "activate", "quote", "status", "nope"])},
    optional={"nonce": st.one_of(st.text(max_size=140), _json,
                                 st.binary(max_size=70).map(bytes.hex)),
              "pcrs": st.one_of(_json, st.lists(st.integers(-2, 30), max_size=30)),
              "credential_blob": st.one_of(_json, st.binary(max_size=64).map(
                  lambda b: base64.b64encode(b).decode())),
              "encrypted_secret": _json, "extra": _json})


def _check_response(response: dict[str, Any]) -> None:
    assert isinstance(response, dict)
    json.dumps(response)
    if "error" in response:
        assert isinstance(response["error"], str) and response["error"]


@given(st.binary(max_size=300))
def test_fuzz_raw_bodies(body: bytes) -> None:
    _check_response(AgentServer(FakeBackend(), Path("/nonexistent")).handle(body))


@given(_requests)
def test_fuzz_structured_requests(request: dict[str, Any]) -> None:
    response = AgentServer(FakeBackend(), Path("/nonexistent")).handle(
        json.dumps(request).encode())
    _check_response(response)
    if request["op"] == "nope" or set(request) - {"op", "nonce", "pcrs", "credential_blob",
                                                  "encrypted_secret"}:
        assert "error" in response


def test_max_frame_is_four_mebibytes() -> None:
    assert MAX_FRAME == 4 << 20  # a quote with a real OVMF log is tens of KiB
    big = AgentServer(FakeBackend(), Path("/x")).handle(os.urandom(10))
    assert "not JSON" in big["error"]


# --- node.json, as the backend reads it -------------------------------------------------------


@given(st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode())))
def test_a_damaged_node_json_is_one_clear_error(tmp_path_factory: pytest.TempPathFactory,
                                                data: bytes) -> None:
    path = tmp_path_factory.mktemp("n") / "node.json"
    path.write_bytes(data)
    try:
        info = NodeInfo.load(path)
    except StateError as exc:
        assert str(path) in str(exc)
    else:
        assert info is None or isinstance(info.pid, int)


def test_node_json_round_trips(tmp_path: Path) -> None:
    info = NodeInfo("n1", "lab", 1234, "/run/agent.sock", state="ready", tampered=["cmdline"])
    info.save(tmp_path / "node.json")
    assert NodeInfo.load(tmp_path / "node.json") == info
    assert stat.S_IMODE((tmp_path / "node.json").stat().st_mode) == 0o600
    assert NodeInfo.load(tmp_path / "absent.json") is None
