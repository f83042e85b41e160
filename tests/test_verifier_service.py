"""The verifier service on SQLite, against a real sim cluster (node processes, swtpms).

One module-scoped cluster of three nodes. The detached service (the real CLI) attests
two of them by pull and the third by push; a policy change is detected within the
interval, recorded as events, POSTed signed to a real local HTTP server and handed to
revocation; `stop` leaves no process. An in-process service shows that a stuck or
trickling agent holds one worker, never the loop, and is not trusted meanwhile. The
store's leases are a property.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, VerificationError
from attestation.ima import IMA_PCR, make_entry
from testbed.cluster.agent import AgentClient, AgentError, UnixTransport
from testbed.core.errors import ArgumentError, StateError
from testbed.core.paths import ClusterPaths
from testbed.core.processes import process_argv
from testbed.sim.backend import SimBackend
from testbed.spec.cluster_spec import default_spec_path
from testbed.tpm.runtime import default_policy
from testbed.verifier.service import (
    DEFAULT_INTERVAL_S,
    VerifierConfig,
    VerifierFiles,
    VerifierService,
    _pushed_runtime,
    _stale,
    push_attest,
)
from testbed.verifier.store import Event, Outcome, open_store
from testbed.verifier.webhooks import QUEUE_LIMIT, SIGNATURE_HEADER, WebhookSender
from tests.sim_lab import run_cli

CLUSTER = "vlab"
NODES = ("n0", "n1", "n2")
INTERVAL = 0.5
SECRET = b"0123456789abcdef-webhook-secret"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s")


@dataclass
class Lab:
    workdir: Path
    paths: ClusterPaths

    def agent(self, node: str) -> AgentClient:
        return AgentClient(UnixTransport(self.paths.node(node).socket), node=node)

    def status(self) -> dict[str, Any]:
        rc, out, err = run_cli(self.workdir, "verifier", "status", "--json")
        assert rc == 0, err
        return json.loads(out)  # type: ignore[no-any-return]

    def node_states(self) -> dict[str, str]:
        return {n["node"]: n["state"] for n in self.status()["nodes"]}

    def events(self) -> list[dict[str, Any]]:
        rc, out, err = run_cli(self.workdir, "events", "--json")
        assert rc == 0, err
        return json.loads(out)["events"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    top = tmp_path_factory.mktemp("vlab")
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["name"] = CLUSTER
    doc["nodes"] = [dict(doc["nodes"][0], name=n, role="generic") for n in NODES]
    spec = top / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    workdir = top / "w"
    rc, out, err = run_cli(workdir, "up", str(spec))
    paths = ClusterPaths(workdir, CLUSTER)
    try:
        assert rc == 0, out + err
        yield Lab(workdir, paths)
    finally:
        run_cli(workdir, "verifier", "stop")
        assert SimBackend(paths).down(purge=False).ok


class _Hooks(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook_server() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    received: list[tuple[dict[str, str], bytes]] = []
    handler = type("Hooks", (_Hooks,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def tamper_policy(paths: ClusterPaths, node: str) -> str:
    """Make ``node``'s policy expect another PCR 4 (what a changed boot looks like to
    the verifier); returns the original text."""
    path = paths.policy(node)
    original = path.read_text()
    doc = yaml.safe_load(original)
    path.write_text(original.replace(doc["pcrs"][4], "00" * 32))
    return original


def test_service_attests_detects_signs_and_stops(
        lab: Lab, tmp_path: Path,
        webhook_server: tuple[str, list[tuple[dict[str, str], bytes]]]) -> None:
    url, received = webhook_server
    rc, out, _ = run_cli(lab.workdir, "events", "--json")
    assert rc == 0 and json.loads(out)["events"] == []
    assert not (lab.paths.root / "verifier").exists()  # read commands create nothing
    secret = tmp_path / "hook.key"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    rc, out, err = run_cli(lab.workdir, "verifier", "start", "--interval", str(INTERVAL),
                           "--push", "n2", "--webhook", url, "--webhook-secret",
                           str(secret), "--json")
    assert rc == 0, out + err
    pid = json.loads(out)["pid"]
    assert process_argv(pid) is not None
    files = VerifierFiles(lab.paths)
    assert oct(files.root.stat().st_mode & 0o777) == "0o700"
    assert oct(files.database.stat().st_mode & 0o777) == "0o600"
    rc, _, err = run_cli(lab.workdir, "verifier", "start")
    assert rc == 4 and "already runs" in err

    # Pull: n0 and n1 trusted; push: n2 is not trusted until it sends evidence.
    wait_until(lambda: lab.node_states()["n0"] == lab.node_states()["n1"] == "trusted")
    assert lab.node_states()["n2"] in ("new", "unreachable")
    assert push_attest(lab.paths, "n2", lab.agent("n2")) == {"ok": True, "check": "",
                                                              "reason": ""}
    assert lab.node_states()["n2"] == "trusted"
    assert not any(n["stale"] for n in lab.status()["nodes"])
    endpoint = AgentClient(UnixTransport(files.push_socket("verifier")), node="v")
    evidence = lab.agent("n2").quote(b"\x01" * 32, [0])
    with pytest.raises(AgentError, match="no live nonce"):  # a nonce is used once
        endpoint.role("evidence", {"node": "n2", "evidence": evidence.to_dict()})
    with pytest.raises(AgentError, match="not a push node"):
        endpoint.role("nonce", {"node": "n0"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hostile:  # oversized frame
        hostile.settimeout(5)
        hostile.connect(str(files.push_socket("verifier")))
        hostile.sendall(struct.pack(">I", 1 << 30))
        assert b"exceeds" in hostile.recv(4096) and hostile.recv(4096) == b""
    endpoint.role("nonce", {"node": "n2"})
    answer = endpoint.role("evidence", {"node": "n2", "evidence": {"version": "x" * 100}})
    assert answer["ok"] is False and answer["check"] == "evidence"  # malformed: fails closed

    # A change is detected within the interval (plus one attestation).
    tampered_at = time.time()
    original = tamper_policy(lab.paths, "n0")
    try:
        change = wait_until(lambda: next((e for e in lab.events() if e["node"] == "n0"
                                          and e["kind"] == "state"
                                          and e["reason"] == "trusted -> rejected"), None))
    finally:
        lab.paths.policy("n0").write_text(original)
    latency = change["time"] - tampered_at
    assert change["check"] == "policy" and latency < INTERVAL + 0.5, latency
    assert not any(e["node"] == "n1" and not e["ok"] for e in lab.events())

    # The webhook got the change, signed with the shared secret.
    def signed_change() -> dict[str, Any] | None:
        for headers, body in list(received):
            doc = json.loads(body)
            if doc["seq"] == change["seq"]:
                expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
                return dict(doc)
        return None
    assert wait_until(signed_change)["cluster"] == CLUSTER
    assert all(not json.loads(b)["ok"] or json.loads(b)["kind"] == "state"
               for _, b in received)  # successes are not POSTed, only changes and failures
    # handed to revocation.publish (logged once every node has answered)
    assert wait_until(lambda: "revocation of n0" in files.log("verifier").read_text())

    # A push node that goes silent is unreachable after three intervals: fail closed.
    silent = wait_until(lambda: next((e for e in lab.events() if e["node"] == "n2"
                                      and e["kind"] == "state"
                                      and e["reason"].endswith("-> unreachable")), None))
    assert silent["check"] == "agent" and silent["mode"] == "push"

    # Restored: the node is trusted again; `events --follow` streams as JSON lines.
    wait_until(lambda: lab.node_states()["n0"] == "trusted")
    follower = subprocess.Popen([sys.executable, "-m", "testbed.cli.main", "--workdir",
                                 str(lab.workdir), "events", "--follow", "--json"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert first["seq"] == 1 and first["kind"] == "attestation"
    finally:
        follower.kill()
        follower.wait()

    rc, out, err = run_cli(lab.workdir, "verifier", "stop", "--json")
    assert rc == 0 and json.loads(out)["stopped"] == {"verifier": "SIGTERM"}, err
    wait_until(lambda: process_argv(pid) is None)
    assert not files.pid_file("verifier").exists()
    assert not files.push_socket("verifier").exists()
    assert lab.status()["verifiers"] == []  # its row went with it
    # No verifier: the verdicts grow stale, and status says so (older than 3 intervals).
    assert _stale(time.time() - DEFAULT_INTERVAL_S * 3.5, [])
    assert not _stale(time.time() - DEFAULT_INTERVAL_S, [])
    rc, out, _ = run_cli(lab.workdir, "verifier", "stop")
    assert rc == 0 and "no verifier to stop" in out


def test_start_refuses_bad_arguments(lab: Lab, tmp_path: Path) -> None:
    secret = tmp_path / "loose.key"
    secret.write_bytes(SECRET)
    secret.chmod(0o644)
    rc, _, err = run_cli(lab.workdir, "verifier", "start", "--webhook", "http://x/",
                         "--webhook-secret", str(secret))
    assert rc == 3 and "readable by others" in err
    rc, _, err = run_cli(lab.workdir, "verifier", "start", "--webhook", "http://x/")
    assert rc == 2 and "--webhook-secret" in err
    rc, _, err = run_cli(lab.workdir, "verifier", "start", "--interval", "0")
    assert rc == 3 and "--interval" in err
    rc, _, err = run_cli(lab.workdir, "events", "--cluster", "nosuch")
    assert rc == 3
    assert not any(VerifierFiles(lab.paths).root.glob("*.pid"))


class _SilentAgent:
    """A unix socket that accepts and never answers: a stuck agent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)

    def close(self) -> None:
        self.sock.close()
        self.path.unlink()


class _TricklingAgent(_SilentAgent):
    """Announces a 1,000-byte answer and sends a byte every 0.1 s: each read is quick,
    the answer never ends (a per-read timeout alone would wait for 100 s)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.sendall(struct.pack(">I", 1000))
            while not self.closed.wait(0.1):
                conn.sendall(b" ")

    def close(self) -> None:
        self.closed.set()
        super().close()


class _StuckBackend(SimBackend):
    """The sim backend, but n1's agent is silent and n2's trickles."""

    silent: Path
    trickling: Path

    def agent(self, node: str, *, timeout: float = 30.0) -> AgentClient:
        fake = {"n1": self.silent, "n2": self.trickling}.get(node)
        if fake is not None:
            return AgentClient(UnixTransport(fake), node=node, timeout=timeout)
        return super().agent(node, timeout=timeout)


def test_stuck_agent_holds_one_worker_not_the_loop(lab: Lab, tmp_path: Path) -> None:
    silent = _SilentAgent(Path(f"/tmp/vs-stuck-{id(tmp_path)}.sock"))
    trickling = _TricklingAgent(Path(f"/tmp/vs-trickle-{id(tmp_path)}.sock"))
    backend = _StuckBackend(lab.paths)
    backend.silent, backend.trickling = silent.path, trickling.path
    config = VerifierConfig(lab.workdir, CLUSTER, name="inproc", interval=INTERVAL,
                            db=str(tmp_path / "db.sqlite"))
    store = open_store(str(tmp_path / "db.sqlite"))
    service = VerifierService(config, store, backend)
    service.start()
    runner = threading.Thread(target=service.run)
    runner.start()
    try:
        time.sleep(INTERVAL * 4 + 0.3)
    finally:
        service.stop()
        runner.join(10)
        silent.close()
        trickling.close()
    assert not runner.is_alive()
    events = store.events_after(0)
    pulls = [e for e in events if e.kind == "attestation"]
    n0 = [e for e in pulls if e.node == "n0"]
    assert len(n0) >= 3 and all(e.ok for e in n0)  # on schedule despite n1
    n1 = [e for e in pulls if e.node == "n1"]
    assert n1 and all(not e.ok and e.check == "agent" for e in n1)
    assert "did not answer" in n1[0].reason
    n2 = [e for e in pulls if e.node == "n2"]  # trickling: unreachable at its next turn
    assert n2 and all(not e.ok and e.check == "agent" for e in n2)
    assert "still running after its lease" in n2[0].reason
    gaps = [b.time - a.time for a, b in itertools.pairwise(n0)]
    assert min(gaps) > INTERVAL * 0.8  # never twice in an interval
    store.close()


# --- the store ----------------------------------------------------------------------------------


@settings(max_examples=100)  # each example is a fresh database file
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.floats(0, 0.6)), max_size=40))
def test_leases_never_attest_a_node_twice_in_an_interval(
        tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, float]]) -> None:
    """Whatever the interleaving of two verifiers' claims and results, each node's
    claims are at least one interval apart."""
    store = open_store(str(tmp_path_factory.mktemp("leases") / "db.sqlite"))
    store.sync_nodes(["x", "y", "z"])
    now, claimed = 1000.0, {"x": [], "y": [], "z": []}  # type: dict[str, list[float]]
    for owner, step in steps:
        now += step
        for claim in store.claim(owner, now, interval=1.0, lease=0.75, limit=2):
            claimed[claim.node].append(now)
            if step < 0.3:  # the other half of the time the verifier "dies" holding it
                store.record(owner, Outcome(claim.node, True, "", "", now, now))
    for times in claimed.values():
        assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(times))
    store.close()


def test_store_keeps_events_bounded_and_reasons_short(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "v" / "db.sqlite"))
    store.sync_nodes(["a"])
    for i in range(30):
        store.record("v", Outcome("a", i % 2 == 0, "" if i % 2 == 0 else "policy",
                                  "x" * 100_000, float(i), float(i)))
    store.prune(keep=10)
    events = store.events_after(0)
    assert len(events) == 10 and events[-1].seq == store.last_seq()
    assert all(len(e.reason) <= 2000 for e in events)
    assert isinstance(events[0], Event)
    store.close()


def test_webhooks_to_a_dead_endpoint_never_block(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # closed again: connections are refused
    sender = WebhookSender("c", [f"http://127.0.0.1:{port}/"], SECRET)
    started = time.monotonic()
    for seq in range(QUEUE_LIMIT + 500):
        sender.send(Event(seq, 0.0, "a", "state", False, "policy", "x", "v", "pull"))
    assert time.monotonic() - started < 1.0  # queued, never waited for
    assert sender.dropped >= 400  # the oldest went when the queue was full
    sender.close(timeout=0.1)
    assert sender.failed >= 1
    with pytest.raises(ArgumentError, match="not http"):
        WebhookSender("c", ["file:///etc/passwd"], SECRET)


def test_corrupt_database_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "v" / "db.sqlite"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(StateError, match="verifier database"):
        open_store(str(path))


# --- with revocation: the default cluster, a runtime tamper -------------------------------------


def test_runtime_tamper_under_the_verifier_is_revoked_and_acted_on(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The issue's loop end to end: the verifier attests the default cluster; the client
    executes a file its runtime policy does not list; the verifier's next attestation
    fails the `runtime` check and its revocation closes the server's channel to it."""
    workdir = tmp_path_factory.mktemp("vrev")
    rc, out, err = run_cli(workdir, "up", "--json")
    paths = ClusterPaths(workdir, "trusted-passages-lab")
    lab = Lab(workdir, paths)
    try:
        assert rc == 0, out + err
        rc, out, err = run_cli(workdir, "verifier", "start", "--interval", str(INTERVAL))
        assert rc == 0, err
        wait_until(lambda: set(lab.node_states().values()) == {"trusted"})
        lab.agent("client").role("open", {"peer": "server"})
        assert lab.agent("server").role("info")["open"] == {"client": 1}

        tampered_at = time.time()
        rc, _, err = run_cli(workdir, "tamper", "client", "--runtime", "/tmp/x")
        assert rc == 0, err
        change = wait_until(lambda: next((e for e in lab.events() if e["node"] == "client"
                                          and e["kind"] == "state"
                                          and e["time"] > tampered_at), None))
        assert change["reason"] == "trusted -> rejected" and change["check"] == "runtime"
        assert change["time"] - tampered_at < INTERVAL + 0.5
        wait_until(lambda: lab.agent("server").role("info")["open"] == {}, timeout=5)
        cut = time.time() - tampered_at
        assert cut < INTERVAL + 1.5, cut  # detection, then delivery within 1 s
        with pytest.raises(AgentError, match="revoked"):
            lab.agent("client").role("connect", {"peer": "server"})
        assert {n: s for n, s in lab.node_states().items() if s != "trusted"} == \
            {"client": "rejected"}
        # `down` stops the cluster's verifier first (else it would find every node gone).
        rc, out, err = run_cli(workdir, "down", "--json")
        assert rc == 0 and json.loads(out)["verifiers_stopped"], out + err
    finally:
        run_cli(workdir, "verifier", "stop")
        assert SimBackend(paths).down(purge=False).ok


def _last_logged(lab: Lab, node: str) -> dict[str, Any]:
    lines = (lab.paths.root / "evidence" / "log.jsonl").read_bytes().splitlines()
    entries = [json.loads(line) for line in lines]
    return next(e for e in reversed(entries) if e["kind"] == "entry" and e["node"] == node)


def test_push_nodes_send_their_runtime_log_and_a_runtime_tamper_is_rejected(lab: Lab) -> None:
    rc, _, err = run_cli(lab.workdir, "verifier", "start", "--interval", "5", "--push", "n2")
    assert rc == 0, err
    try:
        endpoint = AgentClient(UnixTransport(VerifierFiles(lab.paths).push_socket("verifier")),
                               node="v")
        assert push_attest(lab.paths, "n2", lab.agent("n2"))["ok"]
        assert _last_logged(lab, "n2")["runtime"]["verdict"] == "passed"

        def send(runtime: dict[str, Any] | None) -> dict[str, Any]:
            answer = endpoint.role("nonce", {"node": "n2"})
            assert IMA_PCR in answer["pcrs"] and answer["runtime"]["offset"] > 0
            evidence = lab.agent("n2").quote(b64decode(answer["nonce"], "nonce"),
                                             answer["pcrs"])
            request = {"node": "n2", "evidence": evidence.to_dict()}
            return endpoint.role("evidence", request if runtime is None
                                 else {**request, "runtime": runtime})

        rc, _, err = run_cli(lab.workdir, "tamper", "n2", "--runtime",
                             "/usr/local/bin/cryptominer")
        assert rc == 0, err
        # PCR 10 moved. Fail closed: no runtime log, or one that does not explain it.
        assert send(None)["check"] == "runtime"
        stranger = make_entry(b"\x07" * 32, "/usr/bin/unknown").line()
        offset = endpoint.role("nonce", {"node": "n2"})["runtime"]["offset"]
        lie = send({"offset": offset, "data": b64encode(stranger)})
        assert lie["check"] == "runtime" and "does not replay" in lie["reason"]
        assert send({"offset": offset, "data": "!!"})["check"] == "evidence"
        # The node's own log, sent honestly: the runtime check names the binary.
        verdict = push_attest(lab.paths, "n2", lab.agent("n2"))
        assert verdict["ok"] is False and verdict["check"] == "runtime"
        assert "/usr/local/bin/cryptominer" in verdict["reason"]
        logged = _last_logged(lab, "n2")
        assert logged["verdict"] == {"ok": False, "check": "runtime"}
        assert logged["runtime"]["verdict"] == "failed" and logged["runtime"]["slice"]
        rc, out, err = run_cli(lab.workdir, "evidence", "replay", "--json")
        assert rc == 0 and json.loads(out)["ok"], out + err  # runtime verdicts re-judged
    finally:
        run_cli(lab.workdir, "verifier", "stop")


push_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["offset", "data", "x"]), inner,
                                             max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(push_values)
def test_a_hostile_pushed_runtime_log_is_one_format_error(value: object) -> None:
    paths = ClusterPaths(Path("/nonexistent-h5"), "c")
    policy = default_policy("baseline")
    with mock.patch("testbed.verifier.service.node_runtime_policy", return_value=policy):
        try:
            check = _pushed_runtime(paths, "n", value)
        except EvidenceFormatError:
            return
    assert check is not None and check.policy is policy
    if value is None:  # no log: the check fails closed once it needs one
        with pytest.raises(VerificationError, match="carries no runtime log"):
            check.read(0)
