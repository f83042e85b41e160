"""A node's encrypted disks on this machine: provision, unlock, plain view, lock.

Files (``docs/svd.md``):

* ``nodes/NODE/state/disks/DISK.luks``: the LUKS1 image (ciphertext only; kept by
  ``testbed down``, removed by ``--purge`` with the node's TPM state);
* ``nodes/NODE/state/disks/DISK.svd.json``: its binding (:class:`cryptovm.disks.DiskBinding`:
  key id, wrapped passphrase, LUKS UUID; public);
* ``nodes/NODE/run/disks/DISK``: the plain view while unlocked (a FUSE export, 0600);
* ``nodes/NODE/run/svd/DISK.pid`` (+ QMP socket): the qemu-storage-daemon holding it open.

Who unlocks is the caller's business: it passes ``call`` (to the CryptoVM) and ``quote``
(of the disk's owner node). The host-side mode's caller is the hypervisor (the sim
backend), the guest-side mode's the node process itself. The passphrase only passes
through this process's memory on its way into the daemon's QMP socket.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from attestation.files import private_dir
from cryptovm.disks import (
    BINDING_SUFFIX,
    SEALED_SUFFIX,
    Call,
    DiskBinding,
    DiskBindingError,
    Quote,
    SealedDisk,
    disk_key_id,
    luks_uuid,
    new_passphrase,
    release_disk_key,
)
from cryptovm.sealing import Sealer
from testbed.core.errors import StateError
from testbed.spec.cluster_spec import DiskSpec
from testbed.svd.qsd import StorageDaemon

__all__ = ["DiskFiles", "DiskStatus", "attach", "attach_sealed", "detach", "detach_all",
           "disk_status", "mount_filesystem"]

DiskState = Literal["unlocked", "locked", "absent"]


@dataclass(frozen=True)
class DiskFiles:
    """Where one disk of one node lives (see the module docstring)."""

    node: str
    disk: str
    state_dir: Path  # nodes/NODE/state
    run_dir: Path  # nodes/NODE/run

    @property
    def image(self) -> Path:
        return self.state_dir / "disks" / f"{self.disk}.luks"

    @property
    def binding(self) -> Path:
        return self.image.with_name(self.disk + BINDING_SUFFIX)

    @property
    def plain_view(self) -> Path:
        return self.run_dir / "disks" / self.disk

    @property
    def sealed(self) -> Path:
        return self.image.with_name(self.disk + SEALED_SUFFIX)

    @property
    def mountpoint(self) -> Path:
        return self.run_dir / "disks" / f"{self.disk}.mnt"

    @property
    def daemon(self) -> StorageDaemon:
        return StorageDaemon(self.run_dir / "svd", self.disk)


@dataclass(frozen=True)
class DiskStatus:
    """What ``status`` shows of a disk: never a key."""

    name: str
    mode: str
    size: int
    state: DiskState
    plain_view: str | None = None
    daemon_pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "size": self.size, "state": self.state,
                "plain_view": self.plain_view, "daemon_pid": self.daemon_pid}

    def summary(self) -> str:
        return f"{self.name} ({self.mode}, {self.size >> 20} MiB, {self.state})"


def disk_status(files: DiskFiles, spec: DiskSpec) -> DiskStatus:
    pid = files.daemon.pid
    if pid is not None:
        return DiskStatus(spec.name, spec.mode, spec.size, "unlocked", str(files.plain_view), pid)
    known = files.binding.is_file() or files.sealed.is_file()
    state: DiskState = "locked" if known else "absent"
    return DiskStatus(spec.name, spec.mode, spec.size, state)


def attach(files: DiskFiles, spec: DiskSpec, cryptovm: str, call: Call, quote: Quote,
           public_key: Callable[[], bytes]) -> DiskStatus:
    """Unlock the disk (provisioning it on first use) and export its plain view.

    First use: ``public_key()`` gives the disk key's public key (the key itself is
    created inside the CryptoVM); the image is formatted with a fresh passphrase that is
    then forgotten (only its wrapped form is kept). Later: the binding is checked
    against the image, and the passphrase comes back only through attestation-gated
    release (``call``, with ``quote`` of the owner node).
    """
    if files.daemon.pid is not None:
        return disk_status(files, spec)  # already unlocked (e.g. `up` again)
    private_dir(files.image.parent)
    if files.binding.is_file():
        binding = _bound(files)
        passphrase = release_disk_key(call, binding, quote)
        _open(files, passphrase)
    else:
        _check_new(files, files.binding)  # before the CryptoVM is asked for anything
        fresh = new_passphrase(public_key())

        def record(uuid: str) -> None:
            DiskBinding(files.node, files.disk, disk_key_id(files.node, files.disk), cryptovm,
                        spec.size, "guest" if spec.mode == "guest" else "host", uuid,
                        fresh.wrapped_key).save(files.binding)
        _provision(files, spec, fresh.passphrase, record, files.binding)
    return disk_status(files, spec)


def attach_sealed(files: DiskFiles, spec: DiskSpec, sealer: Sealer) -> bool:
    """The CryptoVM's own store disk: its passphrase sealed to the CryptoVM's TPM PCRs
    (``sealer``), unsealed here at start, which works only in the measured state it was
    sealed in. Whether the disk is new (its file system still to be made)."""
    private_dir(files.image.parent)
    if files.sealed.is_file():
        sealed = SealedDisk.load(files.sealed)
        sealed.check_image(files.image)
        _open(files, sealer.unseal(sealed.sealed))
        return False
    _check_new(files, files.sealed)
    passphrase = os.urandom(32).hex().encode()
    blob = sealer.seal(passphrase)

    def record(uuid: str) -> None:
        SealedDisk(files.node, files.disk, spec.size, uuid, blob).save(files.sealed)
    _provision(files, spec, passphrase, record, files.sealed)
    return True


def _bound(files: DiskFiles) -> DiskBinding:
    binding = DiskBinding.load(files.binding)
    if (binding.node, binding.disk) != (files.node, files.disk):
        raise DiskBindingError(f"{files.binding} binds disk {binding.disk!r} of node "
                               f"{binding.node!r}, not {files.disk!r} of {files.node!r}")
    binding.check_image(files.image)
    return binding


def _provision(files: DiskFiles, spec: DiskSpec, passphrase: bytes,
               record: Callable[[str], None], recorded: Path) -> None:
    """Format a new image with ``passphrase``; ``record(luks uuid)`` writes what unlocks
    it next time (to ``recorded``); then open and export it."""
    _check_new(files, recorded)
    daemon = files.daemon.start()
    try:
        daemon.create_luks(files.image, spec.size, passphrase)
        record(luks_uuid(files.image))
        daemon.open_luks(files.image, passphrase)
        _export(files, daemon)
    except BaseException:
        detach(files)
        with contextlib.suppress(FileNotFoundError):
            if not recorded.exists():
                files.image.unlink()
        raise


def _check_new(files: DiskFiles, recorded: Path) -> None:
    if files.image.exists():
        raise DiskBindingError(f"{files.image} exists without its binding {recorded.name}: "
                               "its key is unknown; remove the image to start the disk over")


def _open(files: DiskFiles, passphrase: bytes) -> None:
    daemon = files.daemon.start()
    try:
        daemon.open_luks(files.image, passphrase)
        _export(files, daemon)
    except BaseException:
        detach(files)
        raise


def _export(files: DiskFiles, daemon: StorageDaemon) -> None:
    private_dir(files.plain_view.parent)
    daemon.export_fuse(files.plain_view)


def mount_filesystem(files: DiskFiles, *, new: bool) -> Path:
    """An ext4 file system on the plain view (made when ``new``), mounted (loop) at
    ``run/disks/DISK.mnt``, 0700: the CryptoVM's store directory lives there."""
    mountpoint = private_dir(files.mountpoint)
    if new:
        _run(["mkfs.ext4", "-q", "-F", "-L", files.disk[:16], str(files.plain_view)],
             "make a file system on")
    _run(["mount", "-o", "loop,nosuid,nodev,noexec", str(files.plain_view), str(mountpoint)],
         "mount")
    os.chmod(mountpoint, 0o700)
    return mountpoint


def _run(argv: list[str], what: str) -> None:
    try:
        subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    except subprocess.CalledProcessError as exc:
        raise StateError(f"could not {what} the disk's plain view: "
                         f"{(exc.stderr or '').strip()[-300:]}") from None
    except (subprocess.SubprocessError, OSError) as exc:
        raise StateError(f"could not {what} the disk's plain view: {exc}") from None


def detach(files: DiskFiles) -> bool:
    """Lock the disk: unmount its file system (if mounted), stop its daemon by PID (the
    key dies with it), undo the export. Whether it was unlocked."""
    if _mounted(files.mountpoint):
        _run(["umount", str(files.mountpoint)], "unmount")
    with contextlib.suppress(OSError):
        files.mountpoint.rmdir()
    stopped = files.daemon.stop()
    _unmount_stale(files.plain_view)
    with contextlib.suppress(FileNotFoundError):
        files.plain_view.unlink()
    return stopped


def detach_all(state_dir: Path, run_dir: Path, node: str) -> list[str]:
    """Lock every disk of a node that has a daemon (whatever the spec says now)."""
    locked = []
    for pid_file in sorted((run_dir / "svd").glob("*.pid")):
        if detach(DiskFiles(node, pid_file.stem, state_dir, run_dir)):
            locked.append(pid_file.stem)
    return locked


def _mounted(mountpoint: Path) -> bool:
    try:
        mounts = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    return any(len(fields) > 4 and fields[4] == str(mountpoint)
               for fields in (line.split() for line in mounts.splitlines()))


def _unmount_stale(mountpoint: Path) -> None:
    """A daemon killed with SIGKILL leaves its FUSE mount behind: undo it."""
    if _mounted(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=10,
                       check=False)
