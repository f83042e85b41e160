"""The verifier service attests the lab's hypervisor hosts (testbed.verifier.hosts).

The decision alone: given a failed host and a spec, which VMs are marked untrusted and
which events the store emits for them. End to end, with real hosts (netns, sshd, host
TPM, SSH only; bridge tbk4, 10.213.4.0/24) and the real detached service beside a
one-node sim cluster: a host brought up with a tampered QEMU stays rejected in the
events, and a host whose next attestation fails (its policy changed) goes
``trusted -> rejected`` within one interval, its revocation signed and published.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.files import atomic_write
from attestation.policy import dump_policy, load_policy
from testbed.core.errors import ArgumentError
from testbed.core.paths import ClusterPaths
from testbed.hosts import lifecycle
from testbed.hosts.attest import read_verdicts
from testbed.hosts.layout import LabPaths
from testbed.sim.backend import SimBackend
from testbed.spec.cluster_spec import (
    ClusterSpec,
    ClusterSpecError,
    default_spec_path,
    load_cluster_spec,
    parse_cluster_spec,
)
from testbed.verifier import revocation
from testbed.verifier.hosts import host_marks, host_row, on_failed_host, validate_host_row
from testbed.verifier.service import VerifierConfig, VerifierService
from testbed.verifier.store import HOST_CHECK, Outcome, open_store
from tests.sim_lab import run_cli

BRIDGE, SUBNET = "tbk4", "10.213.4.0/24"
CLUSTER = "hlab"
INTERVAL = 1.0


def _spec(placement: dict[str, str | None]) -> ClusterSpec:
    """The shipped sim spec's first node, once per name, placed as given (the field is
    set directly: a sim spec may not name a host, the decision does not care)."""
    spec = load_cluster_spec(default_spec_path())
    node = spec.nodes[0]
    return replace(spec, nodes=tuple(replace(node, name=name, host=host)
                                     for name, host in placement.items()))


def test_a_failed_host_marks_exactly_its_vms_with_state_events_naming_it(
        tmp_path: Path) -> None:
    spec = _spec({"vm1": "host1", "vm2": "host2", "vm3": "host2", "plain": None})
    store = open_store(str(tmp_path / "v.db"))
    try:
        store.sync_nodes(["vm1", "vm2", "vm3", "plain", host_row("host2")])
        for node in ("vm1", "vm2", "vm3", "plain"):
            store.record("v", Outcome(node, True, "", "", 1.0, 2.0))
        failed = Outcome(host_row("host2"), False, "policy", "PCR 14 differs", 3.0, 4.0)
        host_events = store.record("v", failed)
        marks = host_marks(spec, failed)
        assert [m.node for m in marks] == ["vm2", "vm3"]
        assert all(m.check == HOST_CHECK and m.reason == "host2 failed policy"
                   and m.mode == "host" and not m.ok for m in marks)
        events = [e for m in marks for e in store.record("v", m)]
    finally:
        store.close()
    assert [(e.node, e.kind, e.reason) for e in host_events] == [
        ("host:host2", "attestation", "PCR 14 differs"),
        ("host:host2", "state", "new -> rejected")]
    changes = [(e.node, e.check, e.reason) for e in events if e.kind == "state"]
    assert changes == [("vm2", "host", "trusted -> rejected: host2 failed policy"),
                       ("vm3", "host", "trusted -> rejected: host2 failed policy")]
    assert host_marks(spec, replace(failed, ok=True, check="")) == []
    assert host_marks(spec, replace(failed, node="vm1")) == []  # not a host row


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from([f"vm{i}" for i in range(8)]),
                       st.none() | st.sampled_from(["host1", "host2", "host3"])),
       st.sampled_from(["host1", "host2", "host3"]), st.sampled_from(["policy", "agent"]))
def test_exactly_the_vms_on_the_failed_host_are_marked(
        placed: dict[str, str | None], failed_host: str, check: str) -> None:
    if not placed:
        return
    failed = Outcome(host_row(failed_host), False, check, "why", 1.0, 2.0)
    marks = host_marks(_spec(placed), failed)
    assert {m.node for m in marks} == {vm for vm, h in placed.items() if h == failed_host}
    assert all(m.state == "rejected" and m.reason == f"{failed_host} failed {check}"
               for m in marks)


def test_a_vms_own_good_quote_does_not_clear_its_failed_host() -> None:
    own = Outcome("vm2", True, "", "", 1.0, 2.0)
    kept = on_failed_host(own, "host2", "policy")
    assert not kept.ok and kept.check == HOST_CHECK and kept.state == "rejected"
    assert kept.reason == "host2 failed policy (its own attestation: ok)"


def test_host_rows_are_validated_names() -> None:
    assert validate_host_row("host:host3") == "host3"
    for bad in ("host:host0", "host:host17", "host:../x", "host:"):
        with pytest.raises(ArgumentError):
            validate_host_row(bad)


def test_only_a_qemu_node_names_a_host_and_only_a_host_name() -> None:
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["nodes"][0]["host"] = "host1"
    with pytest.raises(ClusterSpecError, match="only a qemu node"):
        parse_cluster_spec(yaml.safe_dump(doc), default_spec_path().parent)
    qemu = yaml.safe_load(default_spec_path("qemu").read_text())
    base = default_spec_path("qemu").parent
    qemu["nodes"][0]["host"] = "host2"
    spec = parse_cluster_spec(yaml.safe_dump(qemu), base)
    assert spec.nodes[0].host == "host2" and spec.nodes[0].to_dict()["host"] == "host2"
    for bad in ("host0", "host17", "h1", 3, ["host1"]):
        qemu["nodes"][0]["host"] = bad
        with pytest.raises(ClusterSpecError, match="not a host name"):
            parse_cluster_spec(yaml.safe_dump(qemu), base)


# --- end to end: real hosts, the real service ---------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


@dataclass
class Lab:
    workdir: Path
    paths: ClusterPaths

    def events(self) -> list[dict[str, Any]]:
        rc, out, err = run_cli(self.workdir, "events", "--json")
        assert rc == 0, err
        return json.loads(out)["events"]  # type: ignore[no-any-return]

    def rows(self) -> dict[str, dict[str, Any]]:
        rc, out, err = run_cli(self.workdir, "verifier", "status", "--json")
        assert rc == 0, err
        return {n["node"]: n for n in json.loads(out)["nodes"]}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    top = tmp_path_factory.mktemp("hlab")
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["name"] = CLUSTER
    doc["nodes"] = [dict(doc["nodes"][0], name="n0", role="generic")]
    spec = top / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    workdir = top / "w"
    paths = ClusterPaths(workdir, CLUSTER)
    try:
        rc, out, err = run_cli(workdir, "up", str(spec))
        assert rc == 0, out + err
        lifecycle.up(workdir, 2, bridge=BRIDGE, subnet=SUBNET, tamper_qemu=["host2"])
        rc, out, err = run_cli(workdir, "verifier", "start", "--interval", str(INTERVAL))
        assert rc == 0, out + err
        yield Lab(workdir, paths)
    finally:
        run_cli(workdir, "verifier", "stop")
        lifecycle.down(workdir)
        if paths.root.is_dir():
            SimBackend(paths).down(purge=False)


def test_the_verifier_attests_hosts_and_a_tampered_host_stays_rejected(lab: Lab) -> None:
    def settled() -> dict[str, dict[str, Any]] | None:
        rows = lab.rows()
        fails = [e for e in lab.events() if e["node"] == "host:host2"
                 and e["kind"] == "attestation"]
        good = rows.get("host:host1", {}).get("state") == "trusted"
        return rows if good and len(fails) >= 3 else None

    rows = wait_until(settled, 30.0)
    assert rows["host:host1"]["kind"] == "host" and rows["n0"]["kind"] == "node"
    assert rows["host:host2"]["state"] == "rejected"
    host2 = [e for e in lab.events() if e["node"] == "host:host2"]
    changes = [e for e in host2 if e["kind"] == "state"]
    assert [c["reason"] for c in changes] == ["new -> rejected"]  # and never back
    assert changes[0]["check"] == "policy"
    assert all(not e["ok"] and e["check"] == "policy" for e in host2)
    verdicts = read_verdicts(LabPaths(lab.workdir))  # what `hosts status` shows
    assert verdicts["host2"].trusted is False and verdicts["host1"].trusted is True
    log = VerifierLog(lab)
    wait_until(lambda: "revocation of host:host2" in log.text(), 10.0)


class VerifierLog:
    def __init__(self, lab: Lab) -> None:
        self.path = lab.paths.root / "verifier" / "verifier.log"

    def text(self) -> str:
        return self.path.read_text(errors="replace")


def test_a_host_whose_next_attestation_fails_is_rejected_within_one_interval(
        lab: Lab) -> None:
    wait_until(lambda: lab.rows().get("host:host1", {}).get("state") == "trusted", 30.0)
    after = max(e["seq"] for e in lab.events())
    policy_file = LabPaths(lab.workdir).policy("host1")
    policy = load_policy(policy_file)
    changed = time.time()
    atomic_write(policy_file, dump_policy(replace(
        policy, pcrs={**policy.pcrs, 14: bytes(32)})).encode())

    def rejected() -> dict[str, Any] | None:
        return next((e for e in lab.events() if e["seq"] > after
                     and e["node"] == "host:host1" and e["kind"] == "state"), None)

    change = wait_until(rejected, 3 * INTERVAL + 5.0)
    detection = change["time"] - changed
    assert change["reason"] == "trusted -> rejected" and change["check"] == "policy"
    # Within one interval, plus the attestation in flight and its SSH quote.
    assert detection < INTERVAL + 2.0, detection
    log = VerifierLog(lab)
    wait_until(lambda: "revocation of host:host1" in log.text(), 10.0)
    assert read_verdicts(LabPaths(lab.workdir))["host1"].trusted is False
    decision, _ = revocation.reinstate(lab.paths, "host:host1", "policy restored")
    assert decision.node == "host:host1"


def test_the_service_marks_the_vms_of_a_failed_host_and_publishes_their_revocation(
        lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The service's wiring, in process (no VM runs on a host in this lab): n0 is
    placed on host2 in memory; host2's failure marks it, publishes its revocation to
    the cluster's nodes, and keeps its own good quotes failing until host2 passes."""
    caplog.set_level(logging.INFO, logger="testbed.verifier")
    store = open_store(str(tmp_path / "db.sqlite"))
    config = VerifierConfig(lab.workdir, CLUSTER, name="inproc", interval=INTERVAL,
                            db=str(tmp_path / "db.sqlite"))
    service = VerifierService(config, store)
    try:
        store.sync_nodes(["n0"], hosts=[host_row("host2")])
        service._spec = _spec({"n0": "host2"})
        service._placement = {"n0": "host2"}
        service._record(Outcome("n0", True, "", "", 1.0, 2.0), finished=False)
        service._record(Outcome(host_row("host2"), False, "policy", "PCR 14", 3.0, 4.0))
        service._record(Outcome("n0", True, "", "", 5.0, 6.0))  # its own quote: good
        service._record(Outcome(host_row("host2"), True, "", "", 7.0, 8.0))
        service._record(Outcome("n0", True, "", "", 9.0, 10.0))
        service._revoker.shutdown(wait=True)
        n0 = [e for e in store.events_after(0) if e.node == "n0"]
    finally:
        service._pool.shutdown(wait=False)
        store.close()
    assert [(e.kind, e.ok, e.check, e.reason, e.mode) for e in n0] == [
        ("attestation", True, "", "", "pull"),
        ("state", True, "", "new -> trusted", "pull"),
        ("attestation", False, "host", "host2 failed policy", "host"),
        ("state", False, "host", "trusted -> rejected: host2 failed policy", "host"),
        ("attestation", False, "host", "host2 failed policy (its own attestation: ok)",
         "pull"),
        ("attestation", True, "", "", "pull"),  # host2 passed: n0's own verdict counts
        ("state", True, "", "rejected -> trusted", "pull")]
    published = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("revocation of ")]
    assert any(m.startswith("revocation of host:host2") for m in published)
    assert any(m.startswith("revocation of n0") and "n0 applied" in m for m in published)
    # n0 stays revoked with its peers until the explicit decision.
    revocation.reinstate(lab.paths, "n0", "host2 passes again")
