"""Encrypted guest images (docs/svd.md, "Encrypted images"): build, boot, image-theft.

One honest VM boots the encrypted image's clear boot stage, is attested, gets its root
key released by the tenant's CryptoVM, and switches root into the decrypted root
filesystem (QEMU's LUKS layer, the key handed over as an ephemeral libvirt secret).
The ``image-theft`` attack boots one more VM from the copied image without a release.
The image (and its key, in the tenant's CryptoVM) is built once per machine and cached
beside the in-RAM image ($TESTBED_IMAGE_CACHE or /var/cache/trusted-testbed).
"""

from __future__ import annotations

import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from attestation.policy import ReferencePolicy
from cryptovm.disks import luks_uuid
from testbed.attacks.image_theft import image_reveals, image_theft
from testbed.qemu.accel import AccelChoice
from testbed.qemu.domain import VmSpec, domain_xml
from testbed.qemu.image.build import build_image
from testbed.qemu.image.encrypted import (
    EncryptedImage,
    TenantCryptoVm,
    build_encrypted_image,
    encrypted_digest,
    encrypted_recipe,
    tenant_directory,
    tenant_marker,
)
from testbed.qemu.svd_root import (
    RootRefused,
    RootRelease,
    _disk_xml,
    boot_encrypted,
    unlock_root,
)
from testbed.qemu.vms import QemuNode, VmDriver
from testbed.spec.recipe import load_recipe
from tests.vm_lab import CACHE, new_workdir, require_vm_prerequisites

pytestmark = pytest.mark.slow


# --- no VM -------------------------------------------------------------------------------


def test_root_disk_xml_names_the_secret_only_by_uuid() -> None:
    disk = ET.fromstring(_disk_xml(Path("/images/root.luks"), "1234-uuid"))
    assert disk.find("readonly") is not None and disk.find("target").get("dev") == "vda"
    secret = disk.find("encryption/secret")
    assert secret is not None and secret.attrib == {"type": "passphrase", "uuid": "1234-uuid"}
    raw = ET.fromstring(_disk_xml(Path("/images/root.luks"), None))
    assert raw.find("encryption") is None  # the thief's view: ciphertext as raw bytes


def test_hotplug_ports_only_when_asked() -> None:
    spec = VmSpec("testbed-x", Path("/k"), Path("/i"), "", Path("/run"), 1, 2,
                  AccelChoice("tcg", "test"))
    assert "pcie-root-port" not in domain_xml(spec)  # the in-RAM image's device set as is
    ports = ET.fromstring(domain_xml(replace(spec, hotplug_ports=1))).findall(
        "devices/controller[@model='pcie-root-port']")
    assert len(ports) == 1


def test_boot_stage_recipe_adds_only_the_block_driver() -> None:
    recipe = load_recipe()
    without = replace(recipe, modules=tuple(m for m in recipe.modules if m != "virtio_blk"))
    boot = encrypted_recipe(without)
    assert boot.modules == (*without.modules, "virtio_blk")
    assert replace(boot, modules=without.modules) == without
    assert encrypted_recipe(boot) == boot  # a recipe that has it already is unchanged


def test_cli_builds_the_encrypted_image(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import json

    from testbed.cli.qemu import cmd_image_build

    require_vm_prerequisites()  # before any VM: the CLI opens the tenant's CryptoVM itself
    monkeypatch.setenv("TESTBED_IMAGE_CACHE", str(CACHE))
    args = argparse.Namespace(workdir=str(CACHE), recipe=None, force=False, json=True,
                              encrypted=True)
    assert cmd_image_build(args) == 0
    data = json.loads(capsys.readouterr().out)
    image = EncryptedImage.load(Path(data["directory"]))
    assert data["digest"] == image.boot.digest
    assert data["encrypted"]["key_id"] == "svd-testbed-guest-root"
    assert data["encrypted"]["luks_uuid"] == image.binding.luks_uuid == luks_uuid(image.root)


def test_swapped_or_damaged_root_disk_is_refused_before_any_request(tmp_path: Path) -> None:
    from cryptovm.disks import DiskBindingError

    require_vm_prerequisites()
    with TenantCryptoVm(tenant_directory(CACHE)) as tenant:  # built once, then cached
        built = build_encrypted_image(CACHE, load_recipe(), tenant)
    image = EncryptedImage.load(CACHE / "images" / f"encrypted-{encrypted_digest(load_recipe())}")
    assert image.root == built.root
    copy = tmp_path / "root.luks"
    with image.root.open("rb") as src, copy.open("wb") as dst:
        dst.write(src.read(4096))  # truncated: a header, no payload
    with pytest.raises(DiskBindingError, match="truncated"):
        image.binding.check_image(copy)
    copy.write_bytes(b"\0" * (1 << 20))  # not LUKS at all
    with pytest.raises(DiskBindingError, match="no LUKS1 header"):
        image.binding.check_image(copy)


# --- one honest VM ------------------------------------------------------------------------


@dataclass
class World:
    driver: VmDriver
    tenant: TenantCryptoVm
    image: EncryptedImage
    policy: ReferencePolicy
    node: QemuNode


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    require_vm_prerequisites()
    started = time.monotonic()
    with TenantCryptoVm(tenant_directory(CACHE)) as tenant:
        image = build_encrypted_image(CACHE, load_recipe(), tenant)
        print(f"\nencrypted image {image.boot.digest[:12]}: root disk "
              f"{image.root.stat().st_size >> 20} MiB, ready in "
              f"{time.monotonic() - started:.1f} s")
        workdir = new_workdir()
        driver = VmDriver(workdir, reference_dir=CACHE / "firmware")
        try:
            policy = driver.predicted_policy(image.boot)
            node = boot_encrypted(driver, "encroot", image)
            yield World(driver, tenant, image, policy, node)
        finally:
            driver.close()
            shutil.rmtree(workdir, ignore_errors=True)


def test_image_is_ciphertext_but_its_kernel_and_initrd(world: World) -> None:
    image = world.image
    assert luks_uuid(image.root) == image.binding.luks_uuid
    marker = tenant_marker(world.tenant.directory, image.root_id)
    files = sorted(p for p in image.directory.iterdir() if p.name != "build.log")
    root_init = load_recipe().init_script.read_bytes()  # the root's /init, not the boot stage's
    assert image_reveals(files, {"tenant": marker, "root /init": root_init}) == {
        "tenant": [], "root /init": []}
    # The policy predicts exactly the clear part: kernel, initrd, command line.
    predicted = {p.role for p in world.driver.predict(image.boot)}
    assert predicted == {"kernel", "initrd", "cmdline"}


def test_wrong_policy_gets_no_root_key(world: World) -> None:
    other = world.driver.predicted_policy(world.image.boot,
                                          world.image.boot.cmdline + " init=/bin/sh")
    with pytest.raises(RootRefused, match=r"failed attestation \(policy\)"):
        unlock_root(world.driver, world.node, world.image, world.tenant.call, other)


@pytest.fixture(scope="module")
def released(world: World) -> RootRelease:
    return unlock_root(world.driver, world.node, world.image, world.tenant.call,
                       world.policy)


def test_attested_vm_switches_into_the_encrypted_root(world: World,
                                                      released: RootRelease) -> None:
    assert released.report.ok
    console = world.node.vm.console(400)
    assert f"root filesystem {world.image.root_id} unpacked" in console
    assert console.count("starting the guest agent") == 2  # boot stage, then the root's
    report, _ = world.driver.attest(world.node, world.policy)  # the same measured boot
    assert report.ok, report
    print(f"\nrelease (enroll + quote + release + attach) {released.release_seconds:.2f} s, "
          f"switch root {released.switch_seconds:.1f} s")


def test_libvirt_keeps_no_secret(world: World, released: RootRelease) -> None:
    ours = [s for s in world.driver.conn.listAllSecrets(0)
            if world.node.vm.spec.name in (s.XMLDesc(0) or "")]
    assert ours == []


def test_image_theft_attack(world: World, released: RootRelease,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_IMAGE_CACHE", str(CACHE))  # the cached images, not a rebuild
    started = time.monotonic()
    theft = image_theft(world.driver.workdir, tenant=world.tenant)
    result = theft.result
    assert result.plain.attack_succeeded, result.plain.detail
    assert not result.trusted_passages.attack_succeeded, result.trusted_passages.detail
    assert result.trusted_passages.caught_by == "root-still-encrypted"
    assert theft.details["key_request"].startswith("refused: ak_trust")
    print(f"\nimage-theft in {time.monotonic() - started:.1f} s: "
          f"{result.trusted_passages.detail}")


def test_plain_image_reveals_its_root(world: World) -> None:
    plain = build_image(CACHE)
    found = image_reveals([plain.initrd], {"init": load_recipe().init_script.read_bytes()})
    assert found == {"init": ["initrd.img"]}

