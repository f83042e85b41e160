"""Runtime-integrity figures on one real VM (not a test; docs/runtime.md, "VMs").

One qemu node (the guest image, TCG unless KVM works) is brought up. Per round:
- baseline: `testbed attest` of the untampered VM (quote of PCRs 0-10, every check,
  the incremental `runtime` check with no new entry);
- without runtime: the same quote and checks with PCR 10 and the runtime check left
  out (the node's runtime policy set aside), i.e. what attesting a VM cost before;
- detect: the VM "executes" an unlisted binary (`runtime_measure` over its guest agent)
  -> the attestation verdict (fails `runtime`); then the binary is allowed in the
  node's runtime policy and the VM attested again, so the next round starts clean.

Reported: p50 and p99 in ms over the rounds, and the machine load.

Run (root, libvirt): .venv/bin/python bench/bench_vm_runtime.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attestation.encoding import b64encode
from attestation.ima import RuntimePolicy, dump_runtime_policy
from testbed.backends import open_backend
from testbed.cli import main as cli
from testbed.cluster import lifecycle
from testbed.cluster.runtime import node_runtime_policy, runtime_dir
from testbed.core.paths import ClusterPaths

SPEC = ("version: 1\nname: rt\nbackend: qemu\nimage: default\n"
        "nodes:\n  - {name: vm0, role: generic}\n")
CACHE = Path(os.environ.get("TESTBED_IMAGE_CACHE") or "/var/cache/trusted-testbed")


def cli_quiet(workdir: Path, *argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli.main(["--workdir", str(workdir), *argv])


def timed_attest(paths: ClusterPaths) -> tuple[float, bool, str | None]:
    backend = open_backend(paths)
    try:
        start = time.perf_counter()
        result = lifecycle.attest(backend, "vm0")
        elapsed = time.perf_counter() - start
    finally:
        backend.close()
    failure = result.report.failure
    return elapsed, result.report.ok, failure.name if failure else None


def allow(paths: ClusterPaths, path: str, content: bytes) -> None:
    policy = node_runtime_policy(paths, "vm0")
    assert policy is not None
    widened = RuntimePolicy(policy.name, {**policy.allow, path: frozenset(
        {hashlib.sha256(content).digest()})}, policy.exclude)
    (runtime_dir(paths) / "vm0.yaml").write_text(dump_runtime_policy(widened))


def one_round(paths: ClusterPaths, index: int) -> dict[str, float]:
    base, ok, _ = timed_attest(paths)
    assert ok, "the untampered VM must pass"
    policy_file = runtime_dir(paths) / "vm0.yaml"
    aside = policy_file.with_suffix(".aside")
    policy_file.rename(aside)  # no runtime policy: no PCR 10, no runtime check
    try:
        plain, ok, _ = timed_attest(paths)
    finally:
        aside.rename(policy_file)
    assert ok
    path, content = f"/usr/local/bin/unlisted-{index}", b"unlisted %d" % index
    backend = open_backend(paths)
    start = time.perf_counter()
    backend.agent("vm0").call({"op": "runtime_measure", "path": path,
                               "content": b64encode(content)})
    backend.close()
    attest_s, ok, failed = timed_attest(paths)
    detect = time.perf_counter() - start
    assert not ok and failed == "runtime", failed
    allow(paths, path, content)
    return {"baseline": base, "without runtime": plain, "detect": detect,
            "attest (failing)": attest_s}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    (CACHE / "vm-tests").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=CACHE / "vm-tests", prefix="bench-runtime-"))
    (workdir / "rt.yaml").write_text(SPEC)
    try:
        up = time.perf_counter()
        assert cli_quiet(workdir, "up", str(workdir / "rt.yaml")) == 0, "up failed"
        print(f"up (1 VM): {time.perf_counter() - up:.1f} s; load {os.getloadavg()[0]:.2f}")
        paths = ClusterPaths(workdir, "rt")
        rounds = [one_round(paths, i) for i in range(args.rounds)]
        print(f"{args.rounds} rounds; load after {os.getloadavg()[0]:.2f}")
        print("| measure | p50 ms | p99 ms |\n|---|---|---|")
        for key in rounds[0]:
            values = [r[key] for r in rounds]
            print(f"| {key} | {pct(values, 0.5):.0f} | {pct(values, 0.99):.0f} | "
                  f"(mean {statistics.mean(values) * 1000:.0f})")
    finally:
        cli_quiet(workdir, "down", "--purge")
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
