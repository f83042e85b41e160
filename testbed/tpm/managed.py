"""Managed swtpm instances: named TPMs under the work directory that outlive one
CLI invocation (``testbed tpm start NAME``), reachable as ``--tpm NAME``.

Layout: ``WORKDIR/ca`` (the project-local EK CA) and ``WORKDIR/tpms/NAME/`` (0700)
with ``state/`` (swtpm state, 0700), ``instance.json`` (the TCTI), ``swtpm.pid``,
``swtpm.log`` and the unix sockets ``swtpm.sock`` + ``swtpm.sock.ctrl`` (0600; in a
short private directory when that path is too long, see ``Swtpm``). No TCP port: a
managed TPM is its owner's alone (tpm2-tools reach it with ``-T swtpm:path=...``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from attestation.tpm import TpmClient
from testbed.core.errors import StateError, SwtpmError, UsageError
from testbed.core.files import read_json, write_json
from testbed.core.paths import private_tree
from testbed.core.processes import process_argv, read_pid
from testbed.tpm.boot import restore_clock_safety
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm, provision

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class ManagedTpm:
    name: str
    tcti: str
    pid: int | None
    state_dir: Path

    @property
    def running(self) -> bool:
        return self.pid is not None


class ManagedTpms:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "tpms"

    def ca(self) -> LocalCA:
        return LocalCA.ensure(self.workdir / "ca")

    def existing_ca(self) -> LocalCA:
        """The work directory's EK CA as `tpm start` made it; a read never creates one."""
        ca = LocalCA(self.workdir / "ca")
        if not (ca.root_cert_path.is_file() and ca.intermediate_cert_path.is_file()):
            raise StateError(f"no local EK CA in {ca.directory}: start a managed TPM there "
                             "(`testbed tpm start`) or pass --ca-bundle PEM")
        return ca

    def _dir(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise UsageError(f"invalid TPM name {name!r}: use lowercase letters, digits, - and _")
        return self.root / name

    def start(self, name: str) -> ManagedTpm:
        """Provision (first time) and start the named TPM; a no-op if it runs."""
        current = self.get(name)
        if current is not None and current.running:
            return current
        directory = self._dir(name)
        state = directory / "state"
        private_tree(self.workdir, directory)  # tpms/ was 0755 in older work directories
        if not (state / "tpm2-00.permall").exists():
            provision(state, self.ca())
        swtpm = Swtpm(state, run_dir=directory, detached=True).start()
        with TpmClient(swtpm.tcti) as client:
            restore_clock_safety(client)  # stopped without TPM2_Shutdown last time
        write_json(directory / "instance.json", {"tcti": swtpm.tcti})
        return ManagedTpm(name, swtpm.tcti, swtpm.pid, state)

    def stop(self, name: str) -> bool:
        directory = self._dir(name)
        stopped = Swtpm.stop_pidfile(directory / "swtpm.pid")
        (directory / "instance.json").unlink(missing_ok=True)
        return stopped

    def get(self, name: str) -> ManagedTpm | None:
        directory = self._dir(name)
        if not directory.is_dir():
            return None
        pid = _live_pid(directory / "swtpm.pid")
        info = None
        with contextlib.suppress(StateError):  # damaged: shown as stopped, `tpm start` redoes it
            info = read_json(directory / "instance.json")
        tcti = info.get("tcti") if isinstance(info, dict) else None
        if not isinstance(tcti, str):
            tcti, pid = "", None
        return ManagedTpm(name, tcti, pid, directory / "state")

    def list(self) -> list[ManagedTpm]:
        if not self.root.is_dir():
            return []
        names = sorted(d.name for d in self.root.iterdir() if _NAME.fullmatch(d.name))
        return [t for name in names if (t := self.get(name)) is not None]

    def tcti(self, name: str) -> str:
        tpm = self.get(name)
        if tpm is None or not tpm.running:
            raise SwtpmError(f"TPM {name!r} is not running: start it with "
                             f"`testbed tpm start {name}`")
        return tpm.tcti


def _live_pid(pid_file: Path) -> int | None:
    pid = None
    with contextlib.suppress(StateError):  # a damaged pid file: the TPM counts as stopped
        pid = read_pid(pid_file)
    return pid if pid is not None and process_argv(pid) is not None else None
