"""Hypervisor host figures on this machine (not a test; docs/hosts.md).

In one run, each in a fresh work directory sharing one EK CA (made first, timed apart):
- single host: `up 1` (files, TPM manufactured, namespaces, init, sshd/libvirtd, then
  registration and attestation over SSH), then `down`: the baseline;
- two hosts: `up 2` (goal <= 20 s) and `down`;
- host attestation latency over SSH, p50 and p99 over the rounds: cold (a new SSH
  connection per attestation, as `testbed hosts attest` does) and warm (one SSH
  connection and its host agent process kept);
- libvirt over qemu+ssh: open + getLibVersion + close.

Run: .venv/bin/python bench/bench_hosts.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.hosts import lifecycle
from testbed.hosts.attest import attest_host
from testbed.hosts.layout import LabPaths, LabState
from testbed.hosts.network import scratch_network
from testbed.hosts.remote import SshSession, agent_client, libvirt_uri, libvirt_version
from testbed.tpm.localca import LocalCA


def timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def lab_dir(root: Path, name: str) -> Path:
    workdir = root / name
    workdir.mkdir()
    shutil.copytree(root / "ca", workdir / "ca")  # the same project CA in every run
    return workdir


def up_down(root: Path, name: str, count: int) -> tuple[float, float, Path]:
    workdir = lab_dir(root, name)
    bridge, subnet = scratch_network("tbb")
    up_s = timed(lambda: check(lifecycle.up(workdir, count, bridge=bridge, subnet=subnet)))
    down_s = timed(lambda: lifecycle.down(workdir))
    return up_s, down_s, workdir


def check(results: list[lifecycle.HostUp]) -> None:
    bad = [r.name for r in results if r.verdict is None or not r.verdict.trusted]
    if bad:
        raise SystemExit(f"hosts not trusted: {bad}")


def latencies(root: Path, rounds: int) -> dict[str, list[float]]:
    workdir = lab_dir(root, "latency")
    bridge, subnet = scratch_network("tbb")
    check(lifecycle.up(workdir, 1, bridge=bridge, subnet=subnet))
    lab = LabPaths(workdir)
    state = LabState.load(lab)
    assert state is not None
    address = state.hosts["host1"].address
    out: dict[str, list[float]] = {"cold": [], "warm": [], "libvirt": []}
    session = SshSession(address, lab)
    agent = agent_client(session, "host1")
    try:
        for _ in range(rounds):
            out["cold"].append(timed(lambda: lifecycle.attest(workdir, "host1")))
            out["warm"].append(timed(lambda: attest_host(lab, "host1", agent)))
            out["libvirt"].append(timed(lambda: libvirt_version(libvirt_uri(lab, address))))
    finally:
        session.close()
        lifecycle.down(workdir)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp:
        root = Path(tmp)
        ca_s = timed(lambda: LocalCA.ensure(root / "ca"))
        one_up, one_down, _ = up_down(root, "one", 1)
        two_up, two_down, _ = up_down(root, "two", 2)
        lat = latencies(root, args.rounds)
    load_after = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f} (1 min)")
    print(f"project EK CA made once: {ca_s:.2f} s (not in the figures below)")
    print(f"single host (baseline): up + registered + attested {one_up:.2f} s, "
          f"down {one_down:.2f} s")
    print(f"two hosts:              up + registered + attested {two_up:.2f} s "
          f"(goal <= 20 s), down {two_down:.2f} s")
    for name, label in (("cold", "host attestation, new SSH connection"),
                        ("warm", "host attestation, SSH + agent kept"),
                        ("libvirt", "libvirt getLibVersion over qemu+ssh")):
        values = lat[name]
        print(f"{label:<40} p50 {statistics.median(values) * 1000:7.1f} ms  "
              f"p99 {pct(values, 0.99) * 1000:7.1f} ms  ({len(values)} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
