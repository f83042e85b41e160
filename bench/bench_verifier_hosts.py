"""Host attestation by the verifier service, beside its baseline from the same run (not
a test).

Two hosts (bridge tbk4, 10.213.4.0/24) beside a one-node sim cluster:

1. One host attestation as the verifier does it (:class:`HostAttesters`: the SSH
   session and the host agent kept across attestations), p50 and p99 over ``--rounds``.
   Baseline: ``testbed hosts attest``'s way (a fresh SSH session and agent process per
   attestation), p50 and p99.
2. Detection time of a host failure: the detached verifier at ``--interval``; the
   host's policy file changed (PCR 14 expected to be zero) at a random point of the
   interval, until the verifier records the host's ``trusted -> rejected`` event;
   ``--changes`` times (the policy restored between, the host trusted again).

Run: .venv/bin/python bench/bench_verifier_hosts.py [--rounds 30] [--changes 8]
     [--interval 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attestation.files import atomic_write
from attestation.policy import dump_policy, load_policy
from testbed.cli import main as cli
from testbed.core.paths import ClusterPaths
from testbed.hosts import lifecycle
from testbed.hosts.layout import LabPaths
from testbed.sim.backend import SimBackend
from testbed.spec.cluster_spec import default_spec_path
from testbed.verifier.hosts import HostAttesters

BRIDGE, SUBNET = "tbk4", "10.213.4.0/24"
CLUSTER = "hbench"


def run_cli(workdir: Path, *argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main(["--workdir", str(workdir), *argv])
    if rc != 0:
        raise SystemExit(f"testbed {' '.join(argv)}: exit {rc}")
    return out.getvalue()


def quantiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def attestations(workdir: Path, rounds: int) -> dict[str, Any]:
    lab = LabPaths(workdir)
    kept = HostAttesters(lab)
    try:
        first = time.perf_counter()
        assert kept.attest("host1", 10.0).ok
        cold = time.perf_counter() - first
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            assert kept.attest("host1", 10.0).ok
            times.append(time.perf_counter() - start)
    finally:
        kept.close()
    fresh = []
    for _ in range(rounds):
        start = time.perf_counter()
        assert lifecycle.attest(workdir, "host1").trusted
        fresh.append(time.perf_counter() - start)
    return {"kept": quantiles(times), "first_of_session": cold, "fresh": quantiles(fresh)}


def events_after(workdir: Path, seq: int) -> list[dict[str, Any]]:
    doc = json.loads(run_cli(workdir, "events", "--json", "--since", str(seq)))
    return doc["events"]  # type: ignore[no-any-return]


def wait_event(workdir: Path, seq: int, node: str, reason: str, timeout: float
               ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events_after(workdir, seq):
            if event["node"] == node and event["kind"] == "state" \
                    and event["reason"].startswith(reason):
                return event
        time.sleep(0.02)
    raise SystemExit(f"no {reason} event for {node} within {timeout} s")


def detection(workdir: Path, changes: int, interval: float) -> list[float]:
    policy_file = LabPaths(workdir).policy("host1")
    good = policy_file.read_bytes()
    bad = dump_policy(replace(load_policy(policy_file),
                              pcrs={**load_policy(policy_file).pcrs, 14: bytes(32)})).encode()
    seq = 0
    wait_event(workdir, seq, "host:host1", "new -> trusted", 30.0)
    times = []
    for _ in range(changes):
        time.sleep(random.uniform(0, interval))  # a phase, not a secret
        seq = max((e["seq"] for e in events_after(workdir, seq)), default=seq)
        changed = time.time()
        atomic_write(policy_file, bad)
        event = wait_event(workdir, seq, "host:host1", "trusted -> rejected",
                           5 * interval + 10)
        times.append(event["time"] - changed)
        atomic_write(policy_file, good)
        wait_event(workdir, event["seq"], "host:host1", "rejected -> trusted",
                   5 * interval + 10)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--changes", type=int, default=8)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vhosts-") as top:
        workdir = Path(top) / "w"
        doc = yaml.safe_load(default_spec_path().read_text())
        doc["name"] = CLUSTER
        doc["nodes"] = [dict(doc["nodes"][0], name="n0", role="generic")]
        spec = Path(top) / "spec.yaml"
        spec.write_text(yaml.safe_dump(doc))
        paths = ClusterPaths(workdir, CLUSTER)
        try:
            run_cli(workdir, "up", str(spec))
            lifecycle.up(workdir, 2, bridge=BRIDGE, subnet=SUBNET)
            load = os.getloadavg()[0]
            figures = attestations(workdir, args.rounds)
            run_cli(workdir, "verifier", "start", "--interval", str(args.interval))
            detect = detection(workdir, args.changes, args.interval)
        finally:
            with contextlib.suppress(SystemExit):
                run_cli(workdir, "verifier", "stop")
            lifecycle.down(workdir)
            if paths.root.is_dir():
                SimBackend(paths).down(purge=True)
    kept, fresh = figures["kept"], figures["fresh"]
    print(f"load average (1 min) at start: {load:.1f}; 2 cores")
    print(f"host attestation, SSH session kept: p50 {kept[0] * 1000:.0f} ms, "
          f"p99 {kept[1] * 1000:.0f} ms ({args.rounds} rounds; the session's first: "
          f"{figures['first_of_session'] * 1000:.0f} ms)")
    print(f"baseline, fresh session per attestation (`hosts attest`): p50 "
          f"{fresh[0] * 1000:.0f} ms, p99 {fresh[1] * 1000:.0f} ms")
    p50, p99 = quantiles(detect)
    print(f"detection of a host failure at --interval {args.interval:g}: p50 {p50:.2f} s, "
          f"p99 {p99:.2f} s, max {max(detect):.2f} s ({len(detect)} changes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
