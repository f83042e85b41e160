"""The guest agent's raw TPM commands against a real swtpm (no VM needed), and its
runtime log of PCR 10 judged by the verifier's incremental ``runtime`` check.

The agent runs inside the guest on /dev/tpmrm0; here the same code drives an
swtpm's data channel (its unix socket), and the host side (Registrar, QuoteVerifier) checks
what it produced, exactly as it checks a VM's answers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.agent_wire import recv_frame, send_frame
from attestation.errors import EvidenceFormatError, VerificationError
from attestation.evidence import Evidence
from attestation.ima import (
    AGGREGATE_PCRS,
    BOOT_AGGREGATE,
    IMA_PCR,
    MAX_CHUNK,
    SIG_TEMPLATE,
    RuntimePolicy,
    check_entries,
    make_entry,
    parse_log,
    replay,
)
from attestation.registrar import Registrar
from attestation.revocation import (
    Decision,
    Reinstate,
    RevocationEvent,
    decision_args,
    encode_decision,
)
from attestation.tpm import AK_ATTRIBUTES as HOST_AK_ATTRIBUTES
from attestation.tpm import TpmClient
from attestation.tpm_raw import AK_ATTRIBUTES, AK_HANDLE, Tpm, UnixSocketTransport
from attestation.tpm_types import ObjectAttributes, parse_public
from attestation.verifier import QuoteVerifier
from cryptovm.errors import AuthenticationFailed
from testbed.cluster.agent import AgentClient, TcpTransport
from testbed.cluster.runtime import RuntimeState, check_runtime, explaining_prefix
from testbed.core.paths import ClusterPaths
from testbed.qemu.domain import free_port
from testbed.qemu.guest import agent as guest_agent
from testbed.qemu.guest.agent import MAX_EXECUTED, Agent, boot_aggregate
from testbed.qemu.guest.cryptovm_extension import GuestCryptoVm


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


# --- runtime integrity: the guest's ima-ng log of PCR 10 (docs/runtime.md) ---------------


def _pcr10(agent: Agent) -> bytes:
    return agent.tpm.pcr_read("sha256", [IMA_PCR])[IMA_PCR]


def _log(agent: Agent, offset: int = 0) -> bytes:
    return _b(_call(agent, {"op": "runtime_log", "offset": offset}), "data")


def _measure(agent: Agent, path: str, content: bytes) -> dict[str, Any]:
    return _call(agent, {"op": "runtime_measure", "path": path,
                         "content": base64.b64encode(content).decode()})


def test_runtime_log_starts_with_boot_aggregate_and_the_agents_files(agent: Agent) -> None:
    agent.start_runtime([guest_agent.__file__])
    entries = parse_log(_log(agent)).entries
    assert [e.path for e in entries] == [BOOT_AGGREGATE, guest_agent.__file__]
    pcrs = agent.tpm.pcr_read("sha256", range(10))
    assert entries[0].digest == hashlib.sha256(b"".join(pcrs[i] for i in range(10))).digest()
    with open(guest_agent.__file__, "rb") as f:
        assert entries[1].digest == hashlib.sha256(f.read()).digest()
    assert replay(bytes(32), entries)[-1] == _pcr10(agent)


def test_kernel_boot_aggregate_is_adopted_not_extended_again(agent: Agent) -> None:
    """In a VM the guest kernel's IMA has extended PCR 10 with its ima-sig boot_aggregate
    (Debian's default template) before the agent starts: the log begins with that entry."""
    aggregate = boot_aggregate(agent.tpm.pcr_read("sha256", range(10)))
    kernel = make_entry(aggregate, BOOT_AGGREGATE, 0, SIG_TEMPLATE)
    agent.tpm.pcr_extend(IMA_PCR, "sha256", kernel.template_hash)
    agent.start_runtime([])
    (entry,) = parse_log(_log(agent)).entries
    assert entry == kernel and entry.line().split()[2] == b"ima-sig"
    assert replay(bytes(32), [entry])[-1] == _pcr10(agent)


def test_unexplained_pcr10_fails_the_runtime_check_closed(agent: Agent) -> None:
    agent.tpm.pcr_extend(IMA_PCR, "sha256", bytes(range(32)))  # not a boot_aggregate
    agent.start_runtime([])
    with pytest.raises(VerificationError) as caught:
        explaining_prefix(lambda offset: _log(agent, offset), RuntimeState((0, 0), 0, bytes(32)),
                          _pcr10(agent))
    assert caught.value.check == "runtime"


def test_runtime_measure_is_read_incrementally_and_judged(agent: Agent) -> None:
    agent.start_runtime([guest_agent.__file__])
    start, pcr = len(_log(agent)), _pcr10(agent)
    executed = _measure(agent, "/tmp/payload (copy)", b"unlisted binary")
    assert executed["offset"] == start and executed["path"] == "/tmp/payload (copy)"
    new = _log(agent, start)
    (entry,) = parse_log(new, start).entries
    assert entry.to_dict() == executed and replay(pcr, [entry])[-1] == _pcr10(agent)
    assert _log(agent, start + len(new)) == b""  # at the end: nothing new
    entries, end = explaining_prefix(lambda offset: _log(agent, offset),
                                     RuntimeState((0, 0), start, pcr), _pcr10(agent))
    assert entries == [entry] and end == start + len(new)
    policy = RuntimePolicy("vm-runtime", {guest_agent.__file__: frozenset({b"\0" * 32})})
    with pytest.raises(VerificationError, match=r"'/tmp/payload \(copy\)' is not in runtime"):
        check_entries(policy, entries)


@pytest.mark.parametrize("request_", [
    {"op": "runtime_log", "offset": -1},
    {"op": "runtime_log", "offset": True},
    {"op": "runtime_log", "offset": "0"},
    {"op": "runtime_log", "offset": 1.0},
    {"op": "runtime_log", "offset": 10**40},
    {"op": "runtime_log"},
    {"op": "runtime_log", "offset": 0, "extra": 1},
    {"op": "runtime_measure", "path": "/x\nforged line", "content": ""},
    {"op": "runtime_measure", "path": "", "content": ""},
    {"op": "runtime_measure", "path": "/x\0y", "content": ""},
    {"op": "runtime_measure", "path": "/" + "a" * 4096, "content": ""},
    {"op": "runtime_measure", "path": ["/x"], "content": ""},
    {"op": "runtime_measure", "path": "/x", "content": "not base64!"},
    {"op": "runtime_measure", "path": "/x", "content": "A" * (4 * (MAX_EXECUTED // 3 + 2))},
    {"op": "runtime_measure", "path": "/x"},
    {"op": "runtime_measure", "path": "/x", "content": "", "pcr": 16},
])
def test_hostile_runtime_requests_are_refused_and_measure_nothing(agent: Agent,
                                                                   request_: dict[str, Any]
                                                                   ) -> None:
    agent.start_runtime([])
    log, pcr = _log(agent), _pcr10(agent)
    response = agent.handle(json.dumps(request_).encode())
    assert set(response) == {"error"} and len(response["error"]) < 300, response
    assert _log(agent) == log and _pcr10(agent) == pcr  # refused before PCR 10 moved
    assert "error" not in agent.handle(b'{"op": "status"}')


def test_offset_past_the_end_and_mid_line_offsets(agent: Agent) -> None:
    agent.start_runtime([])
    size = len(_log(agent))
    assert "outside the log" in agent.handle(
        json.dumps({"op": "runtime_log", "offset": size + 1}).encode())["error"]
    with pytest.raises(EvidenceFormatError):  # a lying offset gives no entries, an error
        parse_log(_log(agent, 3) + b"\n", 3)


def test_a_full_log_refuses_before_extending(agent: Agent, monkeypatch: Any) -> None:
    agent.start_runtime([])
    monkeypatch.setattr(guest_agent, "MAX_RUNTIME_LOG", len(_log(agent)) + 200)
    _measure(agent, "/bin/a", b"a")
    log, pcr = _log(agent), _pcr10(agent)
    response = agent.handle(json.dumps({"op": "runtime_measure", "path": "/bin/b",
                                        "content": ""}).encode())
    assert "runtime log is full" in response["error"] and "reboot" in response["error"]
    assert _log(agent) == log and _pcr10(agent) == pcr


def test_large_log_is_served_in_bounded_slices(agent: Agent) -> None:
    agent.start_runtime([])
    path = "/usr/lib/" + "x" * 4000
    for i in range(70):  # ~280 KiB: more than one 256 KiB slice
        _measure(agent, f"{path}{i}", b"%d" % i)
    first = _log(agent)
    assert len(first) == MAX_CHUNK
    chunk = parse_log(first)
    rest = parse_log(_log(agent, chunk.end), chunk.end)
    entries = [*chunk.entries, *rest.entries]
    assert len(entries) == 71 and replay(bytes(32), entries)[-1] == _pcr10(agent)


@contextlib.contextmanager
def _serving(agent: Agent) -> Iterator[AgentClient]:
    """The agent served over TCP, and the host's client for it."""
    ports: list[int] = []
    ready = threading.Event()
    server = threading.Thread(target=guest_agent.serve, args=(agent, "127.0.0.1", 0),
                              kwargs={"listening": lambda p: (ports.append(p), ready.set())},
                              daemon=True)
    server.start()
    try:
        assert ready.wait(10)
        yield AgentClient(TcpTransport(ports[0]), node="vm0", timeout=10)
    finally:
        agent.stopping.set()
        server.join(5)


def test_runtime_check_over_tcp_with_the_host_client(agent: Agent, tmp_path: Path) -> None:
    """The verifier's `runtime` check (testbed/cluster/runtime.py) against the guest agent
    served over TCP: the baseline passes, an unlisted binary fails, naming it."""
    agent.start_runtime([guest_agent.__file__])
    with open(guest_agent.__file__, "rb") as f:
        policy = RuntimePolicy("vm0-runtime", {guest_agent.__file__: frozenset(
            {hashlib.sha256(f.read()).digest()})})
    with _serving(agent) as client:
        paths = ClusterPaths(tmp_path, "lab")

        def attest() -> str:
            evidence = client.quote(os.urandom(32), [*AGGREGATE_PCRS, IMA_PCR])
            return check_runtime(paths, "vm0", client, evidence, policy)

        assert "2 new ima-ng entries" in attest()
        assert "0 new ima-ng entries" in attest()  # incremental: nothing new
        _measure(agent, "/usr/local/bin/cryptominer", b"miner")
        for _ in range(2):  # the offending entry stays in the window
            with pytest.raises(VerificationError, match="cryptominer") as caught:
                attest()
            assert caught.value.check == "runtime"


def test_boot_aggregate_is_recomputed_from_the_quoted_pcrs(agent: Agent, tmp_path: Path
                                                           ) -> None:
    """The verifier recomputes the log's boot_aggregate from the quoted PCRs 0-9: a quote
    without them fails closed, PCRs that moved after the aggregate (or a log that lies
    about them) fail, and so does a second boot_aggregate later in the log."""
    for pcr in (0, 4, 8, 9):  # a boot measured into them (firmware, kernel, initrd)
        agent.tpm.pcr_extend(pcr, "sha256", hashlib.sha256(b"boot %d" % pcr).digest())
    agent.start_runtime([])
    policy = RuntimePolicy("vm0-runtime")
    everything = [*AGGREGATE_PCRS, IMA_PCR]
    with _serving(agent) as client:
        def attest(pcrs: list[int], state: str) -> str:
            evidence = client.quote(os.urandom(32), pcrs)
            return check_runtime(ClusterPaths(tmp_path, state), "vm0", client, evidence,
                                 policy)

        with pytest.raises(VerificationError, match=r"does not cover PCRs 8, 9 \(quote") \
                as caught:
            attest([0, 1, 2, 3, 4, 5, 6, 7, IMA_PCR], "a")
        assert caught.value.check == "runtime" and caught.value.data["missing_pcrs"] == [8, 9]
        assert attest(everything, "a").startswith("1 new ima-ng entries")

        agent.tpm.pcr_extend(4, "sha256", bytes(32))  # PCR 4 is not what was aggregated
        with pytest.raises(VerificationError, match="does not match the quoted PCRs 0-9") \
                as caught:
            attest(everything, "b")  # a verifier that judges this boot's log from its start
        assert caught.value.data["entry"]["offset"] == 0

        with agent.tpm.lock:  # a file named boot_aggregate, with the aggregate's digest
            agent._measure(boot_aggregate(agent.tpm.pcr_read("sha256", AGGREGATE_PCRS)),
                           BOOT_AGGREGATE)
        with pytest.raises(VerificationError, match="only as the log's first line"):
            attest(everything, "a")


def test_the_guest_agent_imports_with_the_standard_library_only() -> None:
    """As the guest runs it (a script beside ``attestation``): no PyYAML, cryptography,
    pyOpenSSL or tpm2-pytss needed by the agent itself (extensions are optional)."""
    repo = Path(__file__).resolve().parents[1]
    code = ("import runpy, sys\n"
            "for name in ('yaml', 'cryptography', 'OpenSSL', 'tpm2_pytss'):\n"
            "    sys.modules[name] = None\n"
            "sys.argv = ['guest_agent.py', '--help']\n"
            "runpy.run_path('testbed/qemu/guest/agent.py', run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert run.returncode == 0 and "--tpm" in run.stdout, run.stderr[-2000:]


def test_an_unreadable_agent_file_leaves_a_consistent_log(agent: Agent, tmp_path: Path) -> None:
    """main() reports the error and serves on; what was measured still replays."""
    with pytest.raises(OSError):
        agent.start_runtime([str(tmp_path / "missing.py")])
    entries = parse_log(_log(agent)).entries
    assert [e.path for e in entries] == [BOOT_AGGREGATE]
    assert replay(bytes(32), entries)[-1] == _pcr10(agent)


# --- revocation: the verifier's signed decisions, verified as on sim nodes ------------------


def _signed(key: Ed25519PrivateKey, decision: Decision) -> dict[str, Any]:
    return decision_args(decision, key.sign(encode_decision(decision)))


def _decide(agent: Agent, key: Ed25519PrivateKey, decision: Decision) -> dict[str, Any]:
    return agent.handle(json.dumps({"op": "role", "action": decision.kind,
                                    "args": _signed(key, decision)}).encode())


def _pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo
                                         ).decode()


def test_forged_replayed_and_stale_decisions_are_refused_by_name(agent: Agent) -> None:
    verifier, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    first = RevocationEvent("client", "runtime", "ran /tmp/x", "t1", 5)
    assert "no verifier key" in _decide(agent, verifier, first)["error"]

    assert _call(agent, {"op": "revocation_key", "public_key": _pem(verifier)})["pinned"]
    assert "another verifier key is pinned" in agent.handle(json.dumps(
        {"op": "revocation_key", "public_key": _pem(other)}).encode())["error"]
    forged = _decide(agent, other, first)
    assert forged["error"] == ("revocation: the decision is not signed by the cluster's "
                               "verifier key")
    sent_as = agent.handle(json.dumps({"op": "role", "action": "reinstated",
                                       "args": _signed(verifier, first)}).encode())
    assert sent_as["error"].startswith("revocation: a revoked decision sent as")
    assert not agent.revocations.is_revoked("client")

    applied = _decide(agent, verifier, first)
    assert applied["applied"] and applied["sequence"] == 5 and applied["effects"] == {}
    assert agent.revocations.is_revoked("client")
    replayed = _decide(agent, verifier, first)
    assert not replayed["applied"] and replayed["refused"].startswith("replay:")
    stale = _decide(agent, verifier, Reinstate("client", "old decision", "t0", 3))
    assert not stale["applied"] and stale["refused"].startswith("stale:")
    assert agent.revocations.is_revoked("client")  # neither changed anything


@pytest.mark.parametrize("request_", [
    {"op": "role", "action": "connect", "args": {}},
    {"op": "role", "action": "revoked", "args": []},
    {"op": "role", "action": "revoked", "args": {"decision": "!!", "signature": ""}},
    {"op": "role", "action": "revoked", "args": {"decision": "e30=", "signature": "AA==",
                                                 "extra": 1}},
    {"op": "role", "action": "revoked", "args": {}, "more": 1},
    {"op": "revocation_key", "public_key": "x" * 5000},
    {"op": "revocation_key", "public_key": 7},
])
def test_hostile_revocation_requests_get_one_error(agent: Agent,
                                                   request_: dict[str, Any]) -> None:
    answer = agent.handle(json.dumps(request_).encode())
    assert set(answer) == {"error"} and len(answer["error"]) < 300, answer
    assert agent.revocations.sequence == 0 and not agent.revocations.revoked


def test_guest_cryptovm_refuses_a_revoked_node_until_reinstated(agent: Agent,
                                                                 tmp_path: Path) -> None:
    cvm = GuestCryptoVm(lambda: None, agent.tpm, state_dir=tmp_path / "cvm" / "state",
                        host="127.0.0.1", port=free_port(), revocations=agent.revocations)
    agent.revocation_listeners["cryptovm"] = cvm
    verifier = Ed25519PrivateKey.generate()
    _call(agent, {"op": "revocation_key", "public_key": _pem(verifier)})
    started = cvm.start({"pcrs": "sha256:0-9"})
    try:
        vm = cvm._vm
        assert started["started"] and vm is not None
        vm.attested_session("client")  # the node's earlier attested contact: its account

        answer = _decide(agent, verifier, RevocationEvent("client", "runtime", "x", "t", 1))
        assert answer["effects"]["cryptovm"] == {"account_disabled": True, "running": True}
        with pytest.raises(AuthenticationFailed, match="disabled"):
            vm.attested_session("client")  # no release, enrollment or login any more
        vm.attested_session("server")  # the others are served

        answer = _decide(agent, verifier, Reinstate("client", "re-imaged", "t", 2))
        assert answer["effects"]["cryptovm"] == {"account_enabled": True}
        vm.attested_session("client")
    finally:
        if cvm._server is not None:
            cvm._server.stop()
        if cvm._vm is not None:
            cvm._vm.close()
