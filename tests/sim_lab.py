"""The sim-cluster tests' set-up, once: the `testbed` command run in-process.

The modules that bring a sim cluster up (tests/test_sim_cluster.py, test_cryptovm_node.py,
test_svd_cluster.py, test_batch_quotes.py, test_revocation.py, test_verifier_*.py,
test_hosts_deep.py) drive it through the same handlers `testbed` dispatches to, in the
test's own process, and read what it printed. (The real-VM tests run the command as a
process instead: tests/vm_lab.py.)
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from testbed.cli import main as cli


def run_cli(workdir: Path, *argv: str) -> tuple[int, str, str]:
    """``testbed --workdir WORKDIR ARGV...`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(["--workdir", str(workdir), *argv])
    return rc, out.getvalue(), err.getvalue()
