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


def print_report(report: VerificationReport, title: str) -> None:
    verdict = "ACCEPTED" if report.ok else f"REJECTED (check '{report.failure.name}' failed)" \
        if report.failure else "REJECTED"
    print(f"{title}: {verdict}")
    width = max(len(c.name) for c in report.checks)
    for check in report.checks:
        mark = "ok  " if check.passed else "FAIL"
        print(f"  [{mark}] {check.name:<{width}}  {check.detail}")
