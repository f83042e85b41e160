"""The append-only, hash-chained audit log.

One JSON object per line (canonical JSON)::

    {"account":"alice","hash":"…","key":"k1","mac":"…","op":"sign","outcome":"ok",
     "prev":"…","seq":42,"ts":1700000000.123,"version":1}

* ``hash`` = SHA-256 of the canonical JSON of the entry without ``hash`` and ``mac``
  (so it covers ``prev``, the previous entry's hash: a chain starting at 64 zeros);
* ``mac`` = HMAC-SHA256 of ``hash`` under a key derived from the sealed storage key:
  someone who edits the file can recompute hashes, not MACs;
* ``seq`` counts from 1 without gaps.

:func:`verify_audit_log` detects edits (hash), entries removed from the middle or
reordered (seq, prev), forged re-chaining (mac, with the key) and a torn last line.
Cutting entries off the *end* is only detectable against a known head
(``expected_head``), e.g. the running CryptoVM's :attr:`AuditLog.head`.

Entries carry names, ids, outcomes and short reasons, never key material, PSKs or
request payloads: :meth:`AuditLog.append` accepts only those fields.

Failures of peers that have not authenticated (failed logins, malformed frames before
login) go through :meth:`AuditLog.append_unauthenticated`: at most
:data:`UNAUTHENTICATED_BURST` entries per :data:`UNAUTHENTICATED_WINDOW_S`, then one
``audit.suppressed`` entry counting the rest by op and check, so that nobody without
an account can fill the disk. Everything an authenticated account does is audited
entry by entry.

Durability: lines are buffered and written with one ``write(2)`` per batch
(O_APPEND); :meth:`AuditLog.sync` writes and fsyncs. The CryptoVM syncs before it
answers (per operation in-process; group-committed per batch in the server).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

from attestation.errors import VerificationError
from attestation.files import FILE_MODE, fsync_dir
from cryptovm.encoding import canonical_json
from cryptovm.errors import StorageError

GENESIS = "0" * 64
MAX_FIELD = 200
TAIL_CHUNK = 1 << 16
_REQUIRED = ("seq", "ts", "account", "op", "outcome", "prev", "hash")
_OPTIONAL = ("key", "version", "check", "detail", "target", "mac")
UNAUTHENTICATED_BURST = 20  # entries per window written one by one
UNAUTHENTICATED_WINDOW_S = 60.0
SUPPRESSED_OP = "audit.suppressed"


def _clip(value: str) -> str:
    if len(value) <= MAX_FIELD and "\n" not in value:
        return value
    value = value.replace("\n", " ")
    return value if len(value) <= MAX_FIELD else value[:MAX_FIELD - 1] + "…"


def canonical_entry(fields: list[tuple[str, str | int | float | None]]) -> bytes:
    """canonical_json of the entry made of ``fields`` (sorted by name, None left out),
    built directly: the audit log is on every request's path."""
    parts = []
    for name, value in fields:
        if value is None:
            continue
        text = encode_basestring_ascii(value) if isinstance(value, str) else repr(value)
        parts.append(f'"{name}":{text}')
    return ("{" + ",".join(parts) + "}").encode()


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "mac")}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def entry_mac(key: bytes, digest: str) -> str:
    return hmac.digest(key, bytes.fromhex(digest), "sha256").hex()


class AuditLog:
    """Appends to one audit file; thread-safe."""

    def __init__(self, path: Path, mac_key: bytes | None, *, sync_each: bool = True) -> None:
        self.path = path
        self._hmac = None if mac_key is None else hmac.new(mac_key, digestmod=hashlib.sha256)
        self.sync_each = sync_each
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._throttle = _Throttle(UNAUTHENTICATED_BURST, UNAUTHENTICATED_WINDOW_S)
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, FILE_MODE)
        if created:
            fsync_dir(path.parent)
        self._seq, self._prev, torn = self._recover_tail()
        self._written = self._durable = self._seq
        if torn:
            self.append("cryptovm", "audit.recovered", "ok",
                        detail=f"dropped a torn final line of {torn} bytes (crash during write)")
            self.sync()

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, seq={self._seq})"

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last appended entry."""
        with self._lock:
            return self._seq, self._prev

    @property
    def written_seq(self) -> int:
        return self._written

    @property
    def durable_seq(self) -> int:
        return self._durable

    def append(self, account: str, op: str, outcome: str, *, key: str | None = None,
               version: int | None = None, check: str | None = None,
               detail: str | None = None, target: str | None = None) -> int:
        """Add one entry; returns its seq. Written at the next flush/sync."""
        fields: list[tuple[str, str | int | float | None]] = [
            ("account", _clip(account)), ("check", check and _clip(check)),
            ("detail", detail and _clip(detail)), ("key", key and _clip(key)),
            ("op", _clip(op)), ("outcome", outcome)]
        ts = round(time.time(), 6)
        with self._lock:
            self._seq += 1
            seq = self._seq
            body = canonical_entry([*fields, ("prev", self._prev), ("seq", seq),
                                    ("target", target and _clip(target)), ("ts", ts),
                                    ("version", version)])
            raw = hashlib.sha256(body).digest()
            digest = raw.hex()
            tail = f',"hash":"{digest}"'
            if self._hmac is not None:
                mac = self._hmac.copy()  # keyed once: cheaper than hmac.digest per entry
                mac.update(raw)
                tail += f',"mac":"{mac.hexdigest()}"'
            # Canonical body + hash (+ mac): the verifier recomputes the hash over the
            # canonical JSON of every field but hash and mac, which is exactly ``body``.
            self._buffer.append(body[:-1] + tail.encode() + b"}\n")
            self._prev = digest
        if self.sync_each:
            self.sync()
        return seq

    def append_unauthenticated(self, account: str, op: str, outcome: str, *,
                               check: str | None = None, detail: str | None = None,
                               target: str | None = None) -> int | None:
        """A failure of a peer that has not authenticated: rate-limited (module doc).
        Returns the entry's seq, or None when it was only counted."""
        with self._lock:
            summary = self._throttle.close_window_if_over()
            admitted = self._throttle.admit(op, check)
        if summary:
            self.append("-", SUPPRESSED_OP, "error", detail=summary)
        if not admitted:
            return None
        return self.append(account, op, outcome, check=check, detail=detail, target=target)

    def flush_suppressed(self, *, force: bool = False) -> None:
        """Write the suppressed-entries summary of a finished window (a server calls this
        now and then, so the count lands even when the flood stops); ``force``: end the
        current window now."""
        with self._lock:
            summary = (self._throttle.close_window(force=True) if force
                       else self._throttle.close_window_if_over())
        if summary:
            self.append("-", SUPPRESSED_OP, "error", detail=summary)

    def set_unauthenticated_limit(self, burst: int, window: float) -> None:
        """At most ``burst`` unauthenticated failures logged one by one per ``window`` s."""
        with self._lock:
            self._throttle = _Throttle(burst, window)

    def flush(self) -> int:
        """Write buffered entries (one write call); returns the last written seq."""
        with self._lock:
            if self._buffer:
                data = b"".join(self._buffer)
                self._buffer.clear()
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                self._written = self._seq
            return self._written

    def sync(self) -> int:
        """Write and fsync; returns the seq now durable."""
        target = self.flush()
        if target > self._durable:
            os.fsync(self._fd)
            with self._lock:
                self._durable = max(self._durable, target)
        return self._durable

    def close(self) -> None:
        if self._fd >= 0:
            self.flush_suppressed(force=True)
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def _recover_tail(self) -> tuple[int, str, int]:
        """Last (seq, hash); a torn last line (no newline) is cut off and counted."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0, GENESIS, 0
        start = max(0, size - TAIL_CHUNK)
        tail = os.pread(self._fd, size - start, start)
        torn = 0
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n")
            torn = len(tail) - (cut + 1)
            os.ftruncate(self._fd, size - torn)
            os.fsync(self._fd)
            tail = tail[:cut + 1]
        lines = tail.splitlines()
        if not lines:
            if start or torn < size:
                raise StorageError(f"{self.path}: last audit entry is longer than "
                                   f"{TAIL_CHUNK} bytes")
            return 0, GENESIS, torn
        try:
            last = json.loads(lines[-1])
            return int(last["seq"]), str(last["hash"]), torn
        except (ValueError, KeyError, TypeError):
            raise StorageError(f"{self.path}: the last audit entry is unreadable (tampered?); "
                               "run the audit verifier") from None


class _Throttle:
    """Counts unauthenticated failures per window; the caller holds the log's lock."""

    def __init__(self, burst: int, window: float) -> None:
        self.burst, self.window = burst, window
        self.started = time.monotonic()
        self.written = 0
        self.suppressed: Counter[str] = Counter()

    def admit(self, op: str, check: str | None) -> bool:
        if self.written < self.burst:
            self.written += 1
            return True
        self.suppressed[f"{op}/{check or '-'}"] += 1
        return False

    def close_window_if_over(self) -> str | None:
        return self.close_window(force=time.monotonic() - self.started >= self.window)

    def close_window(self, *, force: bool) -> str | None:
        """Start a new window if ``force``; the summary of what the old one suppressed."""
        if not force:
            return None
        elapsed = time.monotonic() - self.started
        total = sum(self.suppressed.values())
        kinds = ", ".join(f"{kind} x{count}" for kind, count in
                          self.suppressed.most_common(8))
        self.started, self.written = time.monotonic(), 0
        self.suppressed.clear()
        if not total:
            return None
        return (f"suppressed {total} similar unauthenticated failures in {elapsed:.0f} s "
                f"(more than {self.burst} per {self.window:g} s): {kinds}")


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    entries: int
    head: tuple[int, str]
    failed_line: int | None = None
    check: str | None = None
    reason: str | None = None

    def raise_for_failure(self) -> None:
        if not self.ok:
            raise VerificationError(self.check or "audit",
                                    f"line {self.failed_line}: {self.reason}")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "head_seq": self.head[0],
                "head_hash": self.head[1], "failed_line": self.failed_line,
                "check": self.check, "reason": self.reason}


class _Bad(Exception):
    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check, self.reason = check, reason


def _check_entry(raw: bytes, seq: int, prev: str, mac_key: bytes | None) -> dict[str, Any]:
    try:
        entry = json.loads(raw)
    except ValueError:
        raise _Bad("format", "not a JSON line") from None
    if not isinstance(entry, dict) or any(k not in entry for k in _REQUIRED) or (
            set(entry) - set(_REQUIRED) - set(_OPTIONAL)):
        raise _Bad("format", "not an audit entry (missing or unknown fields)")
    if entry["seq"] != seq + 1:
        raise _Bad("sequence", f"entry {entry['seq']!r} follows entry {seq}: entries were "
                   "removed, duplicated or reordered")
    if entry["prev"] != prev:
        raise _Bad("chain", "prev does not equal the previous entry's hash")
    if not hmac.compare_digest(str(entry["hash"]), entry_hash(entry)):
        raise _Bad("hash", "the entry's content does not hash to its hash (edited)")
    if mac_key is not None and not hmac.compare_digest(
            str(entry.get("mac", "")), entry_mac(mac_key, str(entry["hash"]))):
        raise _Bad("mac", "MAC does not verify (entry forged or re-chained without the key)")
    return entry


def verify_audit_log(path: Path, mac_key: bytes | None = None,
                     expected_head: tuple[int, str] | None = None) -> AuditReport:
    """Check the whole chain; the first failure is reported with its line number."""
    seq, prev, line_no = 0, GENESIS, 0
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    try:
        for line_no, raw in enumerate(lines, start=1):  # noqa: B007 - used after the loop
            entry = _check_entry(raw, seq, prev, mac_key)
            seq, prev = entry["seq"], entry["hash"]
        if torn:
            line_no += 1
            raise _Bad("torn_tail", f"the last line is incomplete ({len(torn)} bytes)")
        if expected_head is not None and (seq, prev) != tuple(expected_head):
            line_no += 1
            raise _Bad("truncated", f"the log ends at entry {seq}, the known head is entry "
                       f"{expected_head[0]} (entries cut off the end)")
    except _Bad as bad:
        return AuditReport(False, seq, (seq, prev), line_no, bad.check, bad.reason)
    return AuditReport(True, seq, (seq, prev))


def read_entries(path: Path) -> list[dict[str, Any]]:
    """All complete entries, unverified (for display and tests)."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().split(b"\n") if line]
