"""The Ansible lab automation (ansible/): the site playbook end to end, idempotence,
teardown, a run over SSH to lab hosts that are sshd instances on 127.0.0.1, the spec
rendered from the inventory, and ansible-lint.

Needs ansible (PyPI `ansible`, which bundles community.general and community.libvirt),
ansible-lint and OpenSSH's sshd/ssh/ssh-keygen: missing ones fail the tests, naming what
to install; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.attacks.scenarios import SCENARIOS
from testbed.spec.cluster_spec import load_cluster_spec

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "ansible"
LOCAL_INVENTORY = ANSIBLE_DIR / "inventories" / "local" / "hosts.yml"
MULTIHOST_INVENTORY = ANSIBLE_DIR / "inventories" / "example-multihost" / "hosts.yml"
VENV_BIN = Path(sys.executable).parent
SSHD = Path("/usr/sbin/sshd")
INSTALL_HINT = ("run `sh .ci/bootstrap` (pip: ansible, ansible-lint in .venv; "
                "apt: openssh-server openssh-client)")
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.MULTILINE)
PLAYBOOK_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


# --- helpers ------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path of an executable from the project's virtualenv or PATH; fail (never skip)."""
    candidate = VENV_BIN / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found (looked in {VENV_BIN} and PATH): {INSTALL_HINT}",
                    pytrace=False)
    return found


def _require_sshd() -> None:
    missing = [p for p in (str(SSHD),) if not Path(p).exists()]
    missing += [n for n in ("ssh", "ssh-keygen") if shutil.which(n) is None]
    if missing:
        pytest.fail(f"OpenSSH missing: {', '.join(missing)}: {INSTALL_HINT}", pytrace=False)


@dataclass
class PlaybookRun:
    returncode: int
    output: str
    recap: dict[str, dict[str, int]]

    def explain(self) -> str:
        return f"ansible-playbook exited {self.returncode}; last output:\n{self.output[-6000:]}"


def _ansible_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local-tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp / "cp"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        # per-task timings in the output (which task took the time, if a run is slow)
        "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
        # the controller's Python is this virtualenv: ansible-playbook's own interpreter
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


def run_playbook(playbook: str, inventory: Path, extra_vars: dict[str, Any], tmp: Path,
                 *args: str) -> PlaybookRun:
    vars_file = tmp / f"extra-vars-{time.monotonic_ns()}.json"
    vars_file.write_text(json.dumps(extra_vars))
    cmd = [_tool("ansible-playbook"), "-i", str(inventory), "-e", f"@{vars_file}",
           str(ANSIBLE_DIR / playbook), *args]
    proc = subprocess.run(cmd, cwd=ANSIBLE_DIR, env=_ansible_env(tmp), capture_output=True,
                          text=True, timeout=PLAYBOOK_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    vars_file.with_suffix(".log").write_text(output)  # kept in tmp_path for a post-mortem
    recap = {m[1]: dict(zip(("ok", "changed", "unreachable", "failed", "skipped", "rescued",
                             "ignored"), map(int, m.groups()[1:]), strict=True))
             for m in RECAP.finditer(proc.stdout)}
    return PlaybookRun(proc.returncode, output, recap)


def _processes_mentioning(marker: str) -> list[str]:
    """Live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def _force_down(workdir: Path) -> None:
    """Last resort after a failed test: stop whatever the lab left running."""
    clusters = workdir / "clusters"
    for cluster in (clusters.iterdir() if clusters.is_dir() else []):
        subprocess.run([_tool("testbed"), "--workdir", str(workdir), "down", "--cluster",
                        cluster.name, "--purge"], capture_output=True, timeout=120)


def _json(path: Path) -> Any:
    assert path.is_file(), f"{path} was not fetched"
    return json.loads(path.read_text())


def _check_demo_report(demo: dict[str, Any]) -> None:
    assert demo["ok"] is True and demo["up_ok"] and demo["teardown_clean"]
    assert "seconds" not in demo  # volatile: left out of the report
    assert [(c["from"], c["to"]) for c in demo["channels"]] == [("client", "server"),
                                                                 ("server", "client")]
    for channel in demo["channels"]:
        assert channel["established"] is True, channel
        assert channel["evidence"]["node"] == channel["to"]
        assert channel["evidence"]["node_verified"] is True
    assert len(demo["attacks"]) == len(SCENARIOS)
    for attack in demo["attacks"]:
        assert attack["as_expected"] is True, attack
        assert attack["plain_mtls"]["attack_succeeded"] is True
        assert attack["trusted_passages"]["attack_succeeded"] is False


def _check_attack_report(attack: dict[str, Any]) -> None:
    assert attack["ok"] is True and "seconds" not in attack
    assert len(attack["results"]) == len(SCENARIOS)
    assert all(r["as_expected"] for r in attack["results"]), attack["results"]


# --- the site playbook on this machine (connection local, sim backend) ------------------------


def test_site_playbook_local_sim_collects_results_and_is_idempotent(tmp_path: Path) -> None:
    workdir, results = tmp_path / "lab", tmp_path / "results"
    extra = {"testbed_workdir": str(workdir), "testbed_results_dir": str(results)}
    try:
        first = run_playbook("site.yml", LOCAL_INVENTORY, extra, tmp_path)
        assert first.returncode == 0, first.explain()
        assert first.recap["localhost"]["failed"] == 0
        assert first.recap["localhost"]["changed"] > 0  # nodes started, reports written

        host = results / "localhost"
        _check_demo_report(_json(host / "demo.json"))
        _check_attack_report(_json(host / "attack.json"))
        cluster = _json(host / "cluster.json")
        assert cluster["ok"] is True and cluster["cluster"] == "trusted-passages-lab"
        assert [(n["name"], n["role"], n["state"]) for n in cluster["nodes"]] == [
            ("verifier", "verifier", "running"), ("server", "server", "running"),
            ("client", "client", "running")]
        for node in cluster["nodes"]:
            assert node["attestation"]["accepted"] is True
            assert "policy" in node["attestation"]["checks_passed"]
        logs = sorted(p.relative_to(host / "logs").as_posix()
                      for p in (host / "logs").rglob("*.log"))
        assert "clusters/trusted-passages-lab/nodes/server/run/node.log" in logs

        # the spec rendered from the inventory's role groups is one the project accepts
        spec = load_cluster_spec(workdir / "specs" / "trusted-passages-lab.yaml")
        assert [(n.name, n.role) for n in spec.nodes] == [
            ("verifier", "verifier"), ("server", "server"), ("client", "client")]

        second = run_playbook("site.yml", LOCAL_INVENTORY, extra, tmp_path)
        assert second.returncode == 0, second.explain()
        assert second.recap["localhost"]["changed"] == 0, second.explain()
        assert second.recap["localhost"]["failed"] == 0
        # the demo and the attack lab did run again (reporting tasks, not skipped)
        assert "TASK [testbed : Run the demo" in second.output
        assert "TASK [testbed : Run the attack lab]" in second.output

        # a changed spec (every node booted tampered, as an extra var reaches the node
        # entries too): the handler stops the cluster, `up` starts it with the new boot
        # chains, and every attestation must now be, and is, rejected
        evil = extra | {"testbed_node_tampered": {"cmdline": "console=ttyS0 ro quiet "
                                                             "init=/bin/sh"}}
        third = run_playbook("site.yml", LOCAL_INVENTORY, evil, tmp_path,
                             "--tags", "cluster,collect")
        assert third.returncode == 0, third.explain()
        assert third.recap["localhost"]["changed"] > 0
        handler = re.escape("RUNNING HANDLER [testbed : Stop the cluster so that the changed "
                            "spec takes effect]")
        # the header, a timing line (profile_tasks), then the handler's result
        assert re.search(handler + r"[^\n]*\n(?:[^\n]*\n)?changed: \[localhost\]",
                         third.output), third.explain()
        assert "TASK [testbed : Run the demo" not in third.output  # --tags: cluster only
        cluster = _json(host / "cluster.json")
        assert cluster["ok"] is True
        for node in cluster["nodes"]:
            assert node["state"] == "running" and node["tampered"] == ["cmdline"], node
            attestation = node["attestation"]
            assert attestation["expected"] == "rejected" and attestation["accepted"] is False
            assert attestation["failed_check"] == "policy" and attestation["as_expected"]
    finally:
        down = run_playbook("teardown.yml", LOCAL_INVENTORY, extra, tmp_path)
        leftovers = _processes_mentioning(str(workdir))
        if down.returncode != 0 or leftovers:
            _force_down(workdir)
    assert down.returncode == 0, down.explain()
    assert down.recap["localhost"]["changed"] > 0  # the nodes were stopped
    assert leftovers == [], leftovers
    again = run_playbook("teardown.yml", LOCAL_INVENTORY, extra, tmp_path)
    assert again.returncode == 0, again.explain()
    assert again.recap["localhost"]["changed"] == 0, again.explain()


# --- over SSH: two lab hosts, each an sshd on 127.0.0.1 with its own keys -----------------------


@dataclass
class SshHost:
    name: str
    port: int
    pid: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_sshd(directory: Path, name: str, authorized_key: Path) -> SshHost:
    directory.mkdir(parents=True)
    host_key = directory / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                    str(host_key)], check=True)
    port = _free_port()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"PidFile {directory / 'sshd.pid'}", f"AuthorizedKeysFile {authorized_key}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        "Subsystem sftp internal-sftp", ""]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    log = (directory / "sshd.log").open("w")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited {proc.returncode}: {(directory / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return SshHost(name, port, proc.pid)
        except OSError:
            time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    pytest.fail(f"sshd on port {port} did not come up: {(directory / 'sshd.log').read_text()}")


@pytest.fixture
def ssh_lab(tmp_path: Path) -> Iterator[tuple[list[SshHost], Path, Path]]:
    """Two sshd instances (lab-a, lab-b) on 127.0.0.1; yields them, the user key and the
    known_hosts file holding their host keys. Each sshd is stopped by its PID."""
    _require_sshd()
    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir()
    user_key = ssh_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "testbed-ansible-test",
                    "-f", str(user_key)], check=True)
    authorized = ssh_dir / "authorized_keys"
    shutil.copy(user_key.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    hosts: list[SshHost] = []
    try:
        known = []
        for name in ("lab-a", "lab-b"):
            host = _start_sshd(ssh_dir / name, name, authorized)
            hosts.append(host)
            key = (ssh_dir / name / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            known.append(f"[127.0.0.1]:{host.port} {' '.join(key)}")
        known_hosts = ssh_dir / "known_hosts"
        known_hosts.write_text("\n".join(known) + "\n")
        yield hosts, user_key, known_hosts
    finally:
        # Ansible's ControlPersist masters would keep their sessions open for a minute
        control = tmp_path / "cp"
        for socket_path in (control.iterdir() if control.is_dir() else []):
            subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "x"],
                           capture_output=True, timeout=10)
        for host in hosts:
            try:
                os.kill(host.pid, signal.SIGTERM)
                os.waitpid(host.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def test_site_playbook_over_ssh_two_lab_hosts(
        tmp_path: Path, ssh_lab: tuple[list[SshHost], Path, Path]) -> None:
    hosts, user_key, known_hosts = ssh_lab
    roots = {h.name: tmp_path / "hosts" / h.name for h in hosts}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {
        "testbed_lab": {
            "hosts": {h.name: {
                "ansible_host": "127.0.0.1", "ansible_port": h.port,
                # lab-a gets the controller's tree (archive) and a fresh virtualenv from
                # the bootstrap; lab-b already has a checkout (this one, in place): a
                # second fresh install would only cost time (ansible alone is 54 MB)
                **({"testbed_source_method": "archive",
                    "testbed_install_dir": str(roots[h.name] / "opt" / "testbed")}
                   if h.name == "lab-a" else
                   {"testbed_source_method": "inplace", "testbed_install_dir": str(ROOT)}),
                "testbed_workdir": str(roots[h.name] / "var" / "lib" / "testbed"),
                # lab-a runs the demo (which includes the attack lab); lab-b only its
                # cluster (the local test covers `testbed attack`): saves ~15 s
                "testbed_run_demo": h.name == "lab-a",
                "testbed_run_attack": False,
            } for h in hosts},
            "vars": {
                "ansible_connection": "ssh",
                "ansible_user": "root",
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_ssh_private_key_file": str(user_key),
                "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts} "
                                           "-o StrictHostKeyChecking=yes",
                "testbed_backend": "sim",
                "testbed_cluster_name": "ssh-lab",
            }},
        "testbed_nodes": {"children": {
            "testbed_verifier": {"hosts": {"verifier": {"testbed_node_lab_host": "lab-a"}}},
            "testbed_server": {"hosts": {"server": {"testbed_node_lab_host": "lab-a"},
                                         "server-b": {"testbed_node_lab_host": "lab-b"}}},
            "testbed_client": {"hosts": {"client-evil": {
                "testbed_node_lab_host": "lab-b",
                "testbed_node_tampered": {"cmdline": "console=ttyS0 ro quiet init=/bin/sh"}}}},
        }},
    }}}))
    results = tmp_path / "results"
    extra = {"testbed_results_dir": str(results),
             "testbed_controller_build_dir": str(tmp_path / "build")}
    workdirs = [roots[h.name] / "var" / "lib" / "testbed" for h in hosts]
    try:
        first = run_playbook("site.yml", inventory, extra, tmp_path)
        assert first.returncode == 0, first.explain()
        assert set(first.recap) == {"lab-a", "lab-b"}
        assert "paramiko" not in first.output

        # lab-a: installed from the controller's tree by the project's own bootstrap
        install = roots["lab-a"] / "opt" / "testbed"
        assert (install / ".ci" / "bootstrap").is_file()
        assert (install / "testbed" / "cli" / "main.py").is_file()
        assert (install / ".venv" / "bin" / "testbed").is_file()
        shipped = {p.relative_to(install).parts[0] for p in install.iterdir()}
        assert not shipped & {".git", ".testbed", ".pytest_cache", ".mypy_cache"}, shipped
        assert not list(install.rglob("*.key")) and not list(install.rglob("*-privkey.pem"))

        _check_demo_report(_json(results / "lab-a" / "demo.json"))
        assert not (results / "lab-b" / "demo.json").exists()

        # one cluster per lab host, nodes placed by testbed_node_lab_host
        a = _json(results / "lab-a" / "cluster.json")
        b = _json(results / "lab-b" / "cluster.json")
        assert a["ok"] and b["ok"]
        assert [n["name"] for n in a["nodes"]] == ["verifier", "server"]
        assert [n["name"] for n in b["nodes"]] == ["server-b", "client-evil"]
        evil = b["nodes"][1]["attestation"]
        assert evil["expected"] == "rejected" and evil["accepted"] is False
        assert evil["failed_check"] == "policy" and evil["as_expected"] is True
        assert b["nodes"][0]["attestation"]["accepted"] is True

        second = run_playbook("site.yml", inventory, extra, tmp_path)
        assert second.returncode == 0, second.explain()
        for name in ("lab-a", "lab-b"):
            assert second.recap[name]["changed"] == 0, second.explain()
    finally:
        down = run_playbook("teardown.yml", inventory, extra, tmp_path)
        leftovers = [p for w in workdirs for p in _processes_mentioning(str(w))]
        if down.returncode != 0 or leftovers:
            for w in workdirs:
                _force_down(w)
    assert down.returncode == 0, down.explain()
    assert all(down.recap[name]["changed"] > 0 for name in ("lab-a", "lab-b")), down.explain()
    assert leftovers == [], leftovers


# --- qemu backend teardown: community.libvirt on a local and an "ssh-remote" libvirt host -----

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


def _virsh(uri: str, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True,
                          timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"virsh {' '.join(args)}: {proc.stderr.strip()}", pytrace=False)
    return proc.stdout


def test_teardown_removes_the_clusters_domains_on_every_libvirt_host(
        tmp_path: Path, ssh_lab: tuple[list[SshHost], Path, Path]) -> None:
    """The qemu backend's teardown (roles/testbed/tasks/libvirt_cleanup.yml) with one node
    placed on qemu:///system and one on qemu+ssh://root@127.0.0.1:PORT/system through an
    sshd of this test (host key checked against the test's known_hosts): both domains are
    destroyed and undefined, a foreign domain is left alone, a second run changes nothing.
    The modules run under Debian's python3 (python3-libvirt, python3-lxml), as on a lab
    host that testbed_qemu_packages set up."""
    if os.geteuid() != 0:
        pytest.fail("qemu:///system needs root", pytrace=False)
    missing = [t for t in ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64")
               if shutil.which(t) is None]
    probe = subprocess.run(["/usr/bin/python3", "-c", "import libvirt, lxml"],
                           capture_output=True, text=True)
    if missing or probe.returncode != 0:
        pytest.fail(f"libvirt pieces missing: {missing or probe.stderr.strip()}: apt install "
                    "libvirt-daemon-system libvirt-clients qemu-system-x86 python3-libvirt "
                    "python3-lxml", pytrace=False)
    from testbed.qemu.libvirtd import ensure_daemons

    hosts, user_key, known_hosts = ssh_lab
    wrapper = tmp_path / "ssh-for-libvirt"
    wrapper.write_text("#!/bin/sh\nexec ssh -o BatchMode=yes -o StrictHostKeyChecking=yes "
                       f"-o UserKnownHostsFile={known_hosts} \"$@\"\n")
    wrapper.chmod(0o755)
    local = "qemu:///system"
    remote = (f"qemu+ssh://root@127.0.0.1:{hosts[0].port}/system"
              f"?keyfile={user_key}&command={wrapper}")
    tag = f"tb{os.getpid()}"
    # A cluster domain (testbed-<cluster>.<node>.<work dir tag>) and a single VM's name.
    srv = f"testbed-trusted-passages-lab.{tag}-srv.0123abcd"
    domains = {srv: remote, f"testbed-{tag}-cli": local, f"{tag}-other": local}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {
        "testbed_lab": {"hosts": {"localhost": {
            "ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
            "testbed_backend": "qemu", "testbed_cli": _tool("testbed"),
            "testbed_workdir": str(tmp_path / "wd"),
            "testbed_results_dir": str(tmp_path / "results")}}},
        "testbed_nodes": {"children": {
            "testbed_server": {"hosts": {f"{tag}-srv": {"testbed_node_libvirt_uri": remote}}},
            "testbed_client": {"hosts": {f"{tag}-cli": {}}}}},
    }}}))
    daemons = ensure_daemons(tmp_path / "libvirt-run")
    try:
        for name in domains:
            xml = tmp_path / f"{name}.xml"
            xml.write_text(DOMAIN_XML.format(name=name))
            _virsh(local, "define", str(xml))
        _virsh(remote, "start", srv)  # through the sshd: a running VM
        assert "running" in _virsh(local, "domstate", srv)

        first = run_playbook("teardown.yml", inventory, {}, tmp_path)
        assert first.returncode == 0, first.explain()
        assert first.recap["localhost"]["changed"] > 0
        listed = _virsh(local, "list", "--all", "--name").split()
        assert srv not in listed and f"testbed-{tag}-cli" not in listed
        assert f"{tag}-other" in listed  # not this cluster's: untouched

        second = run_playbook("teardown.yml", inventory, {}, tmp_path)
        assert second.returncode == 0, second.explain()
        assert second.recap["localhost"]["changed"] == 0, second.explain()
    finally:
        for name in domains:
            _virsh(local, "destroy", name, check=False)
            _virsh(local, "undefine", name, check=False)
        daemons.stop()


# --- the inventory model and lint ---------------------------------------------------------------


def test_multihost_example_renders_a_spec_the_project_accepts(tmp_path: Path) -> None:
    """The example multi-host inventory, rendered locally (connection forced to local):
    one node per role-group host, placement kept out of the spec."""
    inventory = json.loads(subprocess.run(
        [_tool("ansible-inventory"), "-i", str(MULTIHOST_INVENTORY), "--list"],
        env=_ansible_env(tmp_path), capture_output=True, text=True, check=True).stdout)
    assert inventory["testbed_server"]["hosts"] == ["server1", "server2"]
    assert inventory["_meta"]["hostvars"]["lab.example.org"]["ansible_connection"] == "ssh"

    spec_path = tmp_path / "spec.yaml"
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Render the lab's spec", "hosts": "testbed_lab", "gather_facts": False,
        "tasks": [{"name": "Render", "ansible.builtin.import_role": {
            "name": "testbed", "tasks_from": "spec"}}]}]))
    extra = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
             "testbed_workdir": str(tmp_path / "wd"), "testbed_spec_path": str(spec_path),
             "testbed_cli": _tool("testbed")}
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(extra))
    env = _ansible_env(tmp_path) | {"ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")}
    proc = subprocess.run([_tool("ansible-playbook"), "-i", str(MULTIHOST_INVENTORY), "-e",
                           f"@{vars_file}", str(playbook)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    spec = load_cluster_spec(spec_path)
    assert spec.name == "tp-multihost" and spec.backend == "qemu"
    assert [(n.name, n.role) for n in spec.nodes] == [
        ("verifier", "verifier"), ("server1", "server"), ("server2", "server"),
        ("client", "client"), ("client-tampered", "client")]
    tampered = {n.name: n for n in spec.nodes}["client-tampered"]
    assert tampered.effective_boot.cmdline.endswith("init=/bin/sh")


def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    proc = subprocess.run([_tool("ansible-lint"), "--offline", "--nocolor"], cwd=ANSIBLE_DIR,
                          env=_ansible_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Profile 'production' was required, and it passed" in output, output[-3000:]


def test_playbooks_never_use_paramiko() -> None:
    text = "\n".join(p.read_text() for p in ANSIBLE_DIR.rglob("*")
                     if p.is_file() and p.suffix in {".yml", ".yaml", ".cfg", ".j2"})
    # the word may appear in comments; no connection setting may name it
    assert not re.search(r"(connection|transport)\s*[:=]\s*['\"]?paramiko", text)
    config = (ANSIBLE_DIR / "inventories" / "example-multihost" / "group_vars" / "all.yml")
    assert yaml.safe_load(config.read_text())["ansible_connection"] == "ssh"
