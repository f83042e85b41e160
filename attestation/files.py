"""The project's file primitives: one bounded reader, one crash-safe writer.

Every file the project reads (policies, cluster specs, quote parts, event logs, state
files, artifacts named by a spec) goes through :func:`read_bounded`: it reads at most
``limit`` bytes whatever ``stat`` claims (devices and procfs report size 0), and it
refuses what is not a regular file, so a FIFO given as a policy fails at once instead
of blocking forever and ``/dev/zero`` fails instead of filling memory.

:func:`atomic_write` replaces a file durably: temp file, fsync, rename, fsync of the
directory. After it returns the new content survives a crash; before, a restart sees
the old content (or no file), never a mix. Files are 0600, directories 0700.

Standard library only: the guest image runs this with Debian's python3.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, overload

from attestation.errors import FileInputError

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "atomic_write",
    "fsync_dir",
    "hash_file",
    "private_dir",
    "read_bounded",
    "remove_durably",
    "remove_stale_temps",
]

FILE_MODE = 0o600
DIR_MODE = 0o700
TEMP_SUFFIX = ".tmp"
_CHUNK = 1 << 16


@overload
def read_bounded(path: Path, limit: int, *, what: str = ...,
                 missing_ok: Literal[False] = ...) -> bytes: ...
@overload
def read_bounded(path: Path, limit: int, *, what: str = ...,
                 missing_ok: Literal[True]) -> bytes | None: ...
def read_bounded(path: Path, limit: int, *, what: str = "file",
                 missing_ok: bool = False) -> bytes | None:
    """The whole of regular file ``path``, at most ``limit`` bytes.

    Raises :class:`FileInputError` naming ``what`` and the path when the file cannot
    be opened, is not a regular file (FIFO, device, directory, socket) or is larger
    than ``limit``. With ``missing_ok``, a file that does not exist gives None.
    """
    fd = _open_regular(path, what, missing_ok=missing_ok)
    if fd is None:
        return None
    try:
        chunks = list(_chunks(fd, limit, what, path))
    finally:
        os.close(fd)
    return b"".join(chunks)


def hash_file(path: Path, limit: int, *, what: str = "file") -> tuple[bytes, int]:
    """(SHA-256, size) of regular file ``path``, read in chunks (kernels are megabytes)."""
    fd = _open_regular(path, what, missing_ok=False)
    assert fd is not None
    digest = hashlib.sha256()
    size = 0
    try:
        for chunk in _chunks(fd, limit, what, path):
            digest.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return digest.digest(), size


def _open_regular(path: Path, what: str, *, missing_ok: bool) -> int | None:
    try:
        # O_NONBLOCK: opening a FIFO with no writer must not block (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise FileInputError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise FileInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FileInputError(f"{what} {path} is not a regular file ({_file_kind(mode)}); "
                             "give a file")
    return fd


def _chunks(fd: int, limit: int, what: str, path: Path) -> Iterator[bytes]:
    """The file's bytes in chunks; more than ``limit`` of them is a FileInputError."""
    size = 0
    while True:
        try:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
        except OSError as exc:
            raise FileInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise FileInputError(f"{what} {path} is larger than {limit} bytes")
        yield chunk


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def private_dir(path: Path) -> Path:
    """mkdir -p with 0700 for every directory it makes; tighten ``path`` itself to 0700.

    ``Path.mkdir(parents=True)`` would make the missing parents with the umask's
    default mode (0755 usually), leaving e.g. ``clusters/`` listable by anyone.
    Parents that exist already are left as they are: they are not ours to change.
    """
    absent = []
    for directory in (path, *path.parents):
        if directory.is_dir():
            break
        absent.append(directory)
    for directory in reversed(absent):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)  # a file in the way: FileExistsError
    os.chmod(path, DIR_MODE)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = FILE_MODE, *,
                 durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably (``mode``, default 0600).

    The temporary file's name is unique per call, so concurrent writers (threads or
    processes) never write into each other's temporary file; the last rename wins.
    ``durable=False`` skips the two fsyncs: still atomic (readers see the old or the new
    file whole), but a crash may bring the old one back; for caches only.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    os.close(fd)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
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
