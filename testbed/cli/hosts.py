"""``testbed hosts up | status | attest | down``: hypervisor hosts on this machine, each
in its own namespaces with its own sshd, libvirtd and host TPM, reached over SSH only
and attested (docs/hosts.md)."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from testbed.cli.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.cli.render import emit
from testbed.core.paths import resolve_workdir
from testbed.core.progress import Progress
from testbed.hosts import lifecycle
from testbed.hosts.attest import HostVerdict
from testbed.hosts.layout import DEFAULT_BRIDGE, DEFAULT_SUBNET, MAX_HOSTS, HostsError

__all__ = ["register_hosts_commands"]


def register_hosts_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hosts = sub.add_parser("hosts", help="hypervisor hosts on this machine (namespaces, "
                           "sshd, libvirtd, host TPM), reached over SSH and attested")
    hsub = hosts.add_subparsers(dest="hosts_command", metavar="ACTION", required=True)
    p = hsub.add_parser("up", help="bring N hosts up, register and attest each "
                        "(exit 1 when a host is untrusted)")
    p.add_argument("count", nargs="?", type=int, default=2,
                   help=f"how many hosts (1..{MAX_HOSTS}; default 2)")
    p.add_argument("--bridge", default=DEFAULT_BRIDGE,
                   help=f"the lab bridge to create (default {DEFAULT_BRIDGE}; an existing "
                        "bridge not made by the lab is refused)")
    p.add_argument("--subnet", default=DEFAULT_SUBNET,
                   help=f"private IPv4 subnet of the lab network (default {DEFAULT_SUBNET})")
    p.add_argument("--tamper-qemu", action="append", default=[], metavar="HOST",
                   help="give HOST a QEMU binary with one byte changed (the tampered-host "
                        "attack: its attestation must fail)")
    p.set_defaults(func=cmd_up)
    p = hsub.add_parser("status", help="per host: address, sshd/libvirtd/TPM, libvirt over "
                        "qemu+ssh, last attestation")
    p.set_defaults(func=cmd_status)
    p = hsub.add_parser("attest", help="re-attest HOST over SSH (exit 1 when rejected)")
    p.add_argument("host", help="host name (host1, host2, ...)")
    p.set_defaults(func=cmd_attest)
    p = hsub.add_parser("inventory", help="the hosts as an Ansible inventory (--json: an "
                        "inventory script's --list; else YAML), connecting over the lab's "
                        "ssh_config (its known_hosts only, strict host key checking)")
    p.set_defaults(func=cmd_inventory)
    p = hsub.add_parser("down", help="stop every host by PID; remove namespaces, veths and "
                        "the bridge the lab made")
    p.set_defaults(func=cmd_down)


def cmd_up(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir)
    results = lifecycle.up(workdir, args.count, bridge=args.bridge, subnet=args.subnet,
                           tamper_qemu=args.tamper_qemu, progress=Progress(quiet=args.json))
    trusted = all(r.verdict is not None and r.verdict.trusted for r in results)

    def human() -> None:
        for r in results:
            print(f"{r.name:<8} {r.address:<15} {r.action:<8} {_verdict(r.verdict)}")

    emit(args, {"ok": trusted, "hosts": [r.to_dict() for r in results]}, human)
    return EXIT_OK if trusted else EXIT_REJECTED


def cmd_status(args: argparse.Namespace) -> int:
    state, rows = lifecycle.status(resolve_workdir(args.workdir, create=False))
    data = {"lab": None if state is None else {
        "bridge": state.bridge, "subnet": str(state.subnet), "lab_address": state.lab_address},
        "hosts": [r.to_dict() for r in rows]}

    def human() -> None:
        if state is None:
            print("no hosts lab here (`testbed hosts up` makes one)")
            return
        print(f"lab: bridge {state.bridge}, {state.subnet}, lab address {state.lab_address}")
        for row in rows:
            verdict = _verdict(row.attestation)
            if row.state != "running":  # a host that does not run is not trusted
                verdict = f"untrusted while not running (last attestation: {verdict})"
            print(f"{row.name:<8} {row.address:<15} {row.state:<8} {verdict}")
            for name, value in row.components.items():
                print(f"  {name:<9} {value}")
            print(f"  {'libvirt':<9} {row.libvirt}")

    emit(args, data, human)
    return EXIT_OK


def cmd_attest(args: argparse.Namespace) -> int:
    verdict = lifecycle.attest(resolve_workdir(args.workdir, create=False), args.host)
    emit(args, verdict.to_dict(), lambda: print(f"{args.host}: {_verdict(verdict)}"))
    return EXIT_OK if verdict.trusted else EXIT_REJECTED


def cmd_inventory(args: argparse.Namespace) -> int:
    data = lifecycle.inventory(resolve_workdir(args.workdir, create=False))
    emit(args, data, lambda: print(yaml.safe_dump(_inventory_yaml(data), sort_keys=False),
                                   end=""))
    return EXIT_OK


def _inventory_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """The ``--list`` JSON as a static YAML inventory (``hosts`` as mappings)."""
    hostvars = data["_meta"]["hostvars"]
    children = {name: {"hosts": {h: hostvars[h] if name == lifecycle.INVENTORY_GROUP else None
                                 for h in group["hosts"]},
                       **({"vars": group["vars"]} if "vars" in group else {})}
                for name, group in data.items() if name not in ("all", "_meta")}
    return {"all": {"children": children}}


def cmd_down(args: argparse.Namespace) -> int:
    result = lifecycle.down(resolve_workdir(args.workdir, create=False),
                            Progress(quiet=args.json))
    if result["left"]:
        raise HostsError(f"processes {result['left']} survived SIGKILL; check them by hand")
    emit(args, {"ok": True, **result},
         lambda: print(f"stopped {len(result['hosts'])} host(s); removed: "
                       f"{', '.join(result['removed']) or 'nothing'}"))
    return EXIT_OK


def _verdict(verdict: HostVerdict | None) -> str:
    if verdict is None:
        return "not attested"
    if verdict.trusted:
        return "trusted (every check passed)"
    return f"UNTRUSTED (check '{verdict.failed_check}' failed: {verdict.message[:120]})"
