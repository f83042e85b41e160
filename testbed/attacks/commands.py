"""`testbed attack NAME` and `testbed attack --all`: the attack lab from the CLI."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from testbed.attacks.lab import Lab
from testbed.attacks.scenarios import SCENARIOS, ScenarioResult, genuine, run
from testbed.errors import StateError
from testbed.progress import Progress
from testbed.workdir import resolve_workdir

if TYPE_CHECKING:
    from testbed.qemu.attack import QemuAttack

QEMU_SCENARIOS = ("tampered-boot",)


def register_attack_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "attack", help="run attack scenarios against plain mTLS and Trusted Passages",
        description="Each scenario runs twice: against plain mutual TLS with CA-valid "
                    "certificates, and against Trusted Passages. Exit 0 when every attack "
                    "succeeds against plain mTLS and is caught by Trusted Passages.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"scenario(s): {', '.join(SCENARIOS)}")
    p.add_argument("--all", action="store_true", help="run every scenario")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--backend", choices=["sim", "qemu"], default="sim",
                   help="where the lab's machines run (default: %(default)s; qemu: real VMs, "
                        f"scenario {', '.join(QEMU_SCENARIOS)})")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_attack)


def cmd_attack(args: argparse.Namespace) -> int:
    if args.list:
        for name, scenario in SCENARIOS.items():
            print(f"{name:<14} {(scenario.__doc__ or '').split(chr(10))[0]}")
        return 0
    names = list(SCENARIOS) if args.all else list(args.names)
    unknown = [n for n in names if n not in SCENARIOS]
    if not names or unknown:
        raise StateError(f"unknown scenario(s) {unknown}: choose from {', '.join(SCENARIOS)} "
                         "or pass --all" if unknown else
                         "name a scenario or pass --all (see `testbed attack --list`)")
    if args.backend == "qemu":
        return _qemu_attack(args, names)
    results, baseline, seconds = run_lab(names, quiet=args.json)
    ok = all(r.as_expected for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "seconds": seconds, "genuine_channel": baseline,
                          "results": [r.to_dict() for r in results]}, indent=2))
    else:
        print_table(results, baseline)
        print(f"\n{len(results)} scenario(s) in {seconds:.1f} s: "
              f"{'every attack caught by Trusted Passages' if ok else 'UNEXPECTED OUTCOMES'}")
    return 0 if ok else 1


def _qemu_attack(args: argparse.Namespace, names: Sequence[str]) -> int:
    """Real VMs: only the scenarios that need no Trusted Passages inside the guests."""
    from testbed.qemu.attack import tampered_boot

    other = [n for n in names if n not in QEMU_SCENARIOS]
    if other:
        raise StateError(f"with --backend qemu only {', '.join(QEMU_SCENARIOS)} runs (the "
                         f"others need Trusted Passages inside the guests): drop "
                         f"{', '.join(other)}, or use --backend sim")
    started = time.monotonic()
    attack = tampered_boot(resolve_workdir(getattr(args, "workdir", None)),
                           progress=Progress(quiet=args.json))
    seconds = round(time.monotonic() - started, 1)
    baseline = ("ACCEPTED: " if attack.baseline.ok else "REJECTED: ") + \
        (attack.baseline.failure.detail if attack.baseline.failure else
         "an honest VM of the same image satisfies the predicted policy")
    if args.json:
        print(json.dumps({"ok": attack.ok, "backend": "qemu", "seconds": seconds,
                          "genuine_channel": baseline, "qemu": attack.details,
                          "results": [attack.result.to_dict()]}, indent=2))
    else:
        _print_qemu(attack, baseline, seconds)
    return 0 if attack.ok else 1


def _print_qemu(attack: QemuAttack, baseline: str, seconds: float) -> None:
    r, d = attack.result, attack.details
    print(f"\naccelerator: {d['accel']} ({d['accel_reason']})")
    print(f"honest VM ({d['honest_cmdline']!r}): {baseline}")
    print(f"tampered VM ({d['tampered_cmdline']!r}):")
    print(f"  without attestation: {r.plain.detail}")
    verdict = "ACCEPTED (!)" if r.trusted_passages.attack_succeeded else \
        f"REJECTED by check '{r.trusted_passages.caught_by}'"
    print(f"  attestation: {verdict}")
    print(f"    {r.trusted_passages.detail}")
    print(f"\n1 scenario in {seconds:.1f} s: "
          f"{'the tampered boot was caught' if attack.ok else 'UNEXPECTED OUTCOME'}")


def run_lab(names: Sequence[str], quiet: bool = False
            ) -> tuple[list[ScenarioResult], str, float]:
    started = time.monotonic()
    progress = Progress(total=2 + len(names), quiet=quiet)
    with progress.step("starting the lab (5 machines, each with its own swtpm)"):
        lab = Lab().start()
    try:
        with progress.step("genuine channel: customer <-> Bob's server"):
            ok, detail = genuine(lab)
        baseline = ("ESTABLISHED: " if ok else "FAILED: ") + detail
        results = []
        for name in names:
            with progress.step(f"attack: {name}"):
                results += run(lab, [name])
    finally:
        lab.close()
    return results, baseline, time.monotonic() - started


def print_table(results: Sequence[ScenarioResult], baseline: str | None = None) -> None:
    if baseline:
        print(f"\nno attack (genuine customer and server): {baseline}")
    header = f"{'attack':<14} {'plain mTLS':<18} {'Trusted Passages':<18} caught by"
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        plain = "attack succeeds" if r.plain.attack_succeeded else "attack failed (!)"
        tp = "attack SUCCEEDS (!)" if r.trusted_passages.attack_succeeded else "caught"
        where = f"{r.trusted_passages.caught_by} @ {r.trusted_passages.caught_at}" \
            if r.trusted_passages.caught_by else "-"
        print(f"{r.name:<14} {plain:<18} {tp:<18} {where}")
    print()
    for r in results:
        print(f"  {r.name}: {r.title}")
        print(f"    plain mTLS: {r.plain.detail}")
        print(f"    Trusted Passages: {r.trusted_passages.detail[:240]}")
