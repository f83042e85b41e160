"""Running the attack lab on a backend: the scenarios, the genuine baseline, the time.

``sim``: every scenario of the Trusted Passages paper, on five machines of swtpm
processes (:mod:`testbed.attacks.lab`). ``qemu``: the scenarios real VMs show, a tampered
boot and a runtime tamper acted on by a revocation (:mod:`testbed.attacks.qemu`), an
encrypted image stolen and booted without a release (:mod:`testbed.attacks.image_theft`),
a live migration to a tampered host (:mod:`testbed.attacks.migration`), and a guest-side
disk copied off the host (``stolen-disk`` on a cluster of VMs,
:mod:`testbed.attacks.vm_disks`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.attacks.image_theft import IMAGE_THEFT, image_theft
from testbed.attacks.lab import Lab
from testbed.attacks.migration import MIGRATE_TO_TAMPERED_HOST, migrate_to_tampered_host
from testbed.attacks.qemu import QEMU_SCENARIOS, run_qemu_attacks
from testbed.attacks.scenarios import SCENARIOS, ScenarioResult, genuine, run
from testbed.attacks.vm_disks import STOLEN_DISK, stolen_disk_cluster
from testbed.core.errors import ArgumentError
from testbed.core.progress import Progress

__all__ = ["ONLY_ON_VMS", "ON_VMS_TOO", "SCENARIOS_BY_BACKEND", "AttackRun", "run_attacks"]

ONLY_ON_VMS: Mapping[str, str] = {
    IMAGE_THEFT: "an encrypted guest image copied off the host and booted without a key "
                 "release reveals no part of its root filesystem",
    MIGRATE_TO_TAMPERED_HOST: "a live migration to a host with a tampered QEMU is refused "
                              "(the destination attests first: policy, PCR 14); plain "
                              "libvirt migrates the VM there"}
"""Scenarios with no sim version, and what each shows."""
ON_VMS_TOO = (STOLEN_DISK,)
"""Sim scenarios that also run on VMs (a cluster of their own)."""
SCENARIOS_BY_BACKEND: Mapping[str, tuple[str, ...]] = {
    "sim": tuple(SCENARIOS), "qemu": (*QEMU_SCENARIOS, *ONLY_ON_VMS, *ON_VMS_TOO)}


@dataclass(frozen=True)
class AttackRun:
    backend: str
    results: list[ScenarioResult]
    baseline: str  # the genuine exchange, without an attack
    baseline_ok: bool
    seconds: float
    details: Mapping[str, Any] = field(default_factory=dict)  # qemu: accel, command lines

    @property
    def ok(self) -> bool:
        """Every attack succeeded against plain mTLS and was caught by Trusted Passages,
        and the genuine exchange worked."""
        return self.baseline_ok and all(r.as_expected for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "backend": self.backend, "seconds": round(self.seconds, 1),
                "genuine_channel": self.baseline, **({"qemu": dict(self.details)}
                                                     if self.details else {}),
                "results": [r.to_dict() for r in self.results]}


def run_attacks(names: Sequence[str], backend: str, workdir: Path,
                progress: Progress) -> AttackRun:
    """Run ``names`` (scenarios of ``backend``) and the genuine baseline."""
    allowed = SCENARIOS_BY_BACKEND[backend]
    other = [n for n in names if n not in allowed]
    if other:
        where = {n: [b for b, known in SCENARIOS_BY_BACKEND.items() if n in known] for n in other}
        raise ArgumentError(
            f"not on --backend {backend}: " + ", ".join(
                f"{n} (runs on {', '.join(where[n]) or 'no backend'})" for n in other)
            + f"; {backend} runs {', '.join(allowed)} (`testbed attack --list`)")
    started = time.monotonic()
    if backend == "qemu":
        attack = run_qemu_attacks(workdir, [n for n in names if n in QEMU_SCENARIOS],
                                  progress=progress)
        results, details = list(attack.results), dict(attack.details)
        if IMAGE_THEFT in names:
            theft = image_theft(workdir, progress=progress)
            results.append(theft.result)
            details["image_theft"] = theft.details
        if MIGRATE_TO_TAMPERED_HOST in names:
            results.append(migrate_to_tampered_host(workdir, progress=progress))
        if STOLEN_DISK in names:
            progress.expect(1)
            results.append(stolen_disk_cluster(workdir, progress))
        baseline = ("ACCEPTED: " if attack.baseline.ok else "REJECTED: ") + \
            (attack.baseline.failure.detail if attack.baseline.failure else
             "an honest VM of the same image satisfies the predicted policy")
        return AttackRun("qemu", results, baseline, attack.baseline.ok,
                         time.monotonic() - started, details)
    results, ok, baseline = _run_lab(names, progress)
    return AttackRun("sim", results, baseline, ok, time.monotonic() - started)


def _run_lab(names: Sequence[str], progress: Progress
             ) -> tuple[list[ScenarioResult], bool, str]:
    progress.expect(2 + len(names))
    with progress.step("starting the lab (5 machines, each with its own swtpm)"):
        lab = Lab().start()
    try:
        with progress.step("genuine channel: customer <-> Bob's server"):
            ok, detail = genuine(lab)
        results = []
        for name in names:
            with progress.step(f"attack: {name}"):
                results += run(lab, [name])
    finally:
        lab.close()
    return results, ok, ("ESTABLISHED: " if ok else "FAILED: ") + detail
