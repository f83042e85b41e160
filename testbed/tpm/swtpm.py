"""swtpm provisioning and process lifecycle.

:func:`provision` manufactures a TPM 2.0 state directory with swtpm_setup
(RSA-2048 EK at 0x81010001, ECC P-384 EK at 0x81010016, EK certificates in NV
0x01c00002 / 0x01c00016, platform certificate in 0x01c08000, all issued by a
:class:`~testbed.tpm.localca.LocalCA`). :class:`Swtpm` runs one ``swtpm socket``
process on such a directory.

Its data and control channels are unix sockets (0600, in a 0700 directory) by
default: a TCP port on loopback answers every local user, who could then use the
TPM (quote, read the EK, fill its object slots) or shut it down through the control
channel. The tpm2-tss ``swtpm`` TCTI takes ``path=SOCKET`` (the control channel is
``SOCKET.ctrl``), and so does QEMU. ``transport="tcp"`` is still there for a caller
that asks for it on a machine it alone uses.

No orphans: an attached swtpm (the default) gets ``PR_SET_PDEATHSIG=SIGKILL``
so the kernel kills it when its parent dies, however it dies (crash, SIGKILL,
``os._exit``), and an ``atexit`` hook stops every attached instance on a normal
exit. Caveat: the death signal fires when the *thread* that started swtpm
exits, so start attached instances from a thread that outlives them (the main
thread, normally). ``detached=True`` opts out, for long-lived nodes that are
later stopped through their pid file with :meth:`Swtpm.stop_pidfile`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from testbed.core.errors import StateError, SwtpmError
from testbed.core.paths import SUN_PATH_MAX, ensure_socket_dir, socket_dir
from testbed.core.processes import process_argv, read_pid, terminate
from testbed.tpm.localca import DEFAULT_PCR_BANKS, LocalCA, find_tool, validate_pcr_banks

__all__ = [
    "ECC_EK_CERT_NV_INDEX",
    "ECC_EK_HANDLE",
    "PLATFORM_CERT_NV_INDEX",
    "RSA_EK_CERT_NV_INDEX",
    "RSA_EK_HANDLE",
    "Swtpm",
    "Transport",
    "clone_state",
    "provision",
]

Transport = Literal["tcp", "unix"]

RSA_EK_HANDLE = 0x81010001
ECC_EK_HANDLE = 0x81010016
RSA_EK_CERT_NV_INDEX = 0x01C00002
ECC_EK_CERT_NV_INDEX = 0x01C00016
PLATFORM_CERT_NV_INDEX = 0x01C08000

STATE_FILE = "tpm2-00.permall"
_SETUP_TIMEOUT_S = 60.0
_PORT_ATTEMPTS = 20
_POLL_INTERVAL_S = 0.02
_PROBE_TIMEOUT_S = 1.0
SOCKET_NAME = "swtpm.sock"
_CTRL_SUFFIX = ".ctrl"  # the TCTI's convention: the control socket is <data socket>.ctrl
PRIVATE_UMASK = 0o077  # swtpm's pid file and log, swtpm_setup's files: the owner's only
_CMD_GET_CAPABILITY = struct.pack(">I", 1)  # swtpm control channel command
_PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: preexec_fn must not import


# -- provisioning -----------------------------------------------------------


def provision(
    state_dir: Path,
    ca: LocalCA,
    *,
    pcr_banks: str = DEFAULT_PCR_BANKS,
    overwrite: bool = False,
) -> None:
    """Manufacture a new TPM (fresh seeds, EKs, certificates) in ``state_dir``.

    Takes ~1 s, mostly waiting (about 45 ms of CPU): provisionings run concurrently.
    They hold the CA lock shared (CA creation holds it exclusively) and swtpm_localca
    serialises the issuance of each certificate itself (its own lock around the serial
    counter). Refuses to replace existing state unless ``overwrite``.
    """
    validate_pcr_banks(pcr_banks)
    state_dir = _prepare_private_dir(Path(state_dir).absolute())
    if (state_dir / STATE_FILE).exists() and not overwrite:
        raise StateError(f"{state_dir} already holds TPM state; pass overwrite=True to replace it")
    cmd = [
        find_tool("swtpm_setup"), "--tpm2", "--tpmstate", str(state_dir),
        "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
        "--pcr-banks", pcr_banks, "--config", str(ca.setup_config_path),
        *(["--overwrite"] if overwrite else []),
    ]  # fmt: skip
    with ca.lock(shared=True):
        _run_setup(cmd)
    with ca.lock():  # the files swtpm_localca rewrote (its serial): 0600, whatever made them
        ca.tighten_permissions()


def clone_state(src: Path, dst: Path) -> None:
    """Copy a TPM state directory (not its lock, logs, pid or sockets) to ``dst``.

    The copy is the *same* TPM as far as anyone can tell: same seeds, same
    EKs and EK certificates. Cheap (one small file), so tests use it instead
    of provisioning, unless they need a TPM with its own identity.
    """
    src, dst = Path(src).absolute(), _prepare_private_dir(Path(dst).absolute())
    files = sorted(src.glob("tpm2-*"))
    if not files:
        raise StateError(f"{src} holds no TPM 2 state (no tpm2-* files)")
    for f in files:
        shutil.copyfile(f, dst / f.name)
        os.chmod(dst / f.name, 0o600)


def _run_setup(cmd: list[str]) -> None:
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_SETUP_TIMEOUT_S,
            preexec_fn=_pdeathsig_preexec(os.getpid()), umask=PRIVATE_UMASK,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise SwtpmError(f"swtpm_setup timed out after {exc.timeout:.0f} s") from exc
    if res.returncode != 0:
        out = _tail(res.stdout + "\n" + res.stderr)
        raise SwtpmError(f"swtpm_setup failed (exit {res.returncode}):\n{out}")


def _prepare_private_dir(path: Path) -> Path:
    """mkdir -p with mode 0700, rejecting paths swtpm's option parser would split."""
    if "," in str(path) or "\n" in str(path):
        raise StateError(f"path {str(path)!r} contains ',' or a newline, which swtpm cannot parse")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise StateError(f"{path} is not a directory") from exc
    if not path.is_dir():
        raise StateError(f"{path} is not a directory")
    os.chmod(path, 0o700)
    return path


# -- child process plumbing ---------------------------------------------------


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` making the child die with SIGKILL when its parent dies."""

    def preexec() -> None:
        if _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # parent died between fork and prctl
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


_live: set[Swtpm] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all_attached() -> None:
    """On interpreter exit, stop every attached swtpm this process started."""
    with _live_lock:
        instances = list(_live)
    for tpm in instances:
        with contextlib.suppress(SwtpmError):
            tpm.stop()


class _AddressInUse(Exception):
    """swtpm lost the race for its TCP port pair; pick another and retry."""


# -- the process --------------------------------------------------------------


class Swtpm:
    """One ``swtpm socket`` process serving one TPM state directory.

    Run files (``swtpm.pid``, ``swtpm.log`` and, for the unix transport,
    ``swtpm.sock`` + ``swtpm.sock.ctrl``) go to ``run_dir``, by default the
    state directory itself (0700, so the sockets are private too). When
    ``run_dir/swtpm.sock.ctrl`` would be too long for AF_UNIX, the sockets go to
    a short private directory instead (:func:`testbed.core.paths.socket_dir`).

    swtpm serves one client connection at a time and has no resource
    manager: transient objects and sessions left by a crashed client stay
    loaded (libtpms has only 3 object slots) until :meth:`flush_transients`.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        transport: Transport = "unix",
        run_dir: Path | None = None,
        socket_path: Path | None = None,
        detached: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        if transport not in ("tcp", "unix"):
            raise ValueError(f"unknown transport {transport!r}; use 'tcp' or 'unix'")
        self._state_dir = Path(state_dir).absolute()
        run = Path(run_dir).absolute() if run_dir is not None else self._state_dir
        self._run_dir = run
        self._transport: Transport = transport
        self._socket_path: Path | None = None
        if transport == "unix":
            self._socket_path = (Path(socket_path).absolute() if socket_path is not None
                                 else default_socket_path(run))
        self._detached = detached
        self._start_timeout = start_timeout
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties ------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def detached(self) -> bool:
        return self._detached

    @property
    def pid_file(self) -> Path:
        return self._run_dir / "swtpm.pid"

    @property
    def log_path(self) -> Path:
        return self._run_dir / "swtpm.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """PID of the swtpm process (valid once started)."""
        if self._proc is None:
            raise SwtpmError("swtpm has not been started")
        return self._proc.pid

    @property
    def port(self) -> int:
        """TCP data port; the control port is ``port + 1`` (the TCTI assumes so)."""
        if self._transport != "tcp":
            raise SwtpmError("port: this swtpm uses the unix transport")
        if self._port is None:
            raise SwtpmError("swtpm has not been started")
        return self._port

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def socket_path(self) -> Path:
        """Unix data socket; the control socket is ``<socket_path>.ctrl`` (TCTI convention)."""
        if self._socket_path is None:
            raise SwtpmError("socket_path: this swtpm uses the tcp transport")
        return self._socket_path

    @property
    def ctrl_socket_path(self) -> Path:
        return Path(f"{self.socket_path}{_CTRL_SUFFIX}")

    @property
    def tcti_name(self) -> str:
        return "swtpm"

    @property
    def tcti_conf(self) -> str:
        """Config for ``TCTILdr("swtpm", conf)``: ``host=..,port=..`` or ``path=..``."""
        if self._transport == "unix":
            return f"path={self.socket_path}"
        return f"host=127.0.0.1,port={self.port}"

    @property
    def tcti(self) -> str:
        """tpm2-tools style TCTI string, e.g. ``swtpm:path=/.../swtpm.sock``."""
        return f"{self.tcti_name}:{self.tcti_conf}"

    def __repr__(self) -> str:
        where = self.tcti if self._port or self._socket_path else "not started"
        return f"Swtpm({str(self._state_dir)!r}, {where}, running={self.running})"

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Self:
        """Spawn swtpm and wait until its control channel answers.

        For TCP, a lost race for the port pair (EADDRINUSE) is retried with a
        new pair. Raises :class:`SwtpmError` with the log tail on failure.
        """
        if self.running:
            raise SwtpmError(f"swtpm for {self._state_dir} is already running (pid {self.pid})")
        self._check_dirs()
        deadline = time.monotonic() + self._start_timeout
        attempts = _PORT_ATTEMPTS if self._transport == "tcp" else 1
        for _ in range(attempts):
            self._spawn()
            try:
                self._wait_ready(deadline)
                return self
            except _AddressInUse:
                self._reap()
        raise SwtpmError(f"no free TCP port pair for swtpm after {attempts} attempts")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired as exc:
                    raise SwtpmError(f"swtpm pid {proc.pid} survived SIGKILL") from exc
        self._reap()
        if self._socket_path is not None:
            _remove_sockets(self._socket_path, self._run_dir)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of swtpm's log (its stderr goes there too)."""
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except FileNotFoundError:
            return "(no swtpm log)"

    # -- TPM access ------------------------------------------------------

    @contextlib.contextmanager
    def esapi(self) -> Iterator[Any]:
        """A tpm2-pytss ``ESAPI`` on this swtpm, finalized (with its TCTI) on exit."""
        from tpm2_pytss import ESAPI, TCTILdr

        tcti = TCTILdr(self.tcti_name, self.tcti_conf)
        try:
            esapi = ESAPI(tcti)
            try:
                yield esapi
            finally:
                esapi.close()
        finally:
            tcti.close()

    def flush_transients(self) -> int:
        """Flush every transient object and session; return how many were flushed.

        Needed because swtpm has no resource manager: a client that crashed
        (or forgot to flush) leaves objects occupying libtpms' 3 slots, and
        the next test then fails with TPM_RC_OBJECT_MEMORY.
        """
        from tpm2_pytss.constants import TPM2_HT

        flushed = 0
        with self.esapi() as esys:
            for kind in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION, TPM2_HT.SAVED_SESSION):
                for handle in _list_handles(esys, int(kind) << 24):
                    esys.flush_context(esys.tr_from_tpmpublic(handle))
                    flushed += 1
        return flushed

    # -- pid files (detached instances) ------------------------------------

    @staticmethod
    def stop_pidfile(pid_file: Path, timeout: float = 5.0) -> bool:
        """Stop the swtpm whose pid ``pid_file`` holds; return whether one was running.

        Refuses (:class:`SwtpmError`, nothing signalled) unless
        ``/proc/PID/cmdline`` shows an ``swtpm`` executable started with this
        very pid file, so a stale pid file whose number was reused by another
        process never gets that process killed.
        """
        pid_file = Path(pid_file).absolute()
        pid = read_pid(pid_file)
        if pid is None:
            return False
        argv = process_argv(pid)
        if argv is None:  # already gone
            pid_file.unlink(missing_ok=True)
            return False
        if not _is_swtpm_for(argv, pid_file):
            raise SwtpmError(
                f"refusing to signal pid {pid} from {pid_file}: its command line "
                f"{' '.join(argv)[:200]!r} is not an swtpm using that pid file (stale pid file?)"
            )
        try:
            terminate(pid, lambda: _is_swtpm_for(process_argv(pid), pid_file), timeout)
        except StateError as exc:
            raise SwtpmError(f"swtpm {exc}") from None
        pid_file.unlink(missing_ok=True)  # swtpm removes it itself, but not after SIGKILL
        _remove_sockets(default_socket_path(pid_file.parent), pid_file.parent)
        return True

    # -- internals -------------------------------------------------------

    def _check_dirs(self) -> None:
        if not self._state_dir.is_dir():
            raise StateError(f"TPM state directory {self._state_dir} does not exist")
        if "," in str(self._state_dir):
            raise StateError(f"path {self._state_dir} contains ',', which swtpm cannot parse")
        _prepare_private_dir(self._run_dir)
        if self._socket_path is not None:
            self._check_socket_path(self._socket_path)

    def _check_socket_path(self, path: Path) -> None:
        if len(os.fsencode(f"{path}{_CTRL_SUFFIX}")) > SUN_PATH_MAX:
            raise StateError(f"unix socket path {path}{_CTRL_SUFFIX} is too long for AF_UNIX")
        if "," in str(path):
            raise StateError(f"socket path {path} contains ',', which swtpm cannot parse")
        if path == default_socket_path(self._run_dir):
            ensure_socket_dir(self._run_dir, SOCKET_NAME + _CTRL_SUFFIX)
        for p in (path, Path(f"{path}{_CTRL_SUFFIX}")):
            if p.is_socket():
                p.unlink()  # stale socket from a killed swtpm; bind would fail
            elif p.exists():
                raise StateError(f"{p} exists and is not a socket")

    def _argv(self) -> list[str]:
        return [
            find_tool("swtpm"), "socket", "--tpm2",
            "--tpmstate", f"dir={self._state_dir},mode=0600",
            *self._transport_args(),
            "--flags", "not-need-init,startup-clear",
            "--pid", f"file={self.pid_file}",
            "--log", f"file={self.log_path},level=1",
        ]  # fmt: skip

    def _transport_args(self) -> list[str]:
        if self._transport == "unix":
            return [
                "--server", f"type=unixio,path={self.socket_path},mode=0600",
                "--ctrl", f"type=unixio,path={self.ctrl_socket_path},mode=0600",
            ]  # fmt: skip
        self._port = _free_port_pair()
        return [
            "--server", f"type=tcp,port={self._port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={self._port + 1},bindaddr=127.0.0.1",
        ]  # fmt: skip

    def _spawn(self) -> None:
        argv = self._argv()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        with open(fd, "ab") as log:  # O_APPEND: swtpm appends to the same file
            if self._detached:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True, umask=PRIVATE_UMASK,
                )  # fmt: skip
                return
            # Own process group: a terminal's Ctrl-C reaches only the parent,
            # which then stops swtpm in order (teardown, atexit, or pdeathsig).
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, umask=PRIVATE_UMASK,
                process_group=0, preexec_fn=_pdeathsig_preexec(os.getpid()),
            )  # fmt: skip
        with _live_lock:
            _live.add(self)

    def _wait_ready(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None
        while True:
            rc = proc.poll()
            if rc is not None:
                tail = self.log_tail()
                if "Address already in use" in tail and self._transport == "tcp":
                    raise _AddressInUse
                self._reap()
                raise SwtpmError(f"swtpm exited with status {rc} while starting:\n{tail}")
            if self._probe():
                return
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise SwtpmError(f"swtpm not ready after {self._start_timeout} s:\n{tail}")
            time.sleep(_POLL_INTERVAL_S)

    def _probe(self) -> bool:
        """True once swtpm's main loop answers CMD_GET_CAPABILITY on the control channel."""
        try:
            with self._connect_ctrl() as sock:
                sock.sendall(_CMD_GET_CAPABILITY)
                reply = _recv_exactly(sock, 8)
        except OSError:
            return False
        return reply[:4] == b"\0\0\0\0"

    def _connect_ctrl(self) -> socket.socket:
        if self._transport == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = str(self.ctrl_socket_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = ("127.0.0.1", self.ctrl_port)
        sock.settimeout(_PROBE_TIMEOUT_S)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock

    def _reap(self) -> None:
        """Forget a process that has exited (waiting for it so no zombie is left)."""
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1.0)
        self._proc = None
        with _live_lock:
            _live.discard(self)


# -- helpers -----------------------------------------------------------------


def default_socket_path(run_dir: Path) -> Path:
    """Where an swtpm whose run files are in ``run_dir`` binds its data socket."""
    return socket_dir(run_dir, SOCKET_NAME + _CTRL_SUFFIX) / SOCKET_NAME


def _remove_sockets(path: Path, run_dir: Path) -> None:
    """Remove the sockets an swtpm killed by SIGKILL leaves behind (a graceful exit
    removes them itself), and their directory if it is a short one made for them."""
    for p in (path, Path(f"{path}{_CTRL_SUFFIX}")):
        with contextlib.suppress(FileNotFoundError):
            if p.is_socket():
                p.unlink()
    if path.parent != run_dir.absolute() and path == default_socket_path(run_dir):
        with contextlib.suppress(OSError):  # not empty, or gone: leave it
            path.parent.rmdir()


def _free_port_pair() -> int:
    """A port P on 127.0.0.1 such that P and P+1 are both free right now.

    Only a hint: someone may grab either port before swtpm binds, which
    :meth:`Swtpm.start` handles by retrying.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    continue
        return port
    raise SwtpmError("could not find two adjacent free TCP ports on 127.0.0.1")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("swtpm closed the control connection")
        buf += chunk
    return buf


def _list_handles(esys: Any, first: int) -> list[int]:
    """All TPM handles of one type (the type is ``first``'s top byte)."""
    from tpm2_pytss.constants import TPM2_CAP

    handles: list[int] = []
    start = first
    while True:
        more, data = esys.get_capability(TPM2_CAP.HANDLES, start, 64)
        page = [int(h) for h in data.data.handles if int(h) >> 24 == first >> 24]
        handles += page
        if not more or not page:
            return handles
        start = page[-1] + 1


def _is_swtpm_for(argv: list[str] | None, pid_file: Path) -> bool:
    if not argv or Path(argv[0]).name != "swtpm":
        return False
    wanted = pid_file.resolve()
    return any(a.startswith("file=") and Path(a[5:]).resolve() == wanted for a in argv)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
