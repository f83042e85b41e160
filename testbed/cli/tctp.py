"""``testbed tctp demo``: TCTP through nginx with the TRESOR proxy (docs/tctp.md)."""

from __future__ import annotations

import argparse

from testbed.cli.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.core.progress import Progress
from testbed.tctp.demo import main_json, render, run_tctp_demo

__all__ = ["register_tctp_commands"]


def register_tctp_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tctp", help="TCTP: attested channels carried in HTTP bodies")
    tctp = p.add_subparsers(dest="tctp_command", metavar="SUBCOMMAND", required=True)
    demo = tctp.add_parser("demo", help="curl -> client proxy -> nginx -> TCTP server on "
                                        "swtpm: attested, denied, refused, cached (~5 s)")
    demo.set_defaults(func=cmd_tctp_demo)


def cmd_tctp_demo(args: argparse.Namespace) -> int:
    result = run_tctp_demo(Progress())
    print(main_json(result) if args.json else render(result))
    return EXIT_OK if result.ok else EXIT_REJECTED
