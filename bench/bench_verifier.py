"""Verifier service figures, each beside its baseline from the same run (not a test).

For each cluster size N (sim nodes, each with its own swtpm; up to 32 each its own
process, or with ``--swarm`` and for any N above 32 a spec ``swarm: N`` entry: the
nodes' agents hosted up to 128 to a process, testbed.sim.swarm), one detached verifier
(SQLite; ``--verifiers K``: K sharing the nodes through the store's leases) attests
every node at the interval:

1. Detection latency of a change, until the verifier records ``trusted -> rejected``,
   p50 and p99: a runtime change (``testbed tamper NODE --runtime PATH``: a file its
   runtime policy does not list is executed; the default) or ``--change policy`` (the
   node's policy made to expect another PCR 4, what a changed boot looks like), on
   ``--tampers`` nodes spread over the cluster and over the interval's phase.
   Baseline: one on-demand attestation (quote + verification, ``testbed attest``'s
   work) of the same nodes, p50.
2. Verifier CPU share (of one core) and resident memory, and memory per node; the CPU
   of the node side too (swarm or node processes, swtpms), since they share the cores.
   Baseline: the CPU of one sequential pass attesting every node in this process,
   divided by the interval (what `testbed attest` of every node once costs).
3. Attestations per second against the N / interval the schedule asks for, and growth
   from the smallest N to the largest.

Run: .venv/bin/python bench/bench_verifier.py [--sizes 8,32] [--interval 2] [--tampers 8]
     [--change runtime|policy] [--swarm] [--workers 16] [--verifiers 1]
Scale: --sizes 50,100,250,500 (swarm nodes; a first start provisions every TPM, about
1 s each but mostly waiting: several at once, 50 nodes come up in about 15 s).
CPU per attestation (verifier, and node side: swarm processes and swtpms) is process CPU
time over the attestations recorded in the same window: it does not depend much on the
machine's load, unlike the latencies.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.cli import main as cli
from testbed.cluster.state import load_node_policy
from testbed.cluster.verification import attest_node
from testbed.core.paths import ClusterPaths
from testbed.sim.backend import SimBackend
from testbed.sim.processes import cluster_processes
from testbed.spec.cluster_spec import MAX_NODES, default_spec_path
from testbed.verifier.service import VerifierConfig, start_verifier, stop_verifiers
from testbed.verifier.store import open_store

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Figures:
    nodes: int
    up_s: float
    attest_p50_ms: float
    sequential_cpu_share: float
    detect_p50_s: float
    detect_p99_s: float
    cpu_share: float
    rss_mb: float
    attestations_per_s: float
    node_cpu_share: float = 0.0  # swarm/node processes and swtpms together
    verifier_ms_per_attestation: float = 0.0  # CPU: process time / attestations
    node_ms_per_attestation: float = 0.0
    load: str = ""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def node_names(n: int, swarm: bool) -> list[str]:
    return [f"w-{i:03d}" for i in range(n)] if swarm else [f"n{i:03d}" for i in range(n)]


def attestations_between(url: str, first: int, last: int) -> int:
    """Attestation events (one per attestation; state changes left out) in (first, last]."""
    store = open_store(url)
    try:
        return sum(1 for e in store.events_after(first, limit=max(1, last - first))
                   if e.kind == "attestation")
    finally:
        store.close()


def bring_up(workdir: Path, n: int, swarm: bool) -> ClusterPaths:
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["name"] = f"bench{n}"
    template = dict(doc["nodes"][0], role="generic")
    doc["nodes"] = ([dict(template, name="w", swarm=n)] if swarm else
                    [dict(template, name=name) for name in node_names(n, swarm)])
    spec = workdir / f"bench{n}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    paths = ClusterPaths(workdir, f"bench{n}")
    with contextlib.redirect_stdout(io.StringIO()):  # progress (stderr) shows
        rc = cli.main(["--workdir", str(workdir), "up", "--json", str(spec)])
    if rc != 0:
        SimBackend(paths).down(purge=True)  # unattended: nothing left behind
        raise SystemExit(f"up of {n} nodes failed ({rc})")
    return paths


def warm_up(url: str, since: float, interval: float, n: int) -> None:
    """Until every node was attested twice by the verifiers: the first pass parses
    each node's policies (cached from then on), which is start-up, not steady state."""
    deadline = time.monotonic() + max(60.0, n / 5)
    for _ in range(2):
        started = time.time()
        while time.monotonic() < deadline:
            store = open_store(url)
            try:
                rows = store.nodes()
            finally:
                store.close()
            if len(rows) == n and all(row.last_time > max(since, started) for row in rows):
                break
            time.sleep(interval / 4)
    time.sleep(interval)


def node_side_cpu(paths: ClusterPaths) -> float:
    """CPU seconds so far of the cluster's node, swarm and swtpm processes."""
    total = 0.0
    for proc in cluster_processes(paths):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(proc.pid)
    return total


def sequential_pass(paths: ClusterPaths, nodes: list[str]) -> tuple[list[float], float]:
    """Attest every node once in this process: per-node latency and CPU seconds."""
    backend = SimBackend(paths)
    latencies = []
    cpu = time.process_time()
    for node in nodes:
        start = time.perf_counter()
        attest_node(paths, node, backend.agent(node), load_node_policy(paths, node),
                    backend.pcrs.indices)
        latencies.append(time.perf_counter() - start)
    return latencies, time.process_time() - cpu


def wait_state(url: str, node: str, transition: str, after: int, timeout: float) -> float:
    store = open_store(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in store.events_after(after, limit=100_000):
                if event.node == node and event.kind == "state" and event.reason == transition:
                    return event.time
            time.sleep(0.02)
    finally:
        store.close()
    raise SystemExit(f"{node}: no {transition!r} within {timeout} s")


def runtime_detection(paths: ClusterPaths, url: str, nodes: list[str], tampers: int,
                      interval: float) -> list[float]:
    """A runtime change: `testbed tamper NODE --runtime PATH` on distinct nodes (the
    change is permanent, each node stays rejected and revoked)."""
    latencies = []
    store = open_store(url)
    for i, node in enumerate(spread(nodes, tampers)):
        after = store.last_seq()
        time.sleep((i % 5) * interval / 5)  # spread the tamper over the interval's phase
        tampered_at = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["--workdir", str(paths.workdir), "--cluster", paths.name,
                           "tamper", node, "--runtime", f"/tmp/unlisted-{i}"])
        if rc != 0:
            raise SystemExit(f"tamper {node} failed ({rc})")
        latencies.append(wait_state(url, node, "trusted -> rejected", after,
                                    max(interval * 5, 60.0)) - tampered_at)
    store.close()
    return latencies


def spread(nodes: list[str], count: int) -> list[str]:
    """``count`` nodes spread evenly over the cluster."""
    return [nodes[i * len(nodes) // count] for i in range(min(count, len(nodes)))]


def detection(paths: ClusterPaths, url: str, nodes: list[str], tampers: int,
              interval: float) -> list[float]:
    latencies = []
    store = open_store(url)
    for i in range(tampers):
        node = nodes[(i * 7) % len(nodes)]
        policy = paths.policy(node)
        original = policy.read_text()
        after = store.last_seq()
        pcr4 = yaml.safe_load(original)["pcrs"][4]
        time.sleep((i % 5) * interval / 5)  # spread the tamper over the interval's phase
        tampered_at = time.time()
        policy.write_text(original.replace(pcr4, "00" * 32))
        latencies.append(wait_state(url, node, "trusted -> rejected", after,
                                    interval * 5) - tampered_at)
        policy.write_text(original)
        wait_state(url, node, "rejected -> trusted", after, interval * 5)
    store.close()
    return latencies


def measure(workdir: Path, n: int, options: argparse.Namespace) -> Figures:
    interval = options.interval
    swarm = options.swarm or n > MAX_NODES
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    started = time.monotonic()
    paths = bring_up(workdir, n, swarm)
    up_s = time.monotonic() - started
    nodes = node_names(n, swarm)
    try:
        latencies, pass_cpu = sequential_pass(paths, nodes)
        pids = [start_verifier(VerifierConfig(workdir, paths.name, name=f"verifier{k or ''}",
                                              interval=interval, workers=options.workers))
                for k in range(options.verifiers)]
        url = str(paths.root / "verifier" / "verifier.db")
        warm_up(url, time.time(), interval, n)
        store = open_store(url)
        seq0, t0 = store.last_seq(), time.monotonic()
        cpu0, node0 = sum(cpu_seconds(p) for p in pids), node_side_cpu(paths)
        time.sleep(options.settle)
        seq1, t1 = store.last_seq(), time.monotonic()
        cpu1, node1 = sum(cpu_seconds(p) for p in pids), node_side_cpu(paths)
        store.close()
        done = max(1, attestations_between(url, seq0, seq1))
        memory = sum(rss_mb(p) for p in pids)
        detected = (runtime_detection if options.change == "runtime" else detection)(
            paths, url, nodes, options.tampers, interval)
        load += " -> " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
        return Figures(
            nodes=n, up_s=up_s, attest_p50_ms=statistics.median(latencies) * 1000,
            sequential_cpu_share=pass_cpu / interval,
            detect_p50_s=statistics.median(detected), detect_p99_s=percentile(detected, 0.99),
            cpu_share=(cpu1 - cpu0) / (t1 - t0), rss_mb=memory,
            attestations_per_s=done / (t1 - t0),
            node_cpu_share=(node1 - node0) / (t1 - t0),
            verifier_ms_per_attestation=(cpu1 - cpu0) / done * 1000,
            node_ms_per_attestation=(node1 - node0) / done * 1000, load=load)
    finally:
        stop_verifiers(paths)
        SimBackend(paths).down(purge=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32",
                        help="cluster sizes, e.g. 50,100,250,500 (above 32: swarm nodes)")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--tampers", type=int, default=8)
    parser.add_argument("--change", choices=("runtime", "policy"), default="runtime",
                        help="what is tampered: a runtime event (an unlisted file executed) "
                             "or the node's policy")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds over which CPU and throughput are measured")
    parser.add_argument("--swarm", action="store_true",
                        help="swarm nodes at every size (above 32 they always are)")
    parser.add_argument("--workers", type=int, default=16, help="each verifier's pool")
    parser.add_argument("--verifiers", type=int, default=1,
                        help="verifiers sharing the nodes through the store's leases")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-verifier-") as tmp:
        for n in sizes:
            rows.append(measure(Path(tmp), n, args))
            print(rows[-1], flush=True)
    print(f"\n{args.verifiers} verifier(s) at a {args.interval:g} s interval, "
          f"{args.workers} workers each, {os.cpu_count()} cores (shared), SQLite; sim nodes "
          f"with their own swtpm; change detected: {args.change}")
    print(f"{'N':>4} {'up s':>6} {'1 attest p50 ms':>16} {'detect p50 s':>13} "
          f"{'detect p99 s':>13} {'CPU (1 core)':>13} {'seq pass CPU':>13} {'RSS MB':>8} "
          f"{'MB/node':>8} {'att/s':>7} {'asked':>6} {'node-side CPU':>14} "
          f"{'verifier ms/att':>16} {'node ms/att':>12}  load")
    for r in rows:
        print(f"{r.nodes:>4} {r.up_s:>6.1f} {r.attest_p50_ms:>16.1f} {r.detect_p50_s:>13.2f} "
              f"{r.detect_p99_s:>13.2f} {r.cpu_share:>13.1%} {r.sequential_cpu_share:>13.1%} "
              f"{r.rss_mb:>8.1f} {r.rss_mb / r.nodes:>8.2f} {r.attestations_per_s:>7.1f} "
              f"{r.nodes / args.interval:>6.1f} {r.node_cpu_share:>14.1%} "
              f"{r.verifier_ms_per_attestation:>16.2f} {r.node_ms_per_attestation:>12.2f}  "
              f"{r.load}")
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        slope = (large.rss_mb - small.rss_mb) / (large.nodes - small.nodes)
        print(f"growth {small.nodes} -> {large.nodes} nodes: memory +{slope:.3f} MB per node, "
              f"CPU x{large.cpu_share / max(small.cpu_share, 1e-9):.1f} for "
              f"x{large.nodes / small.nodes:.1f} nodes, detection p50 "
              f"{small.detect_p50_s:.2f} -> {large.detect_p50_s:.2f} s")


if __name__ == "__main__":
    main()
