"""Encrypted disks of qemu VMs (docs/svd.md, "VMs"): the host-side (transparent) mode.

Fast parts without a VM: the qcow2 LUKS format and its header check (real qemu-storage-
daemon and qemu-img), the libvirt XML, the spec rule, the guest agent's disk ops'
refusals. Then one module-scoped real cluster (a CryptoVM VM and a server VM with a
host-side disk; TCG unless KVM works): `up` attests the server, has its disk key
released by the CryptoVM VM against a fresh quote, hot-plugs the disk through an
ephemeral private libvirt secret; the guest writes a marker through a plain virtio disk;
the qcow2 on the host holds no marker; no file of the work directory or of libvirt holds
the key; no libvirt secret is left; `down` leaves no secret either.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.encoding import b64decode, b64encode
from cryptovm.disks import DiskBinding, DiskBindingError, release_disk_key
from testbed.cluster.agent import AgentClient
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.qemu.accel import AccelChoice
from testbed.qemu.backend import QemuBackend
from testbed.qemu.disks import VmDiskFiles, disk_xml, hotplug, secret_xml
from testbed.qemu.domain import VmSpec, domain_xml
from testbed.qemu.guest.disk_extension import GuestDisks
from testbed.qemu.libvirtd import load_libvirt
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.roles.cryptovm import cryptovm_endpoint
from testbed.spec.cluster_spec import ClusterSpecError, parse_cluster_spec
from testbed.svd.qcow2 import _json, _luks_uuid, format_qcow2_luks, qcow2_luks_uuid
from tests.vm_lab import CliRunner, cli_json, require_root_and_libvirt, vm_workdir

CLUSTER = "svdvm"
MARKER = b"qemu-host-side-disk-marker-5c1e"
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
      - {{name: data, size: 16M}}
"""


# --- without a VM ---------------------------------------------------------------------------


def test_qcow2_luks_format_and_header_checks(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    uuid = format_qcow2_luks(image, 1 << 20, b"ab" * 32, tmp_path / "run")
    assert qcow2_luks_uuid(image) == uuid and len(uuid) == 36
    assert b"ab" * 32 not in image.read_bytes()
    assert not list((tmp_path / "run").glob("*.pid"))  # the formatting daemon is gone
    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    with pytest.raises(DiskBindingError, match="is not LUKS-encrypted"):
        qcow2_luks_uuid(plain)
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(DiskBindingError, match="not a usable qcow2 image"):
        qcow2_luks_uuid(junk)
    truncated = tmp_path / "t.qcow2"
    truncated.write_bytes(image.read_bytes()[:300])
    with pytest.raises(DiskBindingError):
        qcow2_luks_uuid(truncated)
    with pytest.raises(DiskBindingError):
        qcow2_luks_uuid(tmp_path / "missing.qcow2")


def test_libvirt_xml_secret_is_ephemeral_private_and_disk_names_it() -> None:
    secret = secret_xml(Path("/w/vm-disks/c/n/data.qcow2"))
    assert "ephemeral=\"yes\"" in secret and "private=\"yes\"" in secret
    assert "<volume>/w/vm-disks/c/n/data.qcow2</volume>" in secret
    disk = disk_xml(Path("/i.qcow2"), "data", "vdb", "0f0f0f0f-0000-4000-8000-000000000000")
    assert "<encryption format=\"luks\"><secret type=\"passphrase\" " \
           "uuid=\"0f0f0f0f-0000-4000-8000-000000000000\" /></encryption>" in disk
    assert "<serial>data</serial>" in disk and "type=\"qcow2\"" in disk
    spec = VmSpec(name="testbed-x", kernel=Path("/k"), initrd=Path("/i"), cmdline="",
                  run_dir=Path("/r"), agent_port=1, guest_port=2,
                  accel=AccelChoice("tcg", "test"))
    assert "pcie-root-port" not in domain_xml(spec)
    assert domain_xml(VmSpec(**{**spec.__dict__, "hotplug_ports": 2})).count(
        "pcie-root-port") == 2


@pytest.mark.parametrize(("node", "disks", "ok"), [
    ("server", "{name: d, size: 16M}", True),
    ("server", "{name: d, size: 16M, mode: guest}", True),
    ("cryptovm", "{name: store, size: 64M, mode: guest}", True),  # its store disk
    ("cryptovm", "{name: store, size: 16M, mode: guest}", "needs at least 32M"),
])
def test_qemu_spec_takes_disks_of_vms(node: str, disks: str, ok: bool | str) -> None:
    text = SPEC.replace("      - {name: data, size: 16M}\n", "")
    text = text.replace(f"    role: {node}\n", f"    role: {node}\n    disks: [{disks}]\n")
    text = text.replace("    disks:\n  -", "  -").rstrip("\n").removesuffix("    disks:") + "\n"
    if ok is True:
        parse_cluster_spec(text, Path("/"))
    else:
        with pytest.raises(ClusterSpecError, match=ok or r"disks: on the qemu backend only"):
            parse_cluster_spec(text, Path("/"))


def test_guest_disk_ops_refuse_bad_requests(tmp_path: Path) -> None:
    block = tmp_path / "block" / "vdb"
    block.mkdir(parents=True)
    (block / "serial").write_text("data\n")
    (block / "size").write_text("32768\n")  # 16 MiB in sectors
    disks = GuestDisks(tmp_path / "block", tmp_path / "dev")
    assert disks.list({}) == {"disks": [{"serial": "data", "device": str(tmp_path / "dev/vdb"),
                                         "size": 16 << 20}]}
    bad = [({"disk": "other", "offset": 0, "length": 4096}, "no disk 'other'"),
           ({"disk": "../x", "offset": 0, "length": 4096}, "disk: the disk's name"),
           ({"disk": "data", "offset": 100, "length": 4096}, "offset: a multiple of 4096"),
           ({"disk": "data", "offset": 0, "length": 1 << 20}, "length"),
           ({"disk": "data", "offset": 16 << 20, "length": 4096}, "inside the disk")]
    for request, message in bad:
        with pytest.raises(Exception, match=message):
            disks.read(request)
    with pytest.raises(Exception, match="data"):
        disks.write({"disk": "data", "offset": 0, "data": "not base64!"})
    with pytest.raises(Exception, match="mib"):
        disks.bench({"disk": "data", "mib": 10 ** 6})


# --- one real cluster -----------------------------------------------------------------------


_cli = CliRunner(timeout=900)


@dataclass
class Lab:
    workdir: Path
    paths: ClusterPaths
    up: dict[str, Any]

    def agent(self, node: str) -> AgentClient:
        return QemuBackend(self.paths).agent(node)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_root_and_libvirt("the qemu disk test needs root and libvirt-clients (docs/qemu.md)")
    with vm_workdir("svd-", _cli.purge) as workdir:
        spec = workdir / "svd.yaml"
        spec.write_text(SPEC)
        up = _cli(workdir, "up", str(spec), "--json")
        if up.returncode == 4 and "did not answer within" in up.stderr:
            # Under heavy load a TCG guest may outlast up's 240 s boot wait; up is
            # idempotent: it keeps the running VMs and carries on with them.
            up = _cli(workdir, "up", str(spec), "--json")
        yield Lab(workdir, ClusterPaths(workdir, CLUSTER), cli_json(up))


def _secrets() -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", "secret-list"],
                          capture_output=True, text=True, timeout=30).stdout


@pytest.mark.slow
def test_vm_host_side_disk_is_plain_in_the_guest_and_ciphertext_on_the_host(lab: Lab) -> None:
    server = next(n for n in lab.up["nodes"] if n["name"] == "server")
    assert lab.up["all_attested"] and server["action"] in ("started", "kept"), \
        [(n["name"], n["error"], n["log_tail"]) for n in lab.up["nodes"]]
    assert [d["name"] for d in server["disks"]] == ["data"], server
    status = _cli(lab.workdir, "status", "--json")
    shown = next(n for n in json.loads(status.stdout)["nodes"] if n["name"] == "server")
    assert [(d["name"], d["state"]) for d in shown["disks"]] == [("data", "unlocked")]
    agent = lab.agent("server")
    listed = agent.call({"op": "disk_list"})["disks"]
    assert [(d["serial"], d["size"]) for d in listed] == [("data", 16 << 20)]
    agent.call({"op": "disk_write", "disk": "data", "offset": 1 << 20,
                "data": b64encode(MARKER)})
    read = agent.call({"op": "disk_read", "disk": "data", "offset": 1 << 20, "length": 4096})
    assert b64decode(read["data"], "data").startswith(MARKER)
    image = VmDiskFiles(lab.paths, "server", "data").image
    assert MARKER not in image.read_bytes()  # QEMU encrypted it on its way out
    assert CLUSTER not in _secrets()  # the libvirt secret went right after the hot-plug
    assert "svdvm" not in _secrets() and str(image) not in _secrets()


@pytest.mark.slow
def test_vm_disk_key_is_in_no_file_and_release_needs_the_vms_quote(lab: Lab) -> None:
    """Get the passphrase the way the hypervisor does (root, the VM's fresh quote), then
    look for it in every file the work directory and libvirt keep."""
    files = VmDiskFiles(lab.paths, "server", "data")
    binding = DiskBinding.load(files.binding)
    client = cryptovm_endpoint(lab.paths, "cryptovm").client()
    try:
        agent = lab.agent("server")
        key = release_disk_key(client.call, binding,
                               lambda data: agent.quote(data, list(QUOTED_PCRS)))
        with pytest.raises(Exception, match="ak_trust"):  # another VM's quote: refused
            other = lab.agent("cryptovm")
            release_disk_key(client.call, binding,
                             lambda data: other.quote(data, list(QUOTED_PCRS)))
    finally:
        client.close()
    assert len(key) == 64
    leaks = [p for root in (lab.workdir, Path("/var/lib/libvirt"), Path("/etc/libvirt"),
                            Path("/run/libvirt"), Path("/var/log/libvirt"))
             for p in _files(root) if _contains(p, key)]
    assert leaks == []


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


@pytest.mark.slow
def test_down_leaves_no_secret_and_keeps_the_ciphertext(lab: Lab) -> None:
    down = _cli(lab.workdir, "down", "--json")
    assert down.returncode == 0, down.stderr[-2000:]
    assert str(lab.workdir) not in _secrets()
    assert VmDiskFiles(lab.paths, "server", "data").image.is_file()


class _Secret:
    def __init__(self) -> None:
        self.value: bytes | None = None
        self.undefined = False

    def setValue(self, value: bytes, _flags: int) -> None:
        self.value = value

    def UUIDString(self) -> str:
        return "0f0f0f0f-0000-4000-8000-000000000000"

    def undefine(self) -> None:
        self.undefined = True


def test_hotplug_undefines_the_secret_whether_or_not_the_attach_worked() -> None:
    libvirt = load_libvirt()
    secret = _Secret()

    class Conn:
        def secretDefineXML(self, xml: str, _flags: int) -> _Secret:
            assert "ephemeral=\"yes\"" in xml
            return secret

    class Domain:
        fail = False

        def attachDeviceFlags(self, xml: str, flags: int) -> None:
            assert flags == 1 and secret.UUIDString() in xml  # AFFECT_LIVE only
            if self.fail:
                raise libvirt.libvirtError("no free PCI slot")

        def name(self) -> str:
            return "testbed-x"

    hotplug(Conn(), Domain(), Path("/i.qcow2"), "data", "vdb", b"k" * 64)
    assert secret.value == b"k" * 64 and secret.undefined
    secret.undefined, domain = False, Domain()
    domain.fail = True
    with pytest.raises(StateError, match="could not attach disk data to testbed-x"):
        hotplug(Conn(), domain, Path("/i.qcow2"), "data", "vdb", b"k" * 64)
    assert secret.undefined


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(["format-specific", "data", "encrypt",
                                                        "format", "uuid", "luks", "x"]),
                                       inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(doc=_JSON)
def test_hostile_qemu_img_info_is_one_binding_error(doc: object) -> None:
    """Whatever qemu-img says about an image, the answer is a UUID or a DiskBindingError."""
    text = json.dumps(doc).encode()
    try:
        uuid = _luks_uuid(_json(text, Path("/i.qcow2")), Path("/i.qcow2"))
    except DiskBindingError:
        return
    assert isinstance(uuid, str) and 0 < len(uuid) <= 64
