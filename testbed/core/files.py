"""State files of the work directory: small JSON documents, locks, log tails.

Reads are bounded and writes atomic and durable (``attestation.files``, the project's
one reader and writer); what is wrong with a state file is a :class:`StateError` that
names it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attestation.errors import FileInputError
from attestation.files import atomic_write, read_bounded
from testbed.core.errors import StateError

__all__ = ["MAX_STATE_BYTES", "locked", "read_json", "tail", "write_json"]

MAX_STATE_BYTES = 1 << 20


def read_json(path: Path) -> Any:
    """A small JSON state file, or None if absent; anything malformed is a StateError."""
    try:
        data = read_bounded(path, MAX_STATE_BYTES, what="state file", missing_ok=True)
    except FileInputError as exc:
        raise StateError(str(exc)) from None
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{path} is not valid JSON: {str(exc)[:200]}") from None


def write_json(path: Path, document: object, *, durable: bool = True) -> None:
    """Replace ``path`` with ``document`` as JSON, atomically and durably (0600;
    ``durable=False``: atomically only, see :func:`atomic_write`)."""
    atomic_write(path, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode(),
                 durable=durable)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created 0600), held for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def tail(path: Path, lines: int = 15) -> str | None:
    """The last ``lines`` lines of a log file (its last 16 KiB at most), None if unreadable."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    return "\n".join(text.strip().splitlines()[-lines:])
