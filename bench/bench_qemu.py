"""QEMU backend figures (not a test): guest image, per-VM boot, parallel attestation.

1. Guest image: build time (or cache hit) and size.
2. Per-VM boot: ``define`` -> the guest agent answers, one VM at a time (N runs).
3. Parallel: time from defining 3 VMs to all 3 attested (AK activation, quote of
   PCRs 0-9, QuoteVerifier against the predicted policy). Goal: within 60 s.
4. Cluster: ``testbed up --backend qemu`` on the shipped 3-node example (a fresh work
   directory, the CLI as a user runs it) until it returns with all three registered
   and attested, with each VM's boot time; then ``testbed down``. Goal: within 60 s.

Under TCG unless KVM really works (the accelerator and why are printed). The
firmware reference is captured first if this machine has none (one extra boot).

Run (root): .venv/bin/python bench/bench_qemu.py [--runs 2] [--nodes 3] [--cluster-only] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.qemu.image.build import build_image
from testbed.qemu.vms import QemuNode, VmDriver
from testbed.spec.recipe import REPO_ROOT

CACHE = Path(os.environ.get("TESTBED_IMAGE_CACHE") or REPO_ROOT / ".testbed").absolute()
GOAL_S = 60.0


def single_boots(driver: VmDriver, image: Any, runs: int) -> list[float]:
    times = []
    for run in range(runs):
        node = driver.boot(f"bench-single{run}", image)
        try:
            driver.wait(node)
            assert node.boot_seconds is not None
            times.append(node.boot_seconds)
        finally:
            driver.stop(node.name)
    return times


def parallel(driver: VmDriver, image: Any, count: int) -> dict[str, Any]:
    policy = driver.predicted_policy(image)
    started = time.monotonic()
    nodes = [driver.boot(f"bench-par{i}", image) for i in range(count)]

    def attest(node: QemuNode) -> tuple[float, float, bool]:
        driver.wait(node)
        report, _ = driver.attest(node, policy)
        return node.boot_seconds or 0.0, time.monotonic() - started, report.ok

    try:
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            results = list(pool.map(attest, nodes))
    finally:
        for node in nodes:
            driver.stop(node.name)
    return {"nodes": count, "all_attested_seconds": round(max(r[1] for r in results), 1),
            "boot_seconds": [round(r[0], 1) for r in results],
            "all_ok": all(r[2] for r in results)}


def _cli(workdir: Path, *args: str) -> tuple[float, Any]:
    env = {**os.environ, "TESTBED_IMAGE_CACHE": str(CACHE)}
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "testbed", "--workdir", str(workdir), *args,
                          "--json"], capture_output=True, text=True, env=env, check=False,
                         cwd=REPO_ROOT)
    seconds = time.monotonic() - started
    if res.returncode != 0:
        raise SystemExit(f"testbed {' '.join(args)} failed ({res.returncode}): "
                         f"{res.stderr[-2000:]}")
    return seconds, json.loads(res.stdout)


def cluster() -> dict[str, Any]:
    """`testbed up --backend qemu` to all three attested, then `testbed down`."""
    # Under the cache, not /tmp's 0700 mkdtemp parents: QEMU's user must traverse it.
    (CACHE / "vm-tests").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE / "vm-tests", prefix="bench-cluster-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o711)
        try:
            up_s, up = _cli(workdir, "up", "--backend", "qemu")
        finally:
            down_s, down = _cli(workdir, "down", "--purge")
    return {"up_seconds": round(up_s, 1),
            "define_to_all_attested_seconds": up["seconds_define_to_all_attested"],
            "boot_seconds": {n["name"]: n["boot_seconds"] for n in up["nodes"]},
            "all_attested": up["all_attested"], "down_seconds": round(down_s, 1),
            "down_ok": down["ok"], "ratio_to_goal": round(up_s / GOAL_S, 2),
            "goal_60s_met": up["all_attested"] and up_s <= GOAL_S}


def print_cluster(c: dict[str, Any]) -> None:
    print(f"testbed up --backend qemu (3 nodes) -> all attested: {c['up_seconds']} s "
          f"({c['ratio_to_goal']:.2f} x the 60 s goal: {'met' if c['goal_60s_met'] else 'MISSED'});"
          f" define -> attested {c['define_to_all_attested_seconds']} s; boots "
          f"{c['boot_seconds']}; down {c['down_seconds']} s (clean: {c['down_ok']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="single-VM boots to time")
    parser.add_argument("--nodes", type=int, default=3, help="VMs attested in parallel")
    parser.add_argument("--cluster-only", action="store_true",
                        help="only time `testbed up --backend qemu` (section 4)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.cluster_only:
        build_image(CACHE)  # a rebuild is not part of the figure
        c = cluster()
        if args.json:
            print(json.dumps({"cluster": c}, indent=2))
        else:
            print_cluster(c)
        return
    started = time.monotonic()
    image = build_image(CACHE)
    image_seconds = time.monotonic() - started
    with tempfile.TemporaryDirectory(prefix="bench-qemu-") as tmp, \
            VmDriver(Path(tmp), reference_dir=CACHE / "firmware") as driver:
        driver.predicted_policy(image)  # capture the firmware reference outside the timings
        singles = single_boots(driver, image, args.runs)
        par = parallel(driver, image, args.nodes)
        figures = {
            "accel": driver.accel.accel, "accel_reason": driver.accel.reason,
            "image": {"digest": image.digest[:16], "build_seconds": image.manifest["build_seconds"],
                      "this_run_seconds": round(image_seconds, 1),
                      "initrd_mib": round(image.manifest["initrd"]["size"] / 2**20, 1),
                      "kernel_mib": round(image.manifest["kernel"]["size"] / 2**20, 1)},
            "single_boot_seconds": [round(t, 1) for t in singles],
            "single_boot_median": round(statistics.median(singles), 1),
            "parallel": par, "goal_60s_met": par["all_ok"] and par["all_attested_seconds"] <= 60,
        }
    figures["cluster"] = cluster()
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"accelerator: {figures['accel']} ({figures['accel_reason']})")
    img = figures["image"]
    print(f"image {img['digest']}: initrd {img['initrd_mib']} MiB, kernel {img['kernel_mib']} "
          f"MiB, built in {img['build_seconds']} s (cache: {img['this_run_seconds']} s now)")
    print_cluster(figures["cluster"])
    print(f"single VM, define -> agent answers: {figures['single_boot_seconds']} s "
          f"(median {figures['single_boot_median']} s)")
    print(f"{par['nodes']} VMs in parallel, define -> all attested: "
          f"{par['all_attested_seconds']} s (boots {par['boot_seconds']} s, all ok: "
          f"{par['all_ok']}); goal <= 60 s: {'met' if figures['goal_60s_met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
