"""``testbed completion bash|zsh``: shell completion generated from the parser.

Bash: ``source <(testbed completion bash)``, or save it in
``/etc/bash_completion.d/testbed``. Zsh loads the same function through bashcompinit:
``source <(testbed completion zsh)``.
"""

from __future__ import annotations

import argparse

from testbed.cli.render import emit
from testbed.cli.tree import Command, command_tree

__all__ = ["completion_script", "register_completion_command"]

SHELLS = ("bash", "zsh")


def register_completion_command(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                                root: argparse.ArgumentParser) -> None:
    p = sub.add_parser("completion", help="print a shell completion script (bash, zsh)",
                       description="source <(testbed completion bash)   # or zsh")
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=lambda args: _print(root, args))


def _print(root: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    script = completion_script(root, args.shell)
    emit(args, {"shell": args.shell, "script": script}, lambda: print(script, end=""))
    return 0


def completion_script(root: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (zsh reuses the bash function)."""
    script = _bash(command_tree(root))
    if shell == "zsh":
        return "#compdef testbed\nautoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def _bash(commands: list[Command]) -> str:
    paths = " ".join(f"'{' '.join(c.path)}'" for c in commands if c.path)
    cases = "".join(_case(c) for c in commands)
    valued = sorted({flag for c in commands for o in c.options if o.takes_value and not o.choices
                     for flag in o.flags})
    choices: dict[str, set[str]] = {}
    for c in commands:
        for o in c.options:
            for flag in o.flags if o.choices else ():
                choices.setdefault(flag, set()).update(o.choices)
    choice_cases = "".join(f"        {flag}) COMPREPLY=($(compgen -W \"{' '.join(sorted(v))}\" "
                           f"-- \"$cur\")); return;;\n" for flag, v in sorted(choices.items()))
    return f"""# testbed shell completion (generated from the parser: testbed completion bash)
_testbed() {{
    local cur prev path word i known
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    path=""
    known=({paths})
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        [[ "$word" == -* ]] && continue
        local candidate="${{path:+$path }}$word" k
        for k in "${{known[@]}}"; do
            [[ "$k" == "$candidate" ]] && path="$candidate" && break
        done
    done
    case "$prev" in
{choice_cases}        {'|'.join(valued) or '--never'}) COMPREPLY=($(compgen -f -- "$cur")); return;;
    esac
    local words=""
    case "$path" in
{cases}    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
    [[ ${{#COMPREPLY[@]}} -eq 0 && "$cur" != -* ]] && COMPREPLY=($(compgen -f -- "$cur"))
    return 0
}}
complete -F _testbed testbed
"""


def _case(command: Command) -> str:
    words = [*command.subcommands, *(f for o in command.options for f in o.flags)]
    words += [c for p in command.positionals for c in p.choices]
    return f"        '{' '.join(command.path)}') words=\"{' '.join(words)}\";;\n"
