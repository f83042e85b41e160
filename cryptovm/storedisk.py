"""The CryptoVM's store on a LUKS2 volume opened with dm-crypt, keyed by its own TPM.

A CryptoVM cannot ask itself for a key, and nothing below it could release one, so the
volume's passphrase (32 random bytes as 64 hex characters) is **sealed to this
CryptoVM's TPM PCRs** (:mod:`cryptovm.sealing`'s sealed data object, PolicyPCR) and
the sealed blob is kept in the volume's own **LUKS2 token** (type
:data:`TOKEN_TYPE`): the disk carries what opens it, and only that TPM in the measured
state it was sealed in can unseal it. The passphrase goes to ``cryptsetup`` through a
pipe (``--key-file -``): never on a command line, never in a file, never logged.

On the mapped device: an ext4 file system, mounted ``nosuid,nodev,noexec`` (a
``mount(2)`` call, no mount program needed); the CryptoVM's state directory lives in
it. Used by the guest agent's CryptoVM (testbed/qemu/guest/cryptovm_extension.py, its
disk found by serial) and by host-side tests (a loop device, an swtpm).

PBKDF2 with the minimum iteration count: the passphrase is 256 bits of randomness,
not a password, so stretching buys nothing (and argon2's memory cost would not fit a
512 MiB guest under TCG).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptovm.errors import SealedStorageError
from cryptovm.sealing import SealedBlob, Sealer

__all__ = ["TOKEN_TYPE", "Runner", "StoreDisk", "StoreDiskError", "run_command"]

TOKEN_TYPE = "testbed-tpm2-sealed"  # noqa: S105 - a LUKS2 token type, not a secret
TOKEN_ID = 0
PASSPHRASE_BYTES = 32
BLANK_CHECK = 1 << 20  # a new disk reads zeros here; anything else is not formatted over
COMMAND_TIMEOUT_S = 120.0  # TCG guests under load are slow
MAX_TOKEN = 16 << 10
LUKS2_MAGIC = b"LUKS\xba\xbe\x00\x02"
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
# No udev in the guest: libdevmapper makes the /dev/mapper node itself.
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DM_DISABLE_UDEV": "1", "LC_ALL": "C"}

Runner = Callable[[list[str], bytes | None], str]
"""Runs a program with ``stdin``; its stdout, or StoreDiskError naming it."""


class StoreDiskError(SealedStorageError):
    """The store disk cannot be formatted, opened, mounted or closed."""


def run_command(argv: list[str], stdin: bytes | None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, env=_ENV,
                              timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StoreDiskError(f"{' '.join(argv[:2])}: {exc}") from None
    if done.returncode != 0:  # stderr: cryptsetup never echoes a key read from stdin
        why = done.stderr.decode(errors="replace").strip()[-300:]
        raise StoreDiskError(f"{' '.join(argv[:2])} failed ({done.returncode}): {why}")
    return done.stdout.decode(errors="replace")


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise StoreDiskError(f"{name} {args[0]!r}: {os.strerror(errno)}")


@dataclass
class StoreDisk:
    """One block device holding the CryptoVM's store (see the module docstring)."""

    device: Path
    mount: Path
    mapper: str = "cvmstore"
    run: Runner = run_command

    @property
    def mapped(self) -> Path:
        return Path("/dev/mapper") / self.mapper

    @property
    def state_dir(self) -> Path:
        """Where the CryptoVM's state directory goes, on the mounted file system."""
        return self.mount / "cryptovm"

    def open(self, sealer: Sealer) -> bool:
        """Unseal, open and mount the volume (formatting a blank disk first); whether it
        was new. A TPM in another state refuses: SealedStorageError naming the PCRs."""
        if os.path.ismount(self.mount):
            return False  # open already (a second cvm_start)
        new = not self._is_luks()
        passphrase = self.format(sealer) if new else self.unseal(sealer)
        self._open(passphrase)
        try:
            if new:
                self.run(["mke2fs", "-q", "-t", "ext4", "-L", "cvmstore", str(self.mapped)],
                         None)
            self.mount.mkdir(mode=0o700, parents=True, exist_ok=True)
            _libc_call("mount", str(self.mapped).encode(), str(self.mount).encode(), b"ext4",
                       MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            os.chmod(self.mount, 0o700)
        except BaseException:
            self._close_mapping()
            raise
        return new

    def close(self) -> None:
        """Flush, unmount and close the mapping (the volume key leaves the kernel)."""
        os.sync()
        if os.path.ismount(self.mount):
            _libc_call("umount2", str(self.mount).encode(), 0)
        self._close_mapping()

    # --- steps ----------------------------------------------------------------------------

    def _is_luks(self) -> bool:
        try:
            with open(self.device, "rb") as f:
                head = f.read(BLANK_CHECK)
        except OSError as exc:
            raise StoreDiskError(f"store disk {self.device}: {exc.strerror}") from None
        if head.startswith(LUKS2_MAGIC):
            return True
        if head.count(0) != len(head) or len(head) < BLANK_CHECK:
            raise StoreDiskError(f"store disk {self.device} is neither a LUKS2 volume nor "
                                 "blank: refusing to format over it")
        return False

    def format(self, sealer: Sealer) -> bytes:
        """LUKS2 with a fresh passphrase, sealed to ``sealer``'s PCRs into the volume's
        token; the passphrase, for the one open that follows."""
        passphrase = os.urandom(PASSPHRASE_BYTES).hex().encode()
        blob = sealer.seal(passphrase)
        self.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
                  "--cipher", "aes-xts-plain64", "--key-size", "512", "--hash", "sha256",
                  "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                  "--label", "cryptovm-store", "--key-file", "-", str(self.device)],
                 passphrase)
        token = {"type": TOKEN_TYPE, "keyslots": ["0"], "sealed": json.loads(blob.to_json())}
        self.run(["cryptsetup", "token", "import", "--token-id", str(TOKEN_ID),
                  "--json-file", "-", str(self.device)], json.dumps(token).encode())
        return passphrase

    def unseal(self, sealer: Sealer) -> bytes:
        """The passphrase, unsealed from the volume's token: only this TPM, only in the
        measured state it was sealed in (else SealedStorageError naming the PCRs)."""
        return sealer.unseal(self._sealed())

    def _sealed(self) -> SealedBlob:
        text = self.run(["cryptsetup", "token", "export", "--token-id", str(TOKEN_ID),
                         str(self.device)], None)
        if len(text) > MAX_TOKEN:
            raise StoreDiskError(f"store disk {self.device}: its token is too large")
        try:
            token = json.loads(text)
            if token["type"] != TOKEN_TYPE:
                raise ValueError(f"token type {token['type']!r}")
            return SealedBlob.from_json(json.dumps(token["sealed"]).encode())
        except (ValueError, KeyError, TypeError, SealedStorageError) as exc:
            raise StoreDiskError(f"store disk {self.device}: no usable sealed key in its "
                                 f"LUKS2 token ({exc})") from None

    def _open(self, passphrase: bytes) -> None:
        self._close_mapping()  # a mapping left by a crashed start
        self.run(["cryptsetup", "open", "--type", "luks2", "--key-file", "-",
                  str(self.device), self.mapper], passphrase)

    def _close_mapping(self) -> None:
        if self.mapped.exists():
            with contextlib.suppress(StoreDiskError):
                self.run(["cryptsetup", "close", self.mapper], None)
