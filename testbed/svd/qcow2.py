"""qcow2 images with QEMU's LUKS encryption (``encrypt.format=luks``): a VM's host-side
disk (docs/svd.md, "VMs"). QEMU opens them itself, with the key libvirt hands it; this
module only formats them and reads the LUKS UUID of their header (no key needed).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from cryptovm.disks import DiskBindingError
from testbed.svd.qsd import StorageDaemon

__all__ = ["format_qcow2_luks", "qcow2_luks_uuid"]

MAX_INFO = 64 << 10  # qemu-img info of one image is about 1 kB
INFO_TIMEOUT_S = 20.0


def format_qcow2_luks(image: Path, size: int, passphrase: bytes, run_dir: Path) -> str:
    """Create ``image`` (qcow2, ``size`` bytes, LUKS-encrypted with ``passphrase``) with a
    short-lived qemu-storage-daemon (the key goes over its private QMP socket, never on a
    command line); returns the LUKS UUID. A failed format leaves no image behind."""
    daemon = StorageDaemon(run_dir, f"format-{image.stem}").start()
    try:
        daemon.create_qcow2_luks(image, size, passphrase)
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    finally:
        daemon.stop()
    return qcow2_luks_uuid(image)


def qcow2_luks_uuid(image: Path) -> str:
    """The UUID of the LUKS header inside a qcow2 image; a DiskBindingError for a missing,
    truncated or foreign image, or one that is not LUKS-encrypted, before any key is
    asked for. ``-U``: QEMU holds the image's lock while a VM runs."""
    try:
        done = subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json",
                               str(image)], capture_output=True, timeout=INFO_TIMEOUT_S,
                              check=False)
    except (subprocess.SubprocessError, OSError) as exc:
        raise DiskBindingError(f"disk image {image}: qemu-img info failed ({exc})") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()[-300:]
        raise DiskBindingError(f"disk image {image} is not a usable qcow2 image: {why}")
    if len(done.stdout) > MAX_INFO:
        raise DiskBindingError(f"disk image {image}: qemu-img info said too much")
    return _luks_uuid(_json(done.stdout, image), image)


def _json(text: bytes, image: Path) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise DiskBindingError(f"disk image {image}: qemu-img info is not JSON") from None
    if not isinstance(doc, dict):
        raise DiskBindingError(f"disk image {image}: qemu-img info is not an object")
    return doc


def _luks_uuid(info: dict[str, Any], image: Path) -> str:
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    encrypt = data.get("encrypt") if isinstance(data, dict) else None
    if not isinstance(encrypt, dict) or encrypt.get("format") != "luks":
        raise DiskBindingError(f"disk image {image} is not LUKS-encrypted (a plain qcow2 "
                               "put in place of the encrypted disk?)")
    uuid = encrypt.get("uuid")
    if not isinstance(uuid, str) or not 0 < len(uuid) <= 64:
        raise DiskBindingError(f"disk image {image}: its LUKS header has no UUID")
    return uuid
