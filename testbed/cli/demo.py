"""``testbed demo``: the end-to-end demo, on the sim backend or on real VMs."""

from __future__ import annotations

import argparse

from testbed.core.paths import resolve_workdir
from testbed.demo.qemu import run_qemu_demo
from testbed.demo.sim import run_demo

__all__ = ["register_demo_commands"]

DEMOS = {"sim": run_demo, "qemu": run_qemu_demo}


def register_demo_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo: cluster up, attested channels, "
                                    "attack lab, down (sim by default, or real VMs)")
    p.add_argument("--backend", choices=tuple(DEMOS), default="sim",
                   help="sim: node processes with swtpm (~15 s); qemu: three VMs under "
                        "libvirt with OVMF measured boot, TLS inside the guests (~1-2 min "
                        "under TCG)")
    p.add_argument("--keep", action="store_true",
                   help="leave the demo's cluster running (`testbed --workdir DIR/demo status` "
                        "for sim, DIR/demo-qemu for qemu; then down)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    return DEMOS[args.backend](resolve_workdir(args.workdir), json_output=args.json,
                               keep=args.keep)
