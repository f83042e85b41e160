"""Boot time of an encrypted guest image against the in-RAM image (not a test; docs/svd.md,
docs/performance.md).

Same run, same driver, alternating, one VM at a time, each round:

* in-RAM: define -> the agent answers (the image's whole root is in the initrd);
* encrypted: define -> the boot stage's agent answers -> attested (activate + quote +
  verify) -> root key released by the tenant's CryptoVM (enroll, nonce, quote,
  release_decrypt) and the LUKS disk hot-plugged -> the agent answers again from the
  root filesystem (unpacked from the decrypted disk into RAM, switch_root).

Run: .venv/bin/python bench/bench_svd_image.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attestation.policy import ReferencePolicy
from testbed.qemu.image.build import GuestImage, build_image, image_cache
from testbed.qemu.image.encrypted import (
    EncryptedImage,
    TenantCryptoVm,
    build_encrypted_image,
    tenant_directory,
)
from testbed.qemu.svd_root import boot_encrypted, unlock_root
from testbed.qemu.vms import VmDriver
from testbed.spec.recipe import load_recipe

CACHE = image_cache(Path(os.environ.get("TESTBED_IMAGE_CACHE") or "/var/cache/trusted-testbed"))


def _plain(driver: VmDriver, image: GuestImage, n: int) -> float:
    node = driver.boot(f"bplain{n}", image)
    try:
        driver.wait(node)
        return node.boot_seconds or 0.0
    finally:
        driver.stop(node.name)


def _encrypted(driver: VmDriver, image: EncryptedImage, tenant: TenantCryptoVm,
               policy: ReferencePolicy, n: int) -> dict[str, float]:
    node = boot_encrypted(driver, f"benc{n}", image)
    try:
        driver.wait(node)
        stage = node.boot_seconds or 0.0
        release = unlock_root(driver, node, image, tenant.call, policy)
        total = time.monotonic() - node.started
        return {"boot_stage": stage, "release": release.release_seconds,
                "switch": release.switch_seconds, "total": total}
    finally:
        driver.stop(node.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    recipe = load_recipe()
    plain_image = build_image(CACHE, recipe)
    (CACHE / "vm-tests").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=CACHE / "vm-tests"))
    plain: list[float] = []
    encrypted: list[dict[str, float]] = []
    try:
        with TenantCryptoVm(tenant_directory(CACHE)) as tenant, \
                VmDriver(workdir, reference_dir=CACHE / "firmware") as driver:
            image = build_encrypted_image(CACHE, recipe, tenant)
            policy = driver.predicted_policy(image.boot)
            print(f"accelerator {driver.accel.accel}; load {os.getloadavg()[0]:.1f}")
            for n in range(args.rounds):
                plain.append(_plain(driver, plain_image, n))
                encrypted.append(_encrypted(driver, image, tenant, policy, n))
                print(f"round {n}: in-RAM {plain[-1]:.1f} s, encrypted "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in encrypted[-1].items()))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    median = {k: statistics.median(r[k] for r in encrypted) for k in encrypted[0]}
    print(f"median of {args.rounds}: in-RAM define->agent {statistics.median(plain):.1f} s; "
          f"encrypted define->agent from the root filesystem {median['total']:.1f} s "
          f"(boot stage {median['boot_stage']:.1f} s, release {median['release']:.2f} s, "
          f"switch root {median['switch']:.1f} s); ratio "
          f"{median['total'] / statistics.median(plain):.2f}; load "
          f"{os.getloadavg()[0]:.1f}; initrd {plain_image.initrd.stat().st_size >> 20} MiB "
          f"vs boot stage {image.boot.initrd.stat().st_size >> 20} MiB + root disk "
          f"{image.root.stat().st_size >> 20} MiB")


if __name__ == "__main__":
    main()
