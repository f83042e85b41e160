"""QEMU backend figures (not a test): guest image, per-VM boot, parallel attestation.

1. Guest image: build time (or cache hit) and size.
2. Per-VM boot: ``define`` -> the guest agent answers, one VM at a time (N runs).
3. Parallel: time from defining 3 VMs to all 3 attested (AK activation, quote of
   PCRs 0-9, QuoteVerifier against the predicted policy). Goal: within 60 s.

Under TCG unless KVM really works (the accelerator and why are printed). The
firmware reference is captured first if this machine has none (one extra boot).

Run (root): .venv/bin/python bench/bench_qemu.py [--runs 2] [--nodes 3] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.qemu.backend import QemuBackend, QemuNode
from testbed.qemu.image import build_image
from testbed.qemu.recipe import REPO_ROOT

CACHE = REPO_ROOT / ".testbed"


def single_boots(backend: QemuBackend, image: Any, runs: int) -> list[float]:
    times = []
    for run in range(runs):
        node = backend.boot(f"bench-single{run}", image)
        try:
            backend.wait(node)
            assert node.boot_seconds is not None
            times.append(node.boot_seconds)
        finally:
            backend.stop(node.name)
    return times


def parallel(backend: QemuBackend, image: Any, count: int) -> dict[str, Any]:
    policy = backend.predicted_policy(image)
    started = time.monotonic()
    nodes = [backend.boot(f"bench-par{i}", image) for i in range(count)]

    def attest(node: QemuNode) -> tuple[float, float, bool]:
        backend.wait(node)
        report, _ = backend.attest(node, policy)
        return node.boot_seconds or 0.0, time.monotonic() - started, report.ok

    try:
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            results = list(pool.map(attest, nodes))
    finally:
        for node in nodes:
            backend.stop(node.name)
    return {"nodes": count, "all_attested_seconds": round(max(r[1] for r in results), 1),
            "boot_seconds": [round(r[0], 1) for r in results],
            "all_ok": all(r[2] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="single-VM boots to time")
    parser.add_argument("--nodes", type=int, default=3, help="VMs attested in parallel")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    image = build_image(CACHE)
    image_seconds = time.monotonic() - started
    with tempfile.TemporaryDirectory(prefix="bench-qemu-") as tmp, \
            QemuBackend(Path(tmp), reference_dir=CACHE / "firmware") as backend:
        backend.predicted_policy(image)  # capture the firmware reference outside the timings
        singles = single_boots(backend, image, args.runs)
        par = parallel(backend, image, args.nodes)
        figures = {
            "accel": backend.accel.accel, "accel_reason": backend.accel.reason,
            "image": {"digest": image.digest[:16], "build_seconds": image.manifest["build_seconds"],
                      "this_run_seconds": round(image_seconds, 1),
                      "initrd_mib": round(image.manifest["initrd"]["size"] / 2**20, 1),
                      "kernel_mib": round(image.manifest["kernel"]["size"] / 2**20, 1)},
            "single_boot_seconds": [round(t, 1) for t in singles],
            "single_boot_median": round(statistics.median(singles), 1),
            "parallel": par, "goal_60s_met": par["all_ok"] and par["all_attested_seconds"] <= 60,
        }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"accelerator: {figures['accel']} ({figures['accel_reason']})")
    img = figures["image"]
    print(f"image {img['digest']}: initrd {img['initrd_mib']} MiB, kernel {img['kernel_mib']} "
          f"MiB, built in {img['build_seconds']} s (cache: {img['this_run_seconds']} s now)")
    print(f"single VM, define -> agent answers: {figures['single_boot_seconds']} s "
          f"(median {figures['single_boot_median']} s)")
    print(f"{par['nodes']} VMs in parallel, define -> all attested: "
          f"{par['all_attested_seconds']} s (boots {par['boot_seconds']} s, all ok: "
          f"{par['all_ok']}); goal <= 60 s: {'met' if figures['goal_60s_met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
