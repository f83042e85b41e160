"""TCTP, sans-IO: Trusted Passages sessions whose TLS records travel in HTTP bodies.

After TRESOR's Trusted Cloud Transfer Protocol (seed 000). A HALEC (HTTP application
layer encryption channel) is one :class:`~trusted_passages.protocol.TrustedPassagesConnection`
whose bytes are carried in HTTP entity bodies instead of a TCP stream, so that HTTP
intermediaries (load balancers, caches, routing proxies) see and manage the headers
and never the bodies. docs/tctp.md has the message formats; in short:

* discovery: ``OPTIONS *`` with ``Accept: text/prs.tctp-discovery``, answered with one
  ``PATTERN:HALEC-CREATION-URL`` line per URL pattern (:class:`Discovery`);
* creation: ``POST /halecs`` carrying the ClientHello records, answered with the
  server's handshake records and ``Location: /halecs/<id>``; then POSTs to that URL
  until the attestation exchange inside the session is complete (:class:`HalecClient`,
  :class:`HalecTable`);
* use: a request with ``Content-Encoding: encrypted`` whose body is the HALEC URL,
  CRLF, and TLS records carrying an inner message (:func:`encode_body`,
  :func:`parse_body`); the response likewise.

The inner message repeats the method and target of the outer request (the server
refuses a mismatch, so a body cannot be moved to another URL) and the response status
(the client refuses a mismatch), and states its length (a truncated body is refused).

Nothing here does I/O: the HTTP server and client in ``testbed.tctp`` move the bytes.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from trusted_passages.errors import AttestationRejected, ProtocolError
from trusted_passages.events import ApplicationData, AttestationFailed, Event
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.protocol import TrustedPassagesConnection

DISCOVERY_TYPE: Final = "text/prs.tctp-discovery"
ENCRYPTED: Final = "encrypted"  # the Content-Encoding of a TCTP body
MAX_BODY: Final = 1 << 20  # bytes of an HTTP body, either way
MAX_HEAD: Final = 4096  # bytes of an inner message's JSON head
MAX_URL: Final = 256  # bytes of a HALEC URL
MAX_DISCOVERY: Final = 64 * 1024
MAX_RULES: Final = 64
MAX_PATTERN: Final = 256
MAX_MATCHED_PATH: Final = 2048  # longer paths are refused before any pattern runs
CRLF: Final = b"\r\n"
# TLS record header: type (20..23), version 3.x, length at most 2^14 + 256 (RFC 8446 5.2).
_RECORD_TYPES: Final = frozenset({20, 21, 22, 23})
_MAX_RECORD: Final = (1 << 14) + 256
_HALEC_URL: Final = re.compile(r"(?:/[A-Za-z0-9._~-]+)*/halecs/[A-Za-z0-9_-]{16,64}")
_CREATION_URL: Final = re.compile(r"(?:/[A-Za-z0-9._~\\-]+)*/halecs")
_METHOD: Final = re.compile(r"[A-Z]{1,16}")
_TARGET: Final = re.compile(r"/[\x21-\x7e]{0,2047}")
_CONTENT_TYPE: Final = re.compile(r"[\x20-\x7e]{1,200}")
# Patterns come from an unauthenticated document: a safe subset of Python's re (no
# repeated groups, at most two unbounded quantifiers) keeps matching polynomial.
_PATTERN_CHARS: Final = re.compile(r"[A-Za-z0-9/._~()?*+|\[\]^\\-]+")
_REPEATED_GROUP: Final = re.compile(r"\)[*+{]")


class TctpError(ProtocolError):
    """A TCTP message was malformed, truncated, oversized, replayed or unexpected.

    ``status`` is the HTTP status an endpoint answers it with.
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# --- discovery -------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscoveryRule:
    """Paths matching ``pattern`` go over a HALEC made at ``creation`` (None: in clear)."""

    pattern: str
    creation: str | None
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", _compile_pattern(self.pattern))
        if self.creation is not None and not _CREATION_URL.fullmatch(self.creation):
            raise TctpError(f"discovery: bad HALEC creation URL {self.creation[:80]!r}")

    def match(self, path: str) -> tuple[bool, str | None]:
        """(does the rule cover ``path``, its creation URL: None for clear)."""
        found = self._compiled.fullmatch(path)
        if found is None or self.creation is None:
            return found is not None, None
        try:
            url = found.expand(self.creation)
        except (re.error, IndexError):
            raise TctpError(f"discovery: {self.creation!r} names a missing group") from None
        url = re.sub("/+", "/", url)  # an empty optional group leaves "//"
        if not _CREATION_URL.fullmatch(url):
            raise TctpError(f"discovery: {self.creation!r} expands to a bad URL")
        return True, url


@dataclass(frozen=True)
class Discovery:
    """The discovery document: the first rule whose pattern matches a path decides."""

    rules: tuple[DiscoveryRule, ...]

    def creation_url(self, path: str) -> str | None:
        """Where to create the HALEC for ``path`` (None: served in clear).

        Raises TctpError when no rule covers the path."""
        if len(path) > MAX_MATCHED_PATH:
            raise TctpError("path too long for discovery matching", 414)
        for rule in self.rules:
            covered, url = rule.match(path)
            if covered:
                return url
        raise TctpError(f"discovery: no rule covers {path[:80]!r}", 404)

    def render(self) -> bytes:
        return "".join(f"{r.pattern}:{r.creation or ''}\n" for r in self.rules).encode()


def parse_discovery(body: bytes) -> Discovery:
    """Strictly parse a discovery document (``PATTERN:URL`` lines, URL empty for clear)."""
    if len(body) > MAX_DISCOVERY:
        raise TctpError(f"discovery document over {MAX_DISCOVERY} bytes", 413)
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise TctpError("discovery document is not ASCII") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) > MAX_RULES:
        raise TctpError(f"discovery document must have 1 to {MAX_RULES} rules")
    rules = []
    for line in lines:
        pattern, colon, creation = line.rpartition(":")
        if not colon:
            raise TctpError(f"discovery line without ':': {line[:80]!r}")
        rules.append(DiscoveryRule(pattern, creation or None))
    return Discovery(tuple(rules))


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    if not pattern or len(pattern) > MAX_PATTERN or not pattern.startswith("/"):
        raise TctpError(f"discovery pattern must start with '/' and have 1 to "
                        f"{MAX_PATTERN} characters: {pattern[:80]!r}")
    if not _PATTERN_CHARS.fullmatch(pattern) or _REPEATED_GROUP.search(pattern):
        raise TctpError(f"discovery pattern outside the allowed subset: {pattern[:80]!r}")
    if pattern.count("*") + pattern.count("+") > 2:
        raise TctpError(f"discovery pattern has more than two repetitions: {pattern[:80]!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TctpError(f"discovery pattern does not compile: {exc}") from None


# --- bodies ----------------------------------------------------------------------------


def encode_body(halec_url: str, records: bytes) -> bytes:
    """A TCTP body: the HALEC URL, CRLF, then TLS records."""
    return halec_url.encode("ascii") + CRLF + records


def parse_body(body: bytes) -> tuple[str, bytes]:
    """(HALEC URL, TLS records) of a TCTP body; whole records only, or TctpError."""
    if len(body) > MAX_BODY:
        raise TctpError(f"TCTP body over {MAX_BODY} bytes", 413)
    end = body.find(CRLF, 0, MAX_URL + len(CRLF))
    if end < 0:
        raise TctpError("TCTP body does not start with a HALEC URL line")
    url = body[:end].decode("ascii", errors="replace")
    if not _HALEC_URL.fullmatch(url):
        raise TctpError(f"TCTP body starts with no HALEC URL: {url[:80]!r}")
    records = body[end + len(CRLF):]
    check_records(records)
    return url, records


def check_records(data: bytes) -> None:
    """Require ``data`` to be one or more whole TLS records (no partial, no trailer)."""
    if not data:
        raise TctpError("no TLS records")
    offset = 0
    while offset < len(data):
        header = data[offset:offset + 5]
        if len(header) < 5:
            raise TctpError("truncated TLS record header")
        length = int.from_bytes(header[3:5], "big")
        if header[0] not in _RECORD_TYPES or header[1] != 3 or length > _MAX_RECORD:
            raise TctpError(f"not a TLS record at offset {offset}")
        if offset + 5 + length > len(data):
            raise TctpError("truncated TLS record")
        offset += 5 + length


# --- inner messages ------------------------------------------------------------------


@dataclass(frozen=True)
class InnerRequest:
    method: str
    target: str  # path and query, as the client sent them
    content_type: str | None
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class InnerResponse:
    status: int
    content_type: str | None
    body: bytes = field(repr=False)


def encode_request(request: InnerRequest) -> bytes:
    return _encode_inner({"kind": "request", "method": request.method,
                          "target": request.target, "type": request.content_type},
                         request.body)


def encode_response(response: InnerResponse) -> bytes:
    return _encode_inner({"kind": "response", "status": response.status,
                          "type": response.content_type}, response.body)


def decode_request(data: bytes) -> InnerRequest:
    head, body = _decode_inner(data, "request", {"method", "target", "type"})
    method, target, kind = head["method"], head["target"], head["type"]
    if not (isinstance(method, str) and _METHOD.fullmatch(method)):
        raise TctpError("inner request: bad method")
    if not (isinstance(target, str) and _TARGET.fullmatch(target)):
        raise TctpError("inner request: bad target")
    return InnerRequest(method, target, _content_type(kind), body)


def decode_response(data: bytes) -> InnerResponse:
    head, body = _decode_inner(data, "response", {"status", "type"})
    status = head["status"]
    if not (isinstance(status, int) and not isinstance(status, bool) and 100 <= status < 600):
        raise TctpError("inner response: bad status")
    return InnerResponse(status, _content_type(head["type"]), body)


def _content_type(value: object) -> str | None:
    if value is None:
        return None
    if not (isinstance(value, str) and _CONTENT_TYPE.fullmatch(value)):
        raise TctpError("inner message: bad content type")
    return value


def _encode_inner(head: dict[str, object], body: bytes) -> bytes:
    head = {"v": 1, **head, "length": len(body)}
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + body


def _decode_inner(data: bytes, kind: str, fields: set[str]) -> tuple[dict[str, object], bytes]:
    end = data.find(b"\n", 0, MAX_HEAD)
    if end < 0:
        raise TctpError(f"inner {kind}: no head within {MAX_HEAD} bytes")
    try:
        head = json.loads(data[:end])
    except (ValueError, RecursionError):
        raise TctpError(f"inner {kind}: head is not JSON") from None
    if not isinstance(head, dict) or set(head) != fields | {"v", "kind", "length"}:
        raise TctpError(f"inner {kind}: head has the wrong fields")
    if head["v"] != 1 or head["kind"] != kind:
        raise TctpError(f"inner message is not a version 1 {kind}")
    body = data[end + 1:]
    if head["length"] != len(body):
        raise TctpError(f"inner {kind}: {len(body)} body bytes, the head says "
                        f"{head['length']!r} (truncated or padded)")
    return head, body


# --- driving a connection with whole bodies -------------------------------------------


def _feed(core: TrustedPassagesConnection, records: bytes) -> tuple[bytes, bytes]:
    """Feed records; (plaintext received, bytes to send). Raises AttestationRejected."""
    events: list[Event] = core.receive_data(records)
    failure = next((e for e in events if isinstance(e, AttestationFailed)), None)
    if failure is not None:
        raise AttestationRejected(failure.check, failure.reason, by_peer=failure.by_peer)
    if core.closed:
        raise TctpError("the HALEC's TLS session ended (bad record, replay or close)", 403)
    plain = b"".join(e.data for e in events if isinstance(e, ApplicationData))
    return plain, core.data_to_send()


def _seal(core: TrustedPassagesConnection, message: bytes) -> bytes:
    core.send(message)
    return core.data_to_send()


# --- the client side ---------------------------------------------------------------


class HalecClient:
    """One client HALEC. Bodies in, bodies out; one request at a time (TLS is ordered).

    Flow: :meth:`first_flight` is the body of ``POST <creation URL>``; each handshake
    answer goes to :meth:`on_handshake_answer`, which returns the next body to POST to
    :attr:`url`, or None once the HALEC is established.
    """

    def __init__(self, core: TrustedPassagesConnection, creation_url: str) -> None:
        if core.role != "client":
            raise ValueError("a HalecClient drives a client connection")
        self._core = core
        self.creation_url = creation_url
        self.url: str | None = None

    def __repr__(self) -> str:
        return f"HalecClient(url={self.url!r}, state={self._core.state.value!r})"

    @property
    def established(self) -> bool:
        return self._core.established

    @property
    def peer(self) -> PeerEvidence | None:
        return self._core.peer

    def first_flight(self) -> bytes:
        return self._core.data_to_send()

    def on_handshake_answer(self, status: int, location: str | None,
                            body: bytes) -> bytes | None:
        """Take the server's answer to a handshake POST; the next body to POST, or None."""
        if self.url is None:
            if status not in (200, 201) or location is None or not _HALEC_URL.fullmatch(location):
                raise TctpError(f"HALEC creation answered {status} without a HALEC "
                                f"Location", 502)
            self.url = location
        if len(body) > MAX_BODY:
            raise TctpError("handshake answer too large", 502)
        if body:
            check_records(body)
        _, reply = _feed(self._core, body) if body else (b"", b"")
        if status not in (200, 201):
            raise TctpError(f"the server refused the HALEC handshake ({status})", 502)
        if self._core.established:
            return None
        if not reply:
            raise TctpError("the HALEC handshake stalled: nothing to send, not established",
                            502)
        return reply

    def refusal(self) -> bytes:
        """What is left to send after a refusal (the ERROR frame telling the server why)."""
        return self._core.data_to_send()

    def seal_request(self, request: InnerRequest) -> bytes:
        if self.url is None or not self._core.established:
            raise ProtocolError("the HALEC is not established")
        return encode_body(self.url, _seal(self._core, encode_request(request)))

    def open_response(self, status: int, body: bytes) -> InnerResponse:
        """The inner response of an encrypted answer; the outer status must agree."""
        url, records = parse_body(body)
        if url != self.url:
            raise TctpError(f"the response names HALEC {url!r}, not ours", 502)
        plain, _ = _feed(self._core, records)
        response = decode_response(plain)
        if response.status != status:
            raise TctpError(f"the outer status {status} differs from the encrypted "
                            f"{response.status} (altered in transit)", 502)
        return response

    def close(self) -> None:
        self._core.close()


# --- the server side -----------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The server's bounds: HALEC count, per-step deadline while attesting, idle expiry."""

    max_halecs: int = 256
    step_timeout: float = 10.0  # seconds between handshake POSTs
    idle_timeout: float = 300.0  # seconds an established HALEC may stay unused


@dataclass
class ServerHalec:
    """One server HALEC: its connection, URL and lock (one request at a time)."""

    url: str
    core: TrustedPassagesConnection = field(repr=False)
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def peer(self) -> PeerEvidence | None:
        return self.core.peer


@dataclass(frozen=True)
class HandshakeAnswer:
    """What a handshake POST is answered with: status, the HALEC URL, records."""

    status: int
    url: str
    body: bytes = field(repr=False)
    refused: AttestationRejected | None = None  # set when the answer is a refusal


class HalecTable:
    """The server's HALECs, keyed by URL; state outlives any TCP connection.

    Thread-safe: the table has a lock, each HALEC its own (the HTTP server may run
    issuer and validator calls, which quote a TPM, in worker threads).
    """

    def __init__(self, new_connection: Callable[[], TrustedPassagesConnection],
                 prefix: str = "", *, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.creation_url = f"{prefix}/halecs"
        if not _CREATION_URL.fullmatch(self.creation_url):
            raise ValueError(f"bad prefix {prefix!r}")
        self._new_connection = new_connection
        self.limits = limits or Limits()
        self._clock = clock
        self._halecs: dict[str, ServerHalec] = {}
        self._lock = threading.Lock()
        self.refusals: list[AttestationRejected] = []  # what this side refused, for reports

    def __len__(self) -> int:
        with self._lock:
            return len(self._halecs)

    def create(self, body: bytes) -> HandshakeAnswer:
        """``POST <prefix>/halecs``: the ClientHello in, the server's flight out."""
        check_records(body)
        with self._lock:
            self._expire()
            if len(self._halecs) >= self.limits.max_halecs:
                raise TctpError("too many HALECs; try again later", 503)
            url = f"{self.creation_url}/{secrets.token_urlsafe(16)}"
            halec = ServerHalec(url, self._new_connection(), self._clock())
            self._halecs[url] = halec
        answer = self._handshake(halec, body)
        return HandshakeAnswer(201 if answer.status == 200 else answer.status, url,
                               answer.body, answer.refused)

    def handshake(self, url: str, body: bytes) -> HandshakeAnswer:
        """``POST <HALEC URL>`` while attesting: records in, records out."""
        check_records(body)
        halec = self._lookup(url)
        if halec.core.established:
            raise TctpError("the HALEC is established: send requests, not handshakes", 409)
        return self._handshake(halec, body)

    def open_request(self, body: bytes, method: str, target: str
                     ) -> tuple[ServerHalec, InnerRequest]:
        """Decrypt a request body; the inner method and target must be the outer ones."""
        url, records = parse_body(body)
        halec = self._lookup(url)
        with halec.lock:
            if not halec.core.established:
                raise TctpError("the HALEC is not established", 409)
            try:
                plain, _ = _feed(halec.core, records)
                request = decode_request(plain)
            except (TctpError, AttestationRejected) as exc:
                self._drop(url)  # the session is out of step: fail closed
                raise TctpError(f"HALEC refused the body: {exc}", 403) from None
        if request.method != method or request.target != target:
            self._drop(url)
            raise TctpError("the encrypted request names another method or URL than the "
                            "outer one (moved or altered in transit)", 403)
        return halec, request

    def seal_response(self, halec: ServerHalec, response: InnerResponse) -> bytes:
        with halec.lock:
            halec.last_used = self._clock()
            return encode_body(halec.url, _seal(halec.core, encode_response(response)))

    def _handshake(self, halec: ServerHalec, body: bytes) -> HandshakeAnswer:
        with halec.lock:
            halec.last_used = self._clock()
            try:
                _, reply = _feed(halec.core, body)
            except AttestationRejected as exc:
                self._drop(halec.url)
                if not exc.by_peer:
                    self.refusals.append(exc)
                return HandshakeAnswer(403, halec.url, halec.core.data_to_send(), exc)
            except TctpError:
                self._drop(halec.url)
                raise
            if not reply:  # every valid step gets an answer: these records were partial
                self._drop(halec.url)
                raise TctpError("incomplete handshake records")
        return HandshakeAnswer(200, halec.url, reply)

    def _lookup(self, url: str) -> ServerHalec:
        with self._lock:
            self._expire()
            halec = self._halecs.get(url)
        if halec is None:
            raise TctpError("unknown or expired HALEC", 410)
        return halec

    def _drop(self, url: str) -> None:
        with self._lock:
            halec = self._halecs.pop(url, None)
        if halec is not None:
            halec.core.close()

    def _expire(self) -> None:
        """Drop HALECs past their deadline (called with the table lock held)."""
        now = self._clock()
        for url, halec in list(self._halecs.items()):
            limit = (self.limits.idle_timeout if halec.core.established
                     else self.limits.step_timeout)
            if now - halec.last_used > limit:
                del self._halecs[url]


def handshake_in_memory(table: HalecTable, client: HalecClient) -> None:
    """Drive a HALEC handshake with no HTTP in between (tests, the attack lab)."""
    answer = table.create(client.first_flight())
    body = client.on_handshake_answer(answer.status, answer.url, answer.body)
    while body is not None:
        assert client.url is not None
        answer = table.handshake(client.url, body)
        body = client.on_handshake_answer(answer.status, None, answer.body)
