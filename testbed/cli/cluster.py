"""``testbed up | status | attest | down``: clusters on any backend.

Parsing and rendering only: which backend a cluster runs on comes from its spec
(``backend:``, or ``up --backend``) and the lifecycle and backends decide the rest
(:mod:`testbed.cluster.lifecycle`, :mod:`testbed.backends`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attestation.files import atomic_write
from testbed.backends import backend_for, open_backend
from testbed.cli.exitcodes import EXIT_ENVIRONMENT, EXIT_OK, EXIT_REJECTED
from testbed.cli.render import emit, print_report
from testbed.cluster import lifecycle
from testbed.cluster.backend import ClusterBackend
from testbed.cluster.results import (
    AttestationRecord,
    AttestResult,
    DownResult,
    EnrollmentOutcome,
    NodeFacts,
    NodeStatus,
    UpResult,
)
from testbed.cluster.state import load_spec
from testbed.core.errors import ArgumentError, UsageError
from testbed.core.paths import (
    NAME_PATTERN,
    ClusterPaths,
    existing_cluster,
    resolve_workdir,
    select_cluster,
)
from testbed.core.progress import Progress
from testbed.qemu.backend import QemuBackend
from testbed.spec.cluster_spec import (
    BACKENDS,
    MAX_TPM_LATENCY_S,
    default_spec_path,
    load_cluster_spec,
    parse_duration,
    parse_tamper,
)
from testbed.tpm.quote_files import check_quote_directory, write_quote_files
from testbed.verifier.service import stop_verifiers

__all__ = ["register_cluster_commands"]


def register_cluster_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``up``, ``status``, ``attest``, ``reboot`` and ``down`` to the ``testbed`` subparsers."""
    p = sub.add_parser("up", help="bring a cluster of sim nodes or VMs up, register and "
                                  "attest every node (idempotent)",
                       description="Start every node of a cluster spec (sim: each a process with "
                                   "its own swtpm and measured boot; qemu: a VM with OVMF and a "
                                   "vTPM), in parallel, register their AKs and attest each "
                                   "against its policy. Exit 0: all attested; 1: a node was "
                                   "rejected (the failed check is named); 4: a node did not "
                                   "come up.")
    p.add_argument("spec", nargs="?", type=Path,
                   help="cluster spec YAML (default: the shipped example of the backend); "
                        "--cluster NAME runs it under another name")
    p.add_argument("--backend", choices=BACKENDS,
                   help="run the spec on this backend instead of its `backend:` (qemu: real "
                        "VMs that keep running until `testbed down`)")
    p.add_argument("--tamper", action="append", default=[], metavar="NODE=FIELD:VALUE",
                   help="boot NODE tampered, e.g. client=cmdline:'console=ttyS0 init=/bin/sh' "
                        "or server=kernel:content=evil (repeatable)")
    p.add_argument("--tpm-latency", metavar="DURATION",
                   help="put every sim node's swtpm behind the TPM latency model: each quote "
                        "(signing command) takes this long, e.g. 200ms or 0.2s, at most "
                        f"{MAX_TPM_LATENCY_S:g}s (a hardware TPM's pace; docs/protocol.md)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="nodes of a cluster: state, agent, last attestation")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("attest", help="quote a node with a fresh nonce and verify it",
                       description="Exit 0 if the node's evidence is accepted, 1 if rejected.")
    p.add_argument("node", help="node name")
    p.add_argument("--policy", type=Path, metavar="FILE",
                   help="reference policy (default: the node's policy from `up`)")
    p.add_argument("-o", "--output", type=Path, metavar="DIR",
                   help="also write the node's evidence as tpm2-tools files (quote.msg, "
                        "quote.sig, quote.pcrs, ak.pem, ...), evidence.json, eventlog.bin and "
                        "nonce.hex, for `testbed eventlog`, `policy create`, tpm2_checkquote")
    p.add_argument("--force", action="store_true",
                   help="with -o: replace the files of an earlier attestation or quote")
    p.set_defaults(func=cmd_attest)

    p = sub.add_parser("reboot", help="power-cycle a node's VM and attest it again (qemu)",
                       description="Power-cycle NODE's VM (the same domain and vTPM state, a "
                                   "fresh measured boot; a CryptoVM closes its store first), "
                                   "then bring the cluster up again: the node registers, "
                                   "attests and starts its service (a CryptoVM with a store "
                                   "disk unseals it and has its keys again). Exit codes as "
                                   "`up`; 3: no such node, or not a VM of this machine.")
    p.add_argument("node", help="node name")
    p.set_defaults(func=cmd_reboot)

    p = sub.add_parser("down", help="stop every node of a cluster; verify nothing is left")
    p.add_argument("--purge", action="store_true",
                   help="also remove TPM state, registry, policies and clock history")
    p.set_defaults(func=cmd_down)


@contextmanager
def _closing(backend: ClusterBackend) -> Iterator[ClusterBackend]:
    try:
        yield backend
    finally:
        backend.close()


# --- up -------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir)
    override = args.backend
    spec = load_cluster_spec(args.spec or default_spec_path(override or "sim"), backend=override)
    for text in args.tamper:
        node, change = parse_tamper(text)
        spec = spec.with_tamper(node, change)
    if args.tpm_latency is not None:
        spec = spec.with_tpm_latency(parse_duration(args.tpm_latency, "--tpm-latency",
                                                    MAX_TPM_LATENCY_S))
    if args.cluster is not None:  # the spec's cluster under another name (two side by side)
        if not NAME_PATTERN.fullmatch(args.cluster):
            raise UsageError(f"invalid cluster name {args.cluster!r}: lowercase letters, "
                             "digits, '-' and '_' only")
        spec = dataclasses.replace(spec, name=args.cluster)
    with _closing(backend_for(spec.backend, ClusterPaths(workdir, spec.name))) as backend:
        result = lifecycle.up(backend, spec, Progress(quiet=args.json))
    emit(args, result.to_dict(), lambda: _print_up(result))
    _print_problems(result)  # stderr, with --json too: stdout has the details
    if not result.ok:
        return EXIT_ENVIRONMENT
    return EXIT_REJECTED if result.rejected else EXIT_OK


def _print_up(result: UpResult) -> None:
    print(f"cluster {result.cluster} ({result.directory}): {result.backend}"
          + "".join(f", {label} {value}" for label, value in result.facts.summary_items()))
    print(f"  {'NODE':<12} {'ROLE':<9} {'ACTION':<8} {'ATTESTATION':<26} DETAILS")
    for n in result.nodes:
        tampered = f"  TAMPERED: {', '.join(n.tampered)}" if n.tampered else ""
        print(f"  {n.name:<12} {n.role:<9} {n.action:<8} {_verdict(n.attestation):<26} "
              f"{_items(n.facts)}{tampered}")
        if n.attestation is not None and not n.attestation.ok and n.attestation.detail:
            print(f"  {'':<12} {n.attestation.detail[:300]}")
        if n.service:
            print(f"  {'':<12} service: {n.service.summary()}")
        if n.enrollment is not None:
            print(f"  {'':<12} TLS: {_enrollment(n.enrollment)}")
        if n.note:
            print(f"  {'':<12} note: {n.note}")
    attested = sum(bool(n.attested) for n in result.nodes)
    print(f"  {attested}/{len(result.nodes)} attested in {result.seconds:.1f} s; the nodes "
          "keep running (`testbed status`, `testbed down`)")


def _print_problems(result: UpResult) -> None:
    for n in result.nodes:
        if n.action == "failed":
            print(f"testbed up: node {n.name} failed: {n.error}", file=sys.stderr)
            if n.log_tail:
                print(f"  last lines of {n.log_file}:", file=sys.stderr)
                for line in n.log_tail.splitlines():
                    print(f"    {line}", file=sys.stderr)
    for name in result.rejected:
        print(f"testbed up: node {name} was rejected by its attestation; see "
              f"`testbed attest {name}`", file=sys.stderr)


def _enrollment(enrollment: EnrollmentOutcome) -> str:
    """One line on a node's keyless-TLS enrollment with the cluster's CryptoVM."""
    if not enrollment.ok:
        return f"NOT enrolled with the CryptoVM: {enrollment.error}"
    certificate = enrollment.certificate or {}
    issuer = certificate.get("issuer") or (enrollment.ca or {}).get("issuer") or "?"
    expires = certificate.get("not_after") or "?"
    return (f"certificate from the CryptoVM (issuer {issuer}, until {expires}); "
            "the CA key never left the VSM")


def _verdict(record: AttestationRecord | None) -> str:
    if record is None:
        return "-"
    return "accepted" if record.ok else f"REJECTED ({record.failed_check})"


def _items(facts: NodeFacts) -> str:
    return ", ".join(f"{label} {value}" for label, value in facts.summary_items())


# --- status ---------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir, create=False)
    cluster = select_cluster(workdir, args.cluster)
    if cluster is None:
        emit(args, {"workdir": str(workdir), "cluster": None, "nodes": []},
             lambda: print(f"no cluster in {workdir} (`testbed up` starts one)"))
        return EXIT_OK
    with _closing(open_backend(ClusterPaths(workdir, cluster))) as backend:
        nodes = backend.status()
    emit(args, {"workdir": str(workdir), "cluster": cluster, "backend": backend.name,
                "nodes": [n.to_dict() for n in nodes]},
         lambda: _print_status(workdir, cluster, backend.name, nodes))
    return EXIT_OK


def _print_status(workdir: Path, cluster: str, backend: str, nodes: list[NodeStatus]) -> None:
    print(f"cluster {cluster} ({backend}) in {workdir}")
    print(f"  {'NODE':<12} {'ROLE':<9} {'STATE':<12} {'AGENT':<13} {'LAST ATTESTATION':<44} "
          "DETAILS")
    for n in nodes:
        print(f"  {n.name:<12} {n.role:<9} {n.state:<12} {n.agent or '-':<13} "
              f"{_last(n.last_attestation):<44} {_items(n.facts)}")
        if n.reason:
            print(f"  {'':<12} reason: {n.reason}")
        if n.service:
            print(f"  {'':<12} service: {n.service.summary()}")
        if n.tampered:
            print(f"  {'':<12} TAMPERED boot ({', '.join(n.tampered)} replaced in the spec's "
                  "boot chain)")


def _last(last: AttestationRecord | None) -> str:
    if last is None:
        return "-"
    return f"{_verdict(last)} at {last.time}"


# --- attest ---------------------------------------------------------------------------------


def cmd_attest(args: argparse.Namespace) -> int:
    if args.output is not None:  # before the node is quoted: a bad path costs no quote
        check_quote_directory(args.output, force=args.force)
    paths = existing_cluster(args.workdir, args.cluster, node=args.node)
    cluster = paths.name
    with _closing(open_backend(paths)) as backend:
        result = lifecycle.attest(backend, args.node, args.policy)
    written = _write_evidence(args.output, result) if args.output else []
    title = f"node {args.node} (cluster {cluster}, policy {result.policy!r})"
    emit(args, {**result.to_dict(), "written": [str(p) for p in written]},
         lambda: _print_attest(result, title, written))
    return EXIT_OK if result.report.ok else EXIT_REJECTED


def cmd_reboot(args: argparse.Namespace) -> int:
    paths = existing_cluster(args.workdir, args.cluster, node=args.node)
    spec = load_spec(paths)
    spec.node(args.node)  # a clear error for a node the cluster does not have
    progress = Progress(quiet=args.json)
    with _closing(open_backend(paths)) as backend:
        if not isinstance(backend, QemuBackend):
            raise ArgumentError(f"node {args.node} is a sim node: only VMs (qemu backend) "
                                "reboot; `testbed down` and `testbed up` restart sim nodes")
        with progress.step(f"rebooting {args.node}"):
            seconds = backend.reboot(args.node)
        result = lifecycle.up(backend, spec, progress)
    emit(args, {"node": args.node, "reboot_s": round(seconds, 3), "up": result.to_dict()},
         lambda: _print_up(result))
    _print_problems(result)
    if not result.ok:
        return EXIT_ENVIRONMENT
    return EXIT_REJECTED if result.rejected else EXIT_OK


def _write_evidence(directory: Path, result: AttestResult) -> list[Path]:
    """The evidence the node sent, as the files tpm2-tools and `testbed` commands read."""
    evidence = result.evidence
    if evidence is None:
        return []
    written = write_quote_files(directory, evidence)
    extras = {"nonce.hex": (result.nonce.hex() + "\n").encode()}
    if evidence.event_log is not None:
        extras["eventlog.bin"] = evidence.event_log
    for name, data in extras.items():
        atomic_write(directory / name, data, mode=0o644)  # public evidence, like the rest
        written.append(directory / name)
    return written


def _print_attest(result: AttestResult, title: str, written: list[Path]) -> None:
    print_report(result.report, title)
    if written:
        print(f"evidence written to {written[0].parent}: {', '.join(p.name for p in written)}")


# --- down -----------------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir, create=False)
    cluster = select_cluster(workdir, args.cluster, must_exist=False)
    if cluster is None:
        emit(args, {"ok": True, "cluster": None, "nodes": []},
             lambda: print("no cluster to stop"))
        return EXIT_OK
    paths = ClusterPaths(workdir, cluster)
    verifiers = stop_verifiers(paths)  # first: a verifier would find every node gone
    with _closing(open_backend(paths)) as backend:
        result = backend.down(purge=args.purge)
    emit(args, {**result.to_dict(), "verifiers_stopped": sorted(
        name for name, signal in verifiers.items() if signal is not None)},
         lambda: _print_down(result, verifiers))
    return EXIT_OK if result.ok else EXIT_ENVIRONMENT


def _print_down(result: DownResult, verifiers: dict[str, str | None]) -> None:
    for name, signal in sorted(verifiers.items()):
        if signal is not None:
            print(f"verifier {name}: stopped ({signal})")
    for n in result.nodes:
        how = f"stopped ({n.stopped_by})" if n.stopped_by else "was not running"
        extra = ", its swtpm stopped from its pid file" if n.swtpm_stopped else ""
        print(f"{n.name}: {how}{extra}")
    if result.leftovers:
        pids = ", ".join(f"{p.kind} {p.pid} ({p.node})" for p in result.leftovers)
        print(f"testbed down: still running after SIGKILL: {pids}", file=sys.stderr)
        return
    print(f"cluster {result.cluster}: no node, QEMU or swtpm process left (checked /proc)")
    if result.daemons is not None:
        print(_daemons(result))
    if result.purged:
        print("removed all cluster state (TPM state, registry, policies, clock history)")
    else:
        print("kept TPM state, registry, policies and clock history for the next `up` "
              "(--purge removes them)")


def _daemons(result: DownResult) -> str:
    daemons = result.daemons
    assert daemons is not None
    if daemons.stopped:
        return f"stopped {', '.join(daemons.stopped)} (started by this work directory)"
    if daemons.kept_for:
        return ("libvirtd/virtlogd kept running: other domains remain "
                f"({', '.join(daemons.kept_for)})")
    return "libvirtd/virtlogd were not started by this work directory: left alone"
