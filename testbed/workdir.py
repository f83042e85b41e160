"""The testbed's work directory: all state (CA, TPMs, clusters) lives under one root.

Resolved from ``--workdir``, else ``$TESTBED_HOME``, else ``./.testbed``.
"""

from __future__ import annotations

import os
from pathlib import Path

from testbed.errors import StateError


def resolve_workdir(explicit: str | None) -> Path:
    root = Path(explicit or os.environ.get("TESTBED_HOME") or ".testbed").absolute()
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create work directory {root}: {exc.strerror}; "
                         "pass --workdir DIR or set TESTBED_HOME") from None
    return root
