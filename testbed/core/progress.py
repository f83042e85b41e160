"""A minimal progress display for steps slower than a second.

Writes to stderr so ``--json`` output on stdout stays machine-readable. On a
terminal each step shows a spinner-free "… done (1.2 s)" line; elsewhere (CI
logs) the same lines, one per step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    def __init__(self, total: int | None = None, stream: TextIO | None = None,
                 quiet: bool = False) -> None:
        self.total = total
        self.count = 0
        self.stream = stream or sys.stderr
        self.quiet = quiet

    def expect(self, steps: int) -> None:
        """``steps`` more steps will come (each part of a command adds its own)."""
        self.total = (self.total or 0) + steps

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.count += 1
        prefix = f"[{self.count}/{self.total}] " if self.total else ""
        if not self.quiet:
            self.stream.write(f"{prefix}{label} … ")
            self.stream.flush()
        started = time.monotonic()
        try:
            yield
        except BaseException:
            if not self.quiet:
                self.stream.write("failed\n")
                self.stream.flush()
            raise
        if not self.quiet:
            self.stream.write(f"done ({time.monotonic() - started:.1f} s)\n")
            self.stream.flush()
