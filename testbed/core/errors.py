"""Errors raised by the testbed package.

They hang off the project hierarchy in :mod:`attestation.errors` so that a
caller catching :class:`~attestation.errors.TestbedError` (or ``TpmError`` for
anything TPM-shaped) also catches testbed failures.
"""

from __future__ import annotations

from attestation.errors import TestbedError, TpmError

__all__ = ["ArgumentError", "StateError", "SwtpmError", "UsageError"]


class SwtpmError(TpmError):
    """swtpm could not be provisioned, started or stopped.

    The message carries the tail of swtpm's (or swtpm_setup's) own output,
    because the exit status alone never says what went wrong.
    """


class StateError(TestbedError):
    """A state directory (TPM state, CA, run files) is unusable: wrong type,
    wrong owner, half-initialised, or already holds state we refuse to clobber."""


class UsageError(TestbedError):
    """The command line is wrong: a missing or contradictory option, an invalid name.
    The CLI exits 2 (as argparse does for its own usage errors)."""


class ArgumentError(TestbedError):
    """An argument names something that does not exist or has a bad value (a node, a
    cluster, a scenario, a PCR selection). The CLI exits 3 ("bad value")."""
