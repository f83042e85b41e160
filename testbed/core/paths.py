"""The work directory and where each piece of cluster state lives in it.

All state lives under one root: ``--workdir``, else ``$TESTBED_HOME``, else the
nearest ``.testbed`` here or above, else ``~/.local/state/testbed`` (:func:`find_workdir`).
Layout (``docs/testbed.md``)::

    WORKDIR/ca/                          the project-local EK CA (shared)
    WORKDIR/tpms/NAME/                   managed swtpm instances (testbed tpm)
    WORKDIR/clusters/NAME/               0700
        cluster.yaml                     the spec as brought up (tampering included)
        registry.json                    AkRegistry: node -> activated AK (0600)
        clock-history.json               last accepted quote per AK (older layout;
                                         still read, migrated per AK on the next save)
        attestations.json                last attestation result per node (older layout;
                                         still read, a per-node file wins)
        policies/NODE.yaml               each node's reference policy
        tls-ca/                          the cluster's TLS CA (key 0600)
        nodes/NODE/state/                sim: swtpm state; both: role state (kept by `down`)
        nodes/NODE/run/                  sim: node.pid node.json node.log agent.sock
                                         swtpm.pid swtpm.log swtpm.sock(.ctrl); roles'
                                         port files
        nodes/NODE/vm.json               qemu: the running VM
        swarms/FIRST.log                 sim: the log of the swarm process hosting the
                                         agents of nodes FIRST... (testbed.sim.swarm)
        clock-history/AKNAME.json        the last accepted quote of each AK (0600)
        attestations/NODE.json           the last attestation result of each node
    WORKDIR/vms/NAME/NODE/               qemu: console.log, OVMF_VARS.fd (reachable by QEMU)
    WORKDIR/run/libvirt/                 qemu: libvirtd/virtlogd this work dir started

Every directory the testbed makes here is 0700 and every file 0600, unless a comment
says why not (``docs/testbed.md``, "State layout"). A unix socket whose path would be
too long for AF_UNIX goes to a short private directory instead (:func:`socket_dir`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from attestation.files import DIR_MODE, private_dir
from testbed.core.errors import ArgumentError, StateError, UsageError

__all__ = [
    "HOST_VTPM_BINDINGS",
    "NAME_PATTERN",
    "SUN_PATH_MAX",
    "WORKDIR_NAME",
    "ClusterPaths",
    "NodePaths",
    "cluster_names",
    "ensure_socket_dir",
    "existing_cluster",
    "find_workdir",
    "private_tree",
    "resolve_workdir",
    "select_cluster",
    "socket_dir",
]

WORKDIR_NAME = ".testbed"

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
"""Cluster, node and network names: they become directory names and socket paths."""


def find_workdir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The work directory a command means, found as git finds ``.git``; never created.

    ``--workdir``, else ``$TESTBED_HOME``, else the nearest ``.testbed`` directory in the
    current directory or above it, else ``$XDG_STATE_HOME/testbed`` (by default
    ``~/.local/state/testbed``): the same one from any directory.
    """
    chosen = explicit or os.environ.get("TESTBED_HOME")
    if chosen:
        return Path(chosen).absolute()
    here = Path.cwd()
    for directory in (here, *here.parents):
        if (directory / WORKDIR_NAME).is_dir():
            return directory / WORKDIR_NAME
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home).absolute() / "testbed"


def resolve_workdir(explicit: str | os.PathLike[str] | None, *, create: bool = True) -> Path:
    """The work directory; created 0700 if missing unless ``create`` is false (read
    commands never create one: a missing work directory simply holds nothing)."""
    root = find_workdir(explicit)
    if not create:
        return root
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create work directory {root}: {exc.strerror}; "
                         "pass --workdir DIR or set TESTBED_HOME") from None
    return root


def private_tree(top: Path, path: Path) -> Path:
    """``path`` and every directory from ``top`` down to it, made or tightened to 0700.

    Tightening matters for work directories made by older versions, whose
    ``clusters/``, ``nodes/`` and ``tpms/`` were 0755.
    """
    top, path = top.absolute(), path.absolute()
    if path != top and top not in path.parents:
        raise StateError(f"{path} is not inside {top}")
    private_dir(path)
    for directory in path.parents:
        if directory == top or top not in directory.parents:
            break
        os.chmod(directory, DIR_MODE)
    return path


# --- unix sockets ------------------------------------------------------------------------

SUN_PATH_MAX = 107
"""sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL."""
_SOCKET_DIGEST_CHARS = 16


def _fits(path: Path) -> bool:
    return len(os.fsencode(path)) <= SUN_PATH_MAX


def socket_dir(directory: Path, longest_name: str) -> Path:
    """Where the sockets that belong in ``directory`` are bound.

    ``directory`` itself (a 0700 run directory) when ``directory/longest_name`` fits
    in AF_UNIX's 107 bytes. Otherwise (deep work directories: pytest's tmp dirs, long
    paths) a directory named by a digest of ``directory`` under a per-user private
    base: ``$XDG_RUNTIME_DIR/testbed`` when that is the user's own 0700 runtime
    directory, else ``/tmp/testbed-UID``. The socket path must be a real, short path,
    not a ``/proc/self/fd`` alias, because other processes (tpm2-tools, the TCTI in
    another process) connect to it by name. Deterministic, so whoever stops the
    process can find the directory again and remove it.
    """
    directory = directory.absolute()
    if _fits(directory / longest_name):
        return directory
    digest = hashlib.sha256(os.fsencode(directory)).hexdigest()[:_SOCKET_DIGEST_CHARS]
    for base in _short_socket_bases():
        if _fits(base / digest / longest_name):
            return base / digest
    raise StateError(f"no short enough directory for the unix socket {longest_name!r} "
                     f"of {directory}: set XDG_RUNTIME_DIR or use a shorter work directory")


def _short_socket_bases() -> list[Path]:
    bases = []
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/") and _owned_private(Path(runtime)):
        bases.append(Path(runtime) / "testbed")
    bases.append(Path("/tmp") / f"testbed-{os.geteuid()}")  # noqa: S108 - checked when made
    return bases


def _owned_private(path: Path) -> bool:
    """A real directory (not a symlink) owned by us that no one else can enter."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and info.st_mode & 0o077 == 0)


def ensure_socket_dir(directory: Path, longest_name: str) -> Path:
    """:func:`socket_dir`, made ready for binding, safely.

    ``directory`` itself is made 0700. A directory under a shared base like /tmp is
    made with mkdir (which never follows a symlink someone planted there) and then
    refused unless it and its base are ours and 0700: another user who made
    ``/tmp/testbed-UID`` first gets us a clear error, never our sockets.
    """
    where = socket_dir(directory, longest_name)
    if where == directory.absolute():
        return private_dir(where)
    for path in (where.parent, where):
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateError(f"cannot create socket directory {path}: {exc.strerror}") from None
        if not _owned_private(path):
            raise StateError(f"refusing socket directory {path}: not a directory owned by "
                             f"uid {os.geteuid()} with mode 0700 (someone else's?)")
    return where


@dataclass(frozen=True)
class NodePaths:
    """One node's files (``clusters/NAME/nodes/NODE/``)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def pid_file(self) -> Path:
        return self.run / "node.pid"

    @property
    def info(self) -> Path:
        return self.run / "node.json"

    @property
    def log(self) -> Path:
        return self.run / "node.log"

    @property
    def socket(self) -> Path:
        return self.run / "agent.sock"

    @property
    def swtpm_pid(self) -> Path:
        return self.run / "swtpm.pid"

    @property
    def vm(self) -> Path:
        return self.root / "vm.json"


# Which hypervisor host made each node's vTPM (testbed.hosts.deep writes it). Named here
# because the cluster layer must know, without importing the hosts room, that nodes
# have a host layer to judge.
HOST_VTPM_BINDINGS = Path("hosts") / "vtpms.json"


@dataclass(frozen=True)
class ClusterPaths:
    """One cluster's files under a work directory."""

    workdir: Path
    name: str

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise StateError(f"invalid cluster name {self.name!r}")
        object.__setattr__(self, "workdir", Path(self.workdir).absolute())

    @property
    def root(self) -> Path:
        return self.workdir / "clusters" / self.name

    @property
    def spec(self) -> Path:
        return self.root / "cluster.yaml"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def clock_history(self) -> Path:
        return self.root / "clock-history.json"

    @property
    def attestations(self) -> Path:
        return self.root / "attestations.json"

    @property
    def clock_history_dir(self) -> Path:
        """One file per AK: an attestation rewrites its own node's, not every node's."""
        return self.root / "clock-history"

    @property
    def attestations_dir(self) -> Path:
        """One file per node: the last attestation result of each."""
        return self.root / "attestations"

    def swarm_log(self, first: str) -> Path:
        """The log of the swarm process whose first hosted node is ``first``."""
        return self.root / "swarms" / f"{first}.log"

    @property
    def lock(self) -> Path:
        return self.root / ".lifecycle.lock"

    @property
    def attest_lock(self) -> Path:
        return self.root / ".attest.lock"

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    @property
    def tls_ca_dir(self) -> Path:
        return self.root / "tls-ca"

    @property
    def vm_root(self) -> Path:
        """Where this cluster's VMs keep console logs and NVRAM (outside the 0700 tree)."""
        return self.workdir / "vms" / self.name

    @property
    def libvirt_run(self) -> Path:
        return self.workdir / "run" / "libvirt"

    def policy(self, node: str) -> Path:
        return self.root / "policies" / f"{node}.yaml"

    def node(self, name: str) -> NodePaths:
        if not NAME_PATTERN.fullmatch(name):
            raise StateError(f"invalid node name {name!r}")
        return NodePaths(self.root / "nodes" / name)

    def node_names(self) -> list[str]:
        nodes = self.root / "nodes"
        if not nodes.is_dir():
            return []
        return sorted(d.name for d in nodes.iterdir() if d.is_dir()
                      and NAME_PATTERN.fullmatch(d.name))


def cluster_names(workdir: Path) -> list[str]:
    """Every cluster under the work directory, sorted."""
    root = workdir / "clusters"
    return sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []


def select_cluster(workdir: Path, explicit: str | None, *,
                   must_exist: bool = True) -> str | None:
    """The cluster a command means: ``explicit`` (which must exist, unless not
    ``must_exist``: ``down`` also stops a cluster whose directory was deleted), else the
    only one; None if there is none. Two clusters and no ``--cluster`` is a usage error."""
    names = cluster_names(workdir)
    if explicit is not None:
        if not NAME_PATTERN.fullmatch(explicit):
            raise UsageError(f"invalid cluster name {explicit!r}: lowercase letters, "
                             "digits, '-' and '_' only")
        if must_exist and explicit not in names:
            have = f"clusters here: {', '.join(names)}" if names else "no cluster here"
            raise ArgumentError(f"no cluster {explicit!r} in {workdir} ({have}); "
                                "`testbed up` creates one")
        return explicit
    if len(names) > 1:
        raise UsageError(f"several clusters in {workdir} ({', '.join(names)}); "
                         "choose one with --cluster NAME")
    return names[0] if names else None



def existing_cluster(workdir: str | os.PathLike[str] | None, cluster: str | None, *,
                     node: str | None = None, up: str = "testbed up") -> ClusterPaths:
    """The cluster a command about an existing cluster (or one of its nodes) means; with
    none there, an ArgumentError that says how to make one (``up``: the command)."""
    root = resolve_workdir(workdir, create=False)
    name = select_cluster(root, cluster)
    if name is None:
        what = f", so no node {node!r}" if node is not None else ""
        raise ArgumentError(f"no cluster in {root}{what}; bring one up with `{up}`")
    return ClusterPaths(root, name)
