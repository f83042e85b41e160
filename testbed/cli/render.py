"""Rendering command results: JSON for machines, aligned text for people."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from attestation.report import VerificationReport


def emit(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    """Print ``data`` as JSON with --json, else the human rendering."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        human()


_MARKS = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}


def print_report(report: VerificationReport, title: str) -> None:
    print(f"{title}: {verdict(report)}")
    width = max((len(c.name) for c in report.checks), default=0)
    for check in report.checks:
        print(f"  [{_MARKS[check.state]}] {check.name:<{width}}  {check.detail}")


def verdict(report: VerificationReport) -> str:
    """ACCEPTED or REJECTED, and what an acceptance did not establish."""
    if report.failure is not None:
        return f"REJECTED (check '{report.failure.name}' failed)"
    if not report.ok:
        return "REJECTED (no check ran)"
    skipped = report.skipped
    if skipped:
        return f"ACCEPTED, but not established: {', '.join(c.name for c in skipped)} (skipped)"
    return "ACCEPTED"
