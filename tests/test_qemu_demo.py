"""`testbed demo --backend qemu`, end to end, as a user runs it (real VMs under TCG).

Three VMs boot in parallel under libvirt with OVMF measured boot and a vTPM each;
every one is attested against the policy predicted from the guest image; then the
server and client guests open attested TLS channels to each other *inside the
VMs* (TLS keys generated in the guests, quotes from their vTPMs, real OVMF event
logs replayed by the peer guest), the host only relaying records; the CryptoVM
VM runs the CryptoVM service, whose key attestation the host verifies; then
everything is torn down. About 1.5-2.5 minutes here (the image and firmware reference are
cached machine-wide, see tests/test_qemu_vm.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from testbed.qemu.domain import DOMAIN_PREFIX
from tests.vm_lab import CliRunner, vm_workdir

pytestmark = pytest.mark.slow

_cli = CliRunner(timeout=900)


def _down_demo(workdir: Path) -> None:
    """The demo's cluster, in the work directory the demo makes inside ours."""
    _cli(workdir / "demo-qemu", "down", "--cluster", "qemu-lab", "--purge", timeout=300)


def test_demo_on_real_vms() -> None:
    with vm_workdir("qemu-demo-", _down_demo) as workdir:
        r = _cli(workdir, "demo", "--backend", "qemu", "--json")
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        report = json.loads(r.stdout)
    assert report["ok"] and report["up_ok"] and report["teardown_clean"]
    assert report["up"]["all_attested"] and len(report["up"]["nodes"]) == 3
    assert {c["from"] + ">" + c["to"] for c in report["channels"]} == {"client>server",
                                                                        "server>client"}
    for channel in report["channels"]:
        assert channel["established"], channel
        verified = channel["client_view"]["evidence"]
        assert verified["node"] == channel["to"] and verified["node_verified"]
        assert verified["event_log_events"] >= 20  # the real OVMF log, not a simulated one
        assert verified["policy"] == f"{channel['to']}-predicted"
        assert channel["server_view"]["evidence"]["node"] == channel["from"]
        assert channel["client_view"]["reply"].startswith(f"{channel['to']} heard")
    cryptovm = report["cryptovm"]  # the service inside the VM, its key attested by the vTPM
    assert cryptovm["ok"] and cryptovm["key_attestation"] == "verified", cryptovm
    assert {"ak_trust", "policy", "qualifying_data", "origin", "exportable"} <= \
        set(cryptovm["checks"])
    listed = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                            capture_output=True, text=True, check=False).stdout
    assert not [d for d in listed.split() if d.startswith(DOMAIN_PREFIX) and "qemu-lab" in d]
