"""Real VMs: OVMF measured boot, libvirt's swtpm, quotes from inside the guest.

Two VMs boot in parallel under libvirt (TCG unless KVM really works): one with
the image's own command line, one with ``init=/bin/sh`` appended. The first must
satisfy the policy predicted from the image's artifacts (plus the stored firmware
reference), the second must fail it with the PCR 9 command-line event named.

The guest image is built once per machine and cached (``$TESTBED_IMAGE_CACHE`` or
/var/cache/trusted-testbed, shared by every checkout): the first build takes
40-90 s with a warm network, later runs reuse it. The firmware reference is
captured the same way, once (one extra boot, ~20 s). Missing prerequisites fail
the tests with the command that installs them; nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from attestation.eventlog import parse_event_log
from attestation.evidence import Evidence
from attestation.policy import ReferencePolicy
from attestation.report import VerificationReport
from testbed.qemu.domain import DOMAIN_PREFIX, SWTPM_STORAGE
from testbed.qemu.image.build import GuestImage, build_image
from testbed.qemu.predict.events import EV_EFI_BOOT_SERVICES_APPLICATION
from testbed.qemu.vms import QemuNode, VmDriver
from tests.vm_lab import CACHE, new_workdir, require_vm_prerequisites

pytestmark = pytest.mark.slow

TAMPER = " init=/bin/sh"


@dataclass
class Lab:
    driver: VmDriver
    image: GuestImage
    policy: ReferencePolicy
    good: QemuNode
    tampered: QemuNode
    results: dict[str, tuple[VerificationReport, Evidence]]

    def attest(self, node: QemuNode) -> tuple[VerificationReport, Evidence]:
        if node.name not in self.results:
            self.results[node.name] = self.driver.attest(node, self.policy)
        return self.results[node.name]


def _vm_pids(names: tuple[str, ...] = ("good", "tampered")) -> dict[str, int]:
    """QEMU and swtpm processes of this module's domains, from libvirt's pid files.

    Only ours: other runs (a qemu cluster, another test) may have VMs up meanwhile.
    """
    pids = {}
    for pid_file in Path("/run/libvirt/qemu").rglob(f"*{DOMAIN_PREFIX}*.pid"):
        if any(f"{DOMAIN_PREFIX}{name}" in pid_file.name for name in names):
            pids[pid_file.name] = int(pid_file.read_text().split()[0])
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in \
        Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]


def _assert_nothing_left(driver: VmDriver, qemu: dict[str, int], daemons: dict[str, int],
                         uuids: list[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in [*qemu.values(),
                                                                  *daemons.values()]):
        time.sleep(0.2)
    assert not [n for n, p in qemu.items() if _alive(p)], "QEMU or swtpm processes left behind"
    assert not [n for n, p in daemons.items() if _alive(p)], "libvirt daemons left behind"
    assert not [u for u in uuids if (SWTPM_STORAGE / u).exists()], "vTPM state left behind"
    assert not driver.nodes


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_vm_prerequisites()
    started = time.monotonic()
    image = build_image(CACHE)
    print(f"\nimage {image.digest[:12]}: {image.manifest['initrd']['size'] >> 20} MiB initrd, "
          f"built in {image.manifest['build_seconds']} s (this run: "
          f"{time.monotonic() - started:.1f} s)")
    workdir = new_workdir()
    driver = VmDriver(workdir, reference_dir=CACHE / "firmware")
    print(f"accelerator: {driver.accel.accel} ({driver.accel.reason})")
    daemons, qemu, uuids = dict(driver.daemons.started), {}, []
    try:
        policy = driver.predicted_policy(image)
        good = driver.boot("good", image)
        tampered = driver.boot("tampered", image, cmdline=image.cmdline + TAMPER)
        uuids = [good.vm.spec.uuid, tampered.vm.spec.uuid]
        qemu = _vm_pids()
        assert any("swtpm" in name for name in qemu), qemu
        for node in (good, tampered):
            driver.wait(node)
            print(f"{node.name}: define -> agent answers in {node.boot_seconds:.1f} s")
        yield Lab(driver, image, policy, good, tampered, {})
    finally:
        driver.close()
        shutil.rmtree(workdir, ignore_errors=True)
        _assert_nothing_left(driver, qemu, daemons, uuids)


def test_guest_quote_satisfies_the_predicted_policy(lab: Lab) -> None:
    report, evidence = lab.attest(lab.good)
    assert report.ok, report
    assert report.checks[-1].name == "policy" and "satisfies" in report.checks[-1].detail
    assert evidence.event_log is not None and sorted(evidence.pcrs) == list(range(10))
    assert lab.good.status["tcti"] == "device:/dev/tpmrm0"


def test_kernel_event_is_the_predicted_authenticode_digest(lab: Lab) -> None:
    _, evidence = lab.attest(lab.good)
    assert evidence.event_log is not None
    log = parse_event_log(evidence.event_log)
    kernel_events = [e for e in log.events_for(4)
                     if e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]
    predicted = {p.role: p for p in lab.driver.predict(lab.image)}
    assert [e.digests["sha256"] for e in kernel_events] == [predicted["kernel"].digest]
    assert [e.digests["sha256"] for e in log.events_for(9)] == [
        predicted["cmdline"].digest, predicted["initrd"].digest]


def test_changed_command_line_fails_naming_the_event(lab: Lab) -> None:
    report, _ = lab.attest(lab.tampered)
    assert not report.ok
    failed = [c for c in report.checks if c.failed]
    assert [c.name for c in failed] == ["policy"]
    assert "PCR 9: event 1 (kernel command line" in failed[0].detail
    # Everything before the policy passed: a genuine TPM, a genuine quote, a consistent log.
    assert all(c.passed for c in report.checks if c.name in ("signature", "ak_trust",
                                                             "event_log"))


def test_guest_reports_its_command_line(lab: Lab) -> None:
    assert lab.tampered.status["kernel_cmdline"].startswith(lab.image.cmdline + TAMPER)


def test_cli_image_build_reuses_the_cache(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from testbed.cli.qemu import cmd_image_build

    args = argparse.Namespace(workdir=str(CACHE), recipe=None, force=False, json=True)
    assert cmd_image_build(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["digest"] == lab.image.digest and data["this_run_seconds"] < 10
