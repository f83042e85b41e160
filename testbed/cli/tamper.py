"""``testbed tamper NODE --runtime PATH``: a running node executes a file (docs/runtime.md).

The node measures it like Linux IMA does (PCR 10 extended, an ima-ng line appended to its
runtime log): unless its runtime policy allows that path and digest, the node's next
attestation fails the ``runtime`` check. Both backends: a sim node's agent, or a qemu VM's
guest agent (which extends the vTPM's PCR 10); the backend gives the node's agent.
"""

from __future__ import annotations

import argparse
from typing import Any

from attestation.encoding import b64encode
from testbed.backends import open_backend
from testbed.cli.exitcodes import EXIT_OK
from testbed.cli.render import emit
from testbed.cluster.state import load_spec
from testbed.core.errors import ArgumentError
from testbed.core.paths import ClusterPaths, resolve_workdir, select_cluster

__all__ = ["register_tamper_commands"]


def register_tamper_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tamper", help="tamper with a running node: make it execute a file",
                       description="The node measures the file into PCR 10 and its ima-ng "
                       "runtime log; `testbed attest NODE` then judges it (check `runtime`).")
    p.add_argument("node", help="node name (a running sim node or qemu VM)")
    p.add_argument("--runtime", required=True, metavar="PATH",
                   help="the path of the file the node executes, e.g. /tmp/payload")
    p.add_argument("--content", metavar="TEXT",
                   help="the file's content (default: 'unlisted binary PATH')")
    p.set_defaults(func=cmd_tamper)


def cmd_tamper(args: argparse.Namespace) -> int:
    paths = cluster_paths(args)
    load_spec(paths).node(args.node)  # a clear error for a node the cluster does not have
    content = (args.content if args.content is not None
               else f"unlisted binary {args.runtime}").encode()
    backend = open_backend(paths)
    try:
        entry = backend.agent(args.node).call(
            {"op": "runtime_measure", "path": args.runtime, "content": b64encode(content)})
    finally:
        backend.close()
    emit(args, {"node": args.node, "executed": entry}, lambda: _print(args.node, entry))
    return EXIT_OK


def _print(node: str, entry: dict[str, Any]) -> None:
    print(f"node {node} executed {entry.get('path')} ({entry.get('digest')}); measured into "
          f"PCR 10 at runtime log offset {entry.get('offset')}")
    print(f"`testbed attest {node}` judges it against the node's runtime policy")


def cluster_paths(args: argparse.Namespace) -> ClusterPaths:
    workdir = resolve_workdir(args.workdir, create=False)
    cluster = select_cluster(workdir, args.cluster)
    if cluster is None:
        raise ArgumentError(f"no cluster in {workdir}; bring one up with `testbed up`")
    return ClusterPaths(workdir, cluster)
