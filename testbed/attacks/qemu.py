"""``testbed attack tampered-boot --backend qemu``: a real VM booted with another kernel
command line fails attestation, with the diverging PCR 9 event named.

Two VMs of the same guest image boot in parallel: an honest one (the baseline: it
must be accepted, which shows the policy is right) and one whose command line has
``init=/bin/sh`` appended. Both are verified against the policy predicted from the
image and its *honest* command line. Without attestation nothing tells them apart:
the tampered VM boots and its agent answers like the honest one. Everything is torn
down at the end (:class:`~testbed.qemu.vms.VmDriver`'s close).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

from attestation.report import VerificationReport
from testbed.attacks.scenarios import Outcome, ScenarioResult
from testbed.core.progress import Progress
from testbed.qemu.image.build import build_image, image_cache
from testbed.qemu.vms import QemuNode, VmDriver

__all__ = ["TAMPER", "QemuAttack", "tampered_boot"]

TAMPER = " init=/bin/sh"
"""Appended to the command line: a root shell as init (an initramfs boot ignores it,
so the VM still comes up and answers; the point is what the firmware measured)."""


class QemuAttack:
    """The outcome of one qemu attack run, in the attack lab's result shape."""

    def __init__(self, result: ScenarioResult, baseline: VerificationReport,
                 tampered: VerificationReport, details: dict[str, object]) -> None:
        self.result = result
        self.baseline = baseline
        self.tampered = tampered
        self.details = details

    @property
    def ok(self) -> bool:
        """The honest VM was accepted and the tampered one caught."""
        return self.baseline.ok and self.result.as_expected


def tampered_boot(workdir: Path, *, progress: Progress | None = None) -> QemuAttack:
    progress = progress or Progress(quiet=True)
    progress.expect(4)
    cache = image_cache(workdir)
    with progress.step("guest image (built once, then cached)"):
        image = build_image(cache)
    with VmDriver(workdir, reference_dir=cache / "firmware") as driver:
        with progress.step("policy predicted from the image and its honest command line"):
            policy = driver.predicted_policy(image)
        tag = f"atk{os.getpid()}"  # unique domain names: other runs may be booting VMs too
        started = time.monotonic()
        with progress.step(f"booting two VMs in parallel ({driver.accel.accel}): honest, and "
                           f"tampered (command line + {TAMPER.strip()!r})"):
            honest = driver.boot(f"{tag}-honest", image)
            tampered = driver.boot(f"{tag}-tampered", image, cmdline=image.cmdline + TAMPER)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                list(pool.map(driver.wait, (honest, tampered)))
        with progress.step("attesting both against the predicted policy"):
            base_report = driver.attest(honest, policy)[0]
            bad_report = driver.attest(tampered, policy)[0]
        details = _details(driver, honest, tampered, time.monotonic() - started)
    return QemuAttack(_scenario(tampered, bad_report), base_report, bad_report, details)


def _scenario(tampered: QemuNode, report: VerificationReport) -> ScenarioResult:
    booted = tampered.status.get("kernel_cmdline", tampered.cmdline)
    without = Outcome(True, f"the VM booted {booted!r} and its agent answered like the honest "
                            "one: without attestation nothing tells them apart")
    failure = report.failure
    caught = Outcome(report.ok, failure.detail if failure else "the tampered VM was ACCEPTED",
                     failure.name if failure else None, "verifier (host)" if failure else None)
    return ScenarioResult("tampered-boot", "Tampered boot: a real VM booted with another kernel "
                          "command line (PCR 9)", without, caught)


def _details(driver: VmDriver, honest: QemuNode, tampered: QemuNode,
             seconds: float) -> dict[str, object]:
    return {"accel": driver.accel.accel, "accel_reason": driver.accel.reason,
            "honest_cmdline": honest.cmdline, "tampered_cmdline": tampered.cmdline,
            "boot_seconds": {"honest": round(honest.boot_seconds or 0, 1),
                             "tampered": round(tampered.boot_seconds or 0, 1)},
            "seconds": round(seconds, 1)}
