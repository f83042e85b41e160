"""``testbed attack NAME... | --all | --list``: the attack lab from the command line."""

from __future__ import annotations

import argparse
import json

from testbed.attacks.report import print_table
from testbed.attacks.runs import SCENARIOS_BY_BACKEND, AttackRun, run_attacks
from testbed.attacks.scenarios import SCENARIOS
from testbed.cli.render import add_json_option
from testbed.core.errors import StateError
from testbed.core.paths import resolve_workdir
from testbed.core.progress import Progress

__all__ = ["register_attack_commands"]


def register_attack_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "attack", help="run attack scenarios against plain mTLS and Trusted Passages",
        description="Each scenario runs twice: against plain mutual TLS with CA-valid "
                    "certificates, and against Trusted Passages. Exit 0 when every attack "
                    "succeeds against plain mTLS and is caught by Trusted Passages.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"scenario(s): {', '.join(SCENARIOS)}")
    p.add_argument("--all", action="store_true", help="run every scenario of the backend")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--backend", choices=tuple(SCENARIOS_BY_BACKEND), default="sim",
                   help="where the lab's machines run (default: %(default)s; qemu: real VMs, "
                        f"scenario {', '.join(SCENARIOS_BY_BACKEND['qemu'])})")
    add_json_option(p)
    p.set_defaults(func=cmd_attack)


def cmd_attack(args: argparse.Namespace) -> int:
    if args.list:
        for name, scenario in SCENARIOS.items():
            print(f"{name:<14} {(scenario.__doc__ or '').split(chr(10))[0]}")
        return 0
    names = list(SCENARIOS_BY_BACKEND[args.backend]) if args.all else list(args.names)
    unknown = [n for n in names if n not in SCENARIOS]
    if not names or unknown:
        raise StateError(f"unknown scenario(s) {unknown}: choose from {', '.join(SCENARIOS)} "
                         "or pass --all" if unknown else
                         "name a scenario or pass --all (see `testbed attack --list`)")
    attack = run_attacks(names, args.backend, resolve_workdir(args.workdir),
                         Progress(quiet=args.json))
    if args.json:
        print(json.dumps(attack.to_dict(), indent=2))
    else:
        _print(attack)
    return 0 if attack.ok else 1


def _print(attack: AttackRun) -> None:
    details = attack.details
    if details:  # real VMs: which machines, booted how
        print(f"\naccelerator: {details['accel']} ({details['accel_reason']})")
        print(f"honest VM ({details['honest_cmdline']!r}), tampered VM "
              f"({details['tampered_cmdline']!r})")
    print_table(attack.results, attack.baseline)
    verdict = "every attack caught by Trusted Passages" if attack.ok else "UNEXPECTED OUTCOMES"
    print(f"{len(attack.results)} scenario(s) in {attack.seconds:.1f} s: {verdict}")
