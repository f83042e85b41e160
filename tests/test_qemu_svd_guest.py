"""Guest-side encrypted disks of qemu VMs (docs/svd.md, "VMs: guest-side disks").

Fast parts without a VM: the ``svd_unlock`` request parser (hypothesis), cryptsetup
driven as the guest drives it (a real LUKS2 volume in a file: format, UUID, the key only
on stdin, a wrong key refused), the guest's first-use and refusal paths (the dm mapping
itself needs the guest kernel's dm-crypt, which this host may lack), the host's checks of
what a guest answers.

Then one module-scoped real cluster (a CryptoVM VM and a server VM with a guest-side
disk): ``up`` attests both, hot-plugs a plain qcow2, and the server's guest formats it
with LUKS2 and opens it with a key it fetched from the CryptoVM VM over an attested
Trusted Passages channel; a marker written through ``/dev/mapper/svd-data`` is not in the
qcow2, the key is in no host file or log, closing and re-opening re-fetches the key
after a fresh attestation, a quote that does not satisfy the policy is refused
(``policy``), and ``stolen-disk`` runs on these VMs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.encoding import b64decode, b64encode
from cryptovm.disks import DiskBinding, DiskBindingError, disk_key_id, release_disk_key
from testbed.attacks.runs import SCENARIOS_BY_BACKEND
from testbed.attacks.vm_disks import LAB_SPEC, STOLEN_DISK, guest_answer, stolen_disk_on_vms
from testbed.cluster.agent import AgentClient
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.qemu.backend import QemuBackend
from testbed.qemu.disks import GuestDiskKeys, VmDiskFiles, _keep_binding, unlock_guest_disks
from testbed.qemu.guest.disk_extension import (
    DiskOrder,
    GuestDisks,
    GuestSideDisks,
    Luks,
    LuksError,
    UnlockOrder,
    parse_unlock,
)
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.roles.cryptovm import cryptovm_endpoint
from testbed.spec.cluster_spec import DiskSpec, parse_cluster_spec
from tests.vm_lab import CliRunner, cli_json, require_root_and_libvirt, vm_workdir

CLUSTER = "svdguest"
MARKER = b"qemu-guest-side-disk-marker-7a2d"
SPEC = f"""version: 1
name: {CLUSTER}
backend: qemu
image: default
nodes:
  - name: cryptovm
    role: cryptovm
  - name: server
    role: server
    disks:
      - {{name: data, size: 32M, mode: guest}}
"""
_OAEP = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
needs_cryptsetup = pytest.mark.skipif(shutil.which("cryptsetup") is None,
                                      reason="cryptsetup-bin is not installed")


# --- the request parser ---------------------------------------------------------------------


def _binding(node: str = "server", disk: str = "data", mode: str = "guest") -> DiskBinding:
    return DiskBinding(node, disk, disk_key_id(node, disk), "cryptovm", 32 << 20, mode,  # type: ignore[arg-type]
                       "0f0f0f0f-0000-4000-8000-000000000000", b"w" * 256)


def _request(**changes: Any) -> dict[str, Any]:
    return {"op": "svd_unlock", "cryptovm": "cryptovm", "node": "server",
            "pcrs": list(range(10)), "disks": [{"name": "data", "binding": None}], **changes}


def test_unlock_request_is_parsed_strictly() -> None:
    order = parse_unlock(_request(disks=[{"name": "data", "binding": _binding().to_doc()}]))
    assert order.disks[0].binding == _binding() and order.pcrs == tuple(range(10))
    bad = [(_request(extra=1), "unknown keys"), (_request(node="../x"), "node"),
           (_request(pcrs=[True]), "pcrs"), (_request(pcrs=[1, 1]), "pcrs"),
           (_request(pcrs=[]), "pcrs"), (_request(disks=[{"name": "d"}] * 5), "disks"),
           (_request(disks=[{"name": "data", "binding": None}] * 2), "named twice"),
           (_request(disks=[{"name": "Data!", "binding": None}]), "name"),
           (_request(disks=[{"name": "data", "binding": _binding("web").to_doc()}]),
            "not guest disk 'data' of 'server'"),
           (_request(disks=[{"name": "data", "binding": _binding(mode="host").to_doc()}]),
            "binds host disk"),
           (_request(disks=[{"name": "data", "binding": {"format": "x"}}]), "binding")]
    for request, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_unlock(request)


_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 30) | st.text(max_size=12),
                       lambda inner: st.lists(inner, max_size=5)
                       | st.dictionaries(st.sampled_from(["name", "binding", "format", "node",
                                                          "disk", "x"]), inner, max_size=4),
                       max_leaves=15)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["op", "cryptovm", "node", "pcrs", "disks", "x"]),
                           _VALUES, max_size=6))
def test_hostile_unlock_request_is_one_value_error(doc: dict[str, Any]) -> None:
    try:
        order = parse_unlock(doc)
    except ValueError:
        return
    assert isinstance(order, UnlockOrder) and len(order.disks) <= 4


# --- cryptsetup as the guest runs it ---------------------------------------------------------


class _Spy:
    """subprocess.run, recording every command line."""

    def __init__(self) -> None:
        self.argv: list[list[str]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        self.argv.append(list(argv))
        return subprocess.run(argv, **kwargs)


@needs_cryptsetup
def test_luks_format_and_key_checks_keep_the_key_off_command_lines(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (20 << 20))
    spy = _Spy()
    luks = Luks(image, spy)
    assert not luks.is_luks()
    key = os.urandom(32).hex().encode()
    uuid = luks.format(key)
    assert luks.is_luks() and luks.uuid() == uuid and len(uuid) == 36
    luks.test(key)
    with pytest.raises(LuksError, match="does not open this LUKS volume"):
        luks.test(b"0" * 64)
    assert all(key.decode() not in " ".join(argv) for argv in spy.argv)
    assert key not in image.read_bytes()
    with pytest.raises(LuksError, match="luksUUID"):
        Luks(tmp_path / "missing.img").uuid()


class _FileLuks(Luks):
    """Real cryptsetup on a file; ``open`` checks the key instead of making a dm mapping
    (which needs dm-crypt in the kernel: the real-VM test opens one)."""

    def open(self, name: str, passphrase: bytes) -> Path:
        self.test(passphrase)
        return Path("/dev/mapper") / name


class _Agent:
    def quote(self, request: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("no quote may be asked for here")


def _guest(tmp_path: Path, image: Path) -> GuestSideDisks:
    block = tmp_path / "block" / "vdb"
    block.mkdir(parents=True, exist_ok=True)
    (block / "serial").write_text("data\n")
    (block / "size").write_text(f"{image.stat().st_size // 512}\n")
    disks = GuestDisks(tmp_path / "block", tmp_path / "dev")
    (tmp_path / "dev").mkdir(exist_ok=True)
    os.symlink(image, tmp_path / "dev" / "vdb")
    return GuestSideDisks(_Agent(), disks, _FileLuks, tmp_path / "mapper")


@needs_cryptsetup
def test_first_use_formats_and_binds_then_refuses_swaps_before_asking(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (20 << 20))
    guest = _guest(tmp_path, image)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    calls: list[str] = []

    def call(op: str, **args: Any) -> dict[str, Any]:
        calls.append(op)
        assert op == "public_key" and args == {"key_id": "svd-server-data"}
        return {"public_key": spki}

    order = parse_unlock(_request(disks=[{"name": "data", "binding": None},
                                         {"name": "other", "binding": None}]))
    answers = guest.unlock_with(call, order)["disks"]  # each disk answers on its own
    assert answers[1] == {"name": "other", "error": "DiskBindingError: no disk 'other' "
                                                    "attached to this guest"}
    answer = answers[0]
    assert answer["formatted"] and answer["device"].endswith("/svd-data")
    assert calls == ["public_key"]
    binding = DiskBinding.from_doc(answer["binding"], "answer")
    assert (binding.node, binding.disk, binding.mode, binding.size) == (
        "server", "data", "guest", 20 << 20)
    passphrase = key.decrypt(binding.wrapped_key, _OAEP)  # only the CryptoVM can do this
    Luks(image).test(passphrase)
    # Formatted without a binding: refused, not formatted again (the data would be lost).
    with pytest.raises(DiskBindingError, match="already holds a LUKS volume"):
        guest._unlock(call, order, order.disks[0])
    # The bound UUID differs: refused before any key is asked for.
    swapped = DiskOrder("data", _binding())
    with pytest.raises(DiskBindingError, match="a disk swapped in"):
        guest._unlock(call, order, swapped)
    with pytest.raises(DiskBindingError, match="no disk 'other'"):
        guest._unlock(call, order, DiskOrder("other", None))
    assert calls == ["public_key"]


def test_host_keeps_only_a_binding_of_the_right_disk(tmp_path: Path) -> None:
    paths = ClusterPaths(tmp_path, "c")
    files = VmDiskFiles(paths, "server", "data")
    spec = DiskSpec("data", 32 << 20, "guest")
    files.binding.parent.mkdir(parents=True)
    with pytest.raises(StateError, match="another disk"):
        _keep_binding(files, spec, {"name": "other"})
    with pytest.raises(DiskBindingError, match="names another disk"):
        _keep_binding(files, spec, {"name": "data", "binding": _binding("web").to_doc()})
    with pytest.raises(DiskBindingError):
        _keep_binding(files, spec, {"name": "data", "binding": {"format": "x"}})
    assert not files.binding.exists()
    _keep_binding(files, spec, {"name": "data", "binding": _binding().to_doc()})
    assert DiskBinding.load(files.binding) == _binding()


def test_qemu_spec_takes_guest_disks_of_vms() -> None:
    parse_cluster_spec(SPEC, Path("/"))
    parse_cluster_spec(LAB_SPEC, Path("/"))  # the attack lab's stolen-disk cluster


def test_stolen_disk_runs_on_both_backends() -> None:
    assert STOLEN_DISK in SCENARIOS_BY_BACKEND["sim"]
    assert STOLEN_DISK in SCENARIOS_BY_BACKEND["qemu"]


def test_thief_guest_answer_is_read_per_disk() -> None:
    """The channel itself may succeed while the disk is refused: the disk's answer counts."""
    refused = {"role": "svd", "disks": [{"name": "data", "error": "AccessDenied: privilege"}]}
    assert guest_answer(refused) == (False, "refused (AccessDenied: privilege)")
    assert guest_answer({"error": "VerificationError: policy"})[0] is False
    assert guest_answer({"disks": []}) == (False, "refused (no disk answer)")
    opened = {"disks": [{"name": "data", "device": "/dev/mapper/svd-data"}]}
    assert guest_answer(opened) == (True, "opened as /dev/mapper/svd-data")


# --- one real cluster -----------------------------------------------------------------------


_cli = CliRunner(timeout=900)


# Under heavy load a TCG guest may outlast up's boot wait, or its agent may drop the first
# connection while it starts; up is idempotent: it keeps the running VMs and carries on.
_TRANSIENT = ("did not answer within", "agent connection failed")


@dataclass
class Lab:
    workdir: Path
    paths: ClusterPaths
    up: dict[str, Any]

    def agent(self, node: str) -> AgentClient:
        return QemuBackend(self.paths).agent(node, timeout=120)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_root_and_libvirt("the qemu disk test needs root and libvirt-clients (docs/qemu.md)")
    with vm_workdir("svdg-", _cli.purge) as workdir:
        spec = workdir / "svd.yaml"
        spec.write_text(SPEC)
        up = _cli(workdir, "up", str(spec), "--json")
        if up.returncode != 0 and any(m in up.stderr + up.stdout for m in _TRANSIENT):
            up = _cli(workdir, "up", str(spec), "--json")  # a slow TCG boot: up again
        yield Lab(workdir, ClusterPaths(workdir, CLUSTER), cli_json(up))


def _read_marker(agent: AgentClient) -> bytes:
    read = agent.call({"op": "disk_read", "disk": "data", "offset": 1 << 20, "length": 4096})
    return b64decode(read["data"], "data")


@pytest.mark.slow
def test_vm_guest_side_disk_is_plain_only_inside_the_guest(lab: Lab) -> None:
    server = next(n for n in lab.up["nodes"] if n["name"] == "server")
    assert lab.up["all_attested"] and server["action"] in ("started", "kept"), \
        [(n["name"], n["error"], n["log_tail"]) for n in lab.up["nodes"]]
    assert [(d["name"], d["mode"], d["state"]) for d in server["disks"]] == [
        ("data", "guest", "unlocked")], server
    # Keyless TLS still works after the guest's cluster-CA channel to the CryptoVM.
    assert server["enrollment"]["ok"], server["enrollment"]
    agent = lab.agent("server")
    listed = {d["serial"]: d for d in agent.call({"op": "disk_list"})["disks"]}
    assert listed["data"]["device"] == "/dev/mapper/svd-data"
    agent.call({"op": "disk_write", "disk": "data", "offset": 1 << 20,
                "data": b64encode(MARKER)})
    assert _read_marker(agent).startswith(MARKER)
    files = VmDiskFiles(lab.paths, "server", "data")
    assert MARKER not in files.image.read_bytes()  # the guest's dm-crypt encrypted it
    binding = DiskBinding.load(files.binding)
    assert binding.mode == "guest" and binding.node == "server"


@pytest.mark.slow
def test_vm_guest_reopen_refetches_the_key_after_attestation(lab: Lab) -> None:
    agent, cryptovm = lab.agent("server"), lab.agent("cryptovm")
    assert agent.call({"op": "svd_lock", "disk": "data"}) == {"locked": True}
    listed = {d["serial"]: d["device"] for d in agent.call({"op": "disk_list"})["disks"]}
    assert listed["data"] != "/dev/mapper/svd-data"  # ciphertext only now
    client = cryptovm_endpoint(lab.paths, "cryptovm").client()
    try:
        keys = GuestDiskKeys(client.call, lab.paths.policy("server").read_text(),
                             lab.paths.registry.read_text())
        files = VmDiskFiles(lab.paths, "server", "data")
        spec = DiskSpec("data", 32 << 20, "guest")
        unlock_guest_disks(agent, cryptovm, node="server", cryptovm="cryptovm",
                           disks=[(files, spec)], keys=keys, pcrs=QUOTED_PCRS)
        assert _read_marker(agent).startswith(MARKER)
        # A quote that does not show the predicted state (PCRs 4-9 missing): refused by
        # the CryptoVM's release check, by name; the disk stays locked.
        assert agent.call({"op": "svd_lock", "disk": "data"}) == {"locked": True}
        with pytest.raises(StateError, match=r"ReleaseDenied: policy"):
            unlock_guest_disks(agent, cryptovm, node="server", cryptovm="cryptovm",
                               disks=[(files, spec)], keys=keys, pcrs=(0, 1, 2, 3))
        listed = {d["serial"]: d["device"] for d in agent.call({"op": "disk_list"})["disks"]}
        assert listed["data"] != "/dev/mapper/svd-data"
        unlock_guest_disks(agent, cryptovm, node="server", cryptovm="cryptovm",
                           disks=[(files, spec)], keys=keys, pcrs=QUOTED_PCRS)
        assert _read_marker(agent).startswith(MARKER)
    finally:
        client.close()


@pytest.mark.slow
def test_vm_guest_disk_key_is_in_no_host_file_or_log(lab: Lab) -> None:
    """Learn the passphrase the only way the host could (CryptoVM root plus the VM's own
    fresh quote: see docs/svd.md's limits), then search every file the work directory,
    libvirt and the logs keep."""
    binding = DiskBinding.load(VmDiskFiles(lab.paths, "server", "data").binding)
    client = cryptovm_endpoint(lab.paths, "cryptovm").client()
    try:
        agent = lab.agent("server")
        key = release_disk_key(client.call, binding,
                               lambda data: agent.quote(data, list(QUOTED_PCRS)))
    finally:
        client.close()
    assert len(key) == 64
    roots = (lab.workdir, Path("/var/lib/libvirt"), Path("/etc/libvirt"), Path("/run/libvirt"),
             Path("/var/log/libvirt"), Path("/var/log"))
    leaks = [p for root in roots for p in _files(root) if _contains(p, key)]
    assert leaks == []


@pytest.mark.slow
def test_vm_stolen_disk(lab: Lab) -> None:
    result = stolen_disk_on_vms(lab.paths, owner="server", disk="data", thief="cryptovm",
                                marker=MARKER)
    assert result.plain.attack_succeeded, result.plain.detail
    assert not result.trusted_passages.attack_succeeded, result.trusted_passages.detail
    assert result.trusted_passages.caught_by == "ak_trust"
    # The thief VM's own guest, over its own attested channel, is refused too.
    assert "its guest's own request: refused" in result.trusted_passages.detail


def _files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and "images" not in path.parts:
            yield path


def _contains(path: Path, needle: bytes) -> bool:
    try:
        if path.stat().st_size > 64 << 20:
            return False
        return needle in path.read_bytes()
    except OSError:
        return False
