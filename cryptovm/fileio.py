"""Crash-safe file writes: temp file, fsync, atomic rename, fsync of the directory.

After :func:`atomic_write` returns, the new content survives a crash (process kill,
power loss on a file system honouring fsync); before, the old content (or no file)
is what a restart sees, never a mix. Files are 0600, directories 0700.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
TEMP_SUFFIX = ".tmp"


def private_dir(path: Path) -> Path:
    """mkdir -p with 0700; tighten an existing directory to 0700."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (0600)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, path)
    fsync_dir(path.parent)


def remove_durably(path: Path) -> None:
    """Unlink ``path`` (if present) and make the removal durable."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files left by a crash in the middle of :func:`atomic_write`."""
    removed = 0
    for temp in directory.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
            removed += 1
    return removed


def read_limited(path: Path, limit: int) -> bytes:
    """Read a state file, refusing anything larger than ``limit`` bytes."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} exceeds {limit} bytes")
    return data
