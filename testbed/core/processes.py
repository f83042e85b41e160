"""Processes the testbed starts and stops: pid files, /proc, TERM then KILL.

No systemd here: every process the project starts is found again through its pid file
or its command line in ``/proc``, and stopped by PID, never by name. A pid is only ever
signalled while a caller-supplied check (``still_ours``) says it is still the process
meant: a pid that was reused by an unrelated process is left alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from testbed.core.errors import StateError

__all__ = [
    "StopSignal",
    "launch_detached",
    "process_argv",
    "process_state",
    "read_pid",
    "reap",
    "scan_processes",
    "terminate",
    "wait_gone",
]

POLL_S = 0.02
StopSignal = Literal["SIGTERM", "SIGKILL"]
T = TypeVar("T")


def process_argv(pid: int) -> list[str] | None:
    """argv of a live process; None if it is gone or a zombie (exited, not yet reaped).

    A live process may show an empty argv (a kernel thread, or one caught in the middle
    of an exec): it is ``[]``, not None, so that it is never taken for gone.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    if state in ("Z", "X"):
        return None
    return [os.fsdecode(a) for a in raw.rstrip(b"\0").split(b"\0")] if raw else []


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, D, T stopped, t traced, Z zombie),
    None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain ") ".
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] if fields else None


def read_pid(path: Path) -> int | None:
    """The pid in a pid file; None if there is no file. Anything else in it is a StateError."""
    try:
        text = path.read_text(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise StateError(f"cannot read pid file {path}: {exc.strerror or exc}") from None
    if not text.isdigit() or int(text) <= 1:
        raise StateError(f"pid file {path} does not hold a pid: {text[:40]!r}")
    return int(text)


def scan_processes(classify: Callable[[list[str]], T | None]) -> list[tuple[int, T]]:
    """Every live process (but this one) whose argv ``classify`` recognises."""
    found: list[tuple[int, T]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = process_argv(int(entry.name))
        kind = classify(argv) if argv else None
        if kind is not None:
            found.append((int(entry.name), kind))
    return found


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it happens to be our child (no zombie left)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def wait_gone(pid: int, still_ours: Callable[[], bool], timeout: float) -> bool:
    """Whether ``pid`` is gone (or no longer ours) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        reap(pid)
        if not still_ours():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)


def terminate(pid: int, still_ours: Callable[[], bool], timeout: float) -> StopSignal | None:
    """SIGTERM, then SIGKILL after ``timeout``, each only while ``still_ours()``.

    Returns the signal after which the process was gone, None if it was not running
    (or not ours) to begin with; a process that survives SIGKILL is a StateError.
    """
    signals: tuple[tuple[signal.Signals, StopSignal], ...] = (
        (signal.SIGTERM, "SIGTERM"), (signal.SIGKILL, "SIGKILL"))
    for number, name in signals:
        if not still_ours():
            return None if name == "SIGTERM" else "SIGTERM"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)
        if wait_gone(pid, still_ours, timeout):
            return name
    raise StateError(f"pid {pid} survived SIGKILL (uninterruptible sleep?)")


_LAUNCHER = 'umask 077; log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


def launch_detached(argv: Sequence[str], log: Path, cwd: Path) -> int:
    """Start ``argv`` in its own session, re-parented away from us; return its pid.

    A throwaway ``sh`` forks the program and exits at once, so the program is never
    our child: it survives this process, which never has to reap it. Its stdout and
    stderr go to ``log``; files it creates are private (umask 077).
    """
    command = ["sh", "-c", _LAUNCHER, "testbed-launch", str(log), *argv]
    try:
        res = subprocess.run(command, capture_output=True, text=True, timeout=10,
                             start_new_session=True, check=True, cwd=cwd)
        return int(res.stdout.strip())
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        raise StateError(f"could not start {Path(argv[0]).name}: {exc}") from None
