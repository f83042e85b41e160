"""The CryptoVM's store disk (cryptovm/storedisk.py) on the host: a real LUKS2 volume on
a loop device, dm-crypt, ext4, and the passphrase sealed by a real swtpm (the raw backend
the guest uses). The qemu test (tests/test_qemu_cryptovm_store.py) runs it in a VM."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from attestation.tpm import TpmClient
from cryptovm.errors import SealedStorageError
from cryptovm.rawtpm import RawTpm
from cryptovm.sealing import parse_pcr_selection
from cryptovm.storedisk import TOKEN_TYPE, StoreDisk, StoreDiskError
from cryptovm.vsm import CryptoVm
from testbed.qemu.guest.cryptovm_extension import GuestCryptoVm, _disk_by_serial
from testbed.tpm.swtpm import Swtpm

SIZE = 40 << 20  # LUKS2's 16 MiB header + room for ext4
MARKER = "store-marker-" + os.urandom(6).hex()

def _device_mapper() -> bool:
    """Root, cryptsetup and a kernel with device-mapper (not every CI kernel has one)."""
    if os.geteuid() != 0 or shutil.which("cryptsetup") is None:
        return False
    misc = Path("/proc/misc").read_text() if Path("/proc/misc").exists() else ""
    return "device-mapper" in misc


needs_dm = pytest.mark.skipif(not _device_mapper(),
                              reason="the host kernel has no device-mapper (dm-crypt); "
                              "this path runs in a guest in test_qemu_cryptovm_store.py")
pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None,
                                reason="needs cryptsetup (apt-get install cryptsetup-bin)")


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A blank backing file on a loop device; detached afterwards, also on failure."""
    backing = tmp_path / "store.img"
    with backing.open("wb") as f:
        f.truncate(SIZE)
    device = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        yield Path(device), backing
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def _blank(tmp_path: Path) -> Path:
    image = tmp_path / "blank.img"
    with image.open("wb") as f:
        f.truncate(SIZE)
    return image


def _disk(device: Path, tmp_path: Path) -> StoreDisk:
    return StoreDisk(device, tmp_path / "mnt", mapper=f"tbstore-{os.getpid()}-{tmp_path.name}"[:60])


@needs_dm
def test_store_survives_close_and_reopen_and_the_disk_is_ciphertext(
        swtpm: Swtpm, loop: tuple[Path, Path], tmp_path: Path) -> None:
    device, backing = loop
    disk = _disk(device, tmp_path)
    selection = parse_pcr_selection("sha256:0-9")
    with RawTpm.open(f"unix:{swtpm.socket_path}") as raw:
        try:
            assert disk.open(raw.sealer(selection)) is True
            assert oct(disk.mount.stat().st_mode & 0o777) == "0o700"
            vm, _psk = CryptoVm.initialize(disk.state_dir, raw.name, pcrs="sha256:0-9",
                                           **raw.options())
            session = vm.local_root()
            public = session.generate("ec-p256", ["sign"], key_id=MARKER)["public_key"]
            vm.close()
        finally:
            disk.close()
        assert not disk.mapped.exists() and not os.path.ismount(disk.mount)
        assert MARKER.encode() not in backing.read_bytes()  # names, audit log: ciphertext
        try:
            assert disk.open(raw.sealer(selection)) is False
            vm = CryptoVm.open(disk.state_dir, raw.name, **raw.options())
            signed = vm.local_root().sign(MARKER, b"after")
            assert vm.local_root().public_key(MARKER)["public_key"] == public
            assert signed["signature"]
            vm.close()
        finally:
            disk.close()


def test_the_passphrase_is_sealed_in_the_token_and_a_tampered_state_cannot_unseal(
        swtpm: Swtpm, tmp_path: Path) -> None:
    """Real cryptsetup on an image file (no device-mapper needed), a real swtpm."""
    image = _blank(tmp_path)
    disk = _disk(image, tmp_path)
    selection = parse_pcr_selection("sha256:0-9")
    with RawTpm.open(f"unix:{swtpm.socket_path}") as raw:
        passphrase = disk.format(raw.sealer(selection))
        assert disk.unseal(raw.sealer(selection)) == passphrase
    data = image.read_bytes()
    assert data.startswith(b"LUKS\xba\xbe\x00\x02") and passphrase not in data
    assert TOKEN_TYPE.encode() in data  # the sealed blob: public, useless off this TPM
    with TpmClient(swtpm.tcti) as client:  # another kernel command line, as PCR 9 sees it
        client.extend_pcr(9, {"sha256": hashlib.sha256(b"tampered").digest()})
    with RawTpm.open(f"unix:{swtpm.socket_path}") as raw, \
            pytest.raises(SealedStorageError, match=r"PCRs differ: \[9\]"):
        disk.open(raw.sealer(selection))  # refused before any mapping is made
    assert not os.path.ismount(disk.mount)


@pytest.mark.parametrize("token", [
    '{"type": "testbed-tpm2-sealed", "keyslots": ["0"], "sealed": {"format": "x"}}',
    '{"type": "someone-else", "keyslots": ["0"]}',
])
def test_a_damaged_or_foreign_token_is_one_store_disk_error(
        swtpm: Swtpm, tmp_path: Path, token: str) -> None:
    image = _blank(tmp_path)
    disk = _disk(image, tmp_path)
    with RawTpm.open(f"unix:{swtpm.socket_path}") as raw:
        disk.format(raw.sealer(parse_pcr_selection("sha256:0-9")))
        subprocess.run(["cryptsetup", "token", "remove", "--token-id", "0", str(image)],
                       check=True)
        subprocess.run(["cryptsetup", "token", "import", "--token-id", "0", "--json-file", "-",
                        str(image)], input=token.encode(), check=True)
        with pytest.raises(StoreDiskError, match="no usable sealed key in its LUKS2 token"):
            disk.unseal(raw.sealer(parse_pcr_selection("sha256:0-9")))


def test_a_disk_with_data_but_no_luks_header_is_not_formatted(
        swtpm: Swtpm, tmp_path: Path) -> None:
    image = _blank(tmp_path)
    with image.open("r+b") as f:
        f.write(b"someone's data")
    with RawTpm.open(f"unix:{swtpm.socket_path}") as raw, \
            pytest.raises(StoreDiskError, match="neither a LUKS2 volume nor blank"):
        _disk(image, tmp_path).open(raw.sealer(parse_pcr_selection("sha256:0-9")))
    assert image.read_bytes().startswith(b"someone's data")


# --- the guest agent's side: the request and the disk by serial ------------------------------


@pytest.mark.parametrize("value", [5, "", "Store", "../vda", "x" * 21, ["store"]])
def test_cvm_start_refuses_a_bad_store_disk_name_before_anything(value: object) -> None:
    cvm = GuestCryptoVm(lambda: None, cast(Any, None))
    with pytest.raises(ValueError, match="store_disk: the store disk's name"):
        cvm.start({"op": "cvm_start", "store_disk": value})


def test_the_store_disk_is_found_by_serial_or_named_missing(tmp_path: Path) -> None:
    for name, serial in (("vda", "other"), ("vdb", "store")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "serial").write_text(serial + "\n")
    assert _disk_by_serial("store", tmp_path, wait=0) == Path("/dev/vdb")
    with pytest.raises(ValueError, match="no disk with serial 'gone'"):
        _disk_by_serial("gone", tmp_path, wait=0)
