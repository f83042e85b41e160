"""Revocation figures on a real sim cluster (not a test; docs/runtime.md).

Per round: the client holds an attested channel to the server; the client "executes"
an unlisted binary (`runtime_measure`); the client is attested (fails `runtime`); the
revocation is published; we wait until the server reports the channel closed, then
until the CryptoVM refuses the client's enrollment; the client is reinstated.

Reported, p50 and p99 over the rounds:
- detect: tamper -> attestation verdict (quote + checks + incremental log read);
- publish: the publish() call (sign + deliver to every node);
- channel closed: tamper -> the server's channel from the client is gone;
- CryptoVM refusing: tamper -> the client's enrollment is refused.

Run: .venv/bin/python bench/bench_revocation.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attestation.encoding import b64encode
from attestation.errors import TestbedError
from testbed.backends import open_backend
from testbed.cli import main as cli
from testbed.cluster import lifecycle
from testbed.cluster.agent import AgentClient, UnixTransport
from testbed.core.clock import utc_now
from testbed.core.paths import ClusterPaths
from testbed.verifier.revocation import RevocationEvent, next_sequence, publish, reinstate

CLUSTER = "trusted-passages-lab"


def agent(paths: ClusterPaths, node: str) -> AgentClient:
    return AgentClient(UnixTransport(paths.node(node).socket), node=node, timeout=10)


def cli_quiet(workdir: Path, *argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli.main(["--workdir", str(workdir), *argv])


def one_round(paths: ClusterPaths, index: int) -> dict[str, float]:
    client, server = agent(paths, "client"), agent(paths, "server")
    client.role("open", {"peer": "server"})
    start = time.perf_counter()
    client.call({"op": "runtime_measure", "path": f"/opt/unlisted-{index}",
                 "content": b64encode(b"x")})
    backend = open_backend(paths)
    try:
        result = lifecycle.attest(backend, "client")
    finally:
        backend.close()
    assert not result.report.ok and result.report.failure is not None
    detected = time.perf_counter()
    event = RevocationEvent("client", result.report.failure.name,
                            result.report.failure.detail, utc_now(), next_sequence(paths))
    publish(paths, event)
    published = time.perf_counter()
    while server.role("info")["open"]:
        time.sleep(0.002)
    closed = time.perf_counter()
    with contextlib.suppress(TestbedError):
        client.role("enroll")
        raise SystemExit("the CryptoVM served a revoked node")
    refused = time.perf_counter()
    reinstate(paths, "client", "bench round")
    return {"detect": detected - start, "publish": published - detected,
            "channel closed": closed - start, "CryptoVM refusing": refused - start}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-revocation-"))
    if cli_quiet(workdir, "up") != 0:
        raise SystemExit("testbed up failed")
    try:
        paths = ClusterPaths(workdir, CLUSTER)
        rounds = [one_round(paths, i) for i in range(args.rounds)]
    finally:
        cli_quiet(workdir, "down", "--purge")
    print(f"revocation on a 4-node sim cluster, {args.rounds} rounds (ms)")
    for name in rounds[0]:
        values = sorted(r[name] * 1000 for r in rounds)
        p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
        print(f"  {name:<18} p50 {statistics.median(values):7.1f}   p99 {p99:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
