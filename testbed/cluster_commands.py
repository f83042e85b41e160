"""CLI handlers for the cluster commands: ``testbed up | status | attest | down``.

Each command works on sim clusters (:mod:`testbed.sim`) and on qemu clusters of
real VMs (:mod:`testbed.qemu.cluster`); which one a cluster is comes from its
spec (``backend:``), or ``testbed up --backend``.

Wiring: ``testbed.cli.build_parser`` calls :func:`register_cluster_commands` with
its subparsers object. Until then (and for development), the same commands run
as ``python -m testbed.cluster_commands [--workdir DIR] COMMAND ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed import sim
from testbed.cluster import (
    BACKENDS,
    ClusterSpec,
    default_spec_path,
    load_cluster_spec,
    parse_tamper,
)
from testbed.errors import StateError
from testbed.exitcodes import EXIT_ENVIRONMENT, EXIT_OK, EXIT_REJECTED
from testbed.output import emit, print_report
from testbed.progress import Progress
from testbed.workdir import resolve_workdir

if TYPE_CHECKING:
    from testbed.qemu import cluster as qemu_cluster

__all__ = ["cmd_attest", "cmd_down", "cmd_status", "cmd_up", "register_cluster_commands"]


# ==== register_cluster_commands: the one entry point testbed/cli.py calls =====================


def register_cluster_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``up``, ``status``, ``attest`` and ``down`` to the ``testbed`` subparsers.

    The handlers read ``args.workdir`` (the top-level ``--workdir`` option).
    """
    p = sub.add_parser("up", help="bring a cluster of sim nodes or VMs up (idempotent)",
                       description="Start every node of a cluster spec (sim: each a process with "
                                   "its own swtpm and measured boot; qemu: a VM with OVMF and a "
                                   "vTPM, booted in parallel, then attested) and register their "
                                   "AKs.")
    p.add_argument("spec", nargs="?", type=Path,
                   help="cluster spec YAML (default: the shipped 3-node example of the backend)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="run the spec on this backend instead of its `backend:` (qemu: real "
                        "VMs that keep running until `testbed down`)")
    p.add_argument("--tamper", action="append", default=[], metavar="NODE=FIELD:VALUE",
                   help="boot NODE tampered, e.g. client=cmdline:'console=ttyS0 init=/bin/sh' "
                        "or server=kernel:content=evil (repeatable)")
    _add_json(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="nodes of a cluster: state, pids, last attestation")
    _add_cluster(p)
    _add_json(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("attest", help="quote a node with a fresh nonce and verify it",
                       description="Exit 0 if the node's evidence is accepted, 1 if rejected.")
    p.add_argument("node", help="node name")
    _add_cluster(p)
    p.add_argument("--policy", type=Path, metavar="FILE",
                   help="reference policy (default: the node's policy from `up`)")
    _add_json(p)
    p.set_defaults(func=cmd_attest)

    p = sub.add_parser("down", help="stop every node and swtpm of a cluster; verify none is left")
    _add_cluster(p)
    p.add_argument("--purge", action="store_true",
                   help="also remove TPM state, registry, policies and clock history")
    _add_json(p)
    p.set_defaults(func=cmd_down)


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_cluster(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", metavar="NAME",
                        help="cluster name (default: the only cluster in the work directory)")


# --- up ---------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir)
    backend = getattr(args, "backend", None)
    spec = load_cluster_spec(args.spec or default_spec_path(backend or "sim"), backend=backend)
    for text in args.tamper:
        node, override = parse_tamper(text)
        spec = spec.with_tamper(node, override)
    if spec.backend == "qemu":
        return _qemu_up(args, workdir, spec)
    result = sim.up(workdir, spec, progress=Progress(quiet=args.json))
    emit(args, result.to_dict(), lambda: _print_up(result))
    if not result.ok and args.json:
        _print_failures(result)  # stderr: the JSON on stdout already has the details
    return EXIT_OK if result.ok else EXIT_ENVIRONMENT


def _qemu_up(args: argparse.Namespace, workdir: Path, spec: ClusterSpec) -> int:
    from testbed.qemu import cluster as qemu_cluster

    result = qemu_cluster.up(workdir, spec, progress=Progress(quiet=args.json))
    emit(args, result.to_dict(), lambda: _print_qemu_up(result))
    if args.json:
        _print_qemu_failures(result)  # stderr: the JSON on stdout already has the details
    if not result.ok:
        return EXIT_ENVIRONMENT
    return EXIT_REJECTED if result.rejected else EXIT_OK


def _print_qemu_up(result: qemu_cluster.QemuUpResult) -> None:
    print(f"cluster {result.cluster} ({result.directory}): qemu, {result.accel} "
          f"({result.accel_reason}), image {result.image[:16]}")
    print(f"  {'NODE':<12} {'ROLE':<9} {'ACTION':<8} {'DOMAIN':<28} {'PORT':>5} {'BOOT':>6}  "
          "ATTESTATION")
    for n in result.nodes:
        boot = f"{n.boot_seconds:.1f}s" if n.boot_seconds is not None else "-"
        verdict = {True: "accepted", False: f"REJECTED ({n.failed_check})", None: "-"}[n.attested]
        tampered = f"  TAMPERED: {', '.join(n.tampered)}" if n.tampered else ""
        print(f"  {n.name:<12} {n.role:<9} {n.action:<8} {n.domain:<28} {n.agent_port or '-'!s:>5} "
              f"{boot:>6}  {verdict}{tampered}")
        if n.detail and not n.attested:
            print(f"  {'':<12} {n.detail[:300]}")
        if n.note:
            print(f"  {'':<12} note: {n.note}")
    print(f"  {sum(bool(n.attested) for n in result.nodes)}/{len(result.nodes)} attested, "
          f"{result.vm_seconds:.1f} s from the first define ({result.seconds:.1f} s in all); "
          "the VMs keep running (`testbed status`, `testbed down`)")
    _print_qemu_failures(result)


def _print_qemu_failures(result: qemu_cluster.QemuUpResult) -> None:
    for n in result.nodes:
        if n.action == "failed":
            print(f"testbed up: node {n.name} failed: {n.error}", file=sys.stderr)
            for line in (n.console_tail or "").splitlines():
                print(f"    console: {line}", file=sys.stderr)
    for name in result.rejected:
        print(f"testbed up: node {name} booted its spec's honest command line but failed "
              "attestation; see `testbed attest " + name + "`", file=sys.stderr)


def _backend(workdir: Path, cluster: str) -> str:
    from testbed.qemu.cluster import cluster_backend

    return cluster_backend(sim.ClusterPaths(workdir, cluster))


def _print_up(result: sim.UpResult) -> None:
    print(f"cluster {result.cluster} ({result.directory})")
    print(f"  {'NODE':<12} {'ROLE':<9} {'ACTION':<8} {'PID':>7} {'SWTPM':>7}  "
          f"{'REGISTERED':<10} TCTI")
    for n in result.nodes:
        tampered = f"  TAMPERED: {', '.join(n.tampered)}" if n.tampered else ""
        print(f"  {n.name:<12} {n.role:<9} {n.action:<8} {n.pid or '-'!s:>7} "
              f"{n.swtpm_pid or '-'!s:>7}  {'yes' if n.registered else 'no':<10} "
              f"{n.tcti or '-'}{tampered}")
        if n.note:
            print(f"  {'':<12} note: {n.note}")
        if n.enrollment is not None:
            print(f"  {'':<12} TLS: {_enrollment(n.enrollment)}")
    _print_failures(result)


def _enrollment(enrollment: dict[str, Any]) -> str:
    """One line on a node's keyless-TLS enrollment with the cluster's CryptoVM."""
    if not enrollment.get("ok"):
        return f"NOT enrolled with the CryptoVM: {enrollment.get('error')}"
    certificate = enrollment.get("certificate") or {}
    issuer = certificate.get("issuer") or (enrollment.get("ca") or {}).get("issuer") or "?"
    expires = certificate.get("not_after") or "?"
    return (f"certificate from the CryptoVM (issuer {issuer}, until {expires}); "
            "the CA key never left the VSM")


def _print_failures(result: sim.UpResult) -> None:
    for n in result.nodes:
        if n.action == "failed":
            print(f"testbed up: node {n.name} failed: {n.error}", file=sys.stderr)
            if n.log_tail:
                log = result.directory / "nodes" / n.name / "run" / "node.log"
                print(f"  last lines of {log}:", file=sys.stderr)
                for line in n.log_tail.splitlines():
                    print(f"    {line}", file=sys.stderr)


# --- status -------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir)
    cluster = sim.select_cluster(workdir, args.cluster)
    if cluster is None:
        emit(args, {"cluster": None, "nodes": []}, lambda: print("no cluster (`testbed up`)"))
        return EXIT_OK
    if _backend(workdir, cluster) == "qemu":
        from testbed.qemu.cluster import status as qemu_status

        vms = qemu_status(workdir, cluster)
        emit(args, {"cluster": cluster, "backend": "qemu", "nodes": [n.to_dict() for n in vms]},
             lambda: _print_qemu_status(cluster, vms))
        return EXIT_OK
    nodes = sim.status(workdir, cluster)
    data = {"cluster": cluster, "nodes": [n.to_dict() for n in nodes]}
    emit(args, data, lambda: _print_status(cluster, nodes))
    return EXIT_OK


def _print_status(cluster: str, nodes: list[sim.NodeStatus]) -> None:
    print(f"cluster {cluster}")
    print(f"  {'NODE':<12} {'ROLE':<9} {'STATE':<12} {'PID':>7} {'SWTPM':>7}  "
          f"{'TCTI':<32} {'SERVICE':<9} LAST ATTESTATION")
    for n in nodes:
        print(f"  {n.name:<12} {n.role:<9} {n.state:<12} {n.pid or '-'!s:>7} "
              f"{n.swtpm_pid or '-'!s:>7}  {n.tcti or '-':<32} {n.service or '-':<9} "
              f"{_last(n.last_attestation)}")
        if n.tampered:
            print(f"  {'':<12} TAMPERED boot ({', '.join(n.tampered)} replaced in the spec's "
                  "boot chain)")
    if nodes:
        print(f"  agents: {Path(nodes[0].agent).parent.parent.parent}/<node>/run/agent.sock")


def _print_qemu_status(cluster: str, vms: list[qemu_cluster.VmStatus]) -> None:
    print(f"cluster {cluster} (qemu)")
    print(f"  {'NODE':<12} {'ROLE':<9} {'STATE':<9} {'ACCEL':<5} {'QEMU':>7} {'SWTPM':>7} "
          f"{'PORT':>5} {'BOOT':>6}  {'AGENT':<13} LAST ATTESTATION")
    for n in vms:
        boot = f"{n.boot_seconds:.1f}s" if n.boot_seconds is not None else "-"
        print(f"  {n.name:<12} {n.role:<9} {n.state:<9} {n.accel or '-':<5} "
              f"{n.qemu_pid or '-'!s:>7} {n.swtpm_pid or '-'!s:>7} {n.agent_port or '-'!s:>5} "
              f"{boot:>6}  {n.agent or '-':<13} {_last(n.last_attestation)}")
        if n.tampered:
            print(f"  {'':<12} TAMPERED boot: cmdline {n.cmdline!r}")
    if any(n.booted_at for n in vms):
        print("  domains (virsh -c qemu:///system list --all): "
              + ", ".join(n.domain for n in vms if n.booted_at))
        print("  TPM: swtpm run by libvirt, EK certificates from the work dir's CA")


def _last(last: dict[str, Any] | None) -> str:
    if not last:
        return "-"
    verdict = "accepted" if last.get("ok") else f"REJECTED ({last.get('failed_check')})"
    return f"{verdict} at {last.get('time')}"


# --- attest ---------------------------------------------------------------------------------------


def cmd_attest(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir)
    cluster = sim.select_cluster(workdir, args.cluster)
    if cluster is None:
        raise StateError("no cluster in the work directory; bring one up with `testbed up`")
    if _backend(workdir, cluster) == "qemu":
        from testbed.qemu.cluster import attest as qemu_attest

        result = qemu_attest(workdir, cluster, args.node, policy_path=args.policy)
    else:
        result = sim.attest(workdir, cluster, args.node, policy_path=args.policy)
    title = f"node {args.node} (cluster {cluster}, policy {result.policy!r})"
    emit(args, result.to_dict(), lambda: print_report(result.report, title))
    return EXIT_OK if result.report.ok else EXIT_REJECTED


# --- down -----------------------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir)
    cluster = sim.select_cluster(workdir, args.cluster)
    if cluster is None:
        emit(args, {"ok": True, "cluster": None, "nodes": []},
             lambda: print("no cluster to stop"))
        return EXIT_OK
    if _backend(workdir, cluster) == "qemu":
        from testbed.qemu.cluster import down as qemu_down

        vms = qemu_down(workdir, cluster, purge=args.purge)
        emit(args, vms.to_dict(), lambda: _print_qemu_down(vms))
        return EXIT_OK if not vms.leftovers else EXIT_ENVIRONMENT
    result = sim.down(workdir, cluster, purge=args.purge)
    emit(args, result.to_dict(), lambda: _print_down(result))
    return EXIT_OK if not result.leftovers else EXIT_ENVIRONMENT


def _print_qemu_down(result: qemu_cluster.QemuDownResult) -> None:
    print(f"removed {len(result.nodes)} domain(s) with their vTPM and NVRAM: "
          f"{', '.join(result.nodes) or '-'}")
    if result.leftovers:
        pids = ", ".join(f"{p.kind} {p.pid} ({p.node})" for p in result.leftovers)
        print(f"testbed down: still running after SIGKILL: {pids}", file=sys.stderr)
        return
    print(f"cluster {result.cluster}: no QEMU or swtpm process left (checked /proc)")
    print(result.daemons)
    print("removed all cluster state" if result.purged else
          "kept registry, policies and attestation history (--purge removes them)")


def _print_down(result: sim.DownResult) -> None:
    for n in result.nodes:
        how = f"stopped ({n.stopped_by})" if n.stopped_by else "was not running"
        extra = ", its swtpm stopped from its pid file" if n.swtpm_stopped else ""
        print(f"{n.name}: {how}{extra}")
    if result.leftovers:
        pids = ", ".join(f"{p.kind} {p.pid} ({p.node})" for p in result.leftovers)
        print(f"testbed down: still running after SIGKILL: {pids}", file=sys.stderr)
        return
    print(f"cluster {result.cluster}: no node or swtpm process left (checked /proc)")
    if result.purged:
        print("removed all cluster state (TPM state, registry, policies, clock history)")
    else:
        print("kept TPM state, registry, policies and clock history for the next `up` "
              "(--purge removes them)")
