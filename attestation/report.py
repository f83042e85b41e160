"""Verification reports: one named result per check, fail closed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from attestation.errors import EvidenceFormatError, VerificationError

NOT_RUN = "not run: an earlier check failed"

CheckState = Literal["passed", "failed", "skipped"]


class CheckSkipped(Exception):
    """Raised by a check that had nothing to judge (no policy given, no history kept):
    the check is reported ``skipped`` with the reason, never ``passed``."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    state: CheckState
    detail: str
    data: dict[str, Any] = field(default_factory=dict)  # for programs: full values

    @property
    def passed(self) -> bool:
        return self.state == "passed"

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "state": self.state, "detail": self.detail, **self.data}


@dataclass(frozen=True)
class VerificationReport:
    """The outcome of every check, in order. ``ok`` if none failed and at least one
    passed; a skipped check establishes nothing, and :attr:`skipped` says so."""

    checks: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return any(c.passed for c in self.checks) and not any(c.failed for c in self.checks)

    @property
    def failure(self) -> CheckResult | None:
        return next((c for c in self.checks if c.failed), None)

    @property
    def skipped(self) -> tuple[CheckResult, ...]:
        """Checks that did not run because there was nothing to judge (not after a failure)."""
        return tuple(c for c in self.checks if c.state == "skipped" and c.detail != NOT_RUN)

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def raise_for_failure(self) -> None:
        failure = self.failure
        if failure is not None:
            raise VerificationError(failure.name, failure.detail)
        if not any(c.passed for c in self.checks):
            raise VerificationError("report", "no check was run")

    def to_dict(self) -> dict[str, Any]:
        failure = self.failure
        return {
            "ok": self.ok,
            "failed_check": None if failure is None else failure.name,
            "skipped_checks": [c.name for c in self.skipped],
            "checks": [c.to_dict() for c in self.checks],
        }


Check = tuple[str, Callable[[], str]]


def run_checks(checks: Iterable[Check]) -> VerificationReport:
    """Run checks in order; each returns a detail string or raises.

    The first failure stops the run (later checks depend on earlier ones, e.g.
    PCR values mean nothing before the signature is checked); the remaining
    checks are listed as skipped (not run) so the report still names every step.
    """
    results: list[CheckResult] = []
    failed = False
    for name, check in checks:
        if failed:
            results.append(CheckResult(name, "skipped", NOT_RUN))
            continue
        try:
            results.append(CheckResult(name, "passed", check()))
        except CheckSkipped as exc:
            results.append(CheckResult(name, "skipped", str(exc)))
        except VerificationError as exc:
            results.append(CheckResult(name, "failed", exc.reason, exc.data))
            failed = True
        except EvidenceFormatError as exc:
            results.append(CheckResult(name, "failed", f"malformed: {exc}"))
            failed = True
    return VerificationReport(tuple(results))
