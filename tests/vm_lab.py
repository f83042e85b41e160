"""The real-VM tests' set-up, once (tests/test_qemu_*, test_hosts_*, test_ansible_hosts.py,
and the benches that boot VMs): the image cache, a `testbed` CLI runner with it in its
environment, a work directory QEMU's user can traverse, the guards that fail (never skip)
a VM test on a machine without root and libvirt, and a hosts lab on a bridge of its own.

What differs between the modules stays at their call sites: a runner's default timeout,
a guard's message, what a work directory's teardown takes down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.hosts import lifecycle
from testbed.hosts.layout import LabPaths, LabState
from testbed.hosts.remote import libvirt_uri
from testbed.qemu.domain import OVMF_CODE, OVMF_VARS, connect
from testbed.qemu.libvirtd import LibvirtError, load_libvirt

# Machine-wide, outside the checkout so every CI clone reuses it; not under /root, which
# libvirt-qemu (who runs QEMU) cannot traverse.
CACHE = Path(os.environ.get("TESTBED_IMAGE_CACHE") or "/var/cache/trusted-testbed").absolute()
REPO = Path(__file__).resolve().parent.parent
APT = ("apt-get install mmdebstrap qemu-system-x86 ovmf swtpm swtpm-tools "
       "libvirt-daemon-system libvirt-clients")

Result = subprocess.CompletedProcess[str]


@dataclass(frozen=True)
class CliRunner:
    """``python -m testbed.cli.main --workdir WORKDIR ARGS`` with the image cache in its
    environment, from the repository root; ``timeout`` is the module's default."""

    timeout: float

    def __call__(self, workdir: Path, *args: str, timeout: float | None = None) -> Result:
        env = {**os.environ, "TESTBED_IMAGE_CACHE": str(CACHE)}
        return subprocess.run([sys.executable, "-m", "testbed.cli.main", "--workdir",
                               str(workdir), *args], capture_output=True, text=True,
                              timeout=self.timeout if timeout is None else timeout, env=env,
                              cwd=REPO, check=False)

    def purge(self, workdir: Path) -> Result:
        """``down --purge``: whatever a test left in the work directory."""
        return self(workdir, "down", "--purge")


def cli_json(result: Result, stderr_tail: int | None = 3000) -> Any:
    """What a ``--json`` command printed; none fails the test with its stderr (the last
    ``stderr_tail`` characters, all of it with None)."""
    assert result.stdout, result.stderr if stderr_tail is None else result.stderr[-stderr_tail:]
    return json.loads(result.stdout)


def require_root_and_libvirt(message: str) -> None:
    """Fail (no traceback) with ``message`` unless this is root with libvirt's clients."""
    if os.geteuid() != 0 or shutil.which("virsh") is None:
        pytest.fail(message, pytrace=False)


def require_vm_prerequisites() -> None:
    """Fail (no traceback) unless this machine can build a guest image and boot it."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the VM tests need root (qemu:///system, mmdebstrap)")
    for tool in ("mmdebstrap", "qemu-system-x86_64", "swtpm", "swtpm_setup", "libvirtd",
                 "virtlogd"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            problems.append(f"{tool} is missing ({APT})")
    for firmware in (OVMF_CODE, OVMF_VARS):
        if not firmware.is_file():
            problems.append(f"{firmware} is missing (apt-get install ovmf)")
    try:
        load_libvirt()
    except LibvirtError as exc:
        problems.append(str(exc))
    if problems:
        pytest.fail("QEMU VM tests cannot run: " + "; ".join(problems), pytrace=False)


def new_workdir(prefix: str | None = None) -> Path:
    """A fresh work directory under the image cache, not pytest's tmp_path: QEMU's user
    (libvirt-qemu) cannot traverse tmp_path's 0700 parents."""
    (CACHE / "vm-tests").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=CACHE / "vm-tests", prefix=prefix))


@contextmanager
def vm_workdir(prefix: str | None, down: Callable[[Path], object]) -> Iterator[Path]:
    """:func:`new_workdir`; on the way out ``down`` (whatever a failed test left), then the
    directory is removed."""
    path = new_workdir(prefix)
    try:
        yield path
    finally:
        down(path)
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def hosts_lab(cli: CliRunner, prefix: str, hosts: int, bridge: str, subnet: str, *,
              tamper_qemu: str | None = None, need: str) -> Iterator[Path]:
    """A work directory with ``hosts up HOSTS`` on its own ``bridge`` and ``subnet`` (so
    that modules do not meet), ``tamper_qemu`` untrusted as meant (``hosts up`` exits 1
    then, else 0); on the way out its clusters purged, the lab taken down. Without root
    and libvirt it fails first, saying ``need``."""
    require_root_and_libvirt(need)

    def down(workdir: Path) -> None:
        cli.purge(workdir)
        lifecycle.down(workdir)

    tamper = () if tamper_qemu is None else ("--tamper-qemu", tamper_qemu)
    with vm_workdir(prefix, down) as workdir:
        r = cli(workdir, "hosts", "up", str(hosts), "--bridge", bridge, "--subnet", subnet,
                *tamper, "--json", timeout=120)
        assert r.returncode == (0 if tamper_qemu is None else 1), r.stderr
        yield workdir


def host_libvirt_dir(workdir: Path, host: str) -> Path:
    """The lab host's own /var/lib/libvirt, as the lab machine stores it (for inspection)."""
    return LabPaths(workdir).host(host).fs / "var-lib-libvirt"


def host_domains(workdir: Path, host: str | None) -> list[str]:
    """The libvirt domains on a host of the lab, over its qemu+ssh URI; None: this
    machine's own qemu:///system."""
    if host is None:
        conn = connect()
    else:
        lab = LabPaths(workdir)
        state = LabState.load(lab)
        assert state is not None
        conn = connect(libvirt_uri(lab, state.hosts[host].address))
    try:
        return [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()
