"""Domain XML, accelerator detection, lifecycle on libvirt's test driver, daemon handling."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from testbed.qemu.accel import AccelChoice, detect_accel
from testbed.qemu.domain import (
    QEMU_NS,
    Vm,
    VmSpec,
    connect,
    domain_xml,
    free_port,
    leftover_domains,
)
from testbed.qemu.libvirtd import Daemons, LibvirtError, load_libvirt

TCG = AccelChoice("tcg", "test")


def _libvirt() -> Any:
    try:
        return load_libvirt()
    except LibvirtError as exc:
        pytest.fail(str(exc), pytrace=False)


def spec(tmp_path: Path, **changes: object) -> VmSpec:
    base = VmSpec(name="testbed-vm0", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
                  cmdline="console=ttyS0 quiet", run_dir=tmp_path / "run", agent_port=40123,
                  guest_port=9301, accel=TCG, uuid="8d3b2c4e-0000-4000-8000-000000000001")
    return VmSpec(**{**base.__dict__, **changes})


def test_ovmf_domain_xml(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(spec(tmp_path)))
    assert root.get("type") == "qemu"  # TCG
    assert root.findtext("memory") == "512" and root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    os_el = root.find("os")
    assert os_el is not None
    assert os_el.find("type").get("machine") == "q35"  # type: ignore[union-attr]
    loader = os_el.find("loader")
    assert loader is not None and loader.get("readonly") == "yes" and loader.get("type") == "pflash"
    assert loader.text == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    nvram = os_el.find("nvram")
    assert nvram is not None and nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    assert nvram.text == str(tmp_path / "run" / "OVMF_VARS.fd")
    assert os_el.findtext("kernel") == str(tmp_path / "vmlinuz")
    assert os_el.findtext("cmdline") == "console=ttyS0 quiet"
    tpm = root.find("devices/tpm")
    assert tpm is not None and tpm.get("model") == "tpm-crb"
    backend = tpm.find("backend")
    assert backend is not None and backend.attrib == {"type": "emulator", "version": "2.0"}
    serial = root.find("devices/serial/source")
    assert serial is not None and serial.get("path") == str(tmp_path / "run" / "console.log")
    # No libvirt network: only the lab NIC, on a tap connected to nothing without a bridge.
    lab = root.find("devices/interface")
    assert lab is not None and lab.get("type") == "ethernet" and lab.find("source") is None


def test_network_is_isolated_user_mode_with_loopback_hostfwd(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(spec(tmp_path)))
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    netdev = args[args.index("-netdev") + 1]
    assert netdev is not None and "restrict=on" in netdev
    assert "hostfwd=tcp:127.0.0.1:40123-10.0.2.15:9301" in netdev
    device = args[args.index("-device") + 1]
    assert device is not None and "romfile=," in device  # no option ROM to measure


def test_seabios_and_kvm_variants(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(spec(tmp_path, firmware="seabios",
                                         accel=AccelChoice("kvm", "test"))))
    assert root.get("type") == "kvm"
    assert root.find("os/loader") is None and root.find("os/nvram") is None


def _fake_root(tmp_path: Path, *, kvm: bool = True, pvm: bool = False,
               flags: str = "fpu vmx sse") -> Path:
    (tmp_path / "dev").mkdir()
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(f"processor: 0\nflags\t\t: {flags}\n")
    if kvm:
        (tmp_path / "dev/kvm").write_text("")
    if pvm:
        (tmp_path / "sys/module/kvm_pvm").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize(("setup", "accel", "reason"), [
    ({"kvm": False}, "tcg", "no /dev/kvm"),
    ({"pvm": True}, "tcg", "PVM"),
    ({"flags": "fpu sse"}, "tcg", "vmx/svm"),
    ({}, "tcg", "KVM_GET_API_VERSION"),  # a plain file is no KVM device
])
def test_accel_detection(tmp_path: Path, setup: dict[str, object], accel: str,
                         reason: str) -> None:
    choice = detect_accel(env={}, root=_fake_root(tmp_path, **setup))  # type: ignore[arg-type]
    assert choice.accel == accel and reason in choice.reason


def test_accel_override_and_this_machine() -> None:
    assert detect_accel(env={"TESTBED_ACCEL": "kvm"}).accel == "kvm"
    here = detect_accel(env={})
    if Path("/sys/module/kvm_pvm").exists():
        assert here.accel == "tcg"
    print(f"this machine: {here.accel} ({here.reason})")


def test_lifecycle_on_the_test_driver(tmp_path: Path) -> None:
    _libvirt()
    conn = connect("test:///default")
    try:
        vm_spec = spec(tmp_path, accel=AccelChoice("tcg", "test"))
        # The test driver knows no OVMF/qemu namespace; it still parses the whole domain.
        domain = conn.defineXML(domain_xml(vm_spec).replace("type=\"qemu\"", "type=\"test\"", 1))
        vm = Vm(conn, vm_spec, domain)
        domain.create()
        assert vm.active
        assert [d.name() for d in leftover_domains(conn)] == ["testbed-vm0"]
        vm.destroy()
        assert not vm.active
        assert list(leftover_domains(conn)) == []
        vm.destroy()  # idempotent
    finally:
        conn.close()


def test_vm_names_must_carry_the_prefix(tmp_path: Path) -> None:
    _libvirt()
    conn = connect("test:///default")
    try:
        with pytest.raises(ValueError, match="testbed-"):
            Vm.start(conn, spec(tmp_path, name="other"), ca=None)  # type: ignore[arg-type]
    finally:
        conn.close()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 < port < 65536


def test_daemons_stop_only_what_they_started(tmp_path: Path) -> None:
    mine = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "libvirtd.pid").write_text(f"{mine.pid}\n")
        daemons = Daemons(tmp_path, {"libvirtd": mine.pid})
        daemons.stop()
        assert mine.wait(5) is not None
        assert other.poll() is None  # untouched
        assert not (tmp_path / "libvirtd.pid").exists()
        Daemons(tmp_path).stop()  # nothing started: nothing stopped
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        if mine.poll() is None:
            os.kill(mine.pid, 9)


def test_remove_leftovers_on_the_test_driver(tmp_path: Path) -> None:
    from testbed.qemu.domain import remove_leftovers

    _libvirt()
    conn = connect("test:///default")
    try:
        xml = domain_xml(spec(tmp_path)).replace("type=\"qemu\"", "type=\"test\"", 1)
        conn.defineXML(xml).create()
        assert remove_leftovers(conn) == ["testbed-vm0"]
        assert list(leftover_domains(conn)) == []
        assert [d.name() for d in conn.listAllDomains(0)] == ["test"]  # not ours: untouched
    finally:
        conn.close()
