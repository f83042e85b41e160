"""No other local user reaches a TPM, a socket or a secret of the testbed.

A real sim cluster (``python -m testbed up``) and a managed TPM (``testbed tpm
start``) run in a work directory deep enough that their unix sockets do not fit
AF_UNIX's 107 bytes (so the short socket directories are exercised too). Then a
probe running as user ``nobody`` tries everything a curious neighbour would:
connect to every unix socket of the cluster's processes and of the work directory
(TPM2_GetRandom on data channels, CMD_SHUTDOWN on control channels), to every TCP
port those processes listen on, read every file and list every directory. The work
directory itself is made 0711 beforehand, as the qemu backend makes it so QEMU
reaches ``vms/``: its contents must hold on their own.

The only TCP listeners allowed are the ones named in :data:`INTENDED_TCP` (they
authenticate their peers: Trusted Passages by attestation, CVM1 by PSK or
certificate); an swtpm listening on TCP at all fails the test.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from attestation.files import private_dir
from testbed.core.errors import StateError
from testbed.core.paths import SUN_PATH_MAX, ClusterPaths, private_tree
from testbed.core.processes import process_argv
from testbed.sim.processes import cluster_processes
from testbed.tpm.swtpm import Swtpm

CLUSTER = "trusted-passages-lab"
NOBODY = pwd.getpwnam("nobody")
SYSTEM_PYTHON = "/usr/bin/python3"  # the probe is standard library only; nobody can run it
# The TCP listeners a sim cluster is meant to have, by the run file naming their port:
# all of them authenticate the peer before anything else happens.
INTENDED_TCP = {
    "tp.json": "Trusted Passages (attested TLS; the peer's quote is verified)",
    "cryptovm.json": "CVM1 (TLS + PSK or client certificate) and Trusted Passages",
}
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp
_SO_ACCEPTCON = 0x00010000  # a listening unix socket in /proc/net/unix

PROBE = r"""
import json, os, socket, struct, sys

GET_RANDOM = struct.pack(">HIIH", 0x8001, 12, 0x17B, 8)  # TPM2_GetRandom(8)
CMD_SHUTDOWN = struct.pack(">I", 3)                       # swtpm control channel

def recv_some(sock):
    try:
        return sock.recv(64)
    except OSError:
        return b""

def talk(family, address, ctrl):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(address)
    except OSError as exc:
        return "refused: " + (exc.strerror or str(exc))
    try:
        sock.sendall(CMD_SHUTDOWN if ctrl else GET_RANDOM)
        reply = recv_some(sock)
    except OSError:
        reply = b""
    finally:
        sock.close()
    if ctrl and reply[:4] == b"\0\0\0\0":
        return "control command accepted"
    if not ctrl and len(reply) >= 10 and reply[:2] == b"\x80\x01":
        return "TPM answered"
    return "connected"

def read(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        return "refused: " + (exc.strerror or str(exc))
    os.close(fd)
    return "readable"

def listdir(path):
    try:
        os.listdir(path)
    except OSError as exc:
        return "refused: " + (exc.strerror or str(exc))
    return "listable"

targets = json.load(sys.stdin)
out = {"uid": os.getuid(), "unix": {}, "tcp": {}, "files": {}, "dirs": {}}
for path in targets["unix"]:
    out["unix"][path] = talk(socket.AF_UNIX, path, path.endswith(".ctrl"))
for port in targets["tcp"]:
    out["tcp"][str(port)] = talk(socket.AF_INET, ("127.0.0.1", port), False)
for path in targets["files"]:
    out["files"][path] = read(path)
for path in targets["dirs"]:
    out["dirs"][path] = listdir(path)
json.dump(out, sys.stdout)
"""


# --- what the cluster's processes listen on (/proc, as root) ------------------------------


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_listeners() -> dict[int, int]:
    """inode -> port of every listening TCP socket (IPv4 and IPv6)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == _LISTEN:
                found[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


def unix_listeners() -> dict[int, str]:
    """inode -> bound path of every listening unix socket with a path."""
    found = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[3], 16) & _SO_ACCEPTCON:
            found[int(fields[6])] = fields[7]
    return found


@dataclass
class Listeners:
    tcp: dict[int, str]  # port -> "kind pid"
    unix: set[str]


def listeners_of(pids: dict[int, str]) -> Listeners:
    tcp, unix = tcp_listeners(), unix_listeners()
    found = Listeners({}, set())
    for pid, kind in pids.items():
        for inode in socket_inodes(pid):
            if inode in tcp:
                found.tcp[tcp[inode]] = f"{kind} {pid}"
            # A path bound through /proc/self/fd/N (a deep agent socket) means nothing in
            # another process; that socket is found by walking the work directory.
            if inode in unix and not unix[inode].startswith("/proc/"):
                found.unix.add(unix[inode])
    return found


def intended_ports(paths: ClusterPaths) -> dict[int, str]:
    ports = {}
    for node in paths.node_names():
        for name, why in INTENDED_TCP.items():
            run_file = paths.node(node).run / name
            if run_file.is_file():
                doc = json.loads(run_file.read_text())
                for key in ("port", "tp_port", "wire_port"):
                    if isinstance(doc.get(key), int):
                        ports[doc[key]] = f"{node} {name}:{key}: {why}"
    return ports


# --- the probe ----------------------------------------------------------------------------


def probe_as_nobody(targets: dict[str, list[Any]]) -> dict[str, Any]:
    res = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", PROBE], input=json.dumps(targets), capture_output=True,
        text=True, timeout=60, user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
        cwd="/",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout)
    assert result["uid"] == NOBODY.pw_uid
    return result


def walk(roots: list[Path]) -> tuple[list[str], list[str], list[str]]:
    """(files, dirs, sockets) under ``roots``, as root sees them."""
    files, dirs, sockets = [], [], []
    for root in roots:
        dirs.append(str(root))
        for parent, subdirs, names in os.walk(root):
            dirs += [os.path.join(parent, d) for d in subdirs]
            for name in names:
                path = os.path.join(parent, name)
                mode = os.lstat(path).st_mode
                (sockets if stat.S_ISSOCK(mode) else files).append(path)
    return files, dirs, sockets


@dataclass
class Lab:
    workdir: Path
    paths: ClusterPaths
    pids: dict[int, str]  # pid -> "node NAME" / "swtpm NAME"


def run_testbed(workdir: Path, *argv: str,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed", "--workdir", str(workdir), *argv],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # Not under pytest's tmp dir: that is 0700 and would keep nobody out on its own.
    base = Path(tempfile.mkdtemp(prefix="testbed-iso-", dir="/tmp"))
    os.chmod(base, 0o755)
    workdir = base / ("w" * 48)
    workdir.mkdir(mode=0o711)  # searchable, as the qemu backend leaves it for QEMU
    paths = ClusterPaths(workdir, CLUSTER)
    assert len(os.fsencode(paths.node("verifier").run / "swtpm.sock.ctrl")) > SUN_PATH_MAX
    try:
        up = run_testbed(workdir, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        started = run_testbed(workdir, "tpm", "start", "mine", "--json")
        assert started.returncode == 0, started.stderr
        pids = {p.pid: f"{p.kind} {p.node}" for p in cluster_processes(paths)}
        managed = workdir / "tpms" / "mine" / "swtpm.pid"
        pids[int(managed.read_text())] = "swtpm managed:mine"
        yield Lab(workdir, paths, pids)
    finally:
        run_testbed(workdir, "tpm", "stop", "--all", timeout=30)
        run_testbed(workdir, "down", "--purge", timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_nobody_reaches_no_tpm_socket_or_file(lab: Lab) -> None:
    listening = listeners_of(lab.pids)
    swtpm_ports = {port: who for port, who in listening.tcp.items() if who.startswith("swtpm")}
    assert swtpm_ports == {}, "an swtpm listens on TCP"
    intended = intended_ports(lab.paths)
    unintended = {port: who for port, who in listening.tcp.items() if port not in intended}
    assert unintended == {}, f"TCP listeners nobody meant: {unintended}"

    socket_dirs = {Path(p).parent for p in listening.unix if lab.workdir not in Path(p).parents}
    roots = [lab.workdir, *sorted(socket_dirs)]
    files, dirs, sockets = walk(roots)
    dirs += sorted({str(d.parent) for d in socket_dirs})  # /tmp/testbed-UID or $XDG/testbed
    unix = sorted(set(sockets) | listening.unix)
    swtpms = sum(who.startswith("swtpm") for who in lab.pids.values())
    assert len(unix) == 2 * swtpms + len(lab.pids) - swtpms, unix  # data + ctrl; each agent
    assert any(lab.workdir not in Path(p).parents for p in unix), "deep: short socket dirs"

    seen = probe_as_nobody({"unix": unix, "tcp": sorted(listening.tcp), "files": files,
                            "dirs": dirs})

    reached = {p: r for p, r in seen["unix"].items() if not r.startswith("refused")}
    assert reached == {}, "nobody reached a unix socket"
    tpm_over_tcp = {p: r for p, r in seen["tcp"].items()
                    if r in ("TPM answered", "control command accepted")}
    assert tpm_over_tcp == {}
    readable = [p for p, r in seen["files"].items() if r == "readable"]
    assert readable == [], "nobody read these"
    listable = [p for p, r in seen["dirs"].items() if r == "listable"]
    assert listable == [], "nobody listed these"
    assert len(files) > 40 and len(dirs) > 20  # the walk did see the cluster's state
    # Nothing the probe sent stopped a TPM.
    assert all(process_argv(pid) is not None for pid in lab.pids), lab.pids


def test_the_cluster_still_answers_its_owner(lab: Lab) -> None:
    status = run_testbed(lab.workdir, "status", "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    nodes = json.loads(status.stdout)["nodes"]
    assert {n["name"]: n["state"] for n in nodes} == {
        "verifier": "running", "server": "running", "client": "running", "cryptovm": "running"}
    assert all(n["tcti"].startswith("swtpm:path=") for n in nodes)


def test_every_file_is_0600_and_every_dir_0700(lab: Lab) -> None:
    files, dirs, sockets = walk([lab.workdir / name for name in ("ca", "tpms", "clusters")])
    modes = {p: stat.S_IMODE(os.lstat(p).st_mode) for p in files + sockets}
    assert {p: m for p, m in modes.items() if m != 0o600} == {}
    assert {d: oct(m) for d in dirs if (m := stat.S_IMODE(os.lstat(d).st_mode)) != 0o700} == {}


def test_private_dir_makes_every_missing_parent_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: a plain mkdir -p gives 0755 parents
    try:
        leaf = private_dir(tmp_path / "clusters" / "c" / "nodes" / "n")
    finally:
        os.umask(old)
    for directory in (leaf, *list(leaf.parents)[:3]):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        private_dir(tmp_path / "file")


def test_private_tree_tightens_what_older_versions_left_open(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    nodes = workdir / "clusters" / "c" / "nodes"
    nodes.mkdir(parents=True)
    for directory in (nodes, *list(nodes.parents)[:2]):
        os.chmod(directory, 0o755)
    os.chmod(workdir, 0o711)
    node = private_tree(workdir, nodes / "n")
    for directory in (node, *list(node.parents)[:3]):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o711  # the work dir is the user's choice
    with pytest.raises(StateError, match="not inside"):
        private_tree(workdir, tmp_path / "elsewhere")


def test_the_swtpm_fixture_listens_on_no_tcp_port(swtpm: Swtpm) -> None:
    assert swtpm.transport == "unix"
    assert listeners_of({swtpm.pid: "swtpm fixture"}).tcp == {}
    assert stat.S_IMODE(swtpm.socket_path.stat().st_mode) == 0o600
