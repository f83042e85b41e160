"""``image-theft`` on real VMs: an encrypted guest image (``testbed image build
--encrypted``, docs/svd.md) copied off the host and booted by someone without a key
release reveals no part of its root filesystem.

Without the Secure Virtual Device the in-RAM image carries its root filesystem in clear
(the baseline: its markers are found in the image's files). With it, no file of the
encrypted image holds a marker, the thief's key request is refused by the tenant's
CryptoVM (``ak_trust``: the thief's VM was never enrolled), and the ciphertext disk
plugged in anyway stops the boot stage (``root-still-encrypted``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from cryptovm.disks import release_disk_key
from cryptovm.errors import ReleaseDenied
from testbed.attacks.scenarios import Outcome, ScenarioResult
from testbed.core.progress import Progress
from testbed.qemu.image.build import GuestImage, build_image, image_cache
from testbed.qemu.image.encrypted import (
    EncryptedImage,
    TenantCryptoVm,
    build_encrypted_image,
    tenant_directory,
    tenant_marker,
)
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.qemu.svd_root import ROOT_REFUSED, attach_root_disk, boot_encrypted, wait_console
from testbed.qemu.vms import VmDriver
from testbed.spec.recipe import load_recipe

__all__ = ["IMAGE_THEFT", "ImageTheft", "image_reveals", "image_theft"]

IMAGE_THEFT = "image-theft"

THEFT_WAIT_S = 600.0
_CHUNK = 1 << 20


class ImageTheft:
    """The outcome of ``image-theft``: the scenario, and what each search found."""

    def __init__(self, result: ScenarioResult, details: dict[str, object]) -> None:
        self.result = result
        self.details = details

    @property
    def ok(self) -> bool:
        return self.result.as_expected


def _stream(path: Path) -> subprocess.Popen[bytes] | None:
    """A decompressor for a zstd initrd (None: read the file as it is)."""
    with path.open("rb") as f:
        head = f.read(4)
    if head == b"\x28\xb5\x2f\xfd":
        return subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE)
    if head[:2] == b"\x1f\x8b":
        return subprocess.Popen(["gzip", "-dc", str(path)], stdout=subprocess.PIPE)
    return None


def _contains(path: Path, needle: bytes) -> bool:
    """Whether ``path`` (decompressed, if it is a compressed initrd) contains ``needle``."""
    proc = _stream(path)
    source = proc.stdout if proc is not None else path.open("rb")
    assert source is not None
    tail = b""
    try:
        with source:
            while chunk := source.read(_CHUNK):
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle):]
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    return False


def image_reveals(files: list[Path], markers: dict[str, bytes]) -> dict[str, list[str]]:
    """For each marker, the image files in which a thief finds it (initrds unpacked)."""
    return {name: [p.name for p in files if _contains(p, marker)]
            for name, marker in markers.items()}


def _image_files(image: GuestImage) -> list[Path]:
    return sorted(p for p in image.directory.iterdir()
                  if p.is_file() and p.name != "build.log")


def _thief_boot(driver: VmDriver, image: EncryptedImage, tenant: TenantCryptoVm,
                tag: str) -> tuple[str, str]:
    """Boot the copied image, ask for its key with this VM's quote, plug the ciphertext
    in anyway: the CryptoVM's answer and the boot stage's console line."""
    node = boot_encrypted(driver, f"{tag}-thief", image)
    driver.wait(node, THEFT_WAIT_S)
    try:
        release_disk_key(tenant.call, image.binding,
                         lambda data: node.agent.quote(data, QUOTED_PCRS))
        asked = "RELEASED (the key went to an unenrolled VM)"
    except ReleaseDenied as exc:
        asked = f"refused: {exc.check}: {exc.reason}"
    attach_root_disk(driver.conn, node, image.root, None)
    line = wait_console(node, ROOT_REFUSED, THEFT_WAIT_S)
    return asked, line


def image_theft(workdir: Path, *, progress: Progress | None = None,
                tenant: TenantCryptoVm | None = None) -> ImageTheft:
    """The encrypted image copied off the host and booted without a release. ``tenant``:
    the tenant's CryptoVM if the caller has it open already (it is one process's)."""
    cache = image_cache(workdir)
    with contextlib.ExitStack() as stack:
        if tenant is None:
            tenant = stack.enter_context(TenantCryptoVm(tenant_directory(cache)))
        return _image_theft(workdir, cache, tenant, progress or Progress(quiet=True))


def _image_theft(workdir: Path, cache: Path, tenant: TenantCryptoVm,
                 progress: Progress) -> ImageTheft:
    progress.expect(3)
    recipe = load_recipe()
    with progress.step("images: in-RAM (plain) and encrypted (built once, then cached)"):
        plain = build_image(cache, recipe)
        encrypted = build_encrypted_image(cache, recipe, tenant)
    markers = {"root /init": recipe.init_script.read_bytes(),
               "tenant data": tenant_marker(tenant.directory, encrypted.root_id)}
    with progress.step("searching every file of each image for root filesystem markers"):
        found_plain = image_reveals(_image_files(plain), markers)
        found_encrypted = image_reveals(_image_files(encrypted.boot), markers)
    with VmDriver(workdir, reference_dir=cache / "firmware") as driver, \
            progress.step("booting the copied encrypted image without a release"):
        asked, line = _thief_boot(driver, encrypted, tenant, f"atk{os.getpid()}")
    result = _theft_result(found_plain, found_encrypted, asked, line)
    return ImageTheft(result, {"plain": found_plain, "encrypted": found_encrypted,
                               "key_request": asked, "boot_stage": line})


def _theft_result(plain: dict[str, list[str]], encrypted: dict[str, list[str]], asked: str,
                  line: str) -> ScenarioResult:
    revealed = {name: files for name, files in plain.items() if files}
    without = Outcome(bool(revealed), "the in-RAM image carries its root filesystem in "
                      f"clear: {', '.join(f'{n} in {f}' for n, f in revealed.items())}"
                      if revealed else "the plain image revealed nothing")
    leaked = {name: files for name, files in encrypted.items() if files}
    refused = "REFUSED (root-still-encrypted)" in line and asked.startswith("refused")
    caught = Outcome(bool(leaked) or not refused,
                     f"LEAKED {leaked}" if leaked else
                     f"no marker in any file of the image; key request {asked}; boot stage: "
                     f"{line.removeprefix('testbed-init: ')}",
                     "root-still-encrypted" if refused and not leaked else None,
                     "boot stage (initrd)" if refused and not leaked else None)
    return ScenarioResult("image-theft", "Image theft: the encrypted guest image copied and "
                          "booted without a key release", without, caught)
