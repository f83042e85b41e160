"""libvirtd and virtlogd: reuse running daemons, or start them and stop them later.

There is no systemd here, so nothing starts services on demand. When
``qemu:///system`` does not answer, :func:`ensure_daemons` starts ``virtlogd -d``
(it writes the serial-console log files) and ``libvirtd -d`` with pid files in
the caller's run directory, and :meth:`Daemons.stop` stops exactly those
processes, by the PIDs in those files, never by name. Daemons that were already
running are left alone.

Nothing in /etc is changed: the vTPM is manufactured by the project before libvirt
sees it (see :mod:`testbed.qemu.domain`), so libvirt's ``swtpm_setup`` and the
machine-wide ``/var/lib/swtpm-localca`` are never used.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.core.errors import StateError
from testbed.core.processes import terminate

__all__ = ["LIBVIRT_URI", "Daemons", "LibvirtError", "ensure_daemons", "libvirt_answers",
           "load_libvirt"]

LIBVIRT_URI = "qemu:///system"
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_HINT = ("install libvirt-daemon-system and libvirt-clients (apt), libvirt-python (pip); "
         "see docs/qemu.md")


class LibvirtError(StateError):
    """libvirt is missing, does not start, or refused an operation."""


def load_libvirt() -> Any:
    """The ``libvirt`` module (libvirt-python ships no type information: it is Any)."""
    try:
        return importlib.import_module("libvirt")
    except ImportError:
        raise LibvirtError(f"the libvirt Python module is missing; {_HINT}") from None


def libvirt_answers(uri: str = LIBVIRT_URI) -> bool:
    """Whether a libvirt daemon answers ``uri`` right now."""
    libvirt = load_libvirt()

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


@dataclass
class Daemons:
    """The libvirt daemons this process started (empty if they were running already)."""

    run_dir: Path
    started: dict[str, int] = field(default_factory=dict)  # name -> pid

    def stop(self) -> None:
        """Stop what we started: libvirtd first (it talks to virtlogd), by PID."""
        for name in ("libvirtd", "virtlogd"):
            pid = self.started.pop(name, None)
            if pid is not None:
                _stop_pid(pid, name)
                with contextlib.suppress(FileNotFoundError):
                    (self.run_dir / f"{name}.pid").unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def _stop_pid(pid: int, name: str) -> None:
    with contextlib.suppress(StateError):  # survived SIGKILL: `down` reports what is left
        terminate(pid, lambda: _alive(pid), STOP_TIMEOUT_S)


def _wait_for(predicate: object, what: str, timeout: float) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise LibvirtError(f"{what} did not come up within {timeout:.0f} s")


def _start(name: str, run_dir: Path, ready: object) -> int:
    binary = shutil.which(name) or f"/usr/sbin/{name}"
    if not Path(binary).exists():
        raise LibvirtError(f"{name} is not installed; {_HINT}")
    pid_file = run_dir / f"{name}.pid"
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    res = subprocess.run([binary, "--daemon", "--pid-file", str(pid_file)],
                         capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
    if res.returncode != 0:
        raise LibvirtError(f"{name} --daemon failed (exit {res.returncode}): "
                           f"{res.stderr.strip()[-500:]}")
    _wait_for(pid_file.exists, f"{name}'s pid file", START_TIMEOUT_S)
    pid = int(pid_file.read_text().split()[0])
    _wait_for(ready, name, START_TIMEOUT_S)
    return pid


def ensure_daemons(run_dir: Path) -> Daemons:
    """Make ``qemu:///system`` answer; start virtlogd/libvirtd only if needed."""
    load_libvirt()
    if os.geteuid() != 0:
        raise LibvirtError("qemu:///system needs root (the testbed runs VMs as root)")
    run_dir.mkdir(parents=True, exist_ok=True)
    daemons = Daemons(run_dir)
    try:
        if not _socket_answers(VIRTLOGD_SOCKET):
            daemons.started["virtlogd"] = _start(
                "virtlogd", run_dir, lambda: _socket_answers(VIRTLOGD_SOCKET))
        if not libvirt_answers():
            daemons.started["libvirtd"] = _start("libvirtd", run_dir, libvirt_answers)
    except BaseException:
        daemons.stop()
        raise
    return daemons


def _socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True
