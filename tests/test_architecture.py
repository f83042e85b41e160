"""The architecture's own rules that import-linter does not express.

``lint-imports`` (in .ci/test, contracts in pyproject.toml) checks the layers, the
backends' independence and that no modules import each other in a circle. An import
written inside a function would still be counted there, but it can also hide a circle
that only closes at run time; so a project import inside a function must say why it is
late, with a ``# lazy:`` comment on its line or the line above.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("attestation", "trusted_passages", "cryptovm", "testbed")


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def _imported_package(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.ImportFrom):
        return {(node.module or "").split(".")[0]} if node.level == 0 else {"(relative)"}
    return {alias.name.split(".")[0] for alias in node.names}


def _late_project_imports(path: Path) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for function in ast.walk(ast.parse(text)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if not _imported_package(node) & {*PACKAGES, "(relative)"}:
                continue  # a third-party module loaded late (tpm2-pytss in guests, say)
            here = lines[node.lineno - 1]
            above = lines[node.lineno - 2] if node.lineno > 1 else ""
            if "# lazy:" not in here and "# lazy:" not in above:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {here.strip()}")
    return found


def test_project_imports_inside_functions_say_why() -> None:
    late = [line for path in _sources() for line in _late_project_imports(path)]
    assert late == [], "project imports inside functions (move them up, or mark them " \
                       "`# lazy: <why>`):\n" + "\n".join(late)


def test_every_package_says_what_it_holds_and_may_import() -> None:
    missing = []
    for init in sorted(p for package in PACKAGES for p in (REPO / package).rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        if not doc:
            missing.append(str(init.relative_to(REPO)))
    assert missing == [], f"packages without a docstring: {missing}"


@pytest.mark.parametrize("module", ["testbed.cli.main", "testbed.backends", "testbed.sim.node",
                                    "testbed.qemu.guest.agent"])
def test_entry_points_import_cleanly(module: str) -> None:
    """Every entry point imports on its own (no order-dependent import)."""
    importlib.import_module(module)
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
