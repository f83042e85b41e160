"""VMs placed on the lab's hosts (docs/hosts.md, "Placement"): a real run.

One lab of two hosts for the module (bridge tbk2, 10.213.2.0/24), host1 with a tampered
QEMU (untrusted by ``policy``), host2 trusted. One small VM (TCG) is placed on host2:
defined in host2's libvirtd only, its vTPM made in host2's private directories, attested
over the lab bridge; ``down`` leaves nothing of it on host2. A spec naming host1 is
refused before anything is copied there; an artifact whose copy on the host does not
match the lab's digest is refused by name. The guest image is the machine-wide cache's
(``$TESTBED_IMAGE_CACHE``, as tests/test_qemu_cluster.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.hosts.deep import vtpm_hosts
from testbed.hosts.ekcert import EkRequestError, parse_ek_request
from testbed.hosts.layout import LabPaths
from testbed.hosts.placement import HostNotTrusted, require_trusted
from testbed.spec.cluster_spec import ClusterSpecError, parse_cluster_spec
from tests.vm_lab import CliRunner, cli_json, host_domains, host_libvirt_dir, hosts_lab

BRIDGE, SUBNET = "tbk2", "10.213.2.0/24"
SPEC = """\
version: 1
name: placed
backend: qemu
image: default
nodes:
  - name: vm1
    role: generic
    host: {host}
"""


_cli = CliRunner(timeout=400)


def _spec(workdir: Path, host: str) -> Path:
    path = workdir / f"spec-{host}.yaml"
    path.write_text(SPEC.format(host=host))
    return path


@pytest.fixture(scope="module")
def lab() -> Iterator[Path]:
    with hosts_lab(_cli, "placement-", 2, BRIDGE, SUBNET, tamper_qemu="host1",
                   need="the placement tests need root and libvirt (docs/qemu.md)") as workdir:
        yield workdir


def test_untrusted_host_gets_nothing_and_is_named(lab: Path) -> None:
    r = _cli(lab, "up", str(_spec(lab, "host1")), "--json")
    assert r.returncode == 1, r.stderr
    assert "host1: policy (" in r.stderr and "PCR 14" in r.stderr, r.stderr
    assert not (host_libvirt_dir(lab, "host1") / "testbed").exists()  # nothing copied, no vTPM
    assert not any(".vm1." in d for d in host_domains(lab, "host1"))
    r = _cli(lab, "up", str(_spec(lab, "host7")), "--json")
    assert r.returncode == 1 and "host7: host_up" in r.stderr, r.stderr


def test_vm_on_host2_defined_there_attested_and_removed(lab: Path) -> None:
    started = time.monotonic()
    r = _cli(lab, "up", str(_spec(lab, "host2")), "--json")
    assert r.returncode == 0, r.stderr
    up = cli_json(r, stderr_tail=None)
    node = up["nodes"][0]
    assert node["host"] == "host2", node
    assert node["attested"] is True, node
    up_seconds = time.monotonic() - started
    domain = node["domain"]
    assert domain in host_domains(lab, "host2")
    assert domain not in host_domains(lab, "host1") and domain not in host_domains(lab, None)
    record = json.loads((lab / "clusters" / "placed" / "nodes" / "vm1" / "vm.json").read_text())
    assert record["host"] == "host2"
    fs = host_libvirt_dir(lab, "host2")
    assert (fs / "swtpm" / record["uuid"] / "tpm2" / "tpm2-00.permall").is_file()
    assert not Path("/var/lib/libvirt/swtpm", record["uuid"]).exists()
    assert vtpm_hosts(LabPaths(lab)).get("vm1") == "host2"  # EK cert from host2's intermediate
    assert len(list((fs / "testbed" / "artifacts").iterdir())) == 2  # kernel, initrd

    status = cli_json(_cli(lab, "status", "--json"), stderr_tail=None)
    row = status["nodes"][0]
    assert row["state"] == "running" and row["host"] == "host2", row
    assert row["agent"] == "answering", row
    r = _cli(lab, "attest", "vm1", "--json")
    assert r.returncode == 0, r.stderr

    r = _cli(lab, "down", "--json")
    assert r.returncode == 0, r.stderr
    assert domain not in host_domains(lab, "host2")
    assert not (fs / "swtpm" / record["uuid"]).exists()
    assert not (fs / "testbed" / "vms" / domain).exists()
    assert not list((fs / "testbed" / "vtpm-setup").iterdir())
    print(f"\nplaced VM up and attested in {up_seconds:.1f} s")


def test_artifact_whose_copy_mismatches_is_refused_by_name(lab: Path) -> None:
    """host2 keeps the artifacts of the test before (by digest): spoil one of them."""
    artifacts = sorted((host_libvirt_dir(lab, "host2") / "testbed" / "artifacts").iterdir(),
                       key=lambda p: p.stat().st_size)
    assert artifacts, "the test before leaves the artifacts on host2"
    with artifacts[0].open("r+b") as handle:  # the smaller one: the kernel
        handle.write(b"MZ-not-the-kernel")
    r = _cli(lab, "up", str(_spec(lab, "host2")), "--json")
    assert r.returncode == 1, r.stderr
    assert "host2: artifact_digest" in r.stderr and "guest kernel" in r.stderr, r.stderr
    assert not any(".vm1." in d for d in host_domains(lab, "host2"))
    artifacts[0].unlink()


def test_spec_host_field_is_strict() -> None:
    base = Path.cwd()
    spec = parse_cluster_spec(SPEC.format(host="host2"), base)
    assert spec.nodes[0].host == "host2" and spec.nodes[0].to_dict()["host"] == "host2"
    for bad in ("host0", "host17", "hostx", "Host1", "[1]", "host1; rm"):
        with pytest.raises(ClusterSpecError, match="host"):
            parse_cluster_spec(SPEC.format(host=bad), base)
    sim = "version: 1\nname: s\nnodes:\n  - {name: a, boot: {cmdline: x}, host: host1}\n"
    with pytest.raises(ClusterSpecError, match="only a qemu node"):
        parse_cluster_spec(sim, base)


def test_ek_requests_from_a_host_are_checked(tmp_path: Path) -> None:
    good = {"type": "ek", "ek": "ab" * 256, "identity": {
        "tpm-spec-family": "2.0", "tpm-spec-level": "0", "tpm-spec-revision": "164",
        "tpm-manufacturer": "id:00001014", "tpm-model": "swtpm", "tpm-version": "id:20191023"}}
    assert parse_ek_request(json.dumps(good).encode(), "h").modulus_hex == "ab" * 256
    for bad in (b"", b"x" * 5000, b"[]", b"\xff", json.dumps({**good, "ek": "zz"}).encode(),
                json.dumps({**good, "extra": 1}).encode(),
                json.dumps({**good, "identity": {**good["identity"],  # type: ignore[dict-item]
                                                 "tpm-model": "a b --x"}}).encode()):
        with pytest.raises(EkRequestError, match="h: EK certificate request"):
            parse_ek_request(bad, "h")
    with pytest.raises(HostNotTrusted, match="host3: host_up"):
        require_trusted(tmp_path, ["host3"])
