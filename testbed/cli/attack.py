"""``testbed attack NAME... | --all | --list``: the attack lab from the command line."""

from __future__ import annotations

import argparse
from typing import Any

from testbed.attacks.report import print_table
from testbed.attacks.runs import ONLY_ON_VMS, SCENARIOS_BY_BACKEND, AttackRun, run_attacks
from testbed.attacks.scenarios import SCENARIOS
from testbed.cli.render import emit
from testbed.core.errors import ArgumentError, UsageError
from testbed.core.paths import resolve_workdir
from testbed.core.progress import Progress

__all__ = ["register_attack_commands"]

_KNOWN = (*SCENARIOS, *ONLY_ON_VMS)  # every scenario name, of either backend


def register_attack_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "attack", help="run attack scenarios against plain mTLS and Trusted Passages",
        description="Each scenario runs twice: against plain mutual TLS with CA-valid "
                    "certificates, and against Trusted Passages. Exit 0 when every attack "
                    "succeeds against plain mTLS and is caught by Trusted Passages.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"scenario(s): {', '.join(_KNOWN)}")
    p.add_argument("--all", action="store_true", help="run every scenario of the backend")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--backend", choices=tuple(SCENARIOS_BY_BACKEND), default="sim",
                   help="where the lab's machines run (default: %(default)s; qemu: real VMs, "
                        f"scenario {', '.join(SCENARIOS_BY_BACKEND['qemu'])})")
    p.set_defaults(func=cmd_attack)


def cmd_attack(args: argparse.Namespace) -> int:
    if args.list:
        listing = [{"name": name, "summary": _summary(scenario.__doc__),
                    "backends": [b for b, names in SCENARIOS_BY_BACKEND.items() if name in names]}
                   for name, scenario in SCENARIOS.items()]
        listing += [{"name": name, "summary": summary, "backends": ["qemu"]}
                    for name, summary in ONLY_ON_VMS.items()]
        emit(args, {"scenarios": listing}, lambda: _print_list(listing))
        return 0
    names = list(SCENARIOS_BY_BACKEND[args.backend]) if args.all else list(args.names)
    unknown = [n for n in names if n not in _KNOWN]
    if not names:
        raise UsageError("name a scenario or pass --all (see `testbed attack --list`)")
    if unknown:
        raise ArgumentError(f"unknown scenario(s) {', '.join(map(repr, unknown))}: choose from "
                            f"{', '.join(_KNOWN)} (`testbed attack --list`), or pass --all")
    attack = run_attacks(names, args.backend, resolve_workdir(args.workdir),
                         Progress(quiet=args.json))
    emit(args, attack.to_dict(), lambda: _print(attack))
    return 0 if attack.ok else 1


def _summary(doc: str | None) -> str:
    """A scenario's first paragraph, on one line."""
    return " ".join((doc or "").split("\n\n")[0].split())


def _print_list(listing: list[dict[str, Any]]) -> None:
    for entry in listing:
        print(f"{entry['name']:<14} {entry['summary']}  [{', '.join(entry['backends'])}]")


def _print(attack: AttackRun) -> None:
    details = attack.details
    if details:  # real VMs: which machines, booted how
        print(f"\naccelerator: {details['accel']} ({details['accel_reason']})")
        print(f"honest VM ({details['honest_cmdline']!r}), tampered VM "
              f"({details['tampered_cmdline']!r})")
    print_table(attack.results, attack.baseline)
    verdict = "every attack caught by Trusted Passages" if attack.ok else "UNEXPECTED OUTCOMES"
    print(f"{len(attack.results)} scenario(s) in {attack.seconds:.1f} s: {verdict}")
