"""``testbed demo``: the end-to-end demo, on the sim backend or on real VMs."""

from __future__ import annotations

import argparse
from pathlib import Path

from testbed.core.errors import UsageError
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
    p.add_argument("--spec", metavar="SPEC",
                   help="qemu only: the demo on this spec's cluster in the work directory, "
                        "its VMs placed on the lab's hosts as the spec says (docs/hosts.md; "
                        "`testbed hosts up` first); a cluster of it already up is used as it "
                        "is and left up")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir)
    if args.spec is not None:
        if args.backend != "qemu":
            raise UsageError("--spec runs the demo on real VMs: add --backend qemu")
        return run_qemu_demo(workdir, json_output=args.json, keep=args.keep,
                             spec_path=Path(args.spec))
    return DEMOS[args.backend](workdir, json_output=args.json, keep=args.keep)
