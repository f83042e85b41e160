"""``testbed mux demo``: three applications over one attested session (docs/multiplexing.md)."""

from __future__ import annotations

import argparse

from testbed.cli.exitcodes import EXIT_ENVIRONMENT, EXIT_OK
from testbed.cli.render import emit
from testbed.core.progress import Progress
from testbed.demo.mux import MuxDemoResult, run_mux_demo

__all__ = ["register_mux_commands"]


def register_mux_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mux", help="channel multiplexing over one attested session")
    mux = p.add_subparsers(dest="mux_command", metavar="SUBCOMMAND", required=True)
    demo = mux.add_parser("demo", help="three applications (chat, files, metrics) share one "
                                       "Trusted Passages session between two swtpm "
                                       "machines (~5 s)")
    demo.set_defaults(func=cmd_mux_demo)


def cmd_mux_demo(args: argparse.Namespace) -> int:
    result = run_mux_demo(Progress(quiet=args.json))
    emit(args, result.to_dict(), lambda: _print(result))
    return EXIT_OK if result.ok else EXIT_ENVIRONMENT


def _print(result: MuxDemoResult) -> None:
    print(f"one attested session to {result.peer_node!r} (policy {result.peer_policy!r}), "
          "three applications over it:")
    for name, entry in result.to_dict()["applications"].items():
        mark = "ok  " if entry["as_expected"] else "FAIL"
        print(f"  [{mark}] {name:<8} {entry['answer_bytes']} bytes back")
    print(f"  an application the server does not offer: {result.refused}")
    print(f"{'as expected' if result.ok else 'NOT as expected'} ({result.seconds:.1f} s)")
