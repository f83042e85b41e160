"""Ansible over the hosts lab (ansible/hosts-lab.yml, docs/hosts.md, "Ansible"): a real run.

The playbook with the hosts-lab inventory, on this test's own bridge and subnet (tbm3,
10.213.13.0/24): two hosts up and attested, each checked over real SSH (OpenSSH, root,
the lab key, the lab's known_hosts only), one small VM placed on each host; a second run
reports changed=0; the teardown playbook leaves no host process, namespace, bridge or
libvirt domain, and a second teardown changes nothing.

Each run includes the demo across hosts (tag ``demo``: `testbed demo --backend qemu
--spec`, on the cluster as it is: attested channels both ways between the two hosts' VMs);
the spec has two VMs rather than the example's three (no CryptoVM: one TCG boot less).
The inventory command is also checked without a lab and with a stopped one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from attestation.files import private_dir
from testbed.hosts import lifecycle
from testbed.hosts.layout import HostRecord, LabPaths, LabState
from tests.vm_lab import CACHE, require_root_and_libvirt, vm_workdir

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "ansible"
INVENTORY = ANSIBLE_DIR / "inventories" / "hosts-lab"
VENV_BIN = Path(sys.executable).parent
BRIDGE, SUBNET = "tbm3", "10.213.13.0/24"
PLAYBOOK_TIMEOUT_S = 600
SPEC = """\
version: 1
name: ansible-hosts
backend: qemu
image: default
nodes:
  - name: server
    role: server
    host: host1
  - name: client
    role: client
    host: host2
"""

pytestmark = pytest.mark.slow


def _tool(name: str) -> str:
    candidate = VENV_BIN / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found (looked in {VENV_BIN} and PATH): run `sh .ci/bootstrap`",
                    pytrace=False)
    return found


def _env(tmp: Path, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    return env | {
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local-tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp / "cp"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TESTBED_HOME": str(workdir),
        "TESTBED_CLI": _tool("testbed"),
        "TESTBED_IMAGE_CACHE": str(CACHE),
    }


def _recap(stdout: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    for line in stdout.split("PLAY RECAP", 1)[-1].splitlines():
        name, sep, counts = line.partition(" : ")
        if sep:
            recap[name.strip()] = {k: int(v) for k, v in
                                   (item.split("=") for item in counts.split())}
    return recap


def _playbook(name: str, tmp: Path, workdir: Path, extra: dict[str, Any], *args: str
              ) -> tuple[int, str, dict[str, dict[str, int]]]:
    vars_file = tmp / f"vars-{time.monotonic_ns()}.json"
    vars_file.write_text(json.dumps(extra))
    proc = subprocess.run([_tool("ansible-playbook"), "-i", str(INVENTORY), "-e",
                           f"@{vars_file}", str(ANSIBLE_DIR / name), *args],
                          cwd=ANSIBLE_DIR, env=_env(tmp, workdir), capture_output=True,
                          text=True, timeout=PLAYBOOK_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    vars_file.with_suffix(".log").write_text(output)  # for a post-mortem
    return proc.returncode, output, _recap(proc.stdout)


def _netns() -> list[str]:
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True,
                          check=False).returncode == 0


def _processes_mentioning(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def _exit_ssh_masters(control_dir: Path) -> None:
    """Ansible's ControlPersist masters (OpenSSH clients on this machine) by socket."""
    for socket_path in (control_dir.iterdir() if control_dir.is_dir() else []):
        subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "x"],
                       capture_output=True, timeout=10, check=False)


def _down_all(path: Path) -> None:
    """Whatever the playbooks left: by the CLI's own down, which stops by PID (the installed
    `testbed`, as the playbooks run it), then the lab."""
    subprocess.run([_tool("testbed"), "--workdir", str(path), "down", "--cluster",
                    "ansible-hosts", "--purge"], capture_output=True, timeout=300, check=False)
    lifecycle.down(path)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    require_root_and_libvirt("the hosts lab needs root and libvirt (docs/qemu.md)")
    with vm_workdir("ansible-hosts-", _down_all) as path:
        yield path


def test_inventory_of_no_lab_is_empty(tmp_path: Path) -> None:
    proc = subprocess.run([str(INVENTORY / "testbed_hosts.sh"), "--list"], capture_output=True,
                          text=True, timeout=60, check=False,
                          env=_env(tmp_path, tmp_path / "none"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["testbed_hosts"]["hosts"] == [] and data["_meta"]["hostvars"] == {}
    assert not (tmp_path / "none").exists()  # a read command creates no work directory


def test_inventory_of_a_stopped_lab_lists_its_hosts_untrusted(tmp_path: Path) -> None:
    """A lab whose hosts do not run (a lab.json only): both hosts listed, none trusted;
    the YAML form (without --json) is a static inventory Ansible reads the same way."""
    workdir = tmp_path / "wd"
    lab = LabPaths(workdir)
    private_dir(lab.root)
    state = LabState(BRIDGE, ipaddress.IPv4Network(SUBNET))
    for index in (1, 2):
        name = f"host{index}"
        state.hosts[name] = HostRecord(name, index, state.address_of(index),
                                       state.netns_of(name), state.veth_of(index),
                                       machine_pid=None, tampered=["qemu"] * (index == 2))
    state.save(lab)
    data = lifecycle.inventory(workdir)
    assert data["testbed_hosts"]["hosts"] == ["host1", "host2"]
    assert data["testbed_hosts_trusted"]["hosts"] == []
    host2 = data["_meta"]["hostvars"]["host2"]
    assert host2["ansible_host"] == "10.213.13.12" and host2["testbed_host_state"] == "stopped"
    assert host2["testbed_host_tampered"] == ["qemu"] and not host2["testbed_host_trusted"]

    human = subprocess.run([_tool("testbed"), "--workdir", str(workdir), "hosts", "inventory"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    static = tmp_path / "hosts.yml"
    static.write_text(human)
    assert yaml.safe_load(human)["all"]["children"]["testbed_hosts"]["hosts"]["host1"][
        "ansible_host"] == "10.213.13.11"
    listed = json.loads(subprocess.run(
        [_tool("ansible-inventory"), "-i", str(static), "--list"], env=_env(tmp_path, workdir),
        capture_output=True, text=True, timeout=60, check=True).stdout)
    assert listed["_meta"]["hostvars"]["host1"]["ansible_ssh_common_args"] == (
        f"-F {lab.ssh_config}")
    assert sorted(listed["testbed_hosts"]["hosts"]) == ["host1", "host2"]


def test_playbook_over_ssh_twice_then_teardown(tmp_path: Path, workdir: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    extra = {"testbed_hosts_bridge": BRIDGE, "testbed_hosts_subnet": SUBNET,
             "testbed_hosts_spec": str(spec), "testbed_results_dir": str(tmp_path / "results")}
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        rc, output, recap = _playbook("hosts-lab.yml", tmp_path, workdir, extra)
        timings["first"] = time.monotonic() - started
        assert rc == 0, output[-8000:]
        assert set(recap) == {"localhost", "host1", "host2"}, output[-3000:]
        assert recap["localhost"]["changed"] > 0 and recap["host1"]["changed"] > 0

        # the inventory the playbook used: OpenSSH with the lab's config, never learning keys
        inventory = json.loads(subprocess.run(
            [_tool("ansible-inventory"), "-i", str(INVENTORY), "--list"], cwd=ANSIBLE_DIR,
            env=_env(tmp_path, workdir), capture_output=True, text=True, check=True,
            timeout=60).stdout)
        lab = LabPaths(workdir)
        host1 = inventory["_meta"]["hostvars"]["host1"]
        assert host1["ansible_host"] == "10.213.13.11" and host1["ansible_user"] == "root"
        assert host1["ansible_connection"] == "ssh"
        assert host1["ansible_ssh_common_args"] == f"-F {lab.ssh_config}"
        assert "StrictHostKeyChecking yes" in lab.ssh_config.read_text()
        assert sorted(inventory["testbed_hosts_trusted"]["hosts"]) == ["host1", "host2"]

        cluster = json.loads((tmp_path / "results" / "hosts-lab" / "cluster.json").read_text())
        assert {(n["name"], n["host"], n["state"]) for n in cluster} == {
            ("server", "host1", "running"), ("client", "host2", "running")}, cluster
        demo = json.loads((tmp_path / "results" / "hosts-lab" / "demo.json").read_text())
        assert demo["ok"] is True, demo
        assert [(c["from"], c["to"], c["established"]) for c in demo["channels"]] == [
            ("client", "server", True), ("server", "client", True)], demo["channels"]

        started = time.monotonic()
        rc, output, recap = _playbook("hosts-lab.yml", tmp_path, workdir, extra)
        timings["second"] = time.monotonic() - started
        assert rc == 0, output[-8000:]
        for name in ("localhost", "host1", "host2"):
            assert recap[name]["changed"] == 0, output[-8000:]
    finally:
        started = time.monotonic()
        down = _playbook("hosts-lab-teardown.yml", tmp_path, workdir, extra)
        timings["teardown"] = time.monotonic() - started
        _exit_ssh_masters(tmp_path / "cp")
    rc, output, recap = down
    assert rc == 0, output[-8000:]
    assert recap["localhost"]["changed"] == 2, output[-4000:]
    assert LabState.load(LabPaths(workdir)) is None
    assert not [n for n in _netns() if n.startswith(f"{BRIDGE}-")]
    assert not _link_exists(BRIDGE)
    assert _processes_mentioning(str(workdir)) == []
    domains = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                             capture_output=True, text=True, check=False).stdout.split()
    assert not [d for d in domains if "ansible-hosts" in d], domains

    rc, output, recap = _playbook("hosts-lab-teardown.yml", tmp_path, workdir, extra)
    assert rc == 0 and recap["localhost"]["changed"] == 0, output[-4000:]
    print(f"hosts-lab playbook: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}")
