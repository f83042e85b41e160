"""The sim backend's processes: node processes and their swtpms, found again by pid
file or by their command line in /proc, started detached and stopped by PID.

A node is ``python -m testbed.sim.node --workdir W --cluster C --node N``, or one of the
nodes of a swarm process, ``python -m testbed.sim.swarm ... --nodes N1,N2,...``
(:mod:`testbed.sim.swarm`); its swtpm is recognised by its
``--pid file=<cluster>/nodes/<node>/run/swtpm.pid`` argument. All are found even when a
crashed ``up`` never wrote their pid files.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from attestation.files import atomic_write, private_dir
from testbed.cluster.backend import NodeFailed
from testbed.cluster.results import OwnedProcess
from testbed.core.errors import StateError
from testbed.core.paths import NAME_PATTERN, ClusterPaths
from testbed.core.processes import (
    StopSignal,
    launch_detached,
    process_argv,
    process_state,
    read_pid,
    reap,
    scan_processes,
    terminate,
    wait_gone,
)
from testbed.sim.node_info import NodeInfo
from testbed.tpm.swtpm import Swtpm

__all__ = [
    "AGENTS_PER_PROCESS",
    "NODE_MODULE",
    "SWARM_MODULE",
    "NodeProcessState",
    "cluster_processes",
    "ensure_exited",
    "inspect_node",
    "launch_node",
    "launch_swarm",
    "prepare_run_dir",
    "stop_process",
    "swarm_of",
    "wait_ready",
]

NODE_MODULE = "testbed.sim.node"
SWARM_MODULE = "testbed.sim.swarm"
AGENTS_PER_PROCESS = 128  # swarm nodes per process: bounds its threads and descriptors
READY_TIMEOUT_S = 60.0
SWARM_READY_S_PER_NODE = 1.5  # more for swarms: first starts provision TPMs one by one
STOP_TIMEOUT_S = 5.0
SWARM_STOP_TIMEOUT_S = 30.0  # a swarm stops its nodes 8 at a time
_POLL_S = 0.02
SWARM_POLL_S = 0.5  # hundreds of nodes polled by up: each node.json less often
Kind = Literal["node", "swtpm", "swarm"]


def node_command(paths: ClusterPaths, node: str) -> list[str]:
    return [sys.executable, "-m", NODE_MODULE, "--workdir", str(paths.workdir),
            "--cluster", paths.name, "--node", node]


def swarm_command(paths: ClusterPaths, nodes: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", SWARM_MODULE, "--workdir", str(paths.workdir),
            "--cluster", paths.name, "--nodes", ",".join(nodes)]


def swarm_members(argv: list[str], paths: ClusterPaths) -> list[str] | None:
    """The nodes a swarm process of this cluster hosts, from its command line."""
    if argv[1:3] != ["-m", SWARM_MODULE] or len(argv) != 9:
        return None
    opts = dict(zip(argv[3::2], argv[4::2], strict=True))
    if opts.get("--workdir") != str(paths.workdir) or opts.get("--cluster") != paths.name:
        return None
    members = opts.get("--nodes", "").split(",")
    return members if all(NAME_PATTERN.fullmatch(m) for m in members) else None


def _classify(argv: list[str], paths: ClusterPaths) -> tuple[Kind, str] | None:
    """(kind, node) if ``argv`` is one of this cluster's node, swarm (named by its first
    node) or swtpm processes."""
    if not argv:
        return None
    if (members := swarm_members(argv, paths)) is not None:
        return "swarm", members[0]
    if argv[1:3] == ["-m", NODE_MODULE] and len(argv) == 9:
        opts = dict(zip(argv[3::2], argv[4::2], strict=True))
        if (opts.get("--workdir") == str(paths.workdir) and opts.get("--cluster") == paths.name
                and NAME_PATTERN.fullmatch(opts.get("--node", ""))):
            return "node", opts["--node"]
    if Path(argv[0]).name == "swtpm":
        prefix = f"file={paths.root}/nodes/"
        for arg in argv:
            if arg.startswith(prefix) and arg.endswith("/run/swtpm.pid"):
                node = arg[len(prefix):-len("/run/swtpm.pid")]
                if NAME_PATTERN.fullmatch(node):
                    return "swtpm", node
    return None


def cluster_processes(paths: ClusterPaths) -> list[OwnedProcess]:
    """Every live node and swtpm process of this cluster, found by scanning /proc."""
    found = [OwnedProcess(pid, kind, node)
             for pid, (kind, node) in scan_processes(lambda argv: _classify(argv, paths))]
    return sorted(found, key=lambda p: (p.node, p.kind, p.pid))


def _is_ours(pid: int, paths: ClusterPaths, kind: Kind, node: str) -> bool:
    """Whether ``pid`` is ``node``'s process of ``kind``; a swarm process hosting
    ``node`` is its "node" process too."""
    argv = process_argv(pid)
    if argv is None:
        return False
    if kind == "node" and node in (swarm_members(argv, paths) or ()):
        return True
    return _classify(argv, paths) == (kind, node)


def swarm_of(paths: ClusterPaths, pid: int) -> list[str] | None:
    """The nodes ``pid`` hosts if it is a swarm process of this cluster."""
    argv = process_argv(pid)
    return swarm_members(argv, paths) if argv else None


def hosting_swarm(paths: ClusterPaths, node: str) -> list[str] | None:
    """The nodes of the swarm process ``node``'s pid file names, if that is a live
    swarm process hosting ``node``."""
    with contextlib.suppress(StateError):
        pid = read_pid(paths.node(node).pid_file)
        members = swarm_of(paths, pid) if pid is not None else None
        if members is not None and node in members:
            return members
    return None


def stop_process(paths: ClusterPaths, pid: int, kind: Kind, node: str) -> StopSignal | None:
    """SIGTERM, then SIGKILL; only while ``pid`` is still verifiably this node's ``kind``."""
    return terminate(pid, lambda: _is_ours(pid, paths, kind, node), STOP_TIMEOUT_S)


def wait_node_gone(paths: ClusterPaths, node: str, pid: int, timeout: float) -> bool:
    return wait_gone(pid, lambda: _is_ours(pid, paths, "node", node), timeout)


def ensure_exited(paths: ClusterPaths, node: str, pid: int) -> None:
    """Give a node that is on its way out time to stop its swtpm, then signal it."""
    if not wait_node_gone(paths, node, pid, STOP_TIMEOUT_S):
        stop_process(paths, pid, "node", node)


# --- a node's state ------------------------------------------------------------------------

NodeState = Literal["running", "starting", "stopping", "failed", "crashed", "unresponsive",
                    "stopped", "down"]


@dataclass(frozen=True)
class NodeProcessState:
    name: str
    state: NodeState
    pid: int | None
    info: NodeInfo | None = None  # node.json, as the node wrote it
    reason: str | None = None  # why a node is failed, crashed or unresponsive


def node_pid(paths: ClusterPaths, node: str) -> int | None:
    """The node's live pid: from its pid file, else from a /proc scan."""
    pid = None
    with contextlib.suppress(StateError):  # a damaged pid file: the scan finds the node
        pid = read_pid(paths.node(node).pid_file)
    if pid is not None and _is_ours(pid, paths, "node", node):
        return pid
    return next((p.pid for p in cluster_processes(paths)
                 if p.kind == "node" and p.node == node), None)


def read_node_info(paths: ClusterPaths, node: str) -> NodeInfo | None:
    """node.json, None if there is none; a damaged one counts as none (the node's process
    is still found by its pid file or in /proc, and a restart rewrites the file)."""
    try:
        return NodeInfo.load(paths.node(node).info)
    except StateError:
        return None


def inspect_node(paths: ClusterPaths, node: str) -> NodeProcessState:
    """What the node's pid file, node.json and /proc say, with the reason for any failure."""
    info = read_node_info(paths, node)
    pid = node_pid(paths, node)
    log = paths.node(node).log
    if pid is not None:
        if info is None or info.pid != pid:
            return NodeProcessState(node, "starting", pid, info)
        if info.state == "failed":
            return NodeProcessState(node, "failed", pid, info, info.error or f"see {log}")
        if info.state == "stopped" and swarm_of(paths, pid) is not None:
            # One node of a swarm stopped (an agent shutdown): its process hosts others.
            return NodeProcessState(node, "stopped", None, info)
        if info.state != "ready":
            return NodeProcessState(node, "stopping" if info.state == "stopped" else "starting",
                                    pid, info)
        stuck = _stuck(pid, "node") or _swtpm_problem(info)
        if stuck is not None:
            state: NodeState = "failed" if "exited" in stuck else "unresponsive"
            return NodeProcessState(node, state, pid, info, stuck)
        return NodeProcessState(node, "running", pid, info)
    if info is None:
        return NodeProcessState(node, "down", None, None)
    if info.state == "failed":
        return NodeProcessState(node, "failed", None, info, info.error or f"see {log}")
    if info.state == "stopped":
        return NodeProcessState(node, "stopped", None, info)
    # node.json still says starting or ready, yet the process is gone: nobody stopped it.
    return NodeProcessState(node, "crashed", None, info,
                            f"node process {info.pid} ended without a clean stop (killed, or "
                            f"it crashed: see {log}); `testbed up` restarts it")


def _stuck(pid: int, what: str) -> str | None:
    if process_state(pid) in ("T", "t"):
        return f"its {what} process {pid} is stopped (SIGSTOP or a debugger): `kill -CONT {pid}`"
    return None


def _swtpm_problem(info: NodeInfo) -> str | None:
    pid = info.swtpm_pid
    if pid is None:
        return None
    state = process_state(pid)
    if state is None or state == "Z":
        return f"its swtpm (pid {pid}) exited; `testbed up` restarts the node"
    return _stuck(pid, "swtpm")


# --- starting ----------------------------------------------------------------------------


def launch_node(paths: ClusterPaths, node: str) -> int:
    """Start a node detached (it survives the CLI, which never reaps it); return its pid.

    The pid file is written before anyone waits on readiness (the node writes it too,
    first thing), so a later `down` finds the node even if this CLI dies now.
    """
    node_paths = paths.node(node)
    # cwd: `python -m` puts it first on sys.path; the private run dir holds no code.
    pid = launch_detached(node_command(paths, node), node_paths.log, cwd=node_paths.run)
    atomic_write(node_paths.pid_file, f"{pid}\n".encode())
    return pid


def launch_swarm(paths: ClusterPaths, nodes: Sequence[str]) -> int:
    """Start a swarm process hosting ``nodes`` detached; every node's pid file names it."""
    log = paths.swarm_log(nodes[0])
    private_dir(log.parent)
    pid = launch_detached(swarm_command(paths, nodes), log, cwd=log.parent)
    for node in nodes:
        atomic_write(paths.node(node).pid_file, f"{pid}\n".encode())
    return pid


def prepare_run_dir(paths: ClusterPaths, node: str,
                    processes: Sequence[OwnedProcess] | None = None) -> None:
    """Before a (re)start: stop a leftover swtpm and drop the previous run's files.
    ``processes``: the cluster's processes when the caller scanned /proc already (a
    swarm's hundreds of nodes share one scan)."""
    node_paths = paths.node(node)
    with contextlib.suppress(StateError):  # a corrupt pid file: the swtpm is found by scan
        Swtpm.stop_pidfile(node_paths.swtpm_pid)
    for proc in cluster_processes(paths) if processes is None else processes:
        if proc.node == node and proc.kind == "swtpm":
            stop_process(paths, proc.pid, "swtpm", node)
    if node_paths.run.exists():
        shutil.rmtree(node_paths.run)
    private_dir(node_paths.run)


def wait_ready(paths: ClusterPaths, node: str, pid: int, deadline: float,
               poll: float = _POLL_S) -> NodeInfo:
    """node.json once the node says ``ready``; :class:`NodeFailed` if it never will."""
    while True:
        info = read_node_info(paths, node)
        if info is not None and info.pid == pid:
            if info.state == "ready":
                return info
            if info.state == "failed":
                ensure_exited(paths, node, pid)  # it is stopping its swtpm and exiting
                raise NodeFailed(info.error or "node failed")
        if not _is_ours(pid, paths, "node", node):
            reap(pid)
            raise NodeFailed("the node process exited before becoming ready")
        if time.monotonic() > deadline:
            stop_process(paths, pid, "node", node)
            raise NodeFailed("not ready in time; stopped it")
        time.sleep(poll)
