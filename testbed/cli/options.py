"""Options every subcommand accepts, before or after its name (as kubectl's do).

``testbed --json status`` and ``testbed status --json`` mean the same. The top-level
parser owns the defaults; each subparser re-declares the option with a suppressed
default, so that a value typed after the subcommand wins and an absent one does not
overwrite the value typed before it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

__all__ = ["GLOBAL_OPTIONS", "add_global_options", "spread_global_options", "walk_parsers"]

GLOBAL_OPTIONS = ("--json", "--workdir", "--cluster")

_HELP = {
    "--json": "print machine-readable JSON on stdout (errors too)",
    "--workdir": "state directory (default: $TESTBED_HOME, else the nearest .testbed "
                 "directory here or above, else ~/.local/state/testbed)",
    "--cluster": "cluster name (default: the only cluster in the work directory)",
}


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Declare the global options on ``parser`` (with real defaults only if ``top``)."""
    present = {s for action in parser._actions for s in action.option_strings}
    for option in GLOBAL_OPTIONS:
        if option in present:
            continue
        default = (False if option == "--json" else None) if top else argparse.SUPPRESS
        if option == "--json":
            parser.add_argument(option, action="store_true", default=default,
                                help=_HELP[option])
        else:
            parser.add_argument(option, default=default, help=_HELP[option],
                                metavar="NAME" if option == "--cluster" else "DIR")


def walk_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subparser below it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from walk_parsers(child)


def spread_global_options(root: argparse.ArgumentParser) -> None:
    """Give every subparser the global options (after the commands are registered)."""
    for parser in walk_parsers(root):
        add_global_options(parser, top=parser is root)
