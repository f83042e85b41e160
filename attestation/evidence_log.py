"""Durable evidence: a tamper-evident, append-only log of every verified quote.

One directory (0700) holds::

    log.jsonl      one JSON object per line: entries and checkpoint heads, hash-chained
    head.json      the latest signed head (covers the last line): catches a cut-off tail
    head-key.pem   the Ed25519 key that signs heads (0600)
    policies/      every policy an entry was verified with, by SHA-256 of its text

An entry line is ``{"kind": "entry", "seq": n, "prev": H(previous line), "time": ...,
"node": ..., "nonce": hex, "evidence": {Evidence}, "policy": sha256-hex, "verdict":
{"ok": bool, "check": failed-check-or-null}}``; ``H`` is SHA-256 of a line's bytes
without its newline, and the first line's ``prev`` is 64 zeros. Every
``checkpoint_every`` entries a head line ``{"kind": "head", "seq", "prev", "time",
"head": H(entry line), "signature"}`` follows, signed over
``"testbed-evidence-head/v1\\0" || seq (8 bytes, big endian) || H(entry line)``;
head.json holds the same for the newest entry, replaced after every append.

:func:`replay` walks the whole chain (a removed or altered line breaks it: the next
line's ``prev``, a ``seq`` gap, a head's hash or signature), then re-verifies each
entry offline with the policy recorded for it, in order, with a fresh clock history,
and compares the verdict with the recorded one.

What it does not stop: someone who can read the head key, or who rolls back the log
and head.json together to an earlier consistent state; publishing heads elsewhere
(a witness) closes the second.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from attestation.encoding import b64decode, b64encode, require_int
from attestation.errors import (
    EvidenceFormatError,
    FileInputError,
    PolicyError,
    TestbedError,
    VerificationError,
)
from attestation.evidence import Evidence
from attestation.files import FILE_MODE, atomic_write, fsync_dir, private_dir, read_bounded
from attestation.ima import (
    IMA_PCR,
    MAX_CHUNK,
    RuntimePolicy,
    check_boot_aggregate,
    check_entries,
    dump_runtime_policy,
    load_runtime_policy,
    parse_log,
)
from attestation.ima import replay as replay_ima
from attestation.policy import ReferencePolicy, dump_policy, load_policy
from attestation.registrar import AkTrust, PinnedAk
from attestation.report import NOT_RUN, CheckResult, VerificationReport
from attestation.tpm_types import parse_public
from attestation.verifier import ClockHistory, QuoteVerifier

__all__ = ["EvidenceLog", "EvidenceLogError", "LoggedRuntime", "ReplayResult", "ReplayedEntry",
           "RuntimeSlice", "replay"]

HEAD_DOMAIN: Final = b"testbed-evidence-head/v1\x00"
MAX_LINE: Final = 2 << 20  # an envelope is at most 1 MiB; base64 and JSON add a third
MAX_POLICY: Final = 1 << 20
MAX_SLICE: Final = MAX_CHUNK  # runtime log bytes kept in an entry (256 KiB)
ZERO_HASH: Final = "0" * 64
_RUNTIME_PREFIX: Final = "runtime-"  # policies/runtime-DIGEST.yaml: runtime policies
_LOG, _HEAD, _KEY, _POLICIES, _LOCK = "log.jsonl", "head.json", "head-key.pem", "policies", \
    ".lock"


class EvidenceLogError(EvidenceFormatError):
    """The evidence log (or a file beside it) is malformed or unreadable."""


@dataclass(frozen=True)
class RuntimeSlice:
    """The ima-ng log bytes ``start``..``end`` a runtime check judged, replayed from
    ``from_pcr`` (what the previous good quote proved) to the quoted PCR 10."""

    start: int
    end: int
    from_pcr: bytes
    data: bytes


@dataclass(frozen=True)
class LoggedRuntime:
    """The runtime check of a logged verification: its policy, the slice it judged
    (None: the log could not be had, or the check did not run) and its verdict (None:
    not run, since an earlier check failed)."""

    policy: RuntimePolicy
    window: RuntimeSlice | None
    ok: bool | None

    def to_doc(self, policy_digest: str) -> dict[str, Any]:
        verdict = "skipped" if self.ok is None else "passed" if self.ok else "failed"
        doc: dict[str, Any] = {"policy": policy_digest, "verdict": verdict}
        if self.window is not None:
            w = self.window
            doc.update(start=w.start, end=w.end, from_pcr=w.from_pcr.hex(),
                       sha256=hashlib.sha256(w.data).hexdigest())
            if len(w.data) <= MAX_SLICE:  # larger windows: the digest and offsets only
                doc["slice"] = b64encode(w.data)
        return doc


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _head_message(seq: int, covered: str) -> bytes:
    return HEAD_DOMAIN + struct.pack(">Q", seq) + bytes.fromhex(covered)


def policy_digest(policy: ReferencePolicy) -> str:
    return hashlib.sha256(dump_policy(policy).encode()).hexdigest()


def _encode(doc: dict[str, Any]) -> bytes:
    line = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    if len(line) > MAX_LINE:
        raise EvidenceLogError(f"an evidence log line of {len(line)} bytes exceeds {MAX_LINE}")
    return line


@dataclass(frozen=True)
class _Tip:
    seq: int  # of the last entry (0: none yet)
    hash: str  # of the last line


class EvidenceLog:
    """Appends verified evidence to the log in ``directory`` (created 0700)."""

    def __init__(self, directory: Path, *, checkpoint_every: int = 64) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        self.directory = directory
        self.checkpoint_every = checkpoint_every

    @property
    def path(self) -> Path:
        return self.directory / _LOG

    def append(self, node: str, nonce: bytes, evidence: Evidence, policy: ReferencePolicy,
               report: VerificationReport, time: str, *,
               batch: dict[str, Any] | None = None,
               runtime: LoggedRuntime | None = None, durable: bool = True) -> int:
        """Record one verification durably (fsync'd); returns its sequence number.

        ``time`` is ISO 8601 with a time zone (the testbed's ``2026-12-05T06:00:00Z``).
        ``batch``: the quote covers a batch of nonces and this is ``nonce``'s inclusion
        path (recorded as the entry's ``batch``; :func:`replay` needs ``batch_root``).
        ``runtime``: the runtime check's policy, slice and verdict (the entry's
        ``runtime``), re-judged by :func:`replay`.

        Callers serialize appends (the cluster's attest lock); a torn last line left
        by a crash is cut off first, as its verification never returned.
        ``durable=False`` leaves the fsyncs to :meth:`sync`, which the caller runs
        before it reports the verdict, after releasing its lock: appends then wait for
        the disk together instead of one after the other.
        """
        _aware(time, "time")
        private_dir(self.directory / _POLICIES)
        digest = self._keep_policy(policy)
        runtime_doc = None if runtime is None else runtime.to_doc(self._keep_text(
            dump_runtime_policy(runtime.policy).encode(), _RUNTIME_PREFIX))
        key = _load_or_create_key(self.directory / _KEY)
        tip = self._tip()
        seq = tip.seq + 1
        failure = report.failure
        entry = _encode({
            "kind": "entry", "seq": seq, "prev": tip.hash, "time": time,
            "node": node, "nonce": nonce.hex(), "evidence": evidence.to_dict(),
            "policy": digest, "verdict": {"ok": report.ok,
                                          "check": None if failure is None else failure.name},
            **({} if batch is None else {"batch": batch}),
            **({} if runtime_doc is None else {"runtime": runtime_doc}),
        })
        lines = [entry]
        covered = line_hash(entry)
        head = _signed_head(key, seq, covered, time)
        if seq % self.checkpoint_every == 0:
            lines.append(_encode({**head, "kind": "head", "prev": covered}))
        self._write(lines, durable)
        atomic_write(self.directory / _HEAD, _encode(head) + b"\n", durable=durable)
        return seq

    def sync(self) -> None:
        """Make every append so far durable: the log, then its head, then their names."""
        for path in (self.path, self.directory / _HEAD):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.directory)

    def _keep_policy(self, policy: ReferencePolicy) -> str:
        text, _ = _dumped(policy)
        return self._keep_text(text)

    def _keep_text(self, text: bytes, prefix: str = "") -> str:
        """Keep a policy's text once, named by its SHA-256; returns the digest."""
        digest = hashlib.sha256(text).hexdigest()
        path = self.directory / _POLICIES / f"{prefix}{digest}.yaml"
        if not path.exists():
            atomic_write(path, text)
        return digest

    def _tip(self) -> _Tip:
        """The last line's hash and the last entry's seq, cutting off a torn last line.

        Reads backwards from the end in growing windows (an append must not cost a read
        of the whole log, nor of 2 MiB when lines are a few KiB).
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return _Tip(0, ZERO_HASH)
        try:
            tail, start = self._read_tail(fd)
            end = tail.rfind(b"\n")  # the end of the last complete line
            if end + 1 != len(tail):  # a torn last line: its append never returned
                os.ftruncate(fd, start + end + 1)
                os.fsync(fd)
        finally:
            os.close(fd)
        if end < 0:
            return _Tip(0, ZERO_HASH)
        last = tail[tail.rfind(b"\n", 0, end) + 1:end]
        return _Tip(require_seq(_parse_line(last, -1)["seq"]), line_hash(last))

    def _read_tail(self, fd: int) -> tuple[bytes, int]:
        """(the end of the file holding its last complete line whole, where it starts)."""
        size = os.fstat(fd).st_size
        window = 1 << 16
        while True:
            start = max(0, size - window)
            tail = os.pread(fd, size - start, start)
            end = tail.rfind(b"\n")
            if start == 0 or (end >= 0 and tail.rfind(b"\n", 0, end) >= 0):
                return tail, start
            if window > 2 * MAX_LINE + 2:
                raise EvidenceLogError(f"{self.path}: no complete line in its last "
                                       f"{window} bytes")
            window *= 4

    def _write(self, lines: list[bytes], durable: bool = True) -> None:
        created = not self.path.exists()  # appends are serialised: no race here
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.write(fd, b"".join(line + b"\n" for line in lines))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if created and durable:  # an append to an existing file changes no directory entry
            fsync_dir(self.directory)


_DUMPS: dict[ReferencePolicy, tuple[bytes, str]] = {}
_MAX_DUMPS = 4096


def _dumped(policy: ReferencePolicy) -> tuple[bytes, str]:
    """The policy's YAML and its digest, memoised by the policy's value (policies are
    frozen and equal only when every field is: the same value always dumps the same
    text). A verifier appends one entry per attestation; dumping YAML was a fifth of
    its CPU."""
    hit = _DUMPS.get(policy)
    if hit is None:
        text = dump_policy(policy).encode()
        hit = (text, hashlib.sha256(text).hexdigest())
        if len(_DUMPS) >= _MAX_DUMPS:
            _DUMPS.clear()
        _DUMPS[policy] = hit
    return hit


def require_seq(value: object) -> int:
    if type(value) is not int or value < 1:
        raise EvidenceLogError("an evidence log line's seq must be a positive integer")
    return value


def _aware(text: str, what: str) -> datetime:
    """An ISO 8601 time that names its time zone (so times compare)."""
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise EvidenceLogError(f"{what} {str(text)[:40]!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise EvidenceLogError(f"{what} {text!r} has no time zone")
    return moment


def _signed_head(key: Ed25519PrivateKey, seq: int, covered: str,
                 time: str) -> dict[str, Any]:
    return {"seq": seq, "head": covered, "time": time,
            "signature": b64encode(key.sign(_head_message(seq, covered)))}


def _load_or_create_key(path: Path) -> Ed25519PrivateKey:
    data = read_bounded(path, 4096, what="evidence head key", missing_ok=True)
    if data is None:
        key = Ed25519PrivateKey.generate()
        atomic_write(path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        return key
    return _parsed_key(path, data)


@lru_cache(maxsize=16)
def _parsed_key(path: Path, data: bytes) -> Ed25519PrivateKey:
    """The key in ``data`` (the file's bytes, read at each append), parsed once: keyed by
    the exact bytes, so a replaced key file is parsed anew. Errors are not cached."""
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        raise EvidenceLogError(f"{path} is not a PEM private key") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise EvidenceLogError(f"{path} is not an Ed25519 key")
    return loaded


# --- replay -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayedEntry:
    seq: int
    time: str
    node: str
    recorded_ok: bool
    replayed: VerificationReport | None  # None: before --since, chain-checked only

    @property
    def agrees(self) -> bool:
        return self.replayed is None or self.replayed.ok == self.recorded_ok

    def to_dict(self) -> dict[str, Any]:
        failure = None if self.replayed is None else self.replayed.failure
        return {"seq": self.seq, "time": self.time, "node": self.node,
                "recorded_ok": self.recorded_ok,
                "replayed_ok": None if self.replayed is None else self.replayed.ok,
                "replayed_check": None if failure is None else failure.name,
                "agrees": self.agrees}


@dataclass
class ReplayResult:
    entries: list[ReplayedEntry] = field(default_factory=list)
    heads: int = 0  # signed heads verified (checkpoints and head.json)
    problems: list[str] = field(default_factory=list)  # tampering or disagreement

    @property
    def ok(self) -> bool:
        return not self.problems and all(e.agrees for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": [e.to_dict() for e in self.entries],
                "replayed": sum(e.replayed is not None for e in self.entries),
                "heads_verified": self.heads, "problems": self.problems}


def replay(directory: Path, *, trust_for: Callable[[str, Evidence], AkTrust] | None = None,
           since: datetime | None = None, public_key: Ed25519PublicKey | None = None,
           batch_root: Callable[[bytes, object], bytes] | None = None) -> ReplayResult:
    """Check the chain and the signed heads, and re-verify entries from ``since`` on
    (an aware datetime).

    ``batch_root(nonce, batch)`` gives the qualifying data a batched entry's quote must
    carry (the root its path leads to from the nonce, under the batch domain; raises
    ValueError or EvidenceFormatError for a malformed path). Without it a batched entry
    is a problem: it cannot be re-verified here.

    ``trust_for(node, evidence)`` gives the AK trust to verify a node's entry with
    (e.g. the cluster's registry); by default each entry's own AK is pinned, which
    re-checks everything but the AK's provenance. ``public_key`` defaults to the
    head key's own public half.
    """
    key = public_key or _public_key(directory / _KEY)
    walker = _Walker(directory, key, trust_for, since, batch_root)
    for number, line in _lines(directory / _LOG):
        walker.line(number, line)
    walker.finish()
    return walker.result


def _public_key(path: Path) -> Ed25519PublicKey:
    if not path.exists():
        raise EvidenceLogError(f"no head key at {path}: nothing was ever logged there")
    return _load_or_create_key(path).public_key()


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Lines of the log, each at most MAX_LINE bytes (read in bounded pieces)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise EvidenceLogError(f"no evidence log at {path}") from None
    except OSError as exc:
        raise FileInputError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(iter(lambda: handle.readline(MAX_LINE + 2), b""), 1):
            if not line.endswith(b"\n"):
                what = "longer than the limit" if len(line) > MAX_LINE else "torn (no newline)"
                raise EvidenceLogError(f"{path}: line {number} is {what}")
            yield number, line[:-1]


def _parse_line(line: bytes, number: int) -> dict[str, Any]:
    where = "the last line" if number < 0 else f"line {number}"
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        raise EvidenceLogError(f"{where} of the evidence log is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") not in ("entry", "head"):
        raise EvidenceLogError(f"{where} of the evidence log is neither an entry nor a head")
    return doc


class _Altered(VerificationError):
    """A runtime record that is not what was logged (as opposed to a runtime verdict)."""

    def __init__(self, reason: str) -> None:
        super().__init__("runtime", reason)


class _Walker:
    """Replays the log line by line, collecting problems instead of stopping at one."""

    def __init__(self, directory: Path, key: Ed25519PublicKey,
                 trust_for: Callable[[str, Evidence], AkTrust] | None,
                 since: datetime | None,
                 batch_root: Callable[[bytes, object], bytes] | None = None) -> None:
        self.directory = directory
        self.batch_root = batch_root
        self.key = key
        self.trust_for = trust_for
        self.since = since
        self.result = ReplayResult()
        self.prev = ZERO_HASH
        self.seq = 0
        self.last_entry_hash = ZERO_HASH
        self.history = ClockHistory()
        self.policies: dict[str, ReferencePolicy] = {}
        self.runtime_policies: dict[str, RuntimePolicy] = {}

    def line(self, number: int, line: bytes) -> None:
        doc = _parse_line(line, number)
        if doc.get("prev") != self.prev:
            self.result.problems.append(
                f"line {number}: the chain breaks (its prev is not the hash of line "
                f"{number - 1}): a line was removed, inserted or altered before it")
        self.prev = line_hash(line)
        if doc["kind"] == "head":
            self._head(doc, f"line {number}")
        else:
            self._entry(doc, number, self.prev)

    def _entry(self, doc: dict[str, Any], number: int, digest: str) -> None:
        seq = require_seq(doc.get("seq"))
        if seq != self.seq + 1:
            self.result.problems.append(f"line {number}: entry {seq} follows entry {self.seq} "
                                        f"(entries {self.seq + 1}..{seq - 1} are missing)"
                                        if seq > self.seq + 1 else
                                        f"line {number}: entry {seq} repeats or goes back")
        self.seq, self.last_entry_hash = seq, digest
        self.result.entries.append(self._replay_entry(doc, number, seq))

    def _replay_entry(self, doc: dict[str, Any], number: int, seq: int) -> ReplayedEntry:
        try:
            time, node = str(doc["time"]), str(doc["node"])
            verdict = doc["verdict"]
            recorded_ok = verdict["ok"] if isinstance(verdict, dict) else None
            if not isinstance(recorded_ok, bool):
                raise EvidenceLogError("verdict.ok is not a boolean")
            nonce = bytes.fromhex(str(doc["nonce"]))
            evidence = Evidence.from_dict(doc["evidence"])
            when = _aware(time, "time")
        except (KeyError, ValueError, TypeError, EvidenceFormatError) as exc:
            raise EvidenceLogError(f"line {number}: entry {seq} is malformed: {exc}") from None
        if self.since is not None and when < self.since:
            return ReplayedEntry(seq, time, node, recorded_ok, None)
        policy = self._policy(str(doc.get("policy")), number)
        if policy is None:
            return ReplayedEntry(seq, time, node, recorded_ok, None)
        try:
            trust = self.trust_for(node, evidence) if self.trust_for else PinnedAk(
                [parse_public(evidence.ak_public).public_key()], "AK recorded in the entry")
            verifier = QuoteVerifier(ak_trust=trust, policy=policy, clock_history=self.history)
            report = verifier.verify(evidence, self._quoted(doc, nonce, number, seq))
        except TestbedError as exc:
            raise EvidenceLogError(f"line {number}: entry {seq} cannot be re-verified: "
                                   f"{exc}") from None
        if "runtime" in doc:
            report = self._runtime(report, doc["runtime"], evidence, number, seq)
        entry = ReplayedEntry(seq, time, node, recorded_ok, report)
        if not entry.agrees:
            self.result.problems.append(
                f"line {number}: entry {seq} ({node}) was recorded "
                f"{'accepted' if recorded_ok else 'rejected'} but re-verifies "
                f"{'accepted' if report.ok else 'rejected'}")
        return entry

    def _runtime(self, report: VerificationReport, doc: object, evidence: Evidence,
                 number: int, seq: int) -> VerificationReport:
        """``report`` plus the runtime check re-judged from the recorded slice."""
        where = f"line {number}: entry {seq}"
        if not isinstance(doc, dict):
            raise EvidenceLogError(f"{where}: its runtime record is not an object")
        if report.failure is not None:
            return VerificationReport((*report.checks, CheckResult("runtime", "skipped",
                                                                   NOT_RUN)))
        try:
            detail = self._judge_runtime(doc, evidence, where)
        except VerificationError as exc:
            if isinstance(exc, _Altered):  # tampering, not a verdict: name it
                self.result.problems.append(f"{where}: runtime: {exc.reason}")
            return VerificationReport((*report.checks, CheckResult("runtime", "failed",
                                                                   exc.reason, exc.data)))
        except (KeyError, TypeError, ValueError, EvidenceFormatError, PolicyError) as exc:
            raise EvidenceLogError(f"{where}: its runtime record is malformed: {exc}") from None
        return VerificationReport((*report.checks, CheckResult("runtime", "passed", detail)))

    def _judge_runtime(self, doc: dict[str, Any], evidence: Evidence, where: str) -> str:
        """Raise VerificationError("runtime", ...) unless the recorded slice replays to the
        quoted PCR 10 and the runtime policy of the time allows it."""
        policy = self._runtime_policy(str(doc["policy"]), where)
        if "slice" not in doc:
            if doc.get("verdict") == "passed":
                return ("recorded as passed; its log slice was too large to keep "
                        f"(sha256 {str(doc.get('sha256'))[:16]}): not re-judged")
            raise VerificationError("runtime", "recorded as failed before a log slice was "
                                    "had (the node did not show its log): not re-judged")
        start = require_int(doc["start"], "runtime start", EvidenceLogError, minimum=0)
        end = require_int(doc["end"], "runtime end", EvidenceLogError, minimum=start)
        data = b64decode(doc["slice"], "runtime slice", limit=MAX_SLICE)
        if hashlib.sha256(data).hexdigest() != doc["sha256"] or len(data) != end - start:
            raise _Altered("the recorded runtime log slice does not "
                                    "match its digest and offsets: it was altered")
        try:
            chunk = parse_log(data, start)
        except EvidenceFormatError as exc:
            raise _Altered(f"the recorded runtime log slice is not an ima-ng log: {exc}") \
                from None
        if chunk.end != end:
            raise _Altered(f"the recorded runtime log slice ends at "
                                    f"{chunk.end}, not at {end}")
        quoted = evidence.pcrs.get(IMA_PCR)
        values = replay_ima(bytes.fromhex(str(doc["from_pcr"])), chunk.entries)
        reached = values[-1] if values else bytes.fromhex(str(doc["from_pcr"]))
        if quoted is None or reached != quoted:
            raise _Altered(f"the recorded runtime log slice (bytes "
                                    f"{start}-{end}) does not replay to the quoted PCR "
                                    f"{IMA_PCR}: it was altered")
        check_boot_aggregate(chunk.entries, evidence.pcrs)  # as the live check does
        check_entries(policy, chunk.entries)
        return (f"{len(chunk.entries)} recorded ima-ng entries (log bytes {start}-{end}) "
                f"replay to the quoted PCR {IMA_PCR}; runtime policy {policy.name!r} of the "
                "time allows them")

    def _runtime_policy(self, digest: str, where: str) -> RuntimePolicy:
        if digest not in self.runtime_policies:
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise EvidenceLogError(f"{where}: the runtime policy digest is malformed")
            path = self.directory / _POLICIES / f"{_RUNTIME_PREFIX}{digest}.yaml"
            text = read_bounded(path, MAX_POLICY, what="recorded runtime policy",
                                missing_ok=True)
            if text is None or hashlib.sha256(text).hexdigest() != digest:
                raise _Altered(f"the recorded runtime policy "
                                        f"{digest[:16]} is missing or altered")
            self.runtime_policies[digest] = load_runtime_policy(text, str(path))
        return self.runtime_policies[digest]

    def _quoted(self, doc: dict[str, Any], nonce: bytes, number: int, seq: int) -> bytes:
        """What the entry's quote must carry: its nonce, or its batch's root."""
        if "batch" not in doc:
            return nonce
        if self.batch_root is None:
            raise EvidenceLogError(f"line {number}: entry {seq} is a batched quote and this "
                                   "replay cannot check batch paths")
        try:
            return self.batch_root(nonce, doc["batch"])
        except (ValueError, EvidenceFormatError) as exc:
            raise EvidenceLogError(f"line {number}: entry {seq} has a malformed batch path: "
                                   f"{exc}") from None

    def _policy(self, digest: str, number: int) -> ReferencePolicy | None:
        if digest not in self.policies:
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise EvidenceLogError(f"line {number}: the policy digest is malformed")
            path = self.directory / _POLICIES / f"{digest}.yaml"
            text = read_bounded(path, MAX_POLICY, what="recorded policy", missing_ok=True)
            if text is None or hashlib.sha256(text).hexdigest() != digest:
                self.result.problems.append(f"line {number}: the recorded policy {digest[:16]} "
                                            "is missing or altered: not re-verified")
                return None
            self.policies[digest] = load_policy(text)
        return self.policies[digest]

    def _head(self, doc: dict[str, Any], where: str) -> None:
        seq, covered = doc.get("seq"), doc.get("head")
        signature = b64decode(doc.get("signature"), f"{where}: signature", limit=64)
        if seq != self.seq or covered != self.last_entry_hash:
            self.result.problems.append(f"{where}: the signed head names entry {seq} "
                                        f"{str(covered)[:16]}, the log has entry {self.seq} "
                                        f"{self.last_entry_hash[:16]}")
            return
        try:
            self.key.verify(signature, _head_message(self.seq, self.last_entry_hash))
        except InvalidSignature:
            self.result.problems.append(f"{where}: the head signature does not verify")
            return
        self.result.heads += 1

    def finish(self) -> None:
        data = read_bounded(self.directory / _HEAD, MAX_LINE, what="evidence head",
                            missing_ok=True)
        if data is None:
            self.result.problems.append("head.json is missing: the log's tail is unsigned")
            return
        try:
            doc = json.loads(data)
        except ValueError:
            raise EvidenceLogError("head.json is not JSON") from None
        if not isinstance(doc, dict):
            raise EvidenceLogError("head.json is not a JSON object")
        self._head(doc, "head.json")  # a mismatch: entries cut off the end, or the last altered
