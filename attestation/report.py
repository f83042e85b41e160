"""Verification reports: one named result per check, fail closed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from attestation.errors import EvidenceFormatError, VerificationError

NOT_RUN = "not run: an earlier check failed"


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class VerificationReport:
    """The outcome of every check, in order. ``ok`` only if every check ran and passed."""

    checks: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failure(self) -> CheckResult | None:
        return next((c for c in self.checks if not c.passed), None)

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def raise_for_failure(self) -> None:
        failure = self.failure
        if failure is not None:
            raise VerificationError(failure.name, failure.detail)
        if not self.checks:
            raise VerificationError("report", "no check was run")

    def to_dict(self) -> dict[str, Any]:
        failure = self.failure
        return {
            "ok": self.ok,
            "failed_check": None if failure is None else failure.name,
            "checks": [c.to_dict() for c in self.checks],
        }


Check = tuple[str, Callable[[], str]]


def run_checks(checks: Iterable[Check]) -> VerificationReport:
    """Run checks in order; each returns a detail string or raises.

    The first failure stops the run (later checks depend on earlier ones, e.g.
    PCR values mean nothing before the signature is checked); the remaining
    checks are listed as not run so the report still names every step.
    """
    results: list[CheckResult] = []
    failed = False
    for name, check in checks:
        if failed:
            results.append(CheckResult(name, False, NOT_RUN))
            continue
        try:
            results.append(CheckResult(name, True, check()))
        except VerificationError as exc:
            results.append(CheckResult(name, False, exc.reason))
            failed = True
        except EvidenceFormatError as exc:
            results.append(CheckResult(name, False, f"malformed: {exc}"))
            failed = True
    return VerificationReport(tuple(results))
