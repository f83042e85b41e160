"""Sealed storage on a real swtpm: the storage key is bound to the measured state, the
key store holds no plaintext key material, files are private, tampering is caught."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm2_pytss.types import TPM2B_PUBLIC

from attestation.tpm import TpmClient
from cryptovm import admin
from cryptovm.errors import AccessDenied, SealedStorageError, StorageError
from cryptovm.keystore import StateCipher
from cryptovm.sealing import (
    SealedBlob,
    TpmSealer,
    parse_pcr_selection,
    pcr_policy_digest,
)
from cryptovm.vsm import CryptoVm
from testbed.tpm.pytest_plugin import SwtpmFactory
from testbed.tpm.swtpm import Swtpm
from tests.test_cryptovm_support import OTHER_BOOT, boot, scan, secret_forms, start_tpm

ALGORITHMS = [("ec-p256", ["sign"]), ("ec-p384", ["sign", "derive"]), ("ed25519", ["sign"]),
              ("rsa-2048", ["decrypt"]), ("rsa-3072", ["sign"]), ("aes-256", ["encrypt"])]


@pytest.fixture
def measured(swtpm: Swtpm) -> Swtpm:
    boot(swtpm)
    return swtpm


@pytest.fixture
def vm(measured: Swtpm, tmp_path: Path) -> Iterator[tuple[CryptoVm, bytes]]:
    vm, psk = CryptoVm.initialize(tmp_path / "state", measured.tcti)
    try:
        yield vm, psk
    finally:
        vm.close()


def test_policy_digest_computed_in_python_is_the_sealed_objects_auth_policy(
        measured: Swtpm) -> None:
    selection = parse_pcr_selection("sha256:0-9")
    sealer = TpmSealer(measured.tcti, selection)
    blob = sealer.seal(os.urandom(32))
    public = TPM2B_PUBLIC.unmarshal(blob.public)[0].publicArea
    assert bytes(public.authPolicy) == blob.policy_digest
    assert blob.policy_digest == pcr_policy_digest(selection, sealer.read_pcrs())
    assert SealedBlob.from_json(blob.to_json()) == blob
    with TpmClient(measured.tcti) as client:
        assert client.transient_handles() == []  # everything flushed


def test_bad_base64_in_state_files_is_a_named_storage_error() -> None:
    cipher = StateCipher(os.urandom(32))
    record = json.loads(cipher.seal("key", {"id": "k"}, {}, b"secret"))
    assert cipher.open(json.dumps(record).encode(), "key", {"id": "k"}, "k.json")[1] == b"secret"
    for name, value in (("nonce", "!!"), ("ciphertext", 5)):
        bad = json.dumps({**record, name: value}).encode()
        with pytest.raises(StorageError, match=rf"k.json: not a CryptoVM state record \({name} "):
            cipher.open(bad, "key", {"id": "k"}, "k.json")
    blob = SealedBlob(b"pub", b"priv", parse_pcr_selection("sha256:0"), b"d" * 32, {})
    assert SealedBlob.from_json(blob.to_json()) == blob
    damaged = json.dumps({**json.loads(blob.to_json()), "private": "not base64!"}).encode()
    with pytest.raises(SealedStorageError, match="damaged: private is not valid base64"):
        SealedBlob.from_json(damaged)


def test_state_survives_a_restart(vm: tuple[CryptoVm, bytes], measured: Swtpm,
                                  tmp_path: Path) -> None:
    cvm, psk = vm
    root = cvm.login("root", psk)
    key = root.generate("ec-p256", ["sign"], key_id="persist")
    signature = root.sign("persist", b"data")["signature"]
    cvm.close()
    reopened = CryptoVm.open(tmp_path / "state", measured.tcti)
    try:
        again = reopened.login("root", psk)
        assert again.public_key("persist")["public_key"] == key["public_key"]
        assert again.verify("persist", b"data", signature)["valid"]
    finally:
        reopened.close()


def test_after_a_pcr_extend_the_store_cannot_be_opened(vm: tuple[CryptoVm, bytes],
                                                       measured: Swtpm,
                                                       tmp_path: Path) -> None:
    cvm, _ = vm
    cvm.local_root().generate("ec-p256", ["sign"])
    cvm.close()
    with TpmClient(measured.tcti) as client:
        client.extend_pcr(8, {"sha256": b"\x42" * 32})
    with pytest.raises(SealedStorageError, match=r"PCRs differ: \[8\]"):
        CryptoVm.open(tmp_path / "state", measured.tcti)


def test_store_copied_to_a_cryptovm_booted_differently_cannot_be_opened(
        vm: tuple[CryptoVm, bytes], swtpm_template: Path, tmp_path: Path) -> None:
    cvm, _ = vm
    cvm.local_root().generate("ec-p256", ["sign"])
    copy = tmp_path / "copied-state"
    shutil.copytree(cvm.state.path, copy)
    (copy / "lock").unlink()
    other = start_tpm(swtpm_template, tmp_path / "other-tpm")  # same TPM seeds ...
    try:
        boot(other, OTHER_BOOT)  # ... but init=/bin/sh on the kernel command line
        with pytest.raises(SealedStorageError, match=r"PCRs differ: \[9\]"):
            CryptoVm.open(copy, other.tcti)
    finally:
        other.stop()


def test_store_copied_to_another_tpm_cannot_be_opened(vm: tuple[CryptoVm, bytes],
                                                      swtpm_factory: SwtpmFactory,
                                                      tmp_path: Path) -> None:
    cvm, _ = vm
    copy = tmp_path / "copied-state"
    shutil.copytree(cvm.state.path, copy)
    (copy / "lock").unlink()
    stranger = swtpm_factory(unique=True)
    boot(stranger)  # identical measurements, different TPM
    with pytest.raises(SealedStorageError, match="another TPM"):
        CryptoVm.open(copy, stranger.tcti)


def test_no_plaintext_key_material_anywhere_on_disk(vm: tuple[CryptoVm, bytes]) -> None:
    cvm, root_psk = vm
    root = cvm.local_root()
    guest_psk = root.account_create("guest", ["keys:generate"])["psk"]
    for algorithm, usage in ALGORITHMS:
        key_id = root.generate(algorithm, usage)["key_id"]
        if algorithm in ("ec-p256", "aes-256"):
            root.rotate(key_id)
    root.record_write("r0", b"record payload that is secret")
    needles = {"root psk": root_psk, "root psk hex": root_psk.hex().encode(),
               "guest psk": guest_psk, "guest psk hex": guest_psk.hex().encode(),
               "record": b"record payload that is secret", "pem marker": b"PRIVATE KEY"}
    versions = [kv for key_id in cvm.keys.ids() for kv in cvm.keys.versions(key_id)]
    assert len(versions) == len(ALGORITHMS) + 2
    for kv in versions:
        needles |= {f"{kv.key_id} v{kv.version} {name}": value
                    for name, value in secret_forms(kv.secret).items()}
    cvm.audit.sync()
    assert scan(cvm.state.path, needles) == []


def test_state_files_are_private(vm: tuple[CryptoVm, bytes]) -> None:
    cvm, _ = vm
    cvm.local_root().generate("ec-p256", ["sign"])
    cvm.local_root().record_write("r", b"x")
    for path in [cvm.state.path, *cvm.state.path.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_a_tampered_key_file_is_refused(vm: tuple[CryptoVm, bytes], measured: Swtpm,
                                        tmp_path: Path) -> None:
    cvm, _ = vm
    cvm.local_root().generate("ec-p256", ["sign"], key_id="victim")
    cvm.close()
    path = tmp_path / "state" / "keys" / "victim" / "v00000001.key"
    data = path.read_bytes()
    assert b'"exportable":false' in data  # metadata is readable, but authenticated (AAD)
    path.write_bytes(data.replace(b'"exportable":false', b'"exportable":true'))
    with pytest.raises(StorageError, match="authentication failed"):
        CryptoVm.open(tmp_path / "state", measured.tcti)


def test_a_key_file_moved_to_another_keys_place_is_refused(vm: tuple[CryptoVm, bytes],
                                                           measured: Swtpm,
                                                           tmp_path: Path) -> None:
    cvm, _ = vm
    root = cvm.local_root()
    root.generate("ec-p256", ["sign"], key_id="alice-key")
    root.generate("ec-p256", ["sign"], key_id="bob-key")
    cvm.close()
    keys = tmp_path / "state" / "keys"
    shutil.copyfile(keys / "alice-key" / "v00000001.key", keys / "bob-key" / "v00000001.key")
    with pytest.raises(StorageError, match="moved or swapped"):
        CryptoVm.open(tmp_path / "state", measured.tcti)


def test_crash_leftovers_are_cleaned_and_a_second_process_is_locked_out(
        vm: tuple[CryptoVm, bytes], measured: Swtpm, tmp_path: Path) -> None:
    cvm, _ = vm
    cvm.local_root().generate("ec-p256", ["sign"], key_id="gone")
    with pytest.raises(StorageError, match="in use by another CryptoVM"):
        CryptoVm.open(tmp_path / "state", measured.tcti)
    cvm.close()
    keys = tmp_path / "state" / "keys"
    (keys / "gone").rename(keys / ".deleted-gone-1234")  # crash after the delete's rename
    (keys / ".stray.key.99.tmp").write_bytes(b"half-written")
    reopened = CryptoVm.open(tmp_path / "state", measured.tcti)
    try:
        assert reopened.keys.ids() == []
        assert sorted(p.name for p in keys.iterdir()) == []
    finally:
        reopened.close()


def test_a_tampered_audit_log_of_a_cryptovm_is_detected(vm: tuple[CryptoVm, bytes],
                                                        measured: Swtpm,
                                                        tmp_path: Path) -> None:
    cvm, psk = vm
    root = cvm.login("root", psk)
    root.generate("ec-p256", ["sign"], key_id="k1")
    guest = cvm.login("guest", root.account_create("guest", [])["psk"])
    with pytest.raises(AccessDenied):
        guest.sign("k1", b"x")  # a denial the tamperer would like to hide
    assert cvm.verify_audit().ok
    cvm.close()
    log = tmp_path / "state" / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"outcome":"denied"', b'"outcome":"ok"', 1))
    reopened = CryptoVm.open(tmp_path / "state", measured.tcti)
    try:
        report = reopened.verify_audit()
        assert (report.ok, report.check) == (False, "hash")
    finally:
        reopened.close()


def test_admin_functions_return_json(measured: Swtpm, tmp_path: Path) -> None:
    state = tmp_path / "admin-state"
    created = admin.init(state, measured.tcti)
    assert len(bytes.fromhex(created["root_psk"])) == 32
    assert created["ca_certificate"].startswith("-----BEGIN CERTIFICATE")
    guest = admin.account_create(state, measured.tcti, "guest", ["keys:generate"])
    assert len(guest["psk"]) == 64
    key = admin.key_generate(state, measured.tcti, "ec-p256", ["sign"], key_id="cli")
    signed = admin.key_sign(state, measured.tcti, "cli", b"hello")
    assert admin.key_verify(state, measured.tcti, "cli", b"hello",
                            base64.b64decode(signed["signature"]))["valid"]
    assert [k["key_id"] for k in admin.key_list(state, measured.tcti)["keys"]] == ["cli"]
    assert admin.key_attest(state, measured.tcti, "cli", b"n" * 16)["public"] == \
        key["public_key"]
    status = admin.status(state, measured.tcti)
    assert status["keys"] == 1 and status["audit"]["ok"]
    assert admin.verify_audit(state)["ok"]
    json.dumps([created, guest, key, signed, status])
    with pytest.raises(ValueError, match="unknown CryptoVM operation"):
        admin.run(state, measured.tcti, "_authorize_key")
    with CryptoVm.open(state, measured.tcti), pytest.raises(StorageError, match="in use"):
        admin.key_list(state, measured.tcti)
