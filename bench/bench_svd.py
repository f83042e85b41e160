"""Encrypted-disk figures (not a test; docs/svd.md, docs/performance.md).

1. Sequential throughput through a qemu-storage-daemon FUSE plain view: a LUKS1 disk
   (QEMU's ``luks`` driver, aes-256-xts) against a raw disk, same size, same run,
   alternating, each round: write SIZE in 1 MiB blocks + fsync; stop the daemon (the
   page cache of the view goes with its mount); start a new one, read SIZE back.
2. Key release latency, request to unlocked disk: the attack lab's world (in-process
   CryptoVM, real swtpms): nonce, the owner's quote, ``release_decrypt``, open the
   envelope, start a daemon, open the LUKS volume, export the plain view. Also the
   release alone (no daemon) and the daemon part alone (the key already in hand).

3. In a VM (``--vm``; docs/svd.md, "VMs"): a qemu cluster (a CryptoVM VM, a server VM
   with a host-side disk). In the guest, sequential write then read of SIZE in 1 MiB
   blocks with O_DIRECT (dd's ``oflag=direct``/``iflag=direct``; the guest agent's
   ``disk_bench``) on the encrypted disk (qcow2 ``encrypt.format=luks``, QEMU decrypts)
   against a plain qcow2 hot-plugged into the same VM, alternating. Key release latency
   from request to unlocked disk in the VM: the disk unplugged, then release (nonce,
   the VM's quote, ``release_decrypt``), ephemeral libvirt secret, hot-plug, until the
   guest lists the disk.

4. Guest-side mode in a VM (``--vm --guest-mode``; docs/svd.md, "VMs: guest-side
   disks"): the same cluster with a ``mode: guest`` disk (LUKS2 by the guest's dm-crypt,
   its key fetched by the guest over Trusted Passages). Throughput on
   ``/dev/mapper/svd-data`` against a plain qcow2 in the same VM; key release latency
   from request to unlocked disk: the disk closed (``svd_lock``), then the attested
   channel relayed to the CryptoVM VM, the release with the VM's quote, ``cryptsetup
   open``.

Run: .venv/bin/python bench/bench_svd.py [--size-mib 64] [--rounds 3] [--releases 10]
     .venv/bin/python bench/bench_svd.py --vm [--size-mib 64] [--rounds 3] [--releases 5]
     .venv/bin/python bench/bench_svd.py --vm --guest-mode [--size-mib 64] [--releases 5]
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptovm.disks import DiskBinding, ensure_disk_key, release_disk_key
from testbed.attacks.lab import Lab
from testbed.attacks.svd import DISK, OWNER, lab_quote, svd_world
from testbed.cluster.agent import AgentClient
from testbed.core.paths import ClusterPaths
from testbed.qemu import disks as vm_disks
from testbed.qemu.backend import QemuBackend, domain_name
from testbed.qemu.domain import connect
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.roles.cryptovm import cryptovm_endpoint
from testbed.spec.cluster_spec import DiskSpec
from testbed.svd.qsd import StorageDaemon
from testbed.svd.volumes import attach, detach

BLOCK = 1 << 20
KEY = os.urandom(32).hex().encode()


def _open(kind: str, image: Path, run: Path) -> tuple[StorageDaemon, Path]:
    daemon = StorageDaemon(run, kind).start()
    if kind == "luks":
        daemon.open_luks(image, KEY)
    else:
        daemon.open_plain(image)
    view = run / f"{kind}.view"
    daemon.export_fuse(view)
    return daemon, view


def _write(view: Path, size: int) -> float:
    block = os.urandom(BLOCK)
    start = time.perf_counter()
    fd = os.open(view, os.O_WRONLY)
    try:
        for _ in range(size // BLOCK):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size / (time.perf_counter() - start) / BLOCK


def _read(view: Path, size: int) -> float:
    start = time.perf_counter()
    fd = os.open(view, os.O_RDONLY)
    try:
        while os.read(fd, BLOCK):
            pass
    finally:
        os.close(fd)
    return size / (time.perf_counter() - start) / BLOCK


def throughput(base: Path, size: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    images = {"luks": base / "disk.luks", "raw": base / "disk.raw"}
    formatter = StorageDaemon(base / "run", "format").start()
    try:
        formatter.create_luks(images["luks"], size, KEY)
    finally:
        formatter.stop()
    with open(images["raw"], "wb") as f:
        f.truncate(size)
    figures: dict[str, dict[str, list[float]]] = {k: {"write": [], "read": []} for k in images}
    for _ in range(rounds):
        for kind, image in images.items():
            daemon, view = _open(kind, image, base / "run")
            figures[kind]["write"].append(_write(view, size))
            daemon.stop()
            daemon, view = _open(kind, image, base / "run")
            figures[kind]["read"].append(_read(view, size))
            daemon.stop()
    return figures


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def release_latency(releases: int) -> dict[str, list[float]]:
    with Lab() as lab:
        world = svd_world(lab)  # provisions the server's disk
        files = world.files(OWNER)
        quote = lab_quote(lab.nodes[OWNER])
        binding = DiskBinding.load(files.binding)
        figures: dict[str, list[float]] = {"unlock": [], "release": [], "daemon": []}

        def unlock() -> None:
            attach(files, DISK, "cryptovm", world.call, quote, lambda: b"")

        def release() -> None:
            key[:] = [release_disk_key(world.call, binding, quote)]

        def open_disk() -> None:
            daemon = files.daemon.start()
            daemon.open_luks(files.image, key[0])
            daemon.export_fuse(files.plain_view)

        key: list[bytes] = []
        for _ in range(releases):
            figures["unlock"].append(_timed(unlock))
            detach(files)
            figures["release"].append(_timed(release))
            figures["daemon"].append(_timed(open_disk))
            detach(files)
        return figures


# --- in a VM -----------------------------------------------------------------------------------

CACHE = Path(os.environ.get("TESTBED_IMAGE_CACHE") or "/var/cache/trusted-testbed").absolute()
VM_CLUSTER = "svdbench"


def _vm_spec(size_mib: int, mode: str = "host") -> str:
    # A guest-side disk also holds its LUKS2 header (16 MiB) before the data.
    size = size_mib + (17 if mode == "guest" else 1)
    return (f"version: 1\nname: {VM_CLUSTER}\nbackend: qemu\nimage: default\nnodes:\n"
            "  - name: cryptovm\n    role: cryptovm\n  - name: server\n    role: server\n"
            f"    disks:\n      - {{name: data, size: {size}M, mode: {mode}}}\n")


def _cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli.main", "--workdir",
                           str(workdir), *args], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "TESTBED_IMAGE_CACHE": str(CACHE)})


@contextmanager
def vm_cluster(size_mib: int, mode: str = "host"
               ) -> Iterator[tuple[ClusterPaths, dict[str, Any]]]:
    (CACHE / "vm-tests").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=CACHE / "vm-tests", prefix="bench-svd-"))
    try:
        spec = workdir / "svd.yaml"
        spec.write_text(_vm_spec(size_mib, mode))
        up = _cli(workdir, "up", str(spec), "--json")
        if up.returncode == 4 and "did not answer within" in up.stderr:
            up = _cli(workdir, "up", str(spec), "--json")  # a loaded TCG boot: keep going
        if up.returncode != 0:
            raise SystemExit(f"up failed ({up.returncode}): {up.stderr[-3000:]}")
        yield ClusterPaths(workdir, VM_CLUSTER), json.loads(up.stdout)
    finally:
        _cli(workdir, "down", "--purge")
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_disk(agent: AgentClient, serial: str, present: bool, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = {d["serial"] for d in agent.call({"op": "disk_list"})["disks"]}
        if (serial in listed) == present:
            return
        time.sleep(0.05)
    raise SystemExit(f"disk {serial} {'never appeared' if present else 'never left'}")


def vm_figures(paths: ClusterPaths, size_mib: int, rounds: int, releases: int,
               guest_mode: bool = False) -> dict[str, Any]:
    conn = connect()
    domain = conn.lookupByName(domain_name(paths, "server"))
    agent = QemuBackend(paths).agent("server", timeout=600)
    plain = vm_disks.disk_root(paths) / "server" / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), f"{size_mib + 1}M"],
                   check=True)
    domain.attachDeviceFlags(vm_disks.disk_xml(plain, "plain", "vdc", None),
                             vm_disks.AFFECT_LIVE)
    _wait_disk(agent, "plain", True)
    tput: dict[str, dict[str, list[float]]] = {k: {"write": [], "read": []}
                                               for k in ("data", "plain")}
    for _ in range(rounds):
        for serial in ("data", "plain"):
            got = agent.call({"op": "disk_bench", "disk": serial, "mib": size_mib})
            tput[serial]["write"].append(got["write_mib_s"])
            tput[serial]["read"].append(got["read_mib_s"])
    if guest_mode:
        latency = _guest_release_latency(paths, agent, size_mib, releases)
    else:
        latency = _vm_release_latency(paths, conn, domain, agent, size_mib, releases)
    conn.close()
    return {"throughput": tput, "latency": latency}


def _guest_release_latency(paths: ClusterPaths, agent: AgentClient, size_mib: int,
                           releases: int) -> dict[str, list[float]]:
    """Request to unlocked disk, guest-side: close, then what `up` does to open it."""
    files = vm_disks.VmDiskFiles(paths, "server", "data")
    spec = DiskSpec("data", (size_mib + 17) << 20, "guest")
    client = cryptovm_endpoint(paths, "cryptovm").client()
    cryptovm = QemuBackend(paths).agent("cryptovm", timeout=600)
    keys = vm_disks.GuestDiskKeys(client.call, paths.policy("server").read_text(),
                                  paths.registry.read_text())
    figures: dict[str, list[float]] = {"unlock": []}
    try:
        for _ in range(releases):
            agent.call({"op": "svd_lock", "disk": "data"})
            start = time.perf_counter()
            vm_disks.unlock_guest_disks(agent, cryptovm, node="server", cryptovm="cryptovm",
                                        disks=[(files, spec)], keys=keys, pcrs=QUOTED_PCRS)
            figures["unlock"].append((time.perf_counter() - start) * 1000)
    finally:
        client.close()
    return figures


def _vm_release_latency(paths: ClusterPaths, conn: Any, domain: Any, agent: AgentClient,
                        size_mib: int, releases: int) -> dict[str, list[float]]:
    files = vm_disks.VmDiskFiles(paths, "server", "data")
    spec = DiskSpec("data", (size_mib + 1) << 20, "host")
    client = cryptovm_endpoint(paths, "cryptovm").client()
    figures: dict[str, list[float]] = {"unlock": [], "release": []}
    quote_agent = QemuBackend(paths).agent("server")
    try:
        for _ in range(releases):
            vm_disks.detach(domain, "data")
            _wait_disk(agent, "data", False)
            start = time.perf_counter()
            vm_disks.attach_host_disk(
                conn, domain, files, spec, "vdb", "cryptovm", client.call,
                lambda data: quote_agent.quote(data, list(QUOTED_PCRS)),
                lambda: ensure_disk_key(client.call, "server", "data", "", ""))
            _wait_disk(agent, "data", True)
            figures["unlock"].append((time.perf_counter() - start) * 1000)
            binding = DiskBinding.load(files.binding)
            figures["release"].append(_timed(lambda b=binding: release_disk_key(  # type: ignore[misc]
                client.call, b, lambda data: quote_agent.quote(data, list(QUOTED_PCRS)))))
    finally:
        client.close()
    return figures


def _print_vm(figures: dict[str, Any], size_mib: int, rounds: int, releases: int,
              guest_mode: bool = False) -> None:
    tput = figures["throughput"]
    med = {k: {op: statistics.median(v) for op, v in ops.items()} for k, ops in tput.items()}
    print(f"\nin a VM (TCG unless KVM): sequential O_DIRECT, {size_mib} MiB, {rounds} rounds "
          "(median MiB/s in the guest)")
    print("| disk | write | read |\n|---|---|---|")
    print(f"| plain qcow2 | {med['plain']['write']:.1f} | {med['plain']['read']:.1f} |")
    encrypted = ("guest dm-crypt LUKS2 aes-xts-plain64 on a plain qcow2" if guest_mode
                 else "qcow2 encrypt.format=luks")
    print(f"| {encrypted} | {med['data']['write']:.1f} | {med['data']['read']:.1f} |")
    print(f"| ratio encrypted/plain | {med['data']['write'] / med['plain']['write']:.2f} | "
          f"{med['data']['read'] / med['plain']['read']:.2f} |")
    print(f"\nkey release latency in a VM, {releases} rounds (ms)")
    print("| step | p50 | p99 |\n|---|---|---|")
    if guest_mode:
        values = figures["latency"]["unlock"]
        print(f"| request to unlocked disk in the VM (attested channel to the CryptoVM VM, "
              f"release with the VM's quote, cryptsetup open) | {_p(values, 0.5):.0f} | "
              f"{_p(values, 0.99):.0f} |")
        return
    for name, label in (("unlock", "request to unlocked disk in the VM (release + libvirt "
                         "secret + hot-plug + guest sees it)"),
                        ("release", "release alone (nonce, VM quote, release_decrypt)")):
        values = figures["latency"][name]
        print(f"| {label} | {_p(values, 0.5):.0f} | {_p(values, 0.99):.0f} |")


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--releases", type=int, default=10)
    parser.add_argument("--vm", action="store_true", help="the in-guest figures (qemu)")
    parser.add_argument("--guest-mode", action="store_true",
                        help="with --vm: a guest-side disk (dm-crypt in the guest)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    if args.vm:
        mode = "guest" if args.guest_mode else "host"
        with vm_cluster(args.size_mib, mode) as (paths, up):
            figures = vm_figures(paths, args.size_mib, args.rounds, args.releases,
                                 args.guest_mode)
        load_after = os.getloadavg()
        print(f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
              f"{load_after[0]:.2f} after; accel {up.get('accel')}")
        _print_vm(figures, args.size_mib, args.rounds, args.releases, args.guest_mode)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-svd-") as tmp:
        tput = throughput(Path(tmp), args.size_mib * BLOCK, args.rounds)
    latency = release_latency(args.releases)
    load_after = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    print(f"\nsequential throughput, {args.size_mib} MiB, {args.rounds} rounds "
          "(median MiB/s through the FUSE plain view)")
    print("| disk | write | read |\n|---|---|---|")
    med = {k: {op: statistics.median(v) for op, v in ops.items()} for k, ops in tput.items()}
    for kind, label in (("raw", "plain (raw)"), ("luks", "LUKS1 aes-xts-plain64")):
        print(f"| {label} | {med[kind]['write']:.0f} | {med[kind]['read']:.0f} |")
    print(f"| ratio LUKS/plain | {med['luks']['write'] / med['raw']['write']:.2f} | "
          f"{med['luks']['read'] / med['raw']['read']:.2f} |")
    print(f"\nkey release latency, {args.releases} rounds (ms)")
    print("| step | p50 | p99 |\n|---|---|---|")
    for name, label in (("unlock", "request to unlocked disk (release + daemon + open + "
                         "export)"), ("release", "release alone (nonce, quote, "
                                     "release_decrypt, envelope)"),
                        ("daemon", "daemon start + LUKS open + FUSE export")):
        values = latency[name]
        print(f"| {label} | {_p(values, 0.5):.1f} | {_p(values, 0.99):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
