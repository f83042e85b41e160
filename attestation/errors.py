"""The project's one exception hierarchy.

It lives in ``attestation`` because that package sits at the bottom of the
dependency graph (testbed -> cryptovm, trusted_passages -> attestation): every
other package can import it, and nothing here imports them.

Callers catch :class:`TestbedError` to handle every error the project raises on
purpose; anything else escaping is a bug.
"""

from __future__ import annotations

from typing import Any


class TestbedError(Exception):
    """Root of every error this project raises on purpose."""

    __test__ = False  # not a pytest test class, despite the name


class EvidenceFormatError(TestbedError):
    """Input bytes (evidence, quote files, event logs, frames) are malformed,
    truncated, oversized or otherwise not what the format allows."""


class FileInputError(EvidenceFormatError):
    """A file the project was given cannot be read: missing, unreadable, not a regular
    file (FIFO, device, directory) or larger than the format allows."""


class EventLogError(EvidenceFormatError):
    """A TCG event log could not be parsed."""


class PolicyError(TestbedError):
    """A reference policy file is malformed or unusable."""


class TpmError(TestbedError):
    """The TPM could not be reached, or a TPM command failed."""


class EndorsementError(TestbedError):
    """An EK certificate or its chain could not be validated."""


class VerificationError(TestbedError):
    """A named verification check failed.

    ``check`` is the stable name of the check (``"signature"``,
    ``"qualifying_data"``, ``"pcr_digest"``, ...); ``reason`` says why in words;
    ``data`` says it for programs (every mismatch, full digests), JSON-ready.
    """

    def __init__(self, check: str, reason: str,
                 data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason
        self.data = data or {}
