"""qemu clusters: `testbed up --backend qemu`, status, attest, down, and the tampered-boot
attack, through the CLI with real VMs (libvirt, QEMU under TCG unless KVM really works,
OVMF, libvirt's swtpm); plus the spec shape and lifecycle helpers without VMs (libvirt's
``test:///default`` driver).

The guest image and firmware reference come from the machine-wide cache the VM tests
share (``$TESTBED_IMAGE_CACHE``, default /var/cache/trusted-testbed): a changed guest
agent or recipe rebuilds the image once (30-90 s).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.backends import open_backend
from testbed.cluster.state import read_attestations
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.qemu import backend as qc
from testbed.qemu.backend import QemuBackend, VmRecord
from testbed.qemu.domain import SWTPM_STORAGE
from testbed.qemu.libvirtd import LibvirtError, load_libvirt
from testbed.spec.cluster_spec import (
    ClusterSpecError,
    default_spec_path,
    dump_cluster_spec,
    load_cluster_spec,
    parse_cluster_spec,
    parse_tamper,
)
from tests.vm_lab import REPO, CliRunner, cli_json, require_root_and_libvirt, vm_workdir

NODES = ["cryptovm", "server", "client"]


# --- the spec shape -------------------------------------------------------------------------


def test_shipped_qemu_example_has_three_image_nodes() -> None:
    spec = load_cluster_spec(default_spec_path("qemu"))
    assert spec.backend == "qemu" and [n.name for n in spec.nodes] == NODES
    assert spec.image == REPO / "images" / "guest.yaml"
    for node in spec.nodes:
        assert node.boot.kernel.kind == "image" and node.policy is None
        assert node.boot.cmdline == "console=ttyS0 panic=-1 quiet"  # the recipe's
    assert parse_cluster_spec(dump_cluster_spec(spec), Path("/")) == spec


def _qemu_spec(node_yaml: str) -> str:
    return f"version: 1\nname: lab\nbackend: qemu\nnodes:\n  - name: vm0\n{node_yaml}"


@pytest.mark.parametrize(("node_yaml", "message"), [
    ("    boot: {kernel: {content: x}}\n", "nodes[0].boot.kernel: a qemu node boots the guest "
                                          "image's own"),
    ("    tampered: {initrd: {sha256: '" + "0" * 64 + "'}}\n", "nodes[0].tampered.initrd: a "
                                                           "qemu node"),
    ("    boot: {cmdline: 42}\n", "nodes[0].boot.cmdline: expected a string"),
    ("    boot: {cmdline: x, extra: 1}\n", "nodes[0].boot.'extra': unknown key"),
])
def test_qemu_node_blocks_only_take_a_command_line(node_yaml: str, message: str) -> None:
    with pytest.raises(ClusterSpecError, match="^" + re.escape(message)):
        parse_cluster_spec(_qemu_spec(node_yaml), Path("/"))


def test_qemu_node_cmdline_override_and_tamper() -> None:
    spec = parse_cluster_spec(_qemu_spec("    boot: {cmdline: 'console=ttyS0 quiet'}\n"
                                         "    tampered: {cmdline: 'console=ttyS0 x'}\n"),
                              Path("/"))
    node = spec.nodes[0]
    assert node.boot.cmdline == "console=ttyS0 quiet"
    assert node.effective_boot.cmdline == "console=ttyS0 x"
    assert spec.with_tamper("vm0", parse_tamper("vm0=cmdline:y")[1]).nodes[0] \
        .effective_boot.cmdline == "y"
    with pytest.raises(ClusterSpecError, match="only its cmdline can be tampered"):
        spec.with_tamper("vm0", parse_tamper("vm0=kernel:evil")[1])
    with pytest.raises(ClusterSpecError, match="measured by the qemu backend only"):
        node.boot.kernel.measure()


def test_backend_override_in_both_directions() -> None:
    with pytest.raises(ClusterSpecError, match=r"^nodes\[0\]\.boot\.firmware: a qemu node"):
        load_cluster_spec(default_spec_path("sim"), backend="qemu")
    with pytest.raises(ClusterSpecError, match=r"^image: only a qemu cluster"):
        load_cluster_spec(default_spec_path("qemu"), backend="sim")
    with pytest.raises(ClusterSpecError, match=r"^image: image recipe .* does not exist"):
        parse_cluster_spec("version: 1\nname: x\nbackend: qemu\nimage: nope.yaml\n"
                           "nodes: [{name: a}]\n", Path("/"))


def test_cli_bad_spec_is_exit_3_without_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(_qemu_spec("    boot: {kernel: {content: x}}\n"))
    r = subprocess.run([sys.executable, "-m", "testbed.cli.main", "--workdir", str(tmp_path / "w"),
                        "up", str(spec)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "nodes[0].boot.kernel" in r.stderr


# --- lifecycle helpers, no VM ------------------------------------------------------------------


def test_domain_names_are_unique_per_workdir_cluster_and_node(tmp_path: Path) -> None:
    a = ClusterPaths(tmp_path / "one", "a")
    names = {qc.domain_name(a, "b-c"), qc.domain_name(ClusterPaths(tmp_path / "one", "a-b"), "c"),
             qc.domain_name(ClusterPaths(tmp_path / "two", "a"), "b-c")}
    assert len(names) == 3 and all(n.startswith("testbed-") for n in names)


def test_processes_are_classified_by_domain_name(tmp_path: Path) -> None:
    paths = ClusterPaths(tmp_path, "lab")
    domain = qc.domain_name(paths, "server")
    qemu = ["/usr/bin/qemu-system-x86_64", "-name", f"guest={domain},debug-threads=on", "-S"]
    swtpm = ["/usr/bin/swtpm", "socket", "--ctrl",
             "type=unixio,path=/run/libvirt/qemu/swtpm/2-testbed-lab.ser-swtpm.sock,mode=0600",
             "--log", f"file=/var/log/swtpm/libvirt/qemu/{domain}-swtpm.log", "--tpm2"]
    assert qc._classify(qemu, paths) == ("qemu", "server")
    assert qc._classify(swtpm, paths) == ("swtpm", "server")
    other = ClusterPaths(tmp_path / "elsewhere", "lab")  # same cluster name, other work dir
    assert qc._classify(qemu, other) is None and qc._classify(swtpm, other) is None


def test_node_agent_without_a_vm_says_what_to_do(tmp_path: Path) -> None:
    paths = ClusterPaths(tmp_path, "lab")
    with pytest.raises(StateError, match=r"testbed up --backend qemu"):
        QemuBackend(paths).agent("server")
    paths.node("server").root.mkdir(parents=True)
    VmRecord(domain="d", uuid="u", agent_port=40001, accel="tcg", accel_reason="test",
             firmware="ovmf", image="i", image_dir="/", cmdline="", tampered=(),
             memory_mib=512, run_dir="/", console_log="/dev/null",
             booted_at="2026-12-05T00:00:00+00:00").save(paths, "server")
    agent = QemuBackend(paths).agent("server")
    assert agent.transport.describe() == "127.0.0.1:40001" and agent.node == "server"
    assert open_backend(paths).name == "qemu"  # a vm.json is a qemu trace
    assert open_backend(ClusterPaths(tmp_path, "other")).name == "sim"
    paths.node("server").vm.write_text('{"agent_port": "not a port"}')
    with pytest.raises(StateError, match=r"vm.json is damaged"):
        QemuBackend(paths).agent("server")


def test_cluster_domains_and_removal_on_the_test_driver(tmp_path: Path) -> None:
    try:
        libvirt = load_libvirt()
    except LibvirtError as exc:
        pytest.fail(str(exc), pytrace=False)
    paths = ClusterPaths(tmp_path, "lab")
    conn = libvirt.open("test:///default")
    try:
        xml = "<domain type='test'><name>{}</name><memory>1024</memory><os><type>hvm</type>" \
              "</os></domain>"
        mine = conn.defineXML(xml.format(qc.domain_name(paths, "server")))
        mine.create()
        conn.defineXML(xml.format(qc.domain_name(ClusterPaths(tmp_path / "x", "lab"), "server")))
        assert list(qc._cluster_domains(conn, paths)) == ["server"]
        assert qc._domain_state(mine) == "running"
        assert qc._remove_domains(conn, paths) == ["server"]
        assert qc._cluster_domains(conn, paths) == {}
        assert qc._domain_state(qc._lookup(conn, qc.domain_name(paths, "server"))) == "missing"
    finally:
        conn.close()


# --- real VMs through the CLI ----------------------------------------------------------------


_cli = CliRunner(timeout=600)


def _virsh_domains() -> list[str]:
    r = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    require_root_and_libvirt(
        "the qemu cluster tests need root and libvirt-clients (see docs/qemu.md)")
    with vm_workdir("cluster-", _cli.purge) as path:
        yield path


@pytest.mark.slow
def test_up_status_attest_down_with_three_vms(workdir: Path) -> None:
    started = time.monotonic()
    r = _cli(workdir, "up", "--backend", "qemu", "--json")
    up = cli_json(r)
    print(f"\nup: {time.monotonic() - started:.1f} s ({up['accel']}); define -> all attested "
          f"{up['seconds_define_to_all_attested']} s; boots "
          f"{[n['boot_seconds'] for n in up['nodes']]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert up["ok"] and up["all_attested"] and [n["name"] for n in up["nodes"]] == NODES
    assert all(n["action"] == "started" and n["registered"] for n in up["nodes"])
    # Keyless TLS (docs/cryptovm.md): the attested server and client VMs got their TLS
    # certificates from the CryptoVM VM's CA over attested channels, for keys made inside.
    for node in (n for n in up["nodes"] if n["role"] in ("server", "client")):
        enrollment = node["enrollment"]
        assert node["attested"] and enrollment["ok"], enrollment
        assert enrollment["certificate"]["subject"] == node["name"]
        assert enrollment["certificate"]["issuer"] == enrollment["ca"]["issuer"]
        assert enrollment["ca"]["attested_by"] == "cryptovm"
        assert enrollment["ca"]["key_attestation"] == "verified"
    # The VM network too: its peers released by the CryptoVM VM, which is no member.
    assert sorted(up["network"]["members"]) == ["client", "server"]
    assert up["network"]["cryptovm"] == "cryptovm"
    paths = ClusterPaths(workdir, up["cluster"])
    domains = [qc.domain_name(paths, n) for n in NODES]
    assert set(domains) <= set(_virsh_domains())

    status = cli_json(_cli(workdir, "status", "--json"))
    assert status["backend"] == "qemu"
    rows = {row["name"]: row for row in status["nodes"]}
    for name in NODES:
        row = rows[name]
        assert row["state"] == "running" and row["agent"] == "answering", row
        assert row["accel"] in ("kvm", "tcg") and row["qemu_pid"] and row["swtpm_pid"]
        assert row["boot_seconds"] > 0 and row["last_attestation"]["ok"]
        record = VmRecord.load(paths, name)
        assert record is not None
        assert record.agent_port == row["agent_port"] and record.domain == row["domain"]
    assert QemuBackend(paths).agent("server").status()["kernel_cmdline"].startswith(
        "console=ttyS0 panic=-1 quiet")

    again = _cli(workdir, "up", "--backend", "qemu", "--json")  # idempotent: VMs kept
    assert again.returncode == 0 and [n["action"] for n in cli_json(again)["nodes"]] == ["kept"] * 3

    r = _cli(workdir, "attest", "client", "--json")
    assert r.returncode == 0 and cli_json(r)["ok"], r.stdout[-2000:]
    history = read_attestations(paths)
    assert history["client"].ok and history["client"].policy == "client-predicted"

    # As after an `up` that crashed before writing it: down finds the domain by name.
    uuids = [record.uuid for n in NODES if (record := VmRecord.load(paths, n))]
    pids = [rows[n][k] for n in NODES for k in ("qemu_pid", "swtpm_pid")]
    paths.node("client").vm.unlink()
    r = _cli(workdir, "down", "--json")
    down = cli_json(r)
    assert r.returncode == 0 and down["ok"], r.stderr[-3000:]
    assert sorted(n["name"] for n in down["nodes"] if n["stopped_by"] == "libvirt") == sorted(
        NODES)
    assert qc._defined_domains(paths) == []  # libvirt's saved definitions, daemon or not
    assert not set(domains) & set(_virsh_domains() if _libvirt_up() else [])
    assert not [p for p in pids if _alive(p)] and qc.vm_processes(paths) == []
    assert not [u for u in uuids if (SWTPM_STORAGE / u).exists()]
    assert not (workdir / "vms" / paths.name).exists()
    again_down = cli_json(_cli(workdir, "down", "--json"))
    assert again_down["ok"] and again_down["nodes"] == []


def _libvirt_up() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                          timeout=30).returncode == 0


@pytest.mark.slow
def test_attack_tampered_boot_and_runtime_tamper_with_real_vms(workdir: Path) -> None:
    r = _cli(workdir, "attack", "tampered-boot", "runtime-tamper", "--backend", "qemu",
             "--json")
    out = cli_json(r)
    assert r.returncode == 0 and out["ok"], r.stderr[-3000:]
    assert out["genuine_channel"].startswith("ACCEPTED")
    tampered, runtime = out["results"]
    assert tampered["attack"] == "tampered-boot" and tampered["as_expected"]
    caught = tampered["trusted_passages"]
    assert caught["caught_by"] == "policy"
    assert "PCR 9: event 1 (kernel command line" in caught["detail"]
    assert out["qemu"]["tampered_cmdline"].endswith("init=/bin/sh")
    # The honest VM, attested with its runtime log (its kernel's boot_aggregate checked
    # against the quoted PCRs 0-9), runs a miner: caught, revoked, its channel closed.
    assert runtime["attack"] == "runtime-tamper" and runtime["as_expected"], runtime
    assert runtime["trusted_passages"]["caught_by"] == "runtime"
    assert "/usr/local/bin/cryptominer" in runtime["trusted_passages"]["detail"]
    assert "closed its channel" in runtime["trusted_passages"]["detail"]
    # Its VMs are gone (the backend tears them down).
    assert not [d for d in (_virsh_domains() if _libvirt_up() else []) if "atk" in d]


def test_attack_qemu_refuses_other_scenarios(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "testbed.cli.main", "--workdir", str(tmp_path),
                        "attack", "mitm", "--backend", "qemu"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3 and "mitm (runs on sim)" in r.stderr and "Traceback" not in r.stderr

