"""Running the attack lab on a backend: the scenarios, the genuine baseline, the time.

``sim``: every scenario of the Trusted Passages paper, on five machines of swtpm
processes (:mod:`testbed.attacks.lab`). ``qemu``: the scenarios real VMs show, a tampered
boot and a runtime tamper acted on by a revocation (:mod:`testbed.attacks.qemu`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.attacks.lab import Lab
from testbed.attacks.qemu import QEMU_SCENARIOS, run_qemu_attacks
from testbed.attacks.scenarios import SCENARIOS, ScenarioResult, genuine, run
from testbed.core.errors import StateError
from testbed.core.progress import Progress

__all__ = ["SCENARIOS_BY_BACKEND", "AttackRun", "run_attacks"]

SCENARIOS_BY_BACKEND: Mapping[str, tuple[str, ...]] = {"sim": tuple(SCENARIOS),
                                                       "qemu": QEMU_SCENARIOS}


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
        raise StateError(f"with --backend {backend} only {', '.join(allowed)} can run: drop "
                         f"{', '.join(other)}" + (", or use --backend sim" if backend != "sim"
                                                  else ""))
    started = time.monotonic()
    if backend == "qemu":
        attack = run_qemu_attacks(workdir, names, progress=progress)
        baseline = ("ACCEPTED: " if attack.baseline.ok else "REJECTED: ") + \
            (attack.baseline.failure.detail if attack.baseline.failure else
             "an honest VM of the same image satisfies the predicted policy")
        return AttackRun("qemu", attack.results, baseline, attack.baseline.ok,
                         time.monotonic() - started, attack.details)
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
