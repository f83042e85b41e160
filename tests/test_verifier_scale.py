"""Scale: a swarm of sim nodes (many nodes' agents in one process, each node with its own
swtpm, EK and AK) under one verifier.

One module-scoped cluster of 34 swarm nodes (more than the 32 a spec's node entries may
hold), all hosted by one process, their TPMs provisioned several at once, each with its
own EK certificate: the detached verifier (the real CLI) attests them
all; a runtime tamper of one is detected while its siblings stay trusted; hostile
frames on one node's agent socket get the usual one-line errors and harm no sibling;
the per-AK clock history still catches a replayed and an older quote (and reads the
older one-file layout), and the service's clock histories in its database survive a
SIGKILL mid-tick and still catch an older quote, a failed commit publishes nothing; an
agent
``shutdown`` stops that node only. The spec's ``swarm:`` field is checked on its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.agent_wire import recv_frame
from attestation.tpm_types import parse_public
from testbed.cluster.agent import AgentClient, UnixTransport, connect_unix
from testbed.cluster.state import load_node_policy, read_attestations
from testbed.cluster.verification import verify_evidence
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.core.processes import process_argv
from testbed.sim.processes import AGENTS_PER_PROCESS, cluster_processes
from testbed.spec.cluster_spec import (
    MAX_NODES,
    MAX_SWARM_NODES,
    ClusterSpecError,
    default_spec_path,
    dump_cluster_spec,
    parse_cluster_spec,
    parse_tamper,
)
from testbed.tpm.boot import SIM_PCRS
from testbed.tpm.localca import LocalCA
from testbed.verifier.clocks import ClockRow, StoreClocks
from testbed.verifier.service import (
    VerifierConfig,
    VerifierService,
    start_verifier,
    stop_verifiers,
)
from testbed.verifier.store import SQLITE, Event, Outcome, Store, StoreError, open_store
from tests.sim_lab import run_cli

CLUSTER = "swarm-lab"
SWARM = 34  # more than a spec's 32 node entries; each TPM is provisioned (~0.7 s)
NODES = [f"w-{i:03d}" for i in range(SWARM)]
INTERVAL = 1.0


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def swarm_doc(count: int, **fields: Any) -> dict[str, Any]:
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["name"] = CLUSTER
    doc["nodes"] = [dict(doc["nodes"][0], name="w", role="generic", swarm=count, **fields)]
    return doc


@dataclass
class Lab:
    workdir: Path
    paths: ClusterPaths
    up: dict[str, Any]

    def agent(self, node: str) -> AgentClient:
        return AgentClient(UnixTransport(self.paths.node(node).socket), node=node)

    def states(self) -> dict[str, str]:
        store = open_store(str(self.paths.root / "verifier" / "verifier.db"))
        try:
            return {row.node: row.state for row in store.nodes()}
        finally:
            store.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    top = tmp_path_factory.mktemp("swarm")
    spec = top / "spec.yaml"
    spec.write_text(yaml.safe_dump(swarm_doc(SWARM)))
    workdir = top / "w"
    rc, out, err = run_cli(workdir, "up", "--json", str(spec))
    paths = ClusterPaths(workdir, CLUSTER)
    try:
        assert rc == 0, out[-3000:] + err[-3000:]
        yield Lab(workdir, paths, json.loads(out))
    finally:
        run_cli(workdir, "verifier", "stop")
        rc, out, _ = run_cli(workdir, "down", "--json")
        assert rc == 0 and json.loads(out)["leftovers"] == [], out
        assert cluster_processes(paths) == []


# --- the main flow (tests run in file order on the shared cluster) ----------------------------


def test_swarm_hosts_34_nodes_in_one_process_each_with_its_own_tpm(lab: Lab) -> None:
    nodes = lab.up["nodes"]
    assert [n["name"] for n in nodes] == NODES and SWARM > MAX_NODES
    assert all(n["action"] == "started" and n["attested"] for n in nodes)
    assert len({n["pid"] for n in nodes}) == 1  # one process for all the agents
    assert len({n["swtpm_pid"] for n in nodes}) == SWARM  # a swtpm each
    argv = process_argv(nodes[0]["pid"])
    assert argv is not None and argv[2] == "testbed.sim.swarm"
    rc, out, err = run_cli(lab.workdir, "status", "--json")
    assert rc == 0, err
    status = json.loads(out)["nodes"]
    assert {n["state"] for n in status} == {"running"} and len(status) == SWARM
    identities = [lab.agent(n).identity() for n in NODES]
    assert len({i.ek_certificate for i in identities}) == SWARM  # own EK certificates
    assert len({i.ak_public for i in identities}) == SWARM  # own AKs
    assert set(read_attestations(lab.paths)) == set(NODES)
    assert {p.kind for p in cluster_processes(lab.paths)} == {"swarm", "swtpm"}


def test_concurrently_provisioned_tpms_each_have_their_own_ek_certificate(lab: Lab) -> None:
    """The swarm's TPMs were made several at once (the CA lock shared around swtpm_setup,
    swtpm_localca serialising each issuance): every EK certificate is the node's own
    (its own serial and key) and signed by the cluster's CA."""
    root, intermediate = LocalCA(lab.paths.ca_dir).ca_bundle()
    certificates = [x509.load_der_x509_certificate(lab.agent(n).identity().ek_certificate)
                    for n in NODES]
    assert len({c.serial_number for c in certificates}) == SWARM
    assert len({c.public_key().public_numbers() for c in certificates}) == SWARM
    for certificate in certificates:
        assert certificate.issuer == intermediate.subject
        certificate.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    assert stat.S_IMODE(lab.paths.ca_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600
               for f in lab.paths.ca_dir.iterdir() if f.is_file())

def test_verifier_attests_every_swarm_node_and_catches_a_runtime_tamper(lab: Lab) -> None:
    rc, out, err = run_cli(lab.workdir, "verifier", "start", "--interval", str(INTERVAL),
                           "--json")
    assert rc == 0, out + err
    wait_until(lambda: set(lab.states().values()) == {"trusted"} and len(lab.states()) == SWARM)
    rc, _, err = run_cli(lab.workdir, "tamper", "w-007", "--runtime", "/tmp/unlisted-tool")
    assert rc == 0, err
    tampered_at = time.time()
    wait_until(lambda: lab.states()["w-007"] == "rejected", timeout=4 * INTERVAL + 5)
    detected = time.time() - tampered_at
    assert detected < 3 * INTERVAL + 2, detected
    time.sleep(INTERVAL * 1.5)  # every sibling attested again after the tamper
    states = lab.states()
    assert states.pop("w-007") == "rejected"
    assert set(states.values()) == {"trusted"}, states
    store = open_store(str(lab.paths.root / "verifier" / "verifier.db"))
    try:
        rows = {row.node: row for row in store.nodes()}
    finally:
        store.close()
    assert rows["w-007"].last_check == "runtime" and "unlisted-tool" in rows["w-007"].last_reason
    assert all(rows[n].last_time > tampered_at for n in NODES)


def _ask(sock: socket.socket, payload: bytes) -> dict[str, Any]:
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    body = recv_frame(sock)
    assert body is not None
    answer = json.loads(body)
    assert isinstance(answer, dict)
    return answer


def test_hostile_frames_on_one_swarm_agent_harm_no_sibling(lab: Lab) -> None:
    path = lab.paths.node("w-003").socket
    with connect_unix(path, timeout=10) as sock:
        for payload, message in [(b"not json{", "not JSON"), (b'{"op": "reboot"}', "unknown op"),
                                 (b'{"op": "quote", "nonce": "00", "pcrs": [99]}', "0..23"),
                                 (b'{"op": "runtime_log", "offset": -1}', "offset")]:
            answer = _ask(sock, payload)
            assert message in answer.get("error", ""), (payload, answer)
            assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
        assert _ask(sock, b'{"op": "status"}')["node"] == "w-003"
    with connect_unix(path, timeout=10) as sock:  # truncated, then gone
        sock.sendall(struct.pack(">I", 100) + b"{trunc")
    rc, out, _ = run_cli(lab.workdir, "attest", "w-004", "--json")
    assert rc == 0 and json.loads(out)["ok"]
    rc, out, _ = run_cli(lab.workdir, "attest", "w-003", "--json")
    assert rc == 0 and json.loads(out)["ok"]


def test_per_ak_clock_history_still_catches_replayed_and_older_quotes(lab: Lab) -> None:
    node = "w-010"
    policy = load_node_policy(lab.paths, node)
    older_nonce, newer_nonce = os.urandom(32), os.urandom(32)
    older = lab.agent(node).quote(older_nonce, SIM_PCRS.indices)
    newer = lab.agent(node).quote(newer_nonce, SIM_PCRS.indices)
    assert verify_evidence(lab.paths, node, newer, newer_nonce, policy).ok
    for evidence, nonce in ((newer, newer_nonce), (older, older_nonce)):
        report = verify_evidence(lab.paths, node, evidence, nonce, policy)
        assert report.failure is not None and report.failure.name == "clock", report.to_dict()
    files = sorted(lab.paths.clock_history_dir.glob("*.json"))
    assert len(files) == SWARM and not lab.paths.clock_history.exists()  # a file per AK
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    # A work directory of the one-file layout: an AK without a file of its own is found
    # there, so the replay is still caught; the accepted quote then gets its own file.
    rc, _, err = run_cli(lab.workdir, "verifier", "stop")
    assert rc == 0, err
    mine = lab.paths.clock_history_dir / f"{parse_public(newer.ak_public).name.hex()}.json"
    doc = json.loads(mine.read_text())
    lab.paths.clock_history.write_text(json.dumps(
        {"format": doc["format"], "version": 1, "aks": {doc["ak"]: doc["attest"]}}))
    mine.unlink()
    try:
        report = verify_evidence(lab.paths, node, newer, newer_nonce, policy)
        assert report.failure is not None and report.failure.name == "clock"
        fresh_nonce = os.urandom(32)
        fresh = lab.agent(node).quote(fresh_nonce, SIM_PCRS.indices)
        assert verify_evidence(lab.paths, node, fresh, fresh_nonce, policy).ok
        assert json.loads(mine.read_text())["version"] == 2
    finally:
        lab.paths.clock_history.unlink()


def _db(lab: Lab) -> str:
    return str(lab.paths.root / "verifier" / "verifier.db")


def _ok_attestations(lab: Lab, after: int) -> dict[str, int]:
    store = open_store(_db(lab))
    try:
        events = store.events_after(after, limit=100_000)
    finally:
        store.close()
    counts: dict[str, int] = {}
    for event in events:
        if event.kind == "attestation" and event.ok:
            counts[event.node] = counts.get(event.node, 0) + 1
    return counts


def test_verifier_killed_mid_tick_keeps_its_committed_clock_history(lab: Lab) -> None:
    """The service keeps clock histories in its database, committed with the tick's
    outcomes: after a SIGKILL every published verdict has its AK's row, a quote older
    than the committed one is still refused (rolled back), and a new verifier goes on."""
    node = "w-020"
    policy = load_node_policy(lab.paths, node)
    older_nonce = os.urandom(32)
    older = lab.agent(node).quote(older_nonce, SIM_PCRS.indices)
    store = open_store(_db(lab))
    after = store.last_seq()
    store.close()
    config = VerifierConfig(lab.workdir, CLUSTER, interval=INTERVAL)
    pid = start_verifier(config)
    try:
        wait_until(lambda: _ok_attestations(lab, after).get(node, 0) >= 2)
        time.sleep(INTERVAL * 0.3)  # somewhere in a tick, outcomes in flight
    finally:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_argv(pid) is None)
    published = _ok_attestations(lab, after)
    store = open_store(_db(lab))
    try:
        rows = store.clocks_of(sorted(published))
    finally:
        store.close()
    assert {row.node for row in rows} >= set(published)  # no verdict without its history
    clocks = StoreClocks(lab.paths)
    clocks.refresh([row for row in rows if row.node == node])
    report = verify_evidence(lab.paths, node, older, older_nonce, policy, clocks=clocks)
    assert report.failure is not None and report.failure.name == "clock", report.to_dict()
    assert "went back" in report.failure.detail
    # A verifier started after the kill takes the nodes over (the dead one's leases
    # run out) and attests them from the committed history.
    restarted = start_verifier(config)
    try:
        since = open_store(_db(lab)).last_seq()
        wait_until(lambda: _ok_attestations(lab, since).get(node, 0) >= 1,
                   timeout=INTERVAL * 4 + 10)
        assert lab.states()[node] == "trusted"
    finally:
        assert stop_verifiers(lab.paths)["verifier"] is not None
    wait_until(lambda: process_argv(restarted) is None)


def test_an_ak_the_store_does_not_know_is_read_from_its_file_once(lab: Lab) -> None:
    """Migration: a verifier's database without a row for an AK reads the AK's
    clock-history file (what `testbed attest` keeps), so a quote older than the one
    the CLI accepted is still refused; the file is never written by the service."""
    node = "w-022"
    policy = load_node_policy(lab.paths, node)
    older_nonce = os.urandom(32)
    older = lab.agent(node).quote(older_nonce, SIM_PCRS.indices)
    rc, _, err = run_cli(lab.workdir, "attest", node)
    assert rc == 0, err
    file = lab.paths.clock_history_dir / f"{parse_public(older.ak_public).name.hex()}.json"
    written = file.read_bytes()
    clocks = StoreClocks(lab.paths)  # an empty database: no row for this AK
    report = verify_evidence(lab.paths, node, older, older_nonce, policy, clocks=clocks)
    assert report.failure is not None and report.failure.name == "clock", report.to_dict()
    fresh_nonce = os.urandom(32)
    fresh = lab.agent(node).quote(fresh_nonce, SIM_PCRS.indices)
    assert verify_evidence(lab.paths, node, fresh, fresh_nonce, policy, clocks=clocks).ok
    assert [row.node for row in clocks.take_pending()] == [node]  # for the tick's commit
    assert file.read_bytes() == written

def test_a_failed_commit_publishes_nothing_and_keeps_the_history_staged(lab: Lab,
                                                                      tmp_path: Path) -> None:
    """Fail closed: the tick's transaction failed, so no event exists and no revocation
    or webhook ran; the accepted quotes' histories go with the next commit."""

    class Refusing(Store):
        def record_all(self, verifier: str, outcomes: Sequence[Outcome],
                       clocks: Sequence[ClockRow] = ()) -> list[list[Event]]:
            raise StoreError("disk full (simulated)")

    url = str(tmp_path / "refusing.db")
    open_store(url).close()
    refusing = Refusing(sqlite3.connect(url, isolation_level=None, check_same_thread=False),
                        SQLITE)
    service = VerifierService(VerifierConfig(lab.workdir, CLUSTER, name="refusing",
                                             interval=INTERVAL, db=url), refusing)
    nonce = os.urandom(32)
    evidence = lab.agent("w-021").quote(nonce, SIM_PCRS.indices)
    name = parse_public(evidence.ak_public).name
    service.clocks.accepted("w-021", name, evidence)
    service.outcomes.put(Outcome("w-021", True, "", "", time.time(), time.time()))
    with mock.patch.object(service, "_act") as act, pytest.raises(StoreError):
        service._drain(0.1)
    act.assert_not_called()
    assert [row.attest for row in service.clocks.take_pending()] == [evidence.attest]
    assert refusing.last_seq() == 0
    refusing.close()


@settings(max_examples=200, deadline=None)
@given(attest=st.binary(max_size=300), ak=st.binary(min_size=1, max_size=40))
def test_a_corrupt_clock_row_fails_its_node_only(tmp_path_factory: pytest.TempPathFactory,
                                                 attest: bytes, ak: bytes) -> None:
    """Whatever a clock_history row holds, its AK's history is usable or the one clear
    StateError (that node's attestations fail), never another exception."""
    clocks = StoreClocks(ClusterPaths(tmp_path_factory.getbasetemp(), "nowhere"))
    clocks.refresh([ClockRow(ak.hex(), "n", attest)])
    try:
        history = clocks.history(ak)
    except StateError as exc:
        assert "corrupt" in str(exc)
    else:
        assert history is clocks.history(ak)


def test_agent_shutdown_stops_that_swarm_node_only(lab: Lab) -> None:
    pid = lab.up["nodes"][0]["pid"]
    lab.agent("w-033").shutdown()
    wait_until(lambda: json.loads(lab.paths.node("w-033").info.read_text())["state"]
               == "stopped", timeout=10)
    assert process_argv(pid) is not None  # the swarm process serves the others still
    assert lab.agent("w-032").status()["state"] == "ready"
    _, out, _ = run_cli(lab.workdir, "status", "--json")
    states = {n["name"]: n["state"] for n in json.loads(out)["nodes"]}
    assert states["w-033"] == "stopped" and states["w-032"] == "running"
    # `up` again: the others are kept, w-033 restarts (its TPM kept) in a swarm process
    # of its own; `down` (the fixture) then stops both processes.
    spec = lab.paths.root.parent.parent.parent / "spec.yaml"
    rc, out, err = run_cli(lab.workdir, "up", "--json", str(spec))
    assert rc == 1 and json.loads(out)["rejected"] == ["w-007"], out[-2000:] + err[-2000:]
    actions = {n["name"]: (n["action"], n["pid"]) for n in json.loads(out)["nodes"]}
    assert actions.pop("w-033")[0] == "started"
    assert set(actions.values()) == {("kept", pid)}
    assert len([p for p in cluster_processes(lab.paths) if p.kind == "swarm"]) == 2


# --- the spec field ------------------------------------------------------------------------


def test_swarm_entry_expands_and_dumps_back_to_one_entry(tmp_path: Path) -> None:
    spec = parse_cluster_spec(yaml.safe_dump(swarm_doc(500)), tmp_path)
    assert len(spec.nodes) == 500 and spec.nodes[-1].name == "w-499"
    assert {n.swarm for n in spec.nodes} == {"w"} and list(spec.swarms()) == ["w"]
    dumped = dump_cluster_spec(spec)
    assert dumped.count("name: w") == 1 and "swarm: 500" in dumped
    assert parse_cluster_spec(dumped, tmp_path) == spec
    with pytest.raises(ClusterSpecError, match="swarm node boots its swarm's chain"):
        spec.with_tamper("w-001", parse_tamper("w-001=cmdline:init=/bin/sh")[1])
    assert AGENTS_PER_PROCESS < 500  # 500 nodes need several processes


@pytest.mark.parametrize(("change", "message"), [
    ({"swarm": 0}, r"nodes\[0\]\.swarm"),
    ({"swarm": MAX_SWARM_NODES + 1}, r"nodes\[0\]\.swarm"),
    ({"swarm": "40"}, r"nodes\[0\]\.swarm"),
    ({"swarm": True}, r"nodes\[0\]\.swarm"),
    ({"swarm": 4, "role": "server"}, "a swarm's role must be one of generic"),
    ({"swarm": 4, "name": "x" * 29}, "too long for a swarm"),
])
def test_bad_swarm_entries_are_refused_by_path(tmp_path: Path, change: dict[str, Any],
                                               message: str) -> None:
    doc = swarm_doc(4)
    doc["nodes"][0].update(change)
    with pytest.raises(ClusterSpecError, match=message):
        parse_cluster_spec(yaml.safe_dump(doc), tmp_path)


def test_swarm_totals_and_names_are_bounded(tmp_path: Path) -> None:
    doc = swarm_doc(MAX_SWARM_NODES)
    doc["nodes"].append(dict(doc["nodes"][0], name="v", swarm=1))
    with pytest.raises(ClusterSpecError, match=f"more than {MAX_SWARM_NODES} swarm nodes"):
        parse_cluster_spec(yaml.safe_dump(doc), tmp_path)
    doc = swarm_doc(3)
    doc["nodes"].append({k: v for k, v in doc["nodes"][0].items() if k != "swarm"}
                        | {"name": "w-001"})
    with pytest.raises(ClusterSpecError, match=r"nodes\[1\]\.name: 'w-001' is used by two"):
        parse_cluster_spec(yaml.safe_dump(doc), tmp_path)
