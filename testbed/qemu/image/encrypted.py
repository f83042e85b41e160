"""Encrypted guest images (``testbed image build --encrypted``, docs/svd.md).

An encrypted image is two parts:

* the **boot stage**, in clear and measured: ``vmlinuz`` + ``initrd.img``, the same
  Debian + guest agent tree as the in-RAM image (plus ``virtio_blk``) with
  ``init-encrypted.sh`` as ``/init``: it boots, lets the VM be attested, and waits for
  its root disk. These two files and the command line are what the policy predicts.
* the **root disk** ``root.luks``, ciphertext only: a LUKS1 volume (QEMU's ``luks``
  driver, cryptsetup-compatible) holding the complete root filesystem as a ``newc``
  archive, including what only the tenant's root has (``/srv/tenant``, here a
  per-build marker standing for the tenant's applications and data, and
  ``/etc/testbed/root-id``). Its passphrase exists only wrapped under a key generated
  inside the tenant's CryptoVM (``root.svd.json``, a :class:`cryptovm.disks.DiskBinding`).

The key is created with a release policy nobody satisfies; the tenant enrolls a VM
(its activated AK and the image's predicted policy) when it boots one
(:mod:`testbed.qemu.svd_root`). Layout, under ``<cache>/images/encrypted-<digest>/``::

    vmlinuz  initrd.img  cmdline  manifest.json  root.luks  root.svd.json
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from attestation.files import atomic_write, read_bounded
from attestation.policy import ReferencePolicy, dump_policy
from attestation.registrar import AkRegistry
from cryptovm.disks import (
    DiskBinding,
    DiskBindingError,
    disk_key_id,
    ensure_disk_key,
    luks_uuid,
    new_passphrase,
)
from cryptovm.errors import NotFound
from cryptovm.vsm import CryptoVm, VsmSession
from testbed.core.files import locked
from testbed.qemu.image.build import (
    GuestImage,
    ImageBuildError,
    base_manifest,
    image_digest,
    pack_initrd,
    prepare_rootfs,
)
from testbed.qemu.image.initramfs import write_newc
from testbed.spec.recipe import ImageRecipe
from testbed.svd.qsd import StorageDaemon
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm, provision

__all__ = [
    "BOOT_INIT",
    "ROOT_DISK",
    "EncryptedImage",
    "TenantCryptoVm",
    "build_encrypted_image",
    "encrypted_digest",
    "encrypted_recipe",
    "tenant_directory",
    "tenant_marker",
]

BOOT_INIT = Path(__file__).with_name("init-encrypted.sh")
ROOT_DISK = "root"
ROOT_WAIT_S = 600  # how long the boot stage waits for its root disk before powering off
TENANT_DIR = "srv/tenant"
_ALIGN = 1 << 20  # the archive is padded to whole MiB (LUKS payload and virtio sectors)
_UNENROLLED = ReferencePolicy(name="svd-image-unenrolled", pcrs={0: b"\xff" * 32},
                              description="no VM enrolled yet: satisfied by no quote")


def tenant_directory(cache: Path) -> Path:
    """Where the tenant's CryptoVM for image keys lives: beside the images it keys."""
    return Path(cache).absolute() / "tenant-cryptovm"


def encrypted_recipe(recipe: ImageRecipe) -> ImageRecipe:
    """The recipe of the boot stage: the image's, plus the virtio block driver."""
    if "virtio_blk" in recipe.modules:
        return recipe
    return replace(recipe, modules=(*recipe.modules, "virtio_blk"))


def encrypted_digest(recipe: ImageRecipe) -> str:
    """The cache key: the recipe's inputs, the boot stage's init and this builder."""
    h = hashlib.sha256(image_digest(encrypted_recipe(recipe)).encode())
    h.update(BOOT_INIT.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class EncryptedImage:
    """A built encrypted image: the clear boot stage and the encrypted root disk."""

    boot: GuestImage
    root: Path
    binding: DiskBinding

    @property
    def directory(self) -> Path:
        return self.boot.directory

    @property
    def root_id(self) -> str:
        return str(self.boot.manifest["root"]["root_id"])

    @classmethod
    def load(cls, directory: Path) -> EncryptedImage:
        return cls(GuestImage.load(directory), directory / "root.luks",
                   DiskBinding.load(directory / "root.svd.json"))


class TenantCryptoVm:
    """The tenant's CryptoVM for image keys: in-process, its store sealed to its own
    swtpm, everything under ``directory`` (0700; the root PSK 0600). On one machine it
    plays the tenant's side; its keys never leave it (generated inside, not exportable).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).absolute()
        self._swtpm: Swtpm | None = None
        self._vm: CryptoVm | None = None
        self._session: VsmSession | None = None

    def __enter__(self) -> TenantCryptoVm:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        state = self.directory / "tpm"
        if not state.is_dir():
            provision(state, LocalCA.ensure(self.directory / "ca"))
        self._swtpm = Swtpm(state).start()
        try:
            self._open()
        except BaseException:
            self._swtpm.stop()
            raise
        return self

    def _open(self) -> None:
        assert self._swtpm is not None
        store, psk_file = self.directory / "store", self.directory / "root.psk"
        if psk_file.is_file():
            self._vm = CryptoVm.open(store, self._swtpm.tcti)
            psk = read_bounded(psk_file, 256, what="root PSK")
        else:
            self._vm, psk = CryptoVm.initialize(store, self._swtpm.tcti)
            atomic_write(psk_file, psk, mode=0o600)
        self._session = self._vm.login("root", psk)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """``call(op, **args)`` as the tenant's root (what cryptovm.disks expects)."""
        assert self._session is not None, "use TenantCryptoVm as a context manager"
        result: dict[str, Any] = getattr(self._session, op)(**args)
        return result

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._vm is not None:
            self._vm.close()
        if self._swtpm is not None:
            self._swtpm.stop()


def _tenant_content(rootfs: Path, root_id: str, tenant: TenantCryptoVm) -> None:
    """What only the encrypted root holds: the tenant's files (a per-build marker, which
    the tenant also keeps, 0600, to check later that no copy of the image reveals it)."""
    marker = f"tenant-root-secret-{os.urandom(16).hex()}".encode()
    files = rootfs / TENANT_DIR
    files.mkdir(parents=True, mode=0o700)
    (files / "marker").write_bytes(marker + b"\n")
    (rootfs / "etc/testbed/root-id").write_text(f"{root_id}\n")
    kept = tenant.directory / "markers"
    kept.mkdir(mode=0o700, exist_ok=True)
    atomic_write(kept / root_id, marker, mode=0o600)


def tenant_marker(tenant_dir: Path, root_id: str) -> bytes:
    """The marker the build put into the encrypted root filesystem ``root_id``."""
    return read_bounded(Path(tenant_dir) / "markers" / root_id, 256, what="tenant marker")


def _boot_stage(rootfs: Path) -> None:
    """Turn the full tree into the boot stage: no tenant content, the waiting /init."""
    shutil.rmtree(rootfs / TENANT_DIR)
    (rootfs / "etc/testbed/root-id").unlink()
    (rootfs / "etc/testbed/root_wait").write_text(f"{ROOT_WAIT_S}\n")
    shutil.copyfile(BOOT_INIT, rootfs / "init")
    os.chmod(rootfs / "init", 0o755)  # noqa: S103 - the guest's PID 1 must be executable


def _archive(rootfs: Path, target: Path) -> int:
    """The root filesystem as an uncompressed newc archive padded to whole MiB (LUKS
    ciphertext does not compress, and the guest unpacks it without a decompressor)."""
    with target.open("wb") as out:
        write_newc(rootfs, out, epoch=int(time.time()))
        size = out.tell()
        out.write(b"\0" * (-size % _ALIGN))
        return size + (-size % _ALIGN)


def _encrypt(archive: Path, size: int, image: Path, passphrase: bytes, scratch: Path) -> None:
    """Format ``image`` as LUKS1 with ``passphrase`` and write ``archive`` through QEMU's
    LUKS layer (the plain view of a qemu-storage-daemon: no dm-crypt needed)."""
    daemon = StorageDaemon(scratch / "qsd", ROOT_DISK).start()
    try:
        daemon.create_luks(image, size, passphrase)
        daemon.open_luks(image, passphrase)
        view = scratch / "qsd" / "view"
        daemon.export_fuse(view)
        with archive.open("rb") as src, open(view, "r+b") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    finally:
        daemon.stop()


def _disk_key(tenant: TenantCryptoVm, node: str) -> bytes:
    """The root disk key's public key; created (inside the CryptoVM) on first use with a
    release policy that no VM satisfies until the tenant enrolls one."""
    return ensure_disk_key(tenant.call, node, ROOT_DISK, dump_policy(_UNENROLLED),
                           AkRegistry().to_json())


def _usable(directory: Path, tenant: TenantCryptoVm, force: bool) -> bool:
    """A cached image is usable only while its key is in this tenant's CryptoVM."""
    if force or not (directory / "manifest.json").is_file():
        return False
    try:
        key_id = DiskBinding.load(directory / "root.svd.json").key_id
        tenant.call("public_key", key_id=key_id)
    except (DiskBindingError, NotFound):
        return False
    return True


def _build(recipe: ImageRecipe, digest: str, out: Path, scratch: Path,
           tenant: TenantCryptoVm) -> dict[str, Any]:
    started = time.monotonic()
    boot_recipe = encrypted_recipe(recipe)
    tree = prepare_rootfs(boot_recipe, out, scratch)
    root_id = f"{recipe.name}-{digest[:12]}-{os.urandom(4).hex()}"
    _tenant_content(tree.rootfs, root_id, tenant)
    archive = scratch / "root.cpio"
    size = _archive(tree.rootfs, archive)
    _boot_stage(tree.rootfs)
    pack_initrd(tree.rootfs, out / "initrd.img", recipe.compression)
    node = recipe.name
    fresh = new_passphrase(_disk_key(tenant, node))
    _encrypt(archive, size, out / "root.luks", fresh.passphrase, scratch)
    DiskBinding(node, ROOT_DISK, disk_key_id(node, ROOT_DISK), "tenant", size, "host",
                luks_uuid(out / "root.luks"), fresh.wrapped_key).save(out / "root.svd.json")
    manifest = base_manifest(boot_recipe, digest, out, tree, started)
    manifest["encrypted"] = True
    manifest["root"] = {"root_id": root_id, "size": size, "disk": "root.luks",
                        "key_id": disk_key_id(node, ROOT_DISK),
                        "luks_bytes": (out / "root.luks").stat().st_size}
    return manifest


def build_encrypted_image(cache: Path, recipe: ImageRecipe, tenant: TenantCryptoVm, *,
                          force: bool = False) -> EncryptedImage:
    """Build (or reuse) the encrypted image of ``recipe`` under ``cache/images``; its
    root key is generated inside ``tenant`` (the passphrase is forgotten once the disk
    is formatted)."""
    images = Path(cache).absolute() / "images"
    images.mkdir(parents=True, exist_ok=True)
    digest = encrypted_digest(recipe)
    directory = images / f"encrypted-{digest}"
    if _usable(directory, tenant, force):  # cached: no need to queue behind other builds
        return EncryptedImage.load(directory)
    with locked(images / ".build.lock"):  # one build at a time: mmdebstrap is heavy
        if _usable(directory, tenant, force):
            return EncryptedImage.load(directory)
        partial = images / f".encrypted-{digest}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(mode=0o755)
        with tempfile.TemporaryDirectory(dir=images, prefix=".scratch-") as scratch:
            manifest = _build(recipe, digest, partial, Path(scratch), tenant)
        (partial / "cmdline").write_text(recipe.cmdline + "\n")
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for name in ("vmlinuz", "initrd.img", "cmdline", "manifest.json", "root.svd.json"):
            os.chmod(partial / name, 0o644)  # QEMU (libvirt-qemu) reads the boot stage
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(partial, directory)
    if not (directory / "root.luks").is_file():
        raise ImageBuildError(f"{directory}: the encrypted build left no root disk")
    return EncryptedImage.load(directory)
