"""One hypervisor host's init: ``python -m testbed.hosts.machine --host-dir DIR``.

``testbed hosts up`` starts it inside the host's network namespace and new mount and UTS
namespaces (``ip netns exec NS unshare --mount --uts --propagation private -- ...``), so it and
everything it starts see the host's own view of the machine:

1. mounts (private to the host): a tmpfs on :data:`HOST_RUN` (the host TPM's sockets,
   the event log: nothing outside the host reaches them), and the host's own directories
   bound over /run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt,
   /etc/libvirt and /root/.ssh; a tampered host also gets its replacement binaries;
2. the host TPM (swtpm on a unix socket under :data:`HOST_RUN`), made clock-safe;
3. the measured boot (:mod:`testbed.hosts.measured`): firmware to command line, then
   the hypervisor stack *as this namespace shows it*; the persistent AK;
4. virtlogd, libvirtd (reachable only through this namespace's /run/libvirt), and sshd
   (listening on the host's address only), in that order.

It writes ``machine.json`` (state, the pid of everything it started, what failed) and
supervises: a component that exits is recorded as failed. On SIGTERM it stops
everything it started, by PID, in reverse order. Its children get
``PR_SET_PDEATHSIG``: when the init dies, however, they die too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from attestation.errors import TestbedError
from attestation.files import atomic_write
from attestation.tpm import LocalAttester, TpmClient
from testbed.core.files import read_json, write_json
from testbed.hosts.layout import EVENT_LOG, HOST_RUN, TPM_INFO, TPM_RUN, HostPaths, HostsError
from testbed.hosts.measured import HOST_BOOT, StackComponent, measure_host
from testbed.tpm.boot import restore_clock_safety
from testbed.tpm.swtpm import Swtpm

__all__ = ["BINDS", "MIGRATE_TLS_DIR", "main"]

BINDS = (
    ("run-libvirt", "/run/libvirt"),
    ("var-lib-libvirt", "/var/lib/libvirt"),
    ("var-cache-libvirt", "/var/cache/libvirt"),
    ("var-log-libvirt", "/var/log/libvirt"),
    ("etc-libvirt", "/etc/libvirt"),
    ("root-ssh", "/root/.ssh"),
)
"""(directory under ``fs/``, where the host sees it)."""
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
MIGRATE_TLS_DIR = "/etc/libvirt/migrate-tls"
"""Inside a host: its x509 migration credentials (``migrate_tls_x509_cert_dir`` in its
qemu.conf), issued by the lab only after the host attested (testbed.hosts.migration)."""
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_SUPERVISE_S = 0.5
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

log = logging.getLogger("testbed.hosts.machine")


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _mount(*args: str) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=15,
                         check=False)
    if res.returncode != 0:
        raise HostsError(f"mount {' '.join(args)} failed: {res.stderr.strip()[-300:]}")


@dataclass
class Machine:
    """The host's init and what it started."""

    paths: HostPaths
    config: dict[str, Any]
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    swtpm: Swtpm | None = None
    failures: dict[str, str] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)

    # -- bring-up ------------------------------------------------------------------

    def boot(self) -> None:
        self._write("starting")
        socket.sethostname(str(self.config["name"]))  # its own UTS namespace
        self._mounts()
        client = self._start_tpm()
        try:
            if restore_clock_safety(client):
                log.info("TPM clock was unsafe after an unorderly stop: advanced")
            stack = [StackComponent(str(c["name"]), str(c["path"]))
                     for c in self.config["stack"]]
            atomic_write(EVENT_LOG, measure_host(client, HOST_BOOT, stack))
            LocalAttester(client).identity()  # makes the persistent AK on first boot
        finally:
            client.close()  # swtpm serves one connection: the agent needs it free
        self._start("virtlogd", ["virtlogd", "--pid-file", str(HOST_RUN / "virtlogd.pid")])
        self._start("libvirtd", ["libvirtd", "--pid-file", str(HOST_RUN / "libvirtd.pid")])
        self._wait("libvirtd", lambda: _unix_answers(LIBVIRT_SOCKET))
        self._start("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.paths.sshd_config)])
        address = str(self.config["address"])
        self._wait("sshd", lambda: _tcp_answers(address, 22))
        self._write("ready")

    def _mounts(self) -> None:
        HOST_RUN.mkdir(mode=0o700, exist_ok=True)  # outside: an empty directory, once
        _mount("-t", "tmpfs", "-o", "mode=0700,size=16m", "testbed-host", str(HOST_RUN))
        for name, target in BINDS:
            Path(target).mkdir(parents=True, exist_ok=True)
            _mount("--bind", str(self.paths.fs / name), target)
        for target, replacement in sorted(self.config.get("replace", {}).items()):
            _mount("--bind", str(replacement), str(target))
            log.warning("tampered: %s is %s in this host", target, replacement)

    def _start_tpm(self) -> TpmClient:
        self.swtpm = Swtpm(self.paths.tpm_state, run_dir=TPM_RUN)
        self.swtpm.start()
        log.info("host TPM: swtpm pid %d", self.swtpm.pid)
        write_json(TPM_INFO, {"tcti": self.swtpm.tcti})
        return TpmClient(self.swtpm.tcti)

    def _start(self, name: str, argv: Sequence[str]) -> None:
        out = (self.paths.root / f"{name}.log").open("ab")
        with out:
            self.children[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                preexec_fn=_die_with_parent, cwd="/")
        log.info("%s pid %d", name, self.children[name].pid)
        self._write("starting")

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        proc = self.children[name]
        while not ready():
            if proc.poll() is not None:
                raise HostsError(f"{name} exited with status {proc.returncode} while "
                                 f"starting (see {self.paths.root / (name + '.log')})")
            if time.monotonic() > deadline or self.stopping.is_set():
                raise HostsError(f"{name} did not come up within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    # -- running -------------------------------------------------------------------

    def supervise(self) -> None:
        while not self.stopping.wait(_SUPERVISE_S):
            changed = False
            for name, proc in self.children.items():
                if name not in self.failures and proc.poll() is not None:
                    self.failures[name] = f"exited with status {proc.returncode}"
                    changed = True
            if self.swtpm is not None and "swtpm" not in self.failures \
                    and not self.swtpm.running:
                self.failures["swtpm"] = "exited"
                changed = True
            if changed:
                log.error("failed: %s", self.failures)
                self._write("ready")

    def stop(self) -> None:
        """Everything started, by PID, in reverse order."""
        for name in reversed(list(self.children)):
            proc = self.children[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT_S)
        if self.swtpm is not None:
            self.swtpm.stop()

    def _write(self, state: str, error: str | None = None) -> None:
        pids = {name: proc.pid for name, proc in self.children.items()}
        if self.swtpm is not None and self.swtpm.running:
            pids["swtpm"] = self.swtpm.pid
        with contextlib.suppress(OSError):
            write_json(self.paths.machine, {
                "state": state, "pid": os.getpid(), "processes": pids,
                "failures": self.failures, "error": error, "updated": time.time()})


def _unix_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _tcp_answers(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m testbed.hosts.machine",
                                     description="a hypervisor host's init "
                                                 "(started by `testbed hosts up`)")
    parser.add_argument("--host-dir", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    os.umask(0o077)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s host %(process)d %(levelname)s %(message)s")
    paths = HostPaths(args.host_dir.absolute())
    config = read_json(paths.config)
    if not isinstance(config, dict):
        log.error("no host configuration at %s", paths.config)
        return 2
    machine = Machine(paths, config)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        machine.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        machine.boot()
        log.info("ready: %s", config.get("address"))
        machine.supervise()
    except (TestbedError, OSError) as exc:
        log.error("%s", exc)
        machine.stop()
        machine._write("failed", str(exc))
        return 1
    machine.stop()
    machine._write("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
