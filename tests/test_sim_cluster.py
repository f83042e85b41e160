"""The sim backend end to end: real node processes, real swtpms, the real CLI handlers.

One module-scoped cluster (verifier, server, and a client booted with a tampered
kernel command line) carries the main flow: up -> status -> attest -> replay ->
hostile agent frames -> idempotent up -> swtpm death -> down. Two more small
clusters cover a CLI killed in the middle of `up` and a node that fails to start.
Processes are checked in /proc, never trusted from pid files alone.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from attestation.agent_wire import MAX_FRAME, recv_frame
from attestation.eventlog import parse_event_log
from attestation.evidence import Evidence
from attestation.policy import policy_from_evidence
from attestation.report import VerificationReport
from testbed.cluster.agent import (
    AgentClient,
    AgentError,
    AgentUnavailable,
    UnixTransport,
    connect_unix,
)
from testbed.cluster.state import load_node_policy
from testbed.cluster.verification import verify_evidence
from testbed.core.paths import ClusterPaths
from testbed.core.processes import process_argv
from testbed.sim.agent_server import MAX_CONNECTIONS
from testbed.sim.backend import SimBackend
from testbed.sim.processes import cluster_processes
from testbed.spec.cluster_spec import default_spec_path, load_cluster_spec
from testbed.tpm.boot import SIM_PCRS, predicted_policy
from tests.sim_lab import run_cli

CLUSTER = "trusted-passages-lab"
TAMPERED_CMDLINE = "console=ttyS0 ro quiet init=/bin/sh"
TAMPER = f"client=cmdline:{TAMPERED_CMDLINE}"
CHECKS = ["structure", "ak_attributes", "ak_trust", "signature_algorithm", "signature", "magic",
          "attestation_type", "qualifying_data", "pcr_selection", "pcr_digest", "clock",
          "event_log", "policy", "runtime"]


def alive(pid: int) -> bool:
    return process_argv(pid) is not None


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Lab:
    workdir: Path
    paths: ClusterPaths
    seen_pids: set[int] = field(default_factory=set)

    def node_status(self) -> dict[str, dict[str, Any]]:
        rc, out, err = run_cli(self.workdir, "status", "--json")
        assert rc == 0, err
        nodes = {n["name"]: n for n in json.loads(out)["nodes"]}
        for n in nodes.values():
            self.seen_pids.update(p for p in (n["pid"], n["swtpm_pid"]) if p)
        return nodes

    def agent(self, node: str) -> AgentClient:
        return AgentClient(UnixTransport(self.paths.node(node).socket), node=node)

    def verify(self, node: str, evidence: Evidence, nonce: bytes) -> VerificationReport:
        return verify_evidence(self.paths, node, evidence, nonce,
                               load_node_policy(self.paths, node))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("lab")
    rc, out, err = run_cli(workdir, "up", "--json", "--tamper", TAMPER)
    lab = Lab(workdir, ClusterPaths(workdir, CLUSTER))
    try:
        # Every node up and registered (not 4); the tampered client rejected by its
        # attestation, so `up` exits 1 and names the check, as on the qemu backend.
        assert rc == 1, f"up failed: {out}\n{err}"
        result = json.loads(out)
        assert result["ok"] and result["rejected"] == ["client"], out
        client = next(n for n in result["nodes"] if n["name"] == "client")
        assert client["attested"] is False and client["failed_check"] == "policy"
        assert "node client was rejected by its attestation" in err
        yield lab
    finally:
        run_cli(workdir, "down")  # safety net; test_down checks the real thing
        assert cluster_processes(lab.paths) == []


# --- the main flow (tests run in file order on the shared cluster) ----------------------------


def test_up_brings_every_node_up_with_its_own_tpm(lab: Lab) -> None:
    nodes = lab.node_status()
    assert list(nodes) == ["verifier", "server", "client", "cryptovm"]
    assert all(n["state"] == "running" for n in nodes.values())
    pids = [n["pid"] for n in nodes.values()] + [n["swtpm_pid"] for n in nodes.values()]
    assert len(set(pids)) == 8 and all(alive(p) for p in pids)
    found = {(p.kind, p.node): p.pid for p in cluster_processes(lab.paths)}
    assert found == {**{("node", k): v["pid"] for k, v in nodes.items()},
                     **{("swtpm", k): v["swtpm_pid"] for k, v in nodes.items()}}
    assert nodes["client"]["tampered"] == ["cmdline"] and nodes["server"]["tampered"] == []
    assert nodes["server"]["service"]["endpoints"][0]["host"] == "127.0.0.1"
    assert nodes["server"]["service"]["facts"]["profile"] == "tp13"
    assert nodes["verifier"]["service"]["kind"] == "none"
    assert nodes["cryptovm"]["service"]["kind"] == "cryptovm"
    registry = json.loads(lab.paths.registry.read_text())
    assert sorted(registry) == ["client", "cryptovm", "server", "verifier"]
    assert mode(lab.paths.registry) == 0o600 and mode(lab.paths.root) == 0o700
    assert mode(lab.paths.node("server").socket) == 0o600
    info = json.loads(lab.paths.node("client").info.read_text())
    assert info["state"] == "ready" and info["boot"]["cmdline"] == TAMPERED_CMDLINE
    assert lab.paths.policy("client").is_file()


def test_status_table_names_every_node(lab: Lab) -> None:
    rc, out, _ = run_cli(lab.workdir, "status")
    assert rc == 0
    for node in ("verifier", "server", "client"):
        assert any(line.split()[:1] == [node] and "running" in line for line in out.splitlines())
    assert "TAMPERED boot (cmdline" in out


def test_attest_server_is_accepted_with_every_check_named(lab: Lab) -> None:
    rc, out, err = run_cli(lab.workdir, "attest", "server", "--json")
    assert rc == 0, out + err
    result = json.loads(out)
    assert result["ok"] and result["policy"] == "server-predicted"
    assert [c["check"] for c in result["checks"]] == CHECKS
    assert all(c["state"] == "passed" for c in result["checks"])
    rc, out, _ = run_cli(lab.workdir, "attest", "server")
    assert rc == 0 and "ACCEPTED" in out and "[ok  ] policy" in out
    last = lab.node_status()["server"]["last_attestation"]
    assert last["ok"] is True and last["time"]


def test_attest_writes_the_evidence_for_tpm2_tools_and_eventlog(lab: Lab, tmp_path: Path) -> None:
    out_dir = tmp_path / "evidence"
    rc, out, err = run_cli(lab.workdir, "attest", "server", "-o", str(out_dir), "--json")
    assert rc == 0, err
    written = {Path(p).name for p in json.loads(out)["written"]}
    assert {"quote.msg", "quote.sig", "quote.pcrs", "ak.pem", "evidence.json", "eventlog.bin",
            "nonce.hex"} <= written
    nonce = (out_dir / "nonce.hex").read_text().strip()
    check = subprocess.run(
        ["tpm2_checkquote", "-u", str(out_dir / "ak.pem"), "-m", str(out_dir / "quote.msg"),
         "-s", str(out_dir / "quote.sig"), "-f", str(out_dir / "quote.pcrs"), "-g", "sha256",
         "-q", nonce], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    rc, out, err = run_cli(lab.workdir, "eventlog", str(out_dir / "eventlog.bin"), "--json")
    assert rc == 0, err
    rc, _, err = run_cli(lab.workdir, "attest", "server", "-o", str(out_dir))
    assert rc == 3 and "--force" in err  # an earlier attestation is not replaced silently
    rc, _, err = run_cli(lab.workdir, "attest", "server", "-o", str(out_dir), "--force")
    assert rc == 0, err


def test_attest_tampered_client_is_rejected_at_the_command_line_event(lab: Lab) -> None:
    rc, out, _ = run_cli(lab.workdir, "attest", "client", "--json")
    assert rc == 1
    result = json.loads(out)
    assert result["failed_check"] == "policy"
    detail = next(c["detail"] for c in result["checks"] if c["check"] == "policy")
    assert "PCR 9: event 1 (kernel command line" in detail
    assert all(c["state"] == "passed" for c in result["checks"]
               if c["check"] not in ("policy", "runtime"))
    assert result["checks"][-1] == {"check": "runtime", "state": "skipped",
                                    "detail": "not run: an earlier check failed"}
    rc, out, _ = run_cli(lab.workdir, "attest", "client")
    assert rc == 1 and "REJECTED (check 'policy' failed)" in out
    assert lab.node_status()["client"]["last_attestation"]["failed_check"] == "policy"


def test_predicted_policy_equals_what_a_real_node_quotes(lab: Lab) -> None:
    evidence = lab.agent("server").quote(os.urandom(32), SIM_PCRS.indices)
    assert evidence.event_log is not None
    observed = policy_from_evidence(evidence.pcrs, parse_event_log(evidence.event_log), name="x")
    boot = load_cluster_spec(default_spec_path()).node("server").boot
    predicted = predicted_policy("server", boot)
    assert observed.pcrs == predicted.pcrs
    assert [(e.pcr, e.event_type, e.digest) for e in observed.events] == [
        (e.pcr, e.event_type, e.digest) for e in predicted.events]


def test_replay_is_caught_across_invocations(lab: Lab) -> None:
    """Each verify_evidence call loads and saves the history, as separate CLI runs do."""
    nonce = os.urandom(32)
    evidence = lab.agent("server").quote(nonce, SIM_PCRS.indices)
    first = lab.verify("server", evidence, nonce)
    assert first.ok, first.to_dict()
    replayed = lab.verify("server", evidence, nonce)
    assert replayed.failure is not None and replayed.failure.name == "clock"
    assert "replay" in replayed.failure.detail
    histories = list(lab.paths.clock_history_dir.glob("*.json"))  # a file per AK
    assert histories and all(mode(path) == 0o600 for path in histories)
    # Evidence from one node is refused for another (cuckoo), whatever the nonce.
    relayed = lab.verify("verifier", evidence, nonce)
    assert relayed.failure is not None and relayed.failure.name == "ak_trust"
    rc, out, _ = run_cli(lab.workdir, "attest", "server")  # fresh quotes still pass
    assert rc == 0 and "clock advanced" in out


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _connect(path: Path) -> socket.socket:
    return connect_unix(path, timeout=10)


def _ask(sock: socket.socket, payload: bytes) -> dict[str, Any]:
    sock.sendall(_frame(payload))
    body = recv_frame(sock)
    assert body is not None
    response = json.loads(body)
    assert isinstance(response, dict)
    return response


HOSTILE = [
    (b"not json{", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "not JSON"),
    (b'{"op": "reboot"}', "unknown op"),
    (b'{"op": ["status"]}', "unknown op"),
    (b'{"op": "status", "debug": true}', "unknown keys"),
    (b'{"op": "quote", "nonce": "zz", "pcrs": [0]}', "not hexadecimal"),
    (b'{"op": "quote", "nonce": "00", "pcrs": [99]}', "0..23"),
    (b'{"op": "quote", "nonce": "00", "pcrs": [true]}', "0..23"),
    (b'{"op": "quote", "nonce": "' + b"00" * 65 + b'", "pcrs": [0]}', "at most 64"),
    (b'{"op": "quote", "nonce": "00"}', "pcrs: expected"),
    (b'{"op": "activate", "credential_blob": "!!", "encrypted_secret": ""}', "base64"),
    (json.dumps({"op": "activate", "credential_blob": base64.b64encode(os.urandom(64)).decode(),
                 "encrypted_secret": base64.b64encode(os.urandom(256)).decode()}).encode(),
     "ActivateCredential"),
]


def test_agent_survives_hostile_frames(lab: Lab) -> None:
    path = lab.paths.node("server").socket
    with _connect(path) as sock:  # bad requests keep the connection usable
        for payload, message in HOSTILE:
            response = _ask(sock, payload)
            assert message in response.get("error", ""), (payload[:60], response)
        assert _ask(sock, b'{"op": "status"}')["node"] == "server"
    with _connect(path) as sock:  # oversized: answered, then the connection is closed
        sock.sendall(struct.pack(">I", MAX_FRAME + 1) + b"{")
        body = recv_frame(sock)
        assert body is not None and "exceeds" in json.loads(body)["error"]
        with contextlib.suppress(ConnectionResetError):  # reset: the body was never read
            assert sock.recv(1) == b""
    for garbage in (struct.pack(">I", 100) + b"{truncated", b"\xff\xff"):
        with _connect(path) as sock:
            sock.sendall(garbage)
    idle = [_connect(path) for _ in range(MAX_CONNECTIONS + 4)]
    try:  # idle connections fill the slots: a genuine request evicts the longest idle
        assert _status_error(path) == ""
    finally:
        for sock in idle:
            sock.close()
    rc, _, _ = run_cli(lab.workdir, "attest", "server")
    assert rc == 0  # the TPM was left clean by the failed activation


def _status_error(path: Path) -> str:
    try:
        AgentClient(UnixTransport(path), node="server").status()
    except (AgentError, AgentUnavailable) as exc:
        return str(exc)
    return ""


def test_up_twice_leaves_running_nodes_alone(lab: Lab) -> None:
    before = lab.node_status()
    rc, out, err = run_cli(lab.workdir, "up", "--json", "--tamper", TAMPER)
    assert rc == 1, err  # the tampered client is still rejected
    result = json.loads(out)
    assert [n["action"] for n in result["nodes"]] == ["kept"] * 4
    assert all(n["registered"] for n in result["nodes"])
    assert {k: v["pid"] for k, v in lab.node_status().items()} == {
        k: v["pid"] for k, v in before.items()}
    # Without --tamper the client keeps what it booted, and `up` says so.
    rc, out, _ = run_cli(lab.workdir, "up", "--json")
    client = json.loads(out)["nodes"][2]
    assert rc == 1 and client["action"] == "kept" and "another boot chain" in client["note"]
    assert lab.node_status()["client"]["tampered"] == ["cmdline"]


def test_node_stops_when_its_swtpm_dies_and_up_restarts_it(lab: Lab) -> None:
    old = lab.node_status()["verifier"]
    os.kill(old["swtpm_pid"], signal.SIGKILL)
    assert wait_until(lambda: not alive(old["pid"]), timeout=5)
    info = json.loads(lab.paths.node("verifier").info.read_text())
    assert info["state"] == "failed" and "swtpm exited" in info["error"]
    status = lab.node_status()["verifier"]
    assert status["state"] == "failed" and "swtpm exited" in status["reason"]
    rc, out, err = run_cli(lab.workdir, "up", "--json", "--tamper", TAMPER)
    assert rc == 1, err
    assert [n["action"] for n in json.loads(out)["nodes"]] == ["started", "kept", "kept", "kept"]
    new = lab.node_status()["verifier"]
    assert new["state"] == "running" and new["pid"] != old["pid"]
    rc, out, _ = run_cli(lab.workdir, "attest", "verifier")
    assert rc == 0, out  # same TPM state, same AK: still registered


def test_a_stopped_swtpm_is_found_within_5_s_and_attest_fails_fast(lab: Lab) -> None:
    server = lab.node_status()["server"]
    os.kill(server["swtpm_pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        status = lab.node_status()["server"]
        assert time.monotonic() - started < 5
        assert status["state"] == "unresponsive", status
        assert f"swtpm process {server['swtpm_pid']} is stopped" in status["reason"]
        rc, out, err = run_cli(lab.workdir, "status")
        assert "reason: its swtpm process" in out
        started = time.monotonic()
        rc, _, err = run_cli(lab.workdir, "attest", "server")
        assert rc == 4 and "is unresponsive" in err and time.monotonic() - started < 5
    finally:
        os.kill(server["swtpm_pid"], signal.SIGCONT)
    assert lab.node_status()["server"]["state"] == "running"


def test_a_node_killed_with_sigkill_is_crashed_not_stopped(lab: Lab) -> None:
    server = lab.node_status()["server"]
    os.kill(server["pid"], signal.SIGKILL)
    assert wait_until(lambda: not alive(server["pid"]), 5)
    status = lab.node_status()["server"]
    assert status["state"] == "crashed" and "without a clean stop" in status["reason"]
    rc, _, err = run_cli(lab.workdir, "attest", "server")
    assert rc == 4 and "crashed" in err
    rc, _, err = run_cli(lab.workdir, "up", "--json", "--tamper", TAMPER)
    assert rc == 1, err
    assert lab.node_status()["server"]["state"] == "running"
    assert not alive(server["swtpm_pid"])  # the restart stopped the orphaned swtpm


def test_services_are_objects_in_json(lab: Lab) -> None:
    nodes = lab.node_status()
    service = nodes["server"]["service"]
    assert service["kind"] == "trusted-passages"
    assert service["endpoints"][0]["protocol"] == "trusted-passages"
    assert isinstance(service["endpoints"][0]["port"], int)
    assert isinstance(service["counts"]["channels"], int)
    cryptovm = next(n for n in nodes.values() if n["role"] == "cryptovm")["service"]
    assert {e["protocol"] for e in cryptovm["endpoints"]} == {"cvm1", "trusted-passages"}
    assert isinstance(cryptovm["counts"]["keys"], int)


def test_sigterm_stops_a_node_and_its_swtpm(lab: Lab) -> None:
    client = lab.node_status()["client"]
    os.kill(client["pid"], signal.SIGTERM)
    assert wait_until(lambda: not alive(client["pid"]) and not alive(client["swtpm_pid"]), 5)
    assert json.loads(lab.paths.node("client").info.read_text())["state"] == "stopped"
    assert lab.node_status()["client"]["state"] == "stopped"


def test_down_leaves_no_process_and_keeps_only_tpm_state(lab: Lab) -> None:
    lab.node_status()
    assert lab.seen_pids
    rc, out, err = run_cli(lab.workdir, "down", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["ok"] and result["leftover_pids"] == []
    assert {n["name"]: n["stopped_by"] for n in result["nodes"]} == {
        "client": None, "server": "agent", "verifier": "agent", "cryptovm": "agent"}
    assert [p for p in lab.seen_pids if alive(p)] == []
    assert cluster_processes(lab.paths) == []
    for node in ("verifier", "server", "client", "cryptovm"):
        assert not lab.paths.node(node).run.exists()
        assert (lab.paths.node(node).state / "tpm2-00.permall").is_file()
    assert {n["state"] for n in lab.node_status().values()} == {"down"}
    rc, out, _ = run_cli(lab.workdir, "down")
    assert rc == 0 and "was not running" in out


# --- separate small clusters ---------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A work dir whose clusters are brought down at teardown, even if the test failed."""
    path = tmp_path / "w"
    yield path
    for cluster in sorted((path / "clusters").glob("*")):
        assert SimBackend(ClusterPaths(path, cluster.name)).down(purge=False).ok


def two_node_spec(directory: Path, name: str) -> Path:
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["name"] = name
    doc["nodes"] = [dict(doc["nodes"][0], name="good", role="generic"),
                    dict(doc["nodes"][1], name="bad", role="generic")]
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_killed_mid_up_then_down_cleans_up(workdir: Path, tmp_path: Path) -> None:
    spec = two_node_spec(tmp_path, "crash")
    paths = ClusterPaths(workdir, "crash")
    cli = subprocess.Popen([sys.executable, "-m", "testbed.cli.main", "--workdir",
                            str(workdir), "up", str(spec)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_files = [paths.node(n).pid_file for n in ("good", "bad")]
    try:
        assert wait_until(lambda: all(f.exists() for f in pid_files))
    finally:
        cli.kill()
        cli.wait()
    nodes = [int(f.read_text()) for f in pid_files]
    assert all(alive(p) for p in nodes)  # detached: they outlive the CLI
    assert wait_until(lambda: len(cluster_processes(paths)) == 4)  # and start their swtpms
    everything = [p.pid for p in cluster_processes(paths)]
    rc, out, err = run_cli(workdir, "down", "--cluster", "crash")
    assert rc == 0, out + err
    assert [p for p in everything if alive(p)] == [] and cluster_processes(paths) == []


def test_failed_node_is_reported_with_its_log(workdir: Path, tmp_path: Path) -> None:
    spec = two_node_spec(tmp_path, "broken")
    paths = ClusterPaths(workdir, "broken")
    paths.node("bad").root.mkdir(parents=True)
    paths.node("bad").state.write_text("not a TPM state directory")
    rc, _, err = run_cli(workdir, "up", str(spec))
    assert rc == 4
    assert "node bad failed" in err and "is not a directory" in err
    assert str(paths.node("bad").log) in err
    nodes = {n["name"]: n for n in json.loads(run_cli(workdir, "status", "--json")[1])["nodes"]}
    assert nodes["good"]["state"] == "running" and nodes["bad"]["state"] == "failed"
    rc, _, err = run_cli(workdir, "attest", "ghost")
    assert rc == 3 and "no node named 'ghost'" in err
    running = [p.pid for p in cluster_processes(paths)]
    assert len(running) == 2  # the good node and its swtpm
    shutil.rmtree(paths.root)  # pid files gone too: down still finds them in /proc
    rc, out, _ = run_cli(workdir, "down", "--cluster", "broken")
    assert rc == 0 and "good: stopped (SIGTERM)" in out
    assert [p for p in running if alive(p)] == [] and cluster_processes(paths) == []


def test_commands_without_a_cluster(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "status")[0] == 0
    assert run_cli(tmp_path, "down")[0] == 0
    rc, _, err = run_cli(tmp_path, "attest", "server")
    assert rc == 3 and "testbed up" in err
    rc, _, err = run_cli(tmp_path, "status", "--cluster", "nosuch")
    assert rc == 3 and "no cluster 'nosuch'" in err
    rc, _, err = run_cli(tmp_path, "down", "--cluster", "../../etc")
    assert rc == 2 and "invalid cluster name" in err
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["backend"] = "qemu"
    spec = tmp_path / "qemu.yaml"
    spec.write_text(yaml.safe_dump(doc))
    rc, _, err = run_cli(tmp_path, "up", str(spec))  # sim boot chains mean nothing to qemu
    assert rc == 3 and "boots the guest image's own firmware" in err
    rc, _, err = run_cli(tmp_path, "up", "--tamper", "nobody=cmdline:x")
    assert rc == 3 and "no node named 'nobody'" in err
