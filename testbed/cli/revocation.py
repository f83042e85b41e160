"""``testbed revoke NODE`` and ``testbed reinstate NODE``: the verifier's signed decisions.

Both sign a decision with the verifier's Ed25519 key and deliver it to every running
node (docs/runtime.md). ``revoke`` is what the verifier does on a failed attestation,
by hand; ``reinstate`` is the only way back: an explicit policy decision, never automatic.
"""

from __future__ import annotations

import argparse

from testbed.cli.exitcodes import EXIT_OK
from testbed.cli.render import emit
from testbed.cli.tamper import cluster_paths
from testbed.cluster.state import load_spec
from testbed.core.paths import ClusterPaths
from testbed.verifier.hosts import host_of, validate_host_row
from testbed.verifier.revocation import reinstate, revoke

__all__ = ["register_revocation_commands"]


def register_revocation_commands(
        sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("revoke", help="revoke a node: its peers close its channels, the "
                       "CryptoVM stops serving it")
    p.add_argument("node", help="node name, or host:NAME for a hypervisor host")
    p.add_argument("--check", default="operator", help="the failed check to record")
    p.add_argument("--reason", default="revoked by the operator", help="why, in words")
    p.set_defaults(func=cmd_revoke)
    p = sub.add_parser("reinstate", help="trust a revoked node again (an explicit policy "
                       "decision; it must still pass its attestation)")
    p.add_argument("node", help="node name, or host:NAME for a hypervisor host")
    p.add_argument("--reason", default="reinstated by the operator", help="why, in words")
    p.set_defaults(func=cmd_reinstate)


def cmd_revoke(args: argparse.Namespace) -> int:
    paths = cluster_paths(args)
    _check_target(paths, args.node)
    event, delivered = revoke(paths, args.node, args.check, args.reason)
    emit(args, {"decision": "revoked", "node": args.node, "sequence": event.sequence,
                "time": event.time, "delivered": delivered},
         lambda: _print("revoked", args.node, event.sequence, delivered))
    return EXIT_OK


def cmd_reinstate(args: argparse.Namespace) -> int:
    paths = cluster_paths(args)
    _check_target(paths, args.node)
    decision, delivered = reinstate(paths, args.node, args.reason)
    emit(args, {"decision": "reinstated", "node": args.node, "sequence": decision.sequence,
                "time": decision.time, "delivered": delivered},
         lambda: _print("reinstated", args.node, decision.sequence, delivered))
    return EXIT_OK


def _check_target(paths: ClusterPaths, target: str) -> None:
    """A node of the cluster, or ``host:NAME`` (ArgumentError, exit 3, otherwise)."""
    if host_of(target) is None:
        load_spec(paths).node(target)
    else:
        validate_host_row(target)


def _print(what: str, node: str, sequence: int, delivered: dict[str, str]) -> None:
    print(f"node {node} {what} (decision {sequence}, signed by the verifier key)")
    for peer, outcome in delivered.items():
        print(f"  {peer:<16} {outcome}")
