"""A swarm process: the agents of many sim nodes in one process.

``python -m testbed.sim.swarm --workdir W --cluster C --nodes a-000,a-001,...`` is what
``testbed up`` starts for the nodes of a spec's ``swarm: N`` entry, at most
:data:`AGENTS_PER_PROCESS` to a process (a bound on threads and file descriptors:
each node holds its agent socket, its TPM connection and its swtpm's pipes). Every node
is still a node of its own: its own swtpm (a process of its own, provisioned with its
own EK and EK certificate), its own AK, measured boot and ima-ng runtime log, its own
``run/`` directory with ``agent.sock``, ``node.json`` and ``node.pid`` (holding this
process's pid), speaking the same agent protocol. What is shared is the Python
process: one interpreter instead of one per node (about 25 MB each).

Nodes start :data:`START_WORKERS` at a time (provisioning a TPM holds the CA's lock, so
first starts are serial there; swtpm starts and measured boots overlap). A node whose
start fails is recorded ``failed`` in its node.json and the others go on. An agent
``shutdown`` stops that node only; SIGTERM/SIGINT stop them all; the process exits
when no node is left running.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from attestation.errors import TestbedError
from attestation.files import atomic_write, private_dir
from testbed.cluster.state import load_spec
from testbed.core.paths import NAME_PATTERN, ClusterPaths
from testbed.sim.node import Node

__all__ = ["START_WORKERS", "Swarm", "main"]

START_WORKERS = 8  # nodes starting (or stopping) at once in one swarm process
_WATCH_INTERVAL_S = 0.5

log = logging.getLogger("testbed.sim.swarm")


class Swarm:
    """The nodes of one swarm process; :meth:`run` until they all stopped."""

    def __init__(self, paths: ClusterPaths, names: Sequence[str]) -> None:
        spec = load_spec(paths)  # parsed once here, not once per node
        self.nodes = [Node(paths, name, spec) for name in names]
        self.stopping = threading.Event()

    def run(self) -> int:
        with ThreadPoolExecutor(START_WORKERS, thread_name_prefix="start") as pool:
            started = list(pool.map(self._start, self.nodes))
        live = [node for node, ok in zip(self.nodes, started, strict=True) if ok]
        log.info("%d of %d nodes ready", len(live), len(self.nodes))
        while live and not self.stopping.wait(_WATCH_INTERVAL_S):
            gone = [node for node in live if not node.alive()]
            for node in gone:
                node.stop_hosted(node.stop_reason or "stopped")
            live = [node for node in live if node not in gone]
        self._stop_all(live, "swarm stopping")
        return 1 if any(node.failed for node in self.nodes) else 0

    def _start(self, node: Node) -> bool:
        if self.stopping.is_set():  # SIGTERM while others were starting: do not start
            node.stop_hosted("signal while starting")
            return False
        return node.start_hosted()

    def _stop_all(self, nodes: list[Node], reason: str) -> None:
        with ThreadPoolExecutor(START_WORKERS, thread_name_prefix="stop") as pool:
            list(pool.map(lambda node: node.stop_hosted(reason), nodes))


def _raise_fd_limit() -> None:
    """The soft descriptor limit up to the hard one: each node holds a few descriptors
    and up to 16 agent connections, and a client flooding one node's agent must not
    take the descriptors its siblings need (a soft limit of 1024 is common)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m testbed.sim.swarm",
                                     description="many sim nodes' agents in one process "
                                                 "(started by `testbed up`)")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--nodes", required=True, help="comma-separated node names")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    os.umask(0o077)
    _raise_fd_limit()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s swarm[%(process)d] %(threadName)s %(levelname)s "
                               "%(message)s")
    names = args.nodes.split(",")
    if not all(NAME_PATTERN.fullmatch(name) for name in names):
        log.error("cannot start: --nodes must name nodes (%s)", args.nodes[:80])
        return 2
    try:
        paths = ClusterPaths(args.workdir, args.cluster)
        for name in names:  # first thing: `down` finds every node's process even now
            run = paths.node(name).run
            private_dir(run)
            atomic_write(paths.node(name).pid_file, f"{os.getpid()}\n".encode())
        swarm = Swarm(paths, names)
    except (TestbedError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: swarm.stopping.set())
    return swarm.run()


if __name__ == "__main__":
    sys.exit(main())
