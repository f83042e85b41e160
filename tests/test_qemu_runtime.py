"""Runtime integrity on the qemu backend (docs/runtime.md, "VMs"): the runtime policy
predicted for a VM, and one real VM tampered at runtime.

The guest agent's runtime log itself is tested against an swtpm in
tests/test_qemu_guest_agent.py; here one VM (TCG unless KVM works, about 30-40 s to
boot) is attested with its `runtime` check passing, then made to "execute" an unlisted
binary with `testbed tamper`, after which `testbed attest` fails the `runtime` check.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestation.errors import VerificationError
from attestation.ima import BOOT_AGGREGATE, RuntimePolicy, check_entries, make_entry
from testbed.cluster.runtime import ensure_runtime_policy, node_runtime_policy
from testbed.core.paths import ClusterPaths
from testbed.qemu.predict.runtime import vm_runtime_policy
from testbed.spec.recipe import REPO_ROOT, load_recipe
from tests.vm_lab import CliRunner, cli_json, require_root_and_libvirt, vm_workdir

AGENT = "/opt/testbed/guest_agent.py"
SPEC = """version: 1
name: rt
backend: qemu
image: default
nodes:
  - name: vm0
    role: generic
"""


def _sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def test_predicted_policy_allows_exactly_the_guest_agents_files() -> None:
    policy = vm_runtime_policy("vm0", load_recipe())
    assert policy.name == "vm0-predicted-runtime" and policy.exclude == ()
    assert policy.allow == {
        AGENT: {_sha256(REPO_ROOT / "testbed/qemu/guest/agent.py")},
        "/opt/testbed/tp_extension.py": {_sha256(REPO_ROOT /
                                                 "testbed/qemu/guest/tp_extension.py")},
        "/opt/testbed/cryptovm_extension.py": {
            _sha256(REPO_ROOT / "testbed/qemu/guest/cryptovm_extension.py")},
        "/opt/testbed/disk_extension.py": {
            _sha256(REPO_ROOT / "testbed/qemu/guest/disk_extension.py")},
        "/opt/testbed/net_extension.py": {
            _sha256(REPO_ROOT / "testbed/qemu/guest/net_extension.py")},
    }
    check_entries(policy, [make_entry(b"\1" * 32, BOOT_AGGREGATE),
                           make_entry(next(iter(policy.allow[AGENT])), AGENT)])
    with pytest.raises(VerificationError, match="not one runtime policy"):
        check_entries(policy, [make_entry(b"\0" * 32, AGENT)])  # another agent


def test_up_repredicts_its_own_runtime_policy_and_keeps_an_edited_one(tmp_path: Path) -> None:
    paths = ClusterPaths(tmp_path, "lab")
    old = RuntimePolicy("vm0-predicted-runtime", {AGENT: frozenset({b"\0" * 32})})
    new = vm_runtime_policy("vm0", load_recipe())
    ensure_runtime_policy(paths, "vm0", old, replace_same_name=True)
    ensure_runtime_policy(paths, "vm0", new, replace_same_name=True)  # a newer image
    assert node_runtime_policy(paths, "vm0") == new
    mine = RuntimePolicy("vm0-mine", {AGENT: frozenset({b"\0" * 32})})
    ensure_runtime_policy(paths, "vm1", mine)
    ensure_runtime_policy(paths, "vm1", vm_runtime_policy("vm1", load_recipe()),
                          replace_same_name=True)
    assert node_runtime_policy(paths, "vm1") == mine


# --- one real VM ------------------------------------------------------------------------------


_cli = CliRunner(timeout=600)


@pytest.fixture
def workdir() -> Iterator[Path]:
    require_root_and_libvirt(
        "the qemu runtime test needs root and libvirt-clients (see docs/qemu.md)")
    with vm_workdir("runtime-", _cli.purge) as path:
        yield path


@pytest.mark.slow
def test_vm_tampered_at_runtime_fails_the_runtime_check(workdir: Path) -> None:
    spec = workdir / "rt.yaml"
    spec.write_text(SPEC)
    up = _cli(workdir, "up", str(spec), "--json")
    assert up.returncode == 0 and cli_json(up)["all_attested"], up.stderr[-3000:]

    honest = _cli(workdir, "attest", "vm0", "--json")
    report = cli_json(honest)
    assert honest.returncode == 0 and report["ok"], honest.stdout[-3000:]
    runtime = report["checks"][-1]
    assert runtime["check"] == "runtime" and runtime["state"] == "passed", runtime

    started = time.monotonic()
    tamper = _cli(workdir, "tamper", "vm0", "--runtime", "/usr/local/bin/cryptominer", "--json")
    assert tamper.returncode == 0, tamper.stderr[-3000:]
    assert cli_json(tamper)["executed"]["path"] == "/usr/local/bin/cryptominer"
    caught = _cli(workdir, "attest", "vm0", "--json")
    detected = time.monotonic() - started
    result = cli_json(caught)
    assert caught.returncode == 1 and result["failed_check"] == "runtime", caught.stdout[-3000:]
    failed = result["checks"][-1]
    assert "cryptominer" in failed["detail"] and failed["entry"]["path"] == \
        "/usr/local/bin/cryptominer"
    assert "vm0-predicted-runtime" in failed["detail"]
    print(f"\nVM runtime tamper -> `testbed attest` verdict: {detected:.2f} s (two CLI runs)")

    # The verifier's signed decisions reach the VM's guest agent, which verifies them with
    # the key `up` gave it (docs/runtime.md, "Revocation in a VM").
    for command in ("revoke", "reinstate"):
        decided = _cli(workdir, command, "vm0", "--json")
        assert decided.returncode == 0, decided.stderr[-3000:]
        assert cli_json(decided)["delivered"] == {"vm0": "applied"}, decided.stdout
