"""Verifier service figures, each beside its baseline from the same run (not a test).

For each cluster size N (sim nodes, each its own process and swtpm), one detached
verifier (SQLite) attests every node at the interval:

1. Detection latency of a change, until the verifier records ``trusted -> rejected``,
   p50 and p99: a runtime change (``testbed tamper NODE --runtime PATH``: a file its
   runtime policy does not list is executed; the default) or ``--change policy`` (the
   node's policy made to expect another PCR 4, what a changed boot looks like).
   Baseline: one on-demand attestation (quote + verification, ``testbed attest``'s
   work) of the same nodes, p50.
2. Verifier CPU share (of one core) and resident memory, and memory per node. Baseline:
   the CPU of one sequential pass attesting every node in this process, divided by the
   interval (what `testbed attest` of every node once costs).
3. Growth from the small N to the larger N.

A cluster spec holds at most 32 nodes (testbed.spec.cluster_spec.MAX_NODES): the larger N
is 32 here.

Run: .venv/bin/python bench/bench_verifier.py [--sizes 8,32] [--interval 2] [--tampers 8]
     [--change runtime|policy]
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
from testbed.spec.cluster_spec import default_spec_path
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


def bring_up(workdir: Path, n: int) -> ClusterPaths:
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["name"] = f"bench{n}"
    doc["nodes"] = [dict(doc["nodes"][0], name=f"n{i:03d}", role="generic") for i in range(n)]
    spec = workdir / f"bench{n}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main(["--workdir", str(workdir), "up", "--json", str(spec)])
    if rc != 0:
        raise SystemExit(f"up of {n} nodes failed ({rc})")
    return ClusterPaths(workdir, f"bench{n}")


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
    for i, node in enumerate(nodes[:tampers]):
        after = store.last_seq()
        time.sleep((i % 5) * interval / 5)  # spread the tamper over the interval's phase
        tampered_at = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["--workdir", str(paths.workdir), "--cluster", paths.name,
                           "tamper", node, "--runtime", f"/tmp/unlisted-{i}"])
        if rc != 0:
            raise SystemExit(f"tamper {node} failed ({rc})")
        latencies.append(wait_state(url, node, "trusted -> rejected", after,
                                    interval * 5) - tampered_at)
    store.close()
    return latencies


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


def measure(workdir: Path, n: int, interval: float, tampers: int, settle: float,
            change: str) -> Figures:
    started = time.monotonic()
    paths = bring_up(workdir, n)
    up_s = time.monotonic() - started
    nodes = [f"n{i:03d}" for i in range(n)]
    try:
        latencies, pass_cpu = sequential_pass(paths, nodes)
        pid = start_verifier(VerifierConfig(workdir, paths.name, interval=interval))
        url = str(paths.root / "verifier" / "verifier.db")
        time.sleep(interval * 2)  # every node attested at least once
        store = open_store(url)
        seq0, cpu0, t0 = store.last_seq(), cpu_seconds(pid), time.monotonic()
        time.sleep(settle)
        seq1, cpu1, t1 = store.last_seq(), cpu_seconds(pid), time.monotonic()
        store.close()
        memory = rss_mb(pid)
        detected = (runtime_detection if change == "runtime" else detection)(
            paths, url, nodes, tampers, interval)
        return Figures(
            nodes=n, up_s=up_s, attest_p50_ms=statistics.median(latencies) * 1000,
            sequential_cpu_share=pass_cpu / interval,
            detect_p50_s=statistics.median(detected), detect_p99_s=percentile(detected, 0.99),
            cpu_share=(cpu1 - cpu0) / (t1 - t0), rss_mb=memory,
            attestations_per_s=(seq1 - seq0) / (t1 - t0))  # events: ~1 per attestation
    finally:
        stop_verifiers(paths)
        SimBackend(paths).down(purge=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--tampers", type=int, default=10)
    parser.add_argument("--change", choices=("runtime", "policy"), default="runtime",
                        help="what is tampered: a runtime event (an unlisted file executed) "
                             "or the node's policy")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds over which CPU and throughput are measured")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-verifier-") as tmp:
        for n in sizes:
            rows.append(measure(Path(tmp), n, args.interval, args.tampers, args.settle,
                                args.change))
            print(rows[-1], flush=True)
    print(f"\nverifier at a {args.interval:g} s interval, {os.cpu_count()} cores (shared), "
          f"SQLite, sim nodes with their own swtpm; change detected: {args.change}")
    print(f"{'N':>4} {'up s':>6} {'1 attest p50 ms':>16} {'detect p50 s':>13} "
          f"{'detect p99 s':>13} {'CPU (1 core)':>13} {'seq pass CPU':>13} {'RSS MB':>8} "
          f"{'MB/node':>8} {'att/s':>7}")
    for r in rows:
        print(f"{r.nodes:>4} {r.up_s:>6.1f} {r.attest_p50_ms:>16.1f} {r.detect_p50_s:>13.2f} "
              f"{r.detect_p99_s:>13.2f} {r.cpu_share:>13.1%} {r.sequential_cpu_share:>13.1%} "
              f"{r.rss_mb:>8.1f} {r.rss_mb / r.nodes:>8.2f} {r.attestations_per_s:>7.1f}")
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        slope = (large.rss_mb - small.rss_mb) / (large.nodes - small.nodes)
        print(f"growth {small.nodes} -> {large.nodes} nodes: memory +{slope:.3f} MB per node, "
              f"CPU x{large.cpu_share / max(small.cpu_share, 1e-9):.1f} for "
              f"x{large.nodes / small.nodes:.1f} nodes, detection p50 "
              f"{small.detect_p50_s:.2f} -> {large.detect_p50_s:.2f} s")


if __name__ == "__main__":
    main()
