"""Hypervisor host figures on this machine (not a test; docs/hosts.md).

In one run, each in a fresh work directory sharing one EK CA (made first, timed apart):
- single host: `up 1` (files, TPM manufactured, namespaces, init, sshd/libvirtd, then
  registration and attestation over SSH), then `down`: the baseline;
- two hosts: `up 2` (goal <= 20 s) and `down`;
- host attestation latency over SSH, p50 and p99 over the rounds: cold (a new SSH
  connection per attestation, as `testbed hosts attest` does) and warm (one SSH
  connection and its host agent process kept);
- libvirt over qemu+ssh: open + getLibVersion + close.

With ``--placement HOSTSxVMS`` (e.g. ``2x2``, goal <= 90 s under TCG; ``1x1`` on a
loaded machine) instead: VMs placed on attested hosts (fresh hosts: the image artifacts
are copied), ``testbed up SPEC --backend qemu`` until every VM is attested, beside the
same number of VMs on the local libvirt in the same run (the single-host baseline).
Then the demo across hosts (``testbed demo --backend qemu --spec
testbed/examples/two-hosts.yaml``: three VMs on two hosts brought up, channels both ways,
the CryptoVM through SSH, down) beside the plain qemu demo (the same three VMs local),
unless ``--no-demo``. ``--bridge/--subnet`` choose the lab network (default: a scratch one).
The guest image comes from ``$TESTBED_IMAGE_CACHE`` (default /var/cache/trusted-testbed),
built beforehand.

Run: .venv/bin/python bench/bench_hosts.py [--rounds 10]
     [--placement 2x2 [--baseline VMS] [--no-demo] [--bridge B --subnet S]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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


CACHE = Path(os.environ.get("TESTBED_IMAGE_CACHE") or "/var/cache/trusted-testbed").absolute()
EXAMPLE = Path(__file__).resolve().parent.parent / "testbed" / "examples" / "two-hosts.yaml"


def placement_spec(hosts: int, vms: int, placed: bool) -> str:
    nodes = "".join(f"  - {{name: vm{h}{v}, role: generic"
                    f"{f', host: host{h}' if placed else ''}}}\n"
                    for h in range(1, hosts + 1) for v in range(1, vms + 1))
    return f"version: 1\nname: bench\nbackend: qemu\nimage: default\nnodes:\n{nodes}"


def cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TESTBED_IMAGE_CACHE": str(CACHE)}
    return subprocess.run([sys.executable, "-m", "testbed.cli.main", "--workdir", str(workdir),
                           *args], capture_output=True, text=True, env=env, check=False)


class FigureFailed(Exception):
    """One figure could not be measured (said in its place; the others go on)."""


def attempt(label: str, measure: Callable[[], str]) -> bool:
    """Print ``label: measure()``, or why it failed, as soon as it is known."""
    try:
        print(f"{label}: {measure()}; load now {os.getloadavg()[0]:.2f}", flush=True)
    except FigureFailed as exc:
        print(f"{label}: FAILED: {exc}", flush=True)
        return False
    return True


def up_attested(workdir: Path, spec: str) -> tuple[float, list[float], str]:
    """Wall time of `testbed up` until every VM is attested, each VM's boot time, and a
    note: a VM that did not come up in time (TCG on a loaded machine) gets one more `up`
    (which boots only it anew), and the time is then the sum, said in the note."""
    path = workdir / "spec.yaml"
    path.write_text(spec)
    started = time.perf_counter()
    r = cli(workdir, "up", str(path), "--json")
    note = ""
    if r.returncode == 4:
        note = f" (one VM retried: {r.stderr.strip().splitlines()[0][:120]})"
        r = cli(workdir, "up", str(path), "--json")
    seconds = time.perf_counter() - started
    if r.returncode != 0:
        raise FigureFailed(f"up failed ({r.returncode}): {r.stderr.strip()[-300:]}")
    nodes = json.loads(r.stdout)["nodes"]
    return seconds, [float(n.get("boot_seconds") or 0) for n in nodes], note


def demo(workdir: Path, *spec: str) -> float:
    """Wall time of one `testbed demo --backend qemu` (brought up, demo, down)."""
    started = time.perf_counter()
    r = cli(workdir, "demo", "--backend", "qemu", *spec, "--json")
    seconds = time.perf_counter() - started
    if r.returncode != 0:
        raise FigureFailed(f"demo {' '.join(spec)} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-300:]}")
    return seconds


def placement(hosts: int, vms: int, network: tuple[str, str] | None, with_demo: bool,
              baseline: int) -> int:
    """Each figure printed as soon as it is measured (a failed one says why)."""
    (CACHE / "vm-tests").mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores; load average at the start {load[0]:.2f} "
          "(1 min); TCG", flush=True)
    root = Path(tempfile.mkdtemp(dir=CACHE / "vm-tests", prefix="bench-placement-"))

    def up_down(placed: bool, count_hosts: int, count_vms: int) -> str:
        seconds, boot, note = up_attested(root, placement_spec(count_hosts, count_vms, placed))
        down = timed(lambda: cli(root, "down", "--purge"))
        return (f"{seconds:.1f} s{note}; VM boot {', '.join(f'{b:.1f}' for b in boot)} s; "
                f"down {down:.1f} s")

    try:
        bridge, subnet = network or scratch_network("tbb")
        hosts_s = timed(lambda: check(lifecycle.up(root, max(hosts, 2 if with_demo else 1),
                                                   bridge=bridge, subnet=subnet)))
        print(f"hosts up + attested: {hosts_s:.1f} s (not in the figures below)", flush=True)
        attempt(f"{hosts} host(s) x {vms} VM(s) placed, up + attested (artifacts copied to "
                "fresh hosts)", lambda: up_down(True, hosts, vms))
        if not attempt(f"{baseline} VM(s) on the local libvirt, up + attested (baseline)",
                       lambda: up_down(False, 1, baseline)) and baseline > 1:
            cli(root, "down", "--purge")
            attempt("1 VM on the local libvirt, up + attested (the smaller baseline)",
                    lambda: up_down(False, 1, 1))
        if with_demo:
            attempt("demo across hosts (two-hosts.yaml: 3 VMs on 2 hosts, up to down)",
                    lambda: f"{demo(root, '--spec', str(EXAMPLE)):.1f} s")
            attempt("the plain qemu demo (3 local VMs, up to down)",
                    lambda: f"{demo(root):.1f} s")
    finally:
        cli(root, "down", "--purge")
        lifecycle.down(root)
        shutil.rmtree(root, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--placement", metavar="HOSTSxVMS",
                        help="VMs placed on hosts (e.g. 2x2) beside the same VMs local")
    parser.add_argument("--no-demo", action="store_true",
                        help="with --placement: skip the demo across hosts and its baseline")
    parser.add_argument("--baseline", type=int, metavar="VMS",
                        help="with --placement: how many local VMs the baseline has "
                             "(default: as many as placed)")
    parser.add_argument("--bridge", help="the lab bridge (with --subnet; default: scratch)")
    parser.add_argument("--subnet", help="the lab subnet, e.g. 10.213.12.0/24")
    args = parser.parse_args()
    if bool(args.bridge) != bool(args.subnet):
        parser.error("--bridge and --subnet go together")
    if args.placement:
        hosts, _, vms = args.placement.partition("x")
        network = (args.bridge, args.subnet) if args.bridge else None
        return placement(int(hosts), int(vms), network, not args.no_demo,
                         args.baseline or int(hosts) * int(vms))
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
