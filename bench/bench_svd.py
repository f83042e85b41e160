"""Encrypted-disk figures (not a test; docs/svd.md, docs/performance.md).

1. Sequential throughput through a qemu-storage-daemon FUSE plain view: a LUKS1 disk
   (QEMU's ``luks`` driver, aes-256-xts) against a raw disk, same size, same run,
   alternating, each round: write SIZE in 1 MiB blocks + fsync; stop the daemon (the
   page cache of the view goes with its mount); start a new one, read SIZE back.
2. Key release latency, request to unlocked disk: the attack lab's world (in-process
   CryptoVM, real swtpms): nonce, the owner's quote, ``release_decrypt``, open the
   envelope, start a daemon, open the LUKS volume, export the plain view. Also the
   release alone (no daemon) and the daemon part alone (the key already in hand).

Run: .venv/bin/python bench/bench_svd.py [--size-mib 64] [--rounds 3] [--releases 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptovm.disks import DiskBinding, release_disk_key
from testbed.attacks.lab import Lab
from testbed.attacks.svd import DISK, OWNER, lab_quote, svd_world
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


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--releases", type=int, default=10)
    args = parser.parse_args()
    load_before = os.getloadavg()
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
