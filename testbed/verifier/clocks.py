"""The verifier service's clock histories: in its database, durable once per tick.

The clock history (per AK, its last accepted TPMS_ATTEST: reset and restart counts and
the clock) is what catches a rolled-back or replayed quote, so it must be durable before
a verdict that relied on it is published. ``testbed attest`` keeps it in a file per AK
(an fsync and a rename per attestation); the service keeps it in the store's
``clock_history`` table instead, written in the same transaction as the tick's outcomes
(:meth:`Store.record_all`): one commit per tick, and events, revocations and webhooks
only after that commit.

:class:`StoreClocks` is what :func:`testbed.cluster.verification.verify_evidence` reads
and records through (:class:`~testbed.cluster.verification.ClockSource`):

- ``history(ak)``: the AK's history in memory; an AK the database does not know yet is
  read from its file (``clock-history/AKNAME.json`` or the older one-file layout): the
  migration from the files, which are never written here;
- ``accepted(node, ak, evidence)``: stages the quote for the tick's transaction;
- :meth:`refresh`: the rows of the nodes just claimed, read from the database before
  they are attested, so a node another verifier attested last (PostgreSQL or a shared
  SQLite file) is judged against that verifier's newest quote, not this one's memory.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from attestation.errors import EvidenceFormatError
from attestation.evidence import Evidence
from attestation.tpm_types import parse_attest
from attestation.verifier import ClockHistory
from testbed.cluster.verification import AkClockHistory
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths

__all__ = ["ClockRow", "StoreClocks"]


@dataclass(frozen=True)
class ClockRow:
    """One AK's last accepted quote, as the ``clock_history`` table holds it."""

    ak: str  # the AK's name, hex
    node: str
    attest: bytes  # the TPMS_ATTEST


class StoreClocks:
    """Clock histories kept in memory, staged for and refreshed from the store."""

    def __init__(self, paths: ClusterPaths) -> None:
        self.paths = paths
        self._lock = threading.Lock()
        self._histories: dict[str, ClockHistory] = {}
        self._attests: dict[str, bytes] = {}  # what each history was built from or last took
        self._pending: dict[str, ClockRow] = {}
        self._corrupt: dict[str, StateError] = {}  # AK -> why its row is unusable

    def history(self, ak_name: bytes) -> ClockHistory:
        """Raises StateError for an AK whose row is corrupt: its node fails (closed)."""
        key = ak_name.hex()
        with self._lock:
            known, corrupt = self._histories.get(key), self._corrupt.get(key)
        if corrupt is not None:
            raise corrupt
        if known is not None:
            return known
        history = AkClockHistory(self.paths, ak_name).history  # the file, if any: migration
        with self._lock:
            return self._histories.setdefault(key, history)

    def accepted(self, node: str, ak_name: bytes, evidence: Evidence) -> None:
        row = ClockRow(ak_name.hex(), node, evidence.attest)
        with self._lock:
            self._pending[row.ak] = row
            self._attests[row.ak] = row.attest

    def take_pending(self) -> list[ClockRow]:
        """The quotes accepted since the last call, for the tick's transaction."""
        with self._lock:
            rows, self._pending = list(self._pending.values()), {}
        return rows

    def restage(self, rows: Sequence[ClockRow]) -> None:
        """Rows whose transaction failed: written with the next one (unless newer came)."""
        with self._lock:
            for row in rows:
                self._pending.setdefault(row.ak, row)

    def refresh(self, rows: Sequence[ClockRow]) -> None:
        """The database's rows for nodes about to be attested: they replace the memory
        of their AK (the database is the authority), except an AK with a quote staged
        and not yet committed (this verifier's, the newest)."""
        for row in rows:
            with self._lock:
                if row.ak in self._pending or self._attests.get(row.ak) == row.attest:
                    continue
            try:
                history = _history_of(row)
            except StateError as exc:
                with self._lock:
                    self._corrupt[row.ak] = exc
                    self._histories.pop(row.ak, None)
                    self._attests.pop(row.ak, None)
                continue
            with self._lock:
                self._corrupt.pop(row.ak, None)
                self._histories[row.ak] = history
                self._attests[row.ak] = row.attest


def _history_of(row: ClockRow) -> ClockHistory:
    """A history holding exactly ``row``'s quote (how the verifier was after accepting
    it: only ClockHistory's public methods)."""
    history = ClockHistory()
    try:
        history.record(bytes.fromhex(row.ak), parse_attest(row.attest).clock_info, row.attest)
    except (ValueError, EvidenceFormatError) as exc:
        raise StateError(f"the verifier database's clock history of AK {row.ak[:16]} "
                         f"(node {row.node}) is corrupt: {exc}") from None
    return history
