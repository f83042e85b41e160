"""``testbed evidence replay [--since TIME]``: re-verify the cluster's evidence log offline."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from attestation.evidence import Evidence
from attestation.evidence_log import ReplayResult, replay
from attestation.registrar import AkTrust
from testbed.cli.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.cli.render import emit
from testbed.cluster.state import load_registry
from testbed.cluster.verification import evidence_dir
from testbed.core.errors import ArgumentError, StateError
from testbed.core.paths import ClusterPaths, resolve_workdir, select_cluster
from trusted_passages.batch import BatchProof, batch_qualifying_data

__all__ = ["register_evidence_commands"]


def register_evidence_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                               ) -> None:
    evidence = sub.add_parser("evidence", help="the cluster's tamper-evident evidence log")
    esub = evidence.add_subparsers(dest="evidence_command", metavar="ACTION", required=True)
    p = esub.add_parser(
        "replay", help="check the log's hash chain and signed heads and re-verify every entry "
                       "with the policy it was verified with (exit 1 on tampering)",
        description="Walks the whole chain (a removed or altered entry breaks it), checks the "
                    "signed heads, and re-verifies each entry from --since on against the "
                    "cluster's AK registry and the recorded policy; exit 1 if anything was "
                    "tampered with or a verdict differs.")
    p.add_argument("--since", type=_time, metavar="TIME",
                   help="re-verify only entries from this ISO 8601 time on (UTC if no zone); "
                        "the chain is always checked whole")
    p.set_defaults(func=cmd_evidence_replay)


def _time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time, e.g. "
                                         "2026-12-05T06:00:00Z") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def cmd_evidence_replay(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir, create=False)
    cluster = select_cluster(workdir, args.cluster)
    if cluster is None:
        raise ArgumentError(f"no cluster in {workdir} (`testbed up` starts one)")
    paths = ClusterPaths(workdir, cluster)
    directory = evidence_dir(paths)
    if not directory.is_dir():
        raise StateError(f"cluster {cluster} has no evidence log yet (`testbed attest` "
                         "writes one)")
    registry = load_registry(paths)

    def trust_for(node: str, _: Evidence) -> AkTrust:
        return registry.for_node(node)

    result = replay(directory, trust_for=trust_for, since=args.since, batch_root=_batch_root)
    emit(args, {"cluster": cluster, "log": str(directory), **result.to_dict()},
         lambda: _print(result, directory))
    return EXIT_OK if result.ok else EXIT_REJECTED


def _batch_root(nonce: bytes, batch: object) -> bytes:
    """A batched entry's quoted value: the root the nonce's recorded path leads to."""
    return batch_qualifying_data(BatchProof.from_dict(batch).root(nonce))


def _print(result: ReplayResult, directory: Path) -> None:
    replayed = sum(e.replayed is not None for e in result.entries)
    print(f"evidence log {directory}: {len(result.entries)} entries, {replayed} re-verified, "
          f"{result.heads} signed head(s) verified")
    for entry in result.entries:
        if entry.replayed is None:
            continue
        failure = entry.replayed.failure
        verdict = "accepted" if entry.replayed.ok else \
            f"rejected ({failure.name if failure else 'no check ran'})"
        mark = "ok  " if entry.agrees else "DIFF"
        print(f"  [{mark}] #{entry.seq:<5} {entry.time}  {entry.node:<16} {verdict}")
    for problem in result.problems:
        print(f"  TAMPERED: {problem}")
    print("INTACT: every entry re-verifies as recorded" if result.ok else
          "NOT INTACT: see above")
