"""The verifier's state in a real database: SQLite by default (a file in the cluster's
``verifier/`` directory, WAL), PostgreSQL as the option for several verifiers.

Four tables, the same SQL on both engines but for the few words in :class:`Dialect`:

- ``nodes``: one row per registered node: its schedule (``next_due``), its lease
  (``owner`` + ``lease_until``: the verifier attesting it right now, until when) and its
  last verdict and state (``new``, ``trusted``, ``rejected``, ``unreachable``).
- ``events``: the stream of attestation results and state changes, ``seq`` increasing.
- ``verifiers``: each running verifier's pid and heartbeat, for ``status``.
- ``clock_history``: per AK, the last accepted quote (TPMS_ATTEST, hex) and its node:
  what catches a rolled-back or replayed quote (:mod:`testbed.verifier.clocks`), written
  in the same transaction as the outcomes that accepted it.

Leases are how verifiers share nodes: a verifier claims the nodes that are due and whose
lease expired (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, one writer at a time
on SQLite), and the claim pushes ``next_due`` one interval on. So no node is attested
twice in an interval, and the nodes of a verifier that died are claimed by another as
soon as their lease runs out (the lease is shorter than the interval).

Times are Unix seconds from the verifiers' clocks (one host here). Every database error
is a :class:`StoreError`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from attestation.files import private_dir
from testbed.core.errors import StateError
from testbed.verifier.clocks import ClockRow

__all__ = [
    "HOST_CHECK",
    "NODE_STATES",
    "Claim",
    "Event",
    "NodeRow",
    "Outcome",
    "Store",
    "StoreError",
    "VerifierRow",
    "open_store",
]

NODE_STATES = ("new", "trusted", "rejected", "unreachable")
KEEP_EVENTS = 100_000  # older events are pruned: the table's size is bounded
MAX_TEXT = 2000  # reasons are truncated: a hostile agent's error text stays small
UNREACHABLE_CHECK = "agent"  # the check an outcome names when no quote could be had
HOST_CHECK = "host"  # the check of a VM whose hypervisor host failed (testbed.verifier.hosts)


class StoreError(StateError):
    """The verifier's database refused or failed an operation."""


@dataclass(frozen=True)
class Outcome:
    """One attestation of one node, as the verifier records it."""

    node: str
    ok: bool
    check: str  # the first failing check ("" when ok; "agent" when unreachable)
    reason: str
    started: float
    finished: float
    mode: str = "pull"

    @property
    def state(self) -> str:
        if self.ok:
            return "trusted"
        return "unreachable" if self.check == UNREACHABLE_CHECK else "rejected"


@dataclass(frozen=True)
class Event:
    """One row of the event stream: an attestation result or a node's state change."""

    seq: int
    time: float
    node: str
    kind: str  # "attestation" or "state"
    ok: bool
    check: str
    reason: str
    verifier: str
    mode: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "node": self.node, "kind": self.kind,
                "ok": self.ok, "check": self.check, "reason": self.reason,
                "verifier": self.verifier, "mode": self.mode}


@dataclass(frozen=True)
class NodeRow:
    node: str
    mode: str
    state: str
    owner: str
    lease_until: float
    next_due: float
    last_time: float
    last_check: str
    last_reason: str
    attested_by: str

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "mode": self.mode, "state": self.state,
                "last_time": self.last_time or None, "last_check": self.last_check,
                "last_reason": self.last_reason, "attested_by": self.attested_by,
                "lease_owner": self.owner or None}


@dataclass(frozen=True)
class VerifierRow:
    name: str
    pid: int
    started: float
    heartbeat: float
    interval: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "started": self.started,
                "heartbeat": self.heartbeat, "interval": self.interval}


@dataclass(frozen=True)
class Claim:
    """A node leased to one verifier for one attestation."""

    node: str
    claimed: float


@dataclass(frozen=True)
class Dialect:
    """What differs between the two engines."""

    name: str
    placeholder: str
    serial: str
    skip_locked: str  # appended to the claim's inner SELECT
    schema_lock: str  # serialises concurrent CREATE TABLE IF NOT EXISTS


SQLITE = Dialect("sqlite", "?", "INTEGER PRIMARY KEY AUTOINCREMENT", "", "")
POSTGRES = Dialect("postgresql", "%s", "BIGSERIAL PRIMARY KEY", "FOR UPDATE SKIP LOCKED",
                   "SELECT pg_advisory_xact_lock(7340014)")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS nodes (
        node TEXT PRIMARY KEY, mode TEXT NOT NULL DEFAULT 'pull',
        owner TEXT NOT NULL DEFAULT '', lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        next_due DOUBLE PRECISION NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'new',
        last_time DOUBLE PRECISION NOT NULL DEFAULT 0, last_check TEXT NOT NULL DEFAULT '',
        last_reason TEXT NOT NULL DEFAULT '', attested_by TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE IF NOT EXISTS events (
        seq {serial}, time DOUBLE PRECISION NOT NULL, node TEXT NOT NULL,
        kind TEXT NOT NULL, ok INTEGER NOT NULL, check_name TEXT NOT NULL,
        reason TEXT NOT NULL, verifier TEXT NOT NULL, mode TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS verifiers (
        name TEXT PRIMARY KEY, pid INTEGER NOT NULL, started DOUBLE PRECISION NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL, interval_s DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS clock_history (
        ak TEXT PRIMARY KEY, node TEXT NOT NULL, attest TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS clock_history_node ON clock_history (node)",
)
_NODE_COLUMNS = ("node, mode, state, owner, lease_until, next_due, last_time, last_check, "
                 "last_reason, attested_by")
_EVENT_COLUMNS = "seq, time, node, kind, ok, check_name, reason, verifier, mode"


def _clock_row(row: Sequence[Any]) -> ClockRow:
    try:
        attest = bytes.fromhex(str(row[2]))
    except ValueError:
        attest = b""  # judged corrupt where it is used: that node fails, not the tick
    return ClockRow(str(row[0]), str(row[1]), attest)


class _Connection(Protocol):
    """What both sqlite3's and psycopg's connections offer and the store uses."""

    def cursor(self) -> Any: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


def open_store(url: str) -> Store:
    """``postgresql://...`` (or ``postgres://``) opens PostgreSQL; anything else is the
    path of an SQLite file (its directory made 0700)."""
    if url.startswith(("postgresql://", "postgres://")):
        return Store(_connect_postgres(url), POSTGRES)
    return Store(_connect_sqlite(Path(url)), SQLITE)


def _connect_sqlite(path: Path) -> sqlite3.Connection:
    private_dir(path.parent)
    try:
        # Autocommit off, transactions opened explicitly (BEGIN IMMEDIATE: one writer).
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit fsyncs the WAL (NORMAL would lose the last commits to a power
        # cut). Commits are per tick, and they carry the clock history (security state).
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the verifier database {path}: {exc}") from None
    path.chmod(0o600)
    return conn


def _connect_postgres(url: str) -> _Connection:
    # lazy: psycopg (and libpq) only load for the PostgreSQL option
    import psycopg

    try:
        conn: _Connection = psycopg.connect(url, connect_timeout=10)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {str(exc).strip()[:300]}") from None
    return conn


def _database_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [sqlite3.Error]
    with contextlib.suppress(ImportError):
        # lazy: psycopg's error class only when the package is there
        import psycopg

        errors.append(psycopg.Error)
    return tuple(errors)


class Store:
    """One connection to the verifier's database; callers serialise their calls (one
    thread at a time: the service's loop, a CLI command)."""

    def __init__(self, conn: _Connection, dialect: Dialect) -> None:
        self._conn = conn
        self.dialect = dialect
        self._errors = _database_errors()
        self._lock = threading.Lock()
        with self._transaction() as cur:
            if dialect.schema_lock:
                cur.execute(dialect.schema_lock)
            for statement in _SCHEMA:
                cur.execute(statement.format(serial=dialect.serial))

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self._conn.close()

    # --- nodes and leases ----------------------------------------------------------------

    def sync_nodes(self, names: Iterable[str], push: Sequence[str] = (),
                   hosts: Sequence[str] = ()) -> None:
        """Every node in ``names`` has a row (new ones due now); ``push`` nodes send their
        own evidence and are never claimed for pull; ``hosts`` are claimed apart (mode
        ``host``: a lease of their own); rows of other nodes are dropped."""
        wanted = sorted({*names, *hosts})
        with self._transaction() as cur:
            known = {row[0] for row in self._all(cur, "SELECT node FROM nodes")}
            for node in wanted:
                mode = "push" if node in push else "host" if node in hosts else "pull"
                if node in known:
                    self._run(cur, "UPDATE nodes SET mode = ? WHERE node = ?", (mode, node))
                else:
                    self._run(cur, "INSERT INTO nodes (node, mode) VALUES (?, ?)", (node, mode))
            for node in known - set(wanted):
                self._run(cur, "DELETE FROM nodes WHERE node = ?", (node,))

    def claim(self, owner: str, now: float, *, interval: float, lease: float,
              limit: int, mode: str = "pull") -> list[Claim]:
        """Lease up to ``limit`` due nodes of ``mode`` (``pull`` or ``host``) to ``owner``
        for ``lease`` seconds; each is next due one interval from now, so no verifier
        attests it again before."""
        if limit <= 0:
            return []
        # S608: the SQL is constant but for the dialect's words; values are parameters.
        sql = ("UPDATE nodes SET owner = ?, lease_until = ?, next_due = ? WHERE node IN ("  # noqa: S608
               "SELECT node FROM nodes WHERE mode = ? AND next_due <= ? AND "
               f"lease_until < ? ORDER BY next_due LIMIT ? {self.dialect.skip_locked}) "
               "RETURNING node")
        with self._transaction() as cur:
            rows = self._all(cur, sql, (owner, now + lease, now + interval, mode, now, now,
                                        limit))
        return [Claim(str(row[0]), now) for row in rows]

    def record(self, verifier: str, outcome: Outcome) -> list[Event]:
        """Record ``outcome``: the node's row (its lease released if ``verifier`` held it)
        and its events: the attestation, and a state change when the state changed."""
        return self.record_all(verifier, [outcome])[0]

    def record_all(self, verifier: str, outcomes: Sequence[Outcome],
                   clocks: Sequence[ClockRow] = ()) -> list[list[Event]]:
        """:meth:`record` each outcome and keep each accepted quote in ``clocks`` as its
        AK's clock history, all in one transaction (one commit, one fsync of the WAL, per
        tick instead of per attestation); the events of each outcome, in order."""
        with self._transaction() as cur:
            for row in clocks:
                self._run(cur, "INSERT INTO clock_history (ak, node, attest, time) "
                          "VALUES (?, ?, ?, ?) ON CONFLICT (ak) DO UPDATE SET "
                          "node = excluded.node, attest = excluded.attest, "
                          "time = excluded.time",
                          (row.ak, row.node, row.attest.hex(), time.time()))
            return [self._record(cur, verifier, outcome) for outcome in outcomes]

    def clocks_of(self, nodes: Sequence[str]) -> list[ClockRow]:
        """The clock history rows of ``nodes``' AKs (a node re-provisioned has several)."""
        if not nodes:
            return []
        marks = ", ".join("?" * len(nodes))
        with self._transaction() as cur:
            rows = self._all(cur, "SELECT ak, node, attest FROM clock_history "  # noqa: S608
                             f"WHERE node IN ({marks})", tuple(nodes))
        return [_clock_row(r) for r in rows]

    def _record(self, cur: Any, verifier: str, outcome: Outcome) -> list[Event]:
        rows = self._all(cur, "SELECT state FROM nodes WHERE node = ?", (outcome.node,))
        before = str(rows[0][0]) if rows else "new"
        reason = outcome.reason[:MAX_TEXT]
        self._run(cur, "UPDATE nodes SET state = ?, last_time = ?, last_check = ?, "
                  "last_reason = ?, attested_by = ? WHERE node = ?",
                  (outcome.state, outcome.finished, outcome.check, reason, verifier,
                   outcome.node))
        self._run(cur, "UPDATE nodes SET lease_until = 0, owner = '' "
                  "WHERE node = ? AND owner = ?", (outcome.node, verifier))
        events = [self._event(cur, outcome, "attestation", outcome.check, reason,
                              verifier)]
        if before != outcome.state:
            change = f"{before} -> {outcome.state}"
            if outcome.check == HOST_CHECK:  # name the host and its check: the cause
                change += f": {reason}"
            events.append(self._event(cur, outcome, "state", outcome.check, change,
                                      verifier))
        return events

    def _event(self, cur: Any, outcome: Outcome, kind: str, check: str, reason: str,
               verifier: str) -> Event:
        rows = self._all(cur, f"INSERT INTO events ({_EVENT_COLUMNS[5:]}) VALUES "  # noqa: S608
                         "(?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                         (outcome.finished, outcome.node, kind, int(outcome.ok), check,
                          reason, verifier, outcome.mode))
        return Event(int(rows[0][0]), outcome.finished, outcome.node, kind, outcome.ok,
                     check, reason, verifier, outcome.mode)

    def nodes(self) -> list[NodeRow]:
        with self._transaction() as cur:
            rows = self._all(cur, f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY node")  # noqa: S608
        return [NodeRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), float(r[4]), float(r[5]),
                        float(r[6]), str(r[7]), str(r[8]), str(r[9])) for r in rows]

    # --- events ----------------------------------------------------------------------------

    def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        with self._transaction() as cur:
            rows = self._all(cur, f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? "  # noqa: S608
                             "ORDER BY seq LIMIT ?", (seq, limit))
        return [Event(int(r[0]), float(r[1]), str(r[2]), str(r[3]), bool(r[4]), str(r[5]),
                      str(r[6]), str(r[7]), str(r[8])) for r in rows]

    def last_seq(self) -> int:
        with self._transaction() as cur:
            rows = self._all(cur, "SELECT COALESCE(MAX(seq), 0) FROM events")
        return int(rows[0][0])

    def prune(self, keep: int = KEEP_EVENTS) -> None:
        """Drop all but the newest ``keep`` events."""
        with self._transaction() as cur:
            self._run(cur, "DELETE FROM events WHERE seq <= "
                      "(SELECT COALESCE(MAX(seq), 0) FROM events) - ?", (keep,))

    # --- verifiers -------------------------------------------------------------------------

    def heartbeat(self, name: str, pid: int, started: float, interval: float,
                  now: float) -> None:
        with self._transaction() as cur:
            self._run(cur, "DELETE FROM verifiers WHERE name = ?", (name,))
            self._run(cur, "INSERT INTO verifiers (name, pid, started, heartbeat, interval_s) "
                      "VALUES (?, ?, ?, ?, ?)", (name, pid, started, now, interval))

    def forget_verifier(self, name: str) -> None:
        """A verifier that stops: its row goes, and so do its leases (others take over)."""
        with self._transaction() as cur:
            self._run(cur, "DELETE FROM verifiers WHERE name = ?", (name,))
            self._run(cur, "UPDATE nodes SET lease_until = 0, owner = '' WHERE owner = ?",
                      (name,))

    def verifiers(self) -> list[VerifierRow]:
        with self._transaction() as cur:
            rows = self._all(cur, "SELECT name, pid, started, heartbeat, interval_s "
                             "FROM verifiers ORDER BY name")
        return [VerifierRow(str(r[0]), int(r[1]), float(r[2]), float(r[3]), float(r[4]))
                for r in rows]

    # --- plumbing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """One transaction; any database error is a StoreError and rolls back."""
        with self._lock:
            try:
                cur = self._conn.cursor()
                if self.dialect is SQLITE:
                    cur.execute("BEGIN IMMEDIATE")
                yield cur
                self._conn.commit()
            except self._errors as exc:
                with contextlib.suppress(*self._errors):
                    self._conn.rollback()
                raise StoreError(f"verifier database ({self.dialect.name}): "
                                 f"{str(exc).strip()[:300]}") from None
            except BaseException:
                with contextlib.suppress(*self._errors):
                    self._conn.rollback()
                raise

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.dialect.placeholder)

    def _run(self, cur: Any, sql: str, params: Sequence[object] = ()) -> None:
        cur.execute(self._sql(sql), tuple(params))

    def _all(self, cur: Any, sql: str, params: Sequence[object] = ()) -> list[Sequence[Any]]:
        cur.execute(self._sql(sql), tuple(params))
        return list(cur.fetchall())
