"""A deterministic ``newc`` cpio writer: a directory tree becomes an initramfs.

Pure Python so the build needs no ``cpio`` package and the archive is the same
bytes for the same tree: entries are sorted, owners are root, inode numbers are
assigned in order, and modification times are clamped to ``epoch``
(SOURCE_DATE_EPOCH style: files packaged by Debian keep their older mtimes, so
Python's byte-compiled caches stay valid). Hard links are stored as separate
files (the kernel's unpacker does not need them).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["write_newc"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_CHUNK = 1 << 20


def _header(ino: int, mode: int, mtime: int, size: int, nlink: int, name: bytes,
            rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    return _MAGIC + b"".join(b"%08X" % value for value in fields)


def _pad(out: IO[bytes], written: int) -> int:
    padding = -written % 4
    out.write(b"\0" * padding)
    return padding


def _walk(root: Path) -> Iterator[Path]:
    """Every path under ``root`` (directories before their contents), sorted by name."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


def _write_entry(out: IO[bytes], ino: int, name: str, info: os.stat_result, payload: bytes | Path,
                 epoch: int) -> None:
    mode = info.st_mode
    size = len(payload) if isinstance(payload, bytes) else info.st_size
    nlink = 2 if stat.S_ISDIR(mode) else 1
    rdev = (os.major(info.st_rdev), os.minor(info.st_rdev)) if stat.S_ISCHR(mode) or \
        stat.S_ISBLK(mode) else (0, 0)
    encoded = name.encode("utf-8", "surrogateescape")
    head = _header(ino, mode, min(int(info.st_mtime), epoch), size, nlink, encoded, rdev)
    out.write(head + encoded + b"\0")
    _pad(out, len(head) + len(encoded) + 1)
    if isinstance(payload, bytes):
        out.write(payload)
    else:
        with payload.open("rb") as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
    _pad(out, size)


def write_newc(root: Path, out: IO[bytes], *, epoch: int) -> int:
    """Write ``root``'s tree as a newc archive to ``out``; return the number of entries."""
    count = 0
    for path in _walk(root):
        info = path.lstat()
        name = path.relative_to(root).as_posix()
        if stat.S_ISLNK(info.st_mode):
            payload: bytes | Path = os.readlink(path).encode("utf-8", "surrogateescape")
        elif stat.S_ISREG(info.st_mode):
            payload = path
        elif stat.S_ISDIR(info.st_mode) or stat.S_ISCHR(info.st_mode) or \
                stat.S_ISBLK(info.st_mode) or stat.S_ISFIFO(info.st_mode):
            payload = b""
        else:
            continue  # sockets cannot live in an initramfs
        count += 1
        _write_entry(out, count, name, info, payload, epoch)
    trailer = _header(0, 0, 0, 0, 1, _TRAILER.encode())
    out.write(trailer + _TRAILER.encode() + b"\0")
    _pad(out, len(trailer) + len(_TRAILER) + 1)
    return count
