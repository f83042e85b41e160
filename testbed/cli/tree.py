"""The command tree as data: every subcommand with its path, help and options.

Shell completion (:mod:`testbed.cli.completion`) and the reference in docs/cli.md
(:mod:`testbed.cli.reference`) are both generated from it, so neither can drift from
the parser.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["Command", "Option", "command_tree"]


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    takes_value: bool
    metavar: str | None
    choices: tuple[str, ...]
    help: str

    @property
    def option_like(self) -> bool:
        return self.flags[0].startswith("-")


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # () is `testbed` itself
    help: str
    usage: str
    options: tuple[Option, ...]
    positionals: tuple[Option, ...]
    subcommands: tuple[str, ...]

    @property
    def name(self) -> str:
        return " ".join(("testbed", *self.path))


def command_tree(parser: argparse.ArgumentParser) -> list[Command]:
    """Every command below ``parser``, depth first, ``testbed`` itself first."""
    return list(_walk(parser, (), parser.description or ""))


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...],
          help_text: str) -> list[Command]:
    subcommands: dict[str, tuple[argparse.ArgumentParser, str]] = {}
    options, positionals = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, child in action.choices.items():
                subcommands[name] = (child, helps.get(name, ""))
        elif isinstance(action, argparse._HelpAction):
            continue
        elif action.option_strings:
            options.append(_option(action))
        else:
            positionals.append(_option(action))
    usage = " ".join(parser.format_usage().split())  # one line, whatever the terminal
    command = Command(path, help_text, usage, tuple(options),
                      tuple(positionals), tuple(subcommands))
    found = [command]
    for name, (child, child_help) in subcommands.items():
        found += _walk(child, (*path, name), child_help)
    return found


def _option(action: argparse.Action) -> Option:
    metavar = action.metavar if isinstance(action.metavar, str) else None
    choices = tuple(str(c) for c in action.choices) if action.choices else ()
    help_text = (action.help or "") % {"default": action.default} if action.help else ""
    return Option(tuple(action.option_strings) or (action.dest,), action.nargs != 0,
                  metavar or (action.dest.upper() if action.nargs != 0 else None), choices,
                  help_text)
