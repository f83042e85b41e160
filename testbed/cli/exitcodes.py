"""The `testbed` command's exit codes (documented in `testbed --help`)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_REJECTED = 1  # verification ran and the evidence was rejected
EXIT_USAGE = 2  # argparse's own code for bad arguments; also invalid names
EXIT_BAD_INPUT = 3  # a bad value in a file or an argument (malformed evidence, no such node)
EXIT_ENVIRONMENT = 4  # TPM/swtpm unreachable, node down, missing tools, bad work directory
EXIT_INTERNAL = 70  # a bug (sysexits' EX_SOFTWARE): one line, no traceback
EXIT_INTERRUPTED = 130
