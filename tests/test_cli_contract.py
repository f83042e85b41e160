"""The `testbed` command's contract (docs/cli.md), enforced over every subcommand:
global options anywhere, documented exit codes for misuse and bad values, one-line
errors without tracebacks, JSON on stdout, no state created by read commands, the
work directory found from any directory, the docs and completion in step with the parser.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from testbed.cli import main as cli
from testbed.cli.options import GLOBAL_OPTIONS
from testbed.cli.reference import BEGIN, END, render_reference
from testbed.cli.tree import command_tree

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str, workdir: Path | None = None) -> tuple[int, str, str]:
    """The command in-process; argparse's own exits included."""
    out, err = io.StringIO(), io.StringIO()
    args = ["--workdir", str(workdir), *argv] if workdir else list(argv)
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = cli.main(args)
        except SystemExit as exc:
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def run_process(*argv: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


# --- every subcommand --------------------------------------------------------------------------

COMMANDS = command_tree(cli.build_parser())


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_has_help_and_the_global_options(command) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = run(*command.path, "--help")
    assert rc == 0 and out.startswith("usage: testbed"), err
    flags = {f for o in command.options for f in o.flags}
    assert set(GLOBAL_OPTIONS) <= flags


def test_global_options_mean_the_same_before_and_after_the_subcommand() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(["--json", "--workdir", "/w", "--cluster", "c", "vsm", "key",
                                "list"])
    after = parser.parse_args(["vsm", "key", "list", "--json", "--workdir", "/w",
                               "--cluster", "c"])
    middle = parser.parse_args(["vsm", "--json", "key", "list"])
    for ns in (before, after):
        assert (ns.json, ns.workdir, ns.cluster) == (True, "/w", "c")
    assert middle.json is True and middle.workdir is None
    plain = parser.parse_args(["status"])
    assert (plain.json, plain.workdir, plain.cluster) == (False, None, None)


# --- misuse and bad values ---------------------------------------------------------------------

MISUSE = [
    ([], 2),
    (["nosuch"], 2),
    (["status", "--cluster", "../../etc"], 2),
    (["down", "--cluster", "../../etc"], 2),
    (["up", "--cluster", "Not A Name"], 2),
    (["attack"], 2),
    (["completion", "fish"], 2),
    (["status", "--cluster", "nosuch"], 3),
    (["attest", "nosuch"], 3),
    (["attack", "nosuch"], 3),
    (["eventlog", "nofile"], 3),
    (["eventlog", "/dev/zero"], 3),
    (["policy", "show", "nofile"], 3),
    (["up", "nofile.yaml"], 3),
    (["up", "--tamper", "nonsense"], 3),
    (["tamper"], 2),
    (["tctp"], 2),
    (["evidence", "replay", "--since", "notatime"], 2),
    (["tamper", "nosuch", "--runtime", "/x"], 3),
    (["revoke", "nosuch"], 3),
    (["reinstate", "nosuch"], 3),
    (["evidence", "replay"], 3),
    (["sign", "verify", "nofile"], 3),
    (["sign", "verify", "/dev/zero"], 3),
    (["verifier", "status"], 3),
    (["events"], 3),
    (["hosts"], 2),
    (["hosts", "up", "0"], 2),
    (["hosts", "up", "2", "--bridge", "Bad!"], 2),
    (["hosts", "up", "2", "--subnet", "8.8.8.0/24"], 3),
    (["hosts", "up", "2", "--tamper-qemu", "host9"], 3),
    (["hosts", "attest", "nosuch"], 3),
    (["hosts", "attest", "host1"], 3),
    (["migrate"], 2),
    (["migrate", "vm1"], 2),
    (["migrate", "nosuch", "--to", "host1"], 3),
    (["hosts", "inventory", "extra"], 2),
]


@pytest.mark.parametrize(("argv", "code"), MISUSE, ids=lambda v: " ".join(v) if
                         isinstance(v, list) else str(v))
def test_misuse_exits_with_the_documented_code_in_one_line(tmp_path: Path, argv: list[str],
                                                          code: int) -> None:
    rc, out, err = run(*argv, workdir=tmp_path)
    assert rc == code, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("testbed") and "error:" in lines[-1]
    if not lines[0].startswith("usage:"):  # argparse's own errors follow the usage
        assert len(lines) == 1
    rc, out, _ = run(*argv, "--json", workdir=tmp_path) if argv else (2, "", "")
    if rc != 2:  # argparse usage errors print usage, not JSON
        error = json.loads(out)["error"]
        assert error["exit_code"] == code and error["message"]


def test_status_with_two_clusters_is_a_usage_error(tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / "clusters" / name).mkdir(parents=True)
    rc, _, err = run("status", workdir=tmp_path)
    assert rc == 2 and "--cluster" in err


# --- the work directory ------------------------------------------------------------------------


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TESTBED_HOME", "XDG_STATE_HOME", "TESTBED_TCTI")}
    return {**env, "HOME": str(home)}


def test_read_commands_create_no_state(tmp_path: Path) -> None:
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir()
    here.mkdir()
    env = _clean_env(home)
    for argv in (["status"], ["down"], ["tpm", "list"], ["attest", "x"], ["status", "--json"],
                 ["hosts", "status"], ["hosts", "down"], ["hosts", "inventory"]):
        result = run_process(*argv, cwd=here, env=env)
        assert "Traceback" not in result.stderr, result.stderr
    assert list(here.iterdir()) == [] and list(home.iterdir()) == []
    status = json.loads(run_process("status", "--json", cwd=here, env=env).stdout)
    assert status["workdir"] == str(home / ".local" / "state" / "testbed")


def test_the_work_directory_is_found_upward_as_git_finds_dot_git(tmp_path: Path) -> None:
    (tmp_path / ".testbed" / "clusters" / "lab").mkdir(parents=True)
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    result = run_process("status", "--json", cwd=deep, env=_clean_env(tmp_path))
    status = json.loads(result.stdout)
    assert status["workdir"] == str(tmp_path / ".testbed") and status["cluster"] == "lab"


# --- docs and completion in step with the parser -----------------------------------------------


def test_the_reference_in_docs_cli_md_is_generated_from_the_parser() -> None:
    document = (ROOT / "docs" / "cli.md").read_text()
    generated = document.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert generated == render_reference().strip(), (
        "docs/cli.md is stale: run `python -m testbed.cli.reference --write docs/cli.md`")


_PLACEHOLDER = re.compile(r"\[[^\]]*\]|\.\.\.|\|")


_COMMAND = re.compile(r"testbed [ -~]+")  # printable ASCII: not a diagram's box lines
_DESCRIPTION = re.compile(r"\s{3,}|\s+#")  # `command    what it does` or `# comment`


def _documented_command_lines() -> list[tuple[str, str]]:
    """Every `testbed ...` command line inside a code block of README.md and docs/
    (synopsis lines with [optional] parts or alternatives are for people, not checked)."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]:
        in_block, pending = False, ""
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_block, pending = not in_block, ""
                continue
            text = pending + line.strip().removeprefix("$ ").removeprefix(".venv/bin/")
            if text.endswith("\\"):
                pending = text[:-1]
                continue
            pending = ""
            command = _DESCRIPTION.split(text)[0].strip()
            if (in_block and _COMMAND.fullmatch(command)
                    and not _PLACEHOLDER.search(command)):
                found.append((f"{path.relative_to(ROOT)}", command))
    return found


@pytest.mark.parametrize(("where", "line"), _documented_command_lines(),
                         ids=lambda v: v if "/" in v or v.endswith(".md") else v[:60])
def test_every_documented_command_line_parses(where: str, line: str) -> None:
    argv = shlex.split(line.split(" #")[0])[1:]
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{line}` does not parse (exit {exc.code})")


_MENTION = re.compile(r"`(testbed [^`]+)`")


def _mentions() -> list[tuple[str, str]]:
    """Every `testbed ...` the docs name: inline code and code-block lines, synopses too."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]:
        in_block = False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_block = not in_block
                continue
            texts = [_DESCRIPTION.split(line.strip().removeprefix("$ "))[0]] if in_block \
                else _MENTION.findall(line)
            found += [(str(path.relative_to(ROOT)), t.removeprefix(".venv/bin/"))
                      for t in texts if _COMMAND.fullmatch(t.removeprefix(".venv/bin/"))]
    return found


_PATHS = {c.path: c for c in COMMANDS}


@pytest.mark.parametrize(("where", "text"), _mentions(), ids=lambda v: v[:60])
def test_every_command_and_option_the_docs_name_exists(where: str, text: str) -> None:
    if "error:" in text:
        return  # the error format, not a command
    words = text.split()[1:]
    path: tuple[str, ...] = ()
    value_next = False
    for word in words:
        valued = {f for o in _PATHS[path].options if o.takes_value for f in o.flags}
        if value_next:
            value_next = False
        elif (*path, word) in _PATHS:
            path = (*path, word)
        elif word.startswith("-"):
            value_next = word in valued
        elif not path:
            pytest.fail(f"{where}: `{text}`: no command {word!r}")
    command = _PATHS[path]
    flags = {f for o in command.options for f in o.flags} | {"-h", "--help"}
    for word in words:
        for option in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", word):
            assert option in flags, f"{where}: `{text}`: {command.name} has no {option}"


def _complete(script: str, *words: str) -> list[str]:
    program = (f"{script}\nCOMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); "
               f"COMP_CWORD={len(words) - 1}; _testbed; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True,
                            check=True, timeout=10)
    return result.stdout.split()


def test_bash_completion_knows_every_command_path() -> None:
    rc, script, _ = run("completion", "bash")
    assert rc == 0
    assert _complete(script, "testbed", "vs") == ["vsm"]
    assert _complete(script, "testbed", "--json", "vsm", "key", "si") == ["sign"]
    assert _complete(script, "testbed", "up", "--backend", "") == ["qemu", "sim"]
    for command in COMMANDS:
        if command.subcommands:
            words = _complete(script, "testbed", *command.path, "")
            assert set(command.subcommands) <= set(words), command.name
    rc, zsh, _ = run("completion", "zsh")
    assert rc == 0 and zsh.startswith("#compdef testbed") and "bashcompinit" in zsh
