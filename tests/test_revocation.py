"""Revocation that acts, on a real sim cluster (docs/runtime.md).

A client holds an attested channel to the server; its runtime is tampered (it "executes"
a file its runtime policy does not allow); `testbed attest client` fails the `runtime`
check; publishing the signed revocation closes the server's channel within 1 s and the
CryptoVM refuses the client's next enrollment; replays and forgeries change nothing;
an explicit reinstatement restores service.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.errors import EvidenceFormatError, TestbedError
from attestation.ima import make_entry
from testbed.cluster.agent import AgentClient, UnixTransport
from testbed.core.clock import utc_now
from testbed.core.paths import ClusterPaths
from testbed.roles.revocation import (
    Reinstate,
    RevocationGate,
    decision_args,
    decode_decision,
    encode_decision,
    public_key_pem,
)
from testbed.tpm.runtime import BASELINE, file_digest
from testbed.verifier.revocation import (
    RevocationEvent,
    next_sequence,
    publish,
    reinstate,
    signing_key,
)
from tests.sim_lab import run_cli

CLUSTER = "trusted-passages-lab"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterPaths]:
    workdir = tmp_path_factory.mktemp("revocation")
    rc, out, err = run_cli(workdir, "up", "--json")
    try:
        assert rc == 0, out + err
        yield ClusterPaths(workdir, CLUSTER)
    finally:
        run_cli(workdir, "down")


def agent(paths: ClusterPaths, node: str) -> AgentClient:
    return AgentClient(UnixTransport(paths.node(node).socket), node=node, timeout=10)


def open_channels(paths: ClusterPaths, node: str) -> dict[str, int]:
    opened: dict[str, int] = agent(paths, node).role("info")["open"]
    return opened


def test_runtime_tamper_is_caught_and_revocation_cuts_channels_and_keys(
        cluster: ClusterPaths) -> None:
    rc, out, _ = run_cli(cluster.workdir, "attest", "server", "--json")
    assert rc == 0 and json.loads(out)["checks"][-1]["check"] == "runtime", out

    held = agent(cluster, "client").role("open", {"peer": "server"})
    assert "heard" in held["reply"] and open_channels(cluster, "server") == {"client": 1}

    rc, out, err = run_cli(cluster.workdir, "tamper", "client", "--runtime", "/tmp/x",
                           "--json")
    assert rc == 0 and json.loads(out)["executed"]["path"] == "/tmp/x", err
    rc, out, _ = run_cli(cluster.workdir, "attest", "client", "--json")
    result = json.loads(out)
    assert rc == 1 and result["failed_check"] == "runtime", out
    runtime = result["checks"][-1]
    assert "/tmp/x" in runtime["detail"] and runtime["entry"]["path"] == "/tmp/x"

    event = RevocationEvent("client", "runtime", runtime["detail"], utc_now(),
                            next_sequence(cluster))
    started = time.monotonic()
    delivered = publish(cluster, event)
    while open_channels(cluster, "server") and time.monotonic() - started < 2:
        time.sleep(0.01)
    closed_after = time.monotonic() - started
    assert open_channels(cluster, "server") == {} and closed_after < 1.0, closed_after
    assert delivered == dict.fromkeys(["client", "cryptovm", "server", "verifier"], "applied")

    with pytest.raises(TestbedError, match="revoked"):
        agent(cluster, "client").role("enroll")
    with pytest.raises(TestbedError, match="revoked"):
        agent(cluster, "client").role("connect", {"peer": "server"})
    listed = json.loads((cluster.node("cryptovm").run / "cryptovm-revoked.json").read_text())
    assert [r["node"] for r in listed["revoked"]] == ["client"]

    # A replay changes nothing; a decision not signed by the verifier key is refused.
    assert set(publish(cluster, event).values()) == {"replay"}
    forged = RevocationEvent("server", "runtime", "forged", utc_now(), event.sequence + 100)
    args = decision_args(forged, Ed25519PrivateKey.generate().sign(b"x"))
    with pytest.raises(TestbedError, match="not signed by the cluster's verifier key"):
        agent(cluster, "client").role("revoked", args)
    assert signing_key(cluster) is not None
    assert (cluster.root / "verifier" / "revocation-key.pem").stat().st_mode & 0o077 == 0

    rc, out, err = run_cli(cluster.workdir, "reinstate", "client", "--reason", "re-imaged",
                           "--json")
    answer = json.loads(out)
    assert rc == 0 and answer["sequence"] > event.sequence, err
    assert set(answer["delivered"].values()) == {"applied"}
    enrolled = agent(cluster, "client").role("enroll")
    assert enrolled["enrolled"] is True
    listed = json.loads((cluster.node("cryptovm").run / "cryptovm-revoked.json").read_text())
    assert listed["revoked"] == []


def test_bad_decisions_and_requests_get_one_clear_error(cluster: ClusterPaths) -> None:
    client = agent(cluster, "client")
    for args in ({}, {"decision": "!!", "signature": ""}, {"decision": "e30=", "signature":
                 "AA==", "extra": 1}):
        with pytest.raises(TestbedError, match=r"revoked|decision|base64"):
            client.role("revoked", args)
    with pytest.raises(TestbedError, match="offset"):
        client.call({"op": "runtime_log", "offset": -1})
    with pytest.raises(TestbedError, match="outside the log"):
        client.call({"op": "runtime_log", "offset": 1 << 40})
    with pytest.raises(TestbedError, match="path"):
        client.call({"op": "runtime_measure", "path": "a\nb", "content": ""})
    rc, _, err = run_cli(cluster.workdir, "reinstate", "nosuchnode")
    assert rc == 3 and "nosuchnode" in err
    with pytest.raises(TestbedError):
        reinstate(cluster, "../x")


def test_a_restarted_node_starts_a_new_runtime_log(cluster: ClusterPaths) -> None:
    """After a reboot the offending entry is gone: a new log from offset 0 (the quote's
    reset/restart counts say it is a new boot), and the client attests again."""
    rc, out, _ = run_cli(cluster.workdir, "attest", "client", "--json")
    assert rc == 1 and json.loads(out)["failed_check"] == "runtime"  # still in the window
    agent(cluster, "client").shutdown()
    rc, out, err = run_cli(cluster.workdir, "up", "--json")  # attests the new boot
    client = next(n for n in json.loads(out)["nodes"] if n["name"] == "client")
    assert rc == 0 and client["attested"] is True, out + err
    state = json.loads((cluster.root / "runtime" / "client.state.json").read_text())
    assert state["offset"] == len(b"".join(make_entry(file_digest(c), p).line()
                                           for p, c in BASELINE))
    rc, out, _ = run_cli(cluster.workdir, "attest", "client", "--json")
    runtime = json.loads(out)["checks"][-1]
    assert rc == 0 and runtime["detail"].startswith("0 new ima-ng entries"), out


def test_gate_verifies_orders_and_persists_decisions(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "verifier.pub").write_text(public_key_pem(key.public_key()))

    def signed(decision: RevocationEvent | Reinstate) -> dict[str, str]:
        return decision_args(decision, key.sign(encode_decision(decision)))

    gate = RevocationGate(tmp_path / "state.json", tmp_path / "verifier.pub")
    revoked = RevocationEvent("client", "runtime", "unlisted", "t", 5)
    assert gate.receive("revoked", signed(revoked)) == revoked and gate.is_revoked("client")
    assert gate.receive("revoked", signed(revoked)) is None  # a replay
    with pytest.raises(TestbedError, match="sent as"):
        gate.receive("reinstated", signed(RevocationEvent("x", "c", "r", "t", 9)))
    # The key is pinned: replacing the file on disk does not change whom the node trusts.
    (tmp_path / "verifier.pub").write_text(
        public_key_pem(Ed25519PrivateKey.generate().public_key()))
    again = RevocationGate(tmp_path / "state.json", tmp_path / "verifier.pub")
    assert again.is_revoked("client") and again.sequence == 5
    assert again.receive("reinstated", signed(Reinstate("client", "ok", "t", 6))) is not None
    assert not again.is_revoked("client")
    # Not canonical, not a decision, damaged state: one clear error each.
    body = encode_decision(revoked).replace(b'","', b'", "', 1)
    with pytest.raises(EvidenceFormatError, match="canonical"):
        decode_decision(body)
    for bad in (b"[]", b"{" * 5000, b'{"format":"testbed-revocation","version":1}'):
        with pytest.raises(EvidenceFormatError):
            decode_decision(bad)
    (tmp_path / "state.json").write_text('{"sequence": 1, "revoked": {"a": 1}}')
    with pytest.raises(TestbedError, match="damaged"):
        RevocationGate(tmp_path / "state.json", tmp_path / "verifier.pub")


def test_a_file_named_boot_aggregate_is_not_allowed_by_its_name(cluster: ClusterPaths) -> None:
    """Runtime policies allow ``boot_aggregate`` by name; the verifier recomputes its digest
    from the quoted PCRs 0-9. A sim node quotes PCRs 0-7 and 9, so a boot_aggregate entry in
    its log cannot be checked: the runtime check fails closed and says why."""
    rc, out, err = run_cli(cluster.workdir, "tamper", "server", "--runtime", "boot_aggregate",
                           "--json")
    assert rc == 0 and json.loads(out)["executed"]["path"] == "boot_aggregate", err
    rc, out, _ = run_cli(cluster.workdir, "attest", "server", "--json")
    result = json.loads(out)
    assert rc == 1 and result["failed_check"] == "runtime", out
    detail = result["checks"][-1]["detail"]
    assert "boot_aggregate entry cannot be checked: the quote does not cover PCRs 8" in detail
