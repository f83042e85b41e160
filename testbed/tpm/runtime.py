"""A sim node's runtime measurements: IMA in miniature (attestation/ima.py, docs/runtime.md).

What a sim node "executes" after its measured boot is measured like Linux IMA does:
PCR 10 of its swtpm is extended with the entry's template hash and the ``ima-ng`` line
is appended to ``run/runtime.log``, both under the node's TPM lock, so a quote never sees
a PCR 10 its log does not explain. :data:`BASELINE` is what every sim node executes at
start; :func:`default_policy` allows exactly that, and is the runtime policy ``testbed
up`` writes for a sim node unless one exists.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from attestation.errors import FileInputError
from attestation.ima import IMA_PCR, MAX_CHUNK, ImaEntry, RuntimePolicy, make_entry
from attestation.tpm import TpmClient
from testbed.tpm.boot import BANK

__all__ = ["BASELINE", "RuntimeLog", "default_policy", "file_digest"]

BASELINE: tuple[tuple[str, bytes], ...] = (
    ("/usr/lib/systemd/systemd", b"systemd 252 (testbed lab)"),
    ("/usr/bin/python3.11", b"Python 3.11 (testbed lab)"),
    ("/usr/sbin/testbed-agent", b"testbed sim agent"),
)
"""(path, content) of every file a sim node executes after its boot."""

EXCLUDE = ("/var/log/*",)  # written, never executed: IMA's log policy would not appraise it


def file_digest(content: bytes) -> bytes:
    return hashlib.sha256(content).digest()


def default_policy(name: str) -> RuntimePolicy:
    """The runtime policy of a sim node: its baseline, nothing else."""
    return RuntimePolicy(name, {path: frozenset({file_digest(content)})
                                for path, content in BASELINE}, EXCLUDE)


class RuntimeLog:
    """The node's ``ima-ng`` log: a new one per boot (PCR 10 restarts at zero)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self.size = 0

    def measure(self, tpm: TpmClient, path: str, content: bytes) -> ImaEntry:
        """Extend PCR 10, then append the line. Call with the node's TPM lock held."""
        entry = make_entry(file_digest(content), path, self.size)
        tpm.extend_pcr(IMA_PCR, {BANK: entry.template_hash})
        line = entry.line()
        with open(self.path, "ab") as log:
            log.write(line)
        self.size += len(line)
        return entry

    def read(self, offset: int) -> bytes:
        """At most :data:`MAX_CHUNK` bytes of the log from ``offset``."""
        if offset < 0 or offset > self.size:
            raise FileInputError(f"runtime log offset {offset} is outside the log "
                                 f"(0-{self.size} bytes)")
        with open(self.path, "rb") as log:
            log.seek(offset)
            return log.read(min(MAX_CHUNK, self.size - offset))
