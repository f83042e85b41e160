"""Encrypted disks in a sim cluster (docs/svd.md): real node processes and swtpms, the
CryptoVM node, real qemu-storage-daemons and LUKS. One module-scoped cluster carries
the flow (tests run in file order): `up` unlocks a host-side disk (the backend asks for
its key with the node's quote) and a guest-side disk (the node asks over Trusted
Passages); data written through the plain views is ciphertext in the images; `down`
locks both (daemons gone by PID, no mounts, no plain views); `up` again unlocks them
through attestation-gated release and the data is there; a tampered boot gets no disk,
and a tampered CryptoVM cannot unseal the key of its own store disk.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cryptovm.audit import read_entries
from testbed.cluster.agent import AgentClient, UnixTransport
from testbed.core.paths import ClusterPaths
from testbed.core.processes import process_argv, scan_processes, wait_gone
from testbed.roles.cryptovm import state_dir
from testbed.sim.processes import cluster_processes
from tests.sim_lab import run_cli

CLUSTER = "svd-lab"
BOOT = {"firmware": {"content": "OVMF (svd lab)"}, "kernel": {"content": "vmlinuz-svd"},
        "initrd": {"content": "initrd-svd"}, "cmdline": "console=ttyS0 ro"}
MARKERS = {"data": b"host-side-disk-marker-7f3a", "secrets": b"guest-side-disk-marker-91c2"}


@dataclass
class Lab:
    workdir: Path
    spec: Path
    paths: ClusterPaths
    up: dict[str, Any]

    def disks(self) -> dict[str, dict[str, Any]]:
        rc, out, err = run_cli(self.workdir, "status", "--cluster", CLUSTER, "--json")
        assert rc == 0, err
        web = next(n for n in json.loads(out)["nodes"] if n["name"] == "web")
        return {d["name"]: d for d in web["disks"]}

    def image(self, disk: str, node: str = "web") -> Path:
        return self.paths.node(node).state / "disks" / f"{disk}.luks"

    def view(self, disk: str) -> Path:
        return self.paths.node("web").run / "disks" / disk

    def daemons(self, node: str | None = None) -> list[int]:
        """qemu-storage-daemons of this work directory (or node), from /proc."""
        here = str(self.paths.node(node).root if node else self.workdir)
        return [pid for pid, _ in scan_processes(
            lambda argv: True if argv and argv[0].endswith("qemu-storage-daemon")
            and here in " ".join(argv) else None)]

    def audit(self) -> list[dict[str, Any]]:
        store = self.paths.node("cryptovm").run / "disks" / "store.mnt"
        return read_entries(state_dir(store) / "audit.log")


def write_spec(directory: Path) -> Path:
    doc = {"version": 1, "name": CLUSTER, "backend": "sim", "nodes": [
        {"name": "web", "role": "generic", "boot": BOOT,
         "disks": [{"name": "data", "size": "2M"},
                   {"name": "secrets", "size": "1M", "mode": "guest"}]},
        {"name": "cryptovm", "role": "cryptovm", "boot": BOOT,
         "disks": [{"name": "store", "size": "8M", "mode": "guest"}]}]}
    path = directory / "svd-lab.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("svd")
    spec = write_spec(workdir)
    rc, out, err = run_cli(workdir, "up", str(spec), "--json")
    paths = ClusterPaths(workdir, CLUSTER)
    lab = Lab(workdir, spec, paths, json.loads(out) if out else {})
    try:
        assert rc == 0, f"up failed: {out}\n{err}"
        yield lab
    finally:
        run_cli(workdir, "down", "--cluster", CLUSTER, "--purge")
        assert cluster_processes(paths) == []
        assert lab.daemons() == []


def test_up_unlocks_both_disks(lab: Lab) -> None:
    web = next(n for n in lab.up["nodes"] if n["name"] == "web")
    assert [(d["name"], d["mode"], d["state"]) for d in web["disks"]] == [
        ("data", "host", "unlocked"), ("secrets", "guest", "unlocked")]
    disks = lab.disks()
    assert disks["data"]["size"] == 2 << 20 and disks["secrets"]["size"] == 1 << 20
    for disk in disks.values():  # what status shows: never a key
        assert set(disk) == {"name", "mode", "size", "state", "plain_view", "daemon_pid"}
    assert len(lab.daemons()) == 3  # the CryptoVM's store disk too


def test_cryptovm_store_is_on_its_sealed_disk(lab: Lab) -> None:
    info = AgentClient(UnixTransport(lab.paths.node("cryptovm").socket), node="cryptovm").role(
        "info")
    mount = lab.paths.node("cryptovm").run / "disks" / "store.mnt"
    assert info["state_dir"] == str(state_dir(mount))
    assert str(mount) in Path("/proc/self/mountinfo").read_text()
    assert not state_dir(lab.paths.node("cryptovm").state).exists()
    sealed = lab.paths.node("cryptovm").state / "disks" / "store.sealed.json"
    assert json.loads(sealed.read_text())["sealed"]["pcr_selection"] == "sha256:0,1,2,3,4,5,6,7,9"


def test_plain_views_write_ciphertext(lab: Lab) -> None:
    for disk, marker in MARKERS.items():
        with open(lab.view(disk), "r+b") as f:
            f.write(marker)
        assert lab.view(disk).stat().st_mode & 0o777 == 0o600
    for disk, marker in MARKERS.items():
        assert marker not in lab.image(disk).read_bytes()


def test_first_use_creates_keys_inside_and_releases_nothing(lab: Lab) -> None:
    """First `up`: the keys are made inside the CryptoVM, the images formatted with
    fresh passphrases (kept only wrapped), the node's account may ask for its guest
    disk's key; no release was needed yet."""
    entries = lab.audit()
    generated = {e["key"] for e in entries if e["op"] == "generate" and e["outcome"] == "ok"}
    assert {"svd-web-data", "svd-web-secrets"} <= generated
    assert [e for e in entries if e["op"] == "release"] == []
    assert any(e["op"] == "account_grant" and e.get("target") == "node.web" for e in entries)


def test_down_locks_and_up_unlocks_through_release(lab: Lab) -> None:
    rc, _, err = run_cli(lab.workdir, "down", "--cluster", CLUSTER)
    assert rc == 0, err
    assert lab.daemons() == []
    assert str(lab.workdir) not in Path("/proc/self/mountinfo").read_text()
    assert not lab.view("data").exists() and not lab.view("secrets").exists()
    assert {d["state"] for d in lab.disks().values()} == {"locked"}
    store = lab.image("store", "cryptovm").read_bytes()
    assert b"account_create" not in store and b"tls-ca" not in store  # audit log, key ids
    rc, out, err = run_cli(lab.workdir, "up", str(lab.spec), "--json")
    assert rc == 0, f"{out}\n{err}"
    for disk, marker in MARKERS.items():
        assert lab.view(disk).read_bytes()[:len(marker)] == marker
    released = {(e["account"], e["key"]) for e in lab.audit()
                if e["op"] == "release" and e["outcome"] == "ok"}
    # The host-side key went to root (the hypervisor), the guest-side one to the node's
    # own attested account only: the backend never asked for it.
    assert released == {("root", "svd-web-data"), ("node.web", "svd-web-secrets")}


def test_a_crashed_node_gets_its_disks_back_only_by_attesting_again(lab: Lab) -> None:
    def releases() -> int:
        return sum(1 for e in lab.audit() if e["op"] == "release" and e["outcome"] == "ok")

    before = releases()
    pid = int(lab.paths.node("web").pid_file.read_text())
    os.kill(pid, signal.SIGKILL)  # no clean stop: its disks stay open for now
    wait_gone(pid, lambda: process_argv(pid) is not None, 5.0)
    assert len(lab.daemons("web")) == 2
    rc, out, err = run_cli(lab.workdir, "up", str(lab.spec), "--json")
    assert rc == 0, f"{out}\n{err}"
    assert releases() == before + 2  # both keys released again, after the new attestation
    assert len(lab.daemons("web")) == 2
    for disk, marker in MARKERS.items():
        assert lab.view(disk).read_bytes()[:len(marker)] == marker


def test_tampered_boots_get_no_disk(lab: Lab) -> None:
    """A tampered web node gets no disk key (its disks stay locked); a tampered CryptoVM
    cannot unseal its own store disk's key, naming the PCR that differs."""
    run_cli(lab.workdir, "down", "--cluster", CLUSTER)
    rc, out, _ = run_cli(lab.workdir, "up", str(lab.spec),
                         "--tamper", "web=cmdline:console=ttyS0 ro init=/bin/sh",
                         "--tamper", "cryptovm=cmdline:console=ttyS0 ro init=/bin/sh", "--json")
    assert rc != 0
    nodes = {n["name"]: n for n in json.loads(out)["nodes"]}
    assert nodes["web"]["attested"] is False
    error = nodes["cryptovm"]["error"]
    assert "cannot unlock its store disk" in error and "PCRs differ: [9]" in error
    assert {d["state"] for d in lab.disks().values()} == {"locked"}
    assert lab.daemons() == []
    assert str(lab.workdir) not in Path("/proc/self/mountinfo").read_text()


def test_bad_disk_spec_exits_3(lab: Lab, tmp_path: Path) -> None:
    doc = yaml.safe_load(lab.spec.read_text())
    doc["nodes"][0]["disks"][0]["size"] = "5G"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    rc, _, err = run_cli(tmp_path, "up", str(bad))
    assert rc == 3 and "nodes[0].disks[0].size" in err
