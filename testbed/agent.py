"""The node agent API: length-prefixed JSON over a unix socket in the node's run dir.

Frame: a big-endian u32 length, then that many bytes of UTF-8 JSON (one object),
at most :data:`MAX_FRAME` bytes. Each request gets exactly one response frame on
the same connection; a client may send several requests on one connection.

Requests (``op``) and responses::

    {"op": "identity"}  -> {"node", "role", "ek_algorithm", "ek_certificate": b64 DER,
                            "ek_public": b64 TPMT_PUBLIC, "ak_public": b64 TPMT_PUBLIC}
    {"op": "activate", "credential_blob": b64, "encrypted_secret": b64}
                        -> {"secret": b64}
    {"op": "quote", "nonce": hex, "pcrs": [0, 1, ...]}
                        -> an Evidence (attestation/evidence.py to_dict()), with the event log
    {"op": "status"}    -> {"node", "role", "state", "pid", "swtpm_pid", "tcti", "service", ...}
    {"op": "shutdown"}  -> {"stopping": true}; the node then stops its swtpm and exits
    {"op": "role", "action": str, "args": {...}} -> the role service's answer (e.g. a
                         Trusted Passages node's "connect" to a peer, see testbed/tp_role.py)

Anything else (oversized or truncated frames, invalid JSON, unknown ops or keys,
bad values, a failing TPM command) gets ``{"error": "..."}`` and the agent keeps
serving. An oversized frame also closes that connection, since its body is not
read and the stream cannot be resynchronised. One thread per connection, at
most :data:`MAX_CONNECTIONS` at a time; the TPM behind it is serialised by the
node (swtpm has no resource manager).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from attestation.credential import CredentialChallenge
from attestation.errors import EvidenceFormatError, TestbedError
from attestation.evidence import Evidence
from attestation.tpm_types import PcrSelection
from testbed.errors import StateError

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_FRAME",
    "AgentBackend",
    "AgentClient",
    "AgentError",
    "AgentServer",
    "AgentUnavailable",
    "NodeIdentity",
    "connect_unix",
    "recv_frame",
    "send_frame",
    "sockaddr",
]

MAX_FRAME = 1 << 20
MAX_CONNECTIONS = 16
LISTEN_BACKLOG = 128  # connections waiting for accept(); beyond it clients get EAGAIN
IDLE_TIMEOUT_S = 30.0  # a silent client does not pin a thread forever
MAX_NONCE_BYTES = 64  # TPM2_Quote's qualifyingData limit in TpmClient
MAX_CREDENTIAL_BYTES = 4096  # an ID object / encrypted seed is a few hundred bytes
_HEADER = struct.Struct(">I")
_SUN_PATH_MAX = 107
_OPS: Mapping[str, frozenset[str]] = {
    "identity": frozenset(),
    "activate": frozenset({"credential_blob", "encrypted_secret"}),
    "quote": frozenset({"nonce", "pcrs"}),
    "status": frozenset(),
    "shutdown": frozenset(),
    "role": frozenset({"action", "args"}),
}

log = logging.getLogger("testbed.agent")


class AgentError(TestbedError):
    """The agent answered a request with an error (its message is included)."""


class AgentUnavailable(StateError):
    """No agent answers on the socket: the node is down, starting or gone."""


class FrameError(EvidenceFormatError):
    """A frame is oversized, truncated or not a JSON object."""


class _BadRequest(Exception):
    """A request the agent refuses; the message goes back to the client."""


# --- framing -------------------------------------------------------------------------------


def send_frame(sock: socket.socket, message: Mapping[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    sock.sendall(_HEADER.pack(len(body)) + body)


def recv_frame(sock: socket.socket) -> bytes | None:
    """The next frame's body; None on a clean end of stream before a header."""
    header = _recv_exactly(sock, _HEADER.size, allow_eof=True)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    body = _recv_exactly(sock, length, allow_eof=False)
    assert body is not None
    return body


def _recv_exactly(sock: socket.socket, size: int, *, allow_eof: bool) -> bytes | None:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = sock.recv(min(size - got, 65536))
        if not chunk:
            if allow_eof and got == 0:
                return None
            raise FrameError(f"connection closed after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def decode_message(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"frame is not JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise FrameError("frame must hold a JSON object")
    return message


@contextlib.contextmanager
def sockaddr(path: Path) -> Iterator[str]:
    """An AF_UNIX address for ``path``, even when it is longer than sun_path allows.

    Deep work directories (pytest's tmp_path, long cluster names) easily exceed
    107 bytes; binding or connecting through ``/proc/self/fd/N/NAME`` of the
    directory opened with O_PATH reaches the same socket file.
    """
    text = str(path)
    if len(os.fsencode(text)) <= _SUN_PATH_MAX:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{fd}/{path.name}"
        if len(os.fsencode(short)) > _SUN_PATH_MAX:
            raise StateError(f"socket name {path.name!r} is too long for AF_UNIX")
        yield short
    finally:
        os.close(fd)


def connect_unix(path: Path, timeout: float) -> socket.socket:
    """Connect to a unix stream socket, waiting (up to ``timeout``) while its backlog is full.

    A socket with a timeout is non-blocking underneath, and connect() on a unix
    socket whose listen backlog is full fails at once with EAGAIN instead of
    waiting like TCP does; a burst of clients must not read as "no agent".
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            with sockaddr(path) as address:
                sock.connect(address)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        except OSError:
            sock.close()
            raise


# --- client ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeIdentity:
    node: str
    role: str
    ek_algorithm: str
    ek_certificate: bytes
    ek_public: bytes
    ak_public: bytes


class AgentClient:
    """Talks to one node's agent; one connection per request."""

    def __init__(self, socket_path: Path, *, timeout: float = 30.0, node: str = "") -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.node = node or self.socket_path.parent.parent.name

    def call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request; return the response, raising :class:`AgentError` on an error."""
        with self._connect() as sock:
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    # The agent may answer (e.g. "too many connections") and hang up
                    # before reading the request: its answer is still there to read.
                    send_frame(sock, request)
                body = recv_frame(sock)
            except TimeoutError:
                raise AgentUnavailable(f"node {self.node!r}: the agent did not answer within "
                                       f"{self.timeout:.0f} s") from None
            except OSError as exc:
                raise AgentUnavailable(f"node {self.node!r}: agent connection failed: "
                                       f"{exc.strerror or exc}") from None
        if body is None:
            raise AgentUnavailable(f"node {self.node!r}: the agent closed the connection")
        response = decode_message(body)
        if "error" in response:
            raise AgentError(f"node {self.node!r}: {response['error']}")
        return response

    def _connect(self) -> socket.socket:
        try:
            return connect_unix(self.socket_path, self.timeout)
        except OSError as exc:
            raise AgentUnavailable(
                f"node {self.node!r}: no agent at {self.socket_path} ({exc.strerror or exc}); "
                "is the node up? (`testbed up`, `testbed status`)") from None

    def identity(self) -> NodeIdentity:
        r = self.call({"op": "identity"})
        return NodeIdentity(
            node=_string(r, "node"), role=_string(r, "role"),
            ek_algorithm=_string(r, "ek_algorithm"),
            ek_certificate=_b64(r.get("ek_certificate"), "ek_certificate", MAX_FRAME),
            ek_public=_b64(r.get("ek_public"), "ek_public", MAX_FRAME),
            ak_public=_b64(r.get("ak_public"), "ak_public", MAX_FRAME),
        )  # fmt: skip

    def activate(self, challenge: CredentialChallenge) -> bytes:
        r = self.call({"op": "activate",
                       "credential_blob": _enc(challenge.credential_blob),
                       "encrypted_secret": _enc(challenge.encrypted_secret)})
        return _b64(r.get("secret"), "secret", MAX_CREDENTIAL_BYTES)

    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> Evidence:
        r = self.call({"op": "quote", "nonce": nonce.hex(), "pcrs": list(pcrs)})
        return Evidence.from_dict(r)

    def status(self) -> dict[str, Any]:
        return self.call({"op": "status"})

    def shutdown(self) -> None:
        self.call({"op": "shutdown"})

    def role(self, action: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Ask the node's role service to do ``action`` (see testbed/roles.py)."""
        return self.call({"op": "role", "action": action, "args": args or {}})


def _string(response: Mapping[str, Any], key: str) -> str:
    value = response.get(key)
    if not isinstance(value, str):
        raise EvidenceFormatError(f"agent response: {key} must be a string")
    return value


def _enc(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64(value: object, name: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * limit:
        raise EvidenceFormatError(f"{name}: expected a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceFormatError(f"{name}: not valid base64") from None
    if len(data) > limit:
        raise EvidenceFormatError(f"{name}: {len(data)} bytes is more than {limit}")
    return data


# --- server -----------------------------------------------------------------------------------


class AgentBackend(Protocol):
    """What the agent serves; the node process implements it (TPM access serialised)."""

    def identity(self) -> dict[str, Any]: ...

    def activate(self, challenge: CredentialChallenge) -> bytes: ...

    def quote(self, nonce: bytes, selection: PcrSelection) -> Evidence: ...

    def status(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...

    def role_call(self, action: str, args: dict[str, Any]) -> dict[str, Any]: ...


class AgentServer:
    """Serves :class:`AgentBackend` on a unix socket (mode 0600) until :meth:`close`."""

    def __init__(self, backend: AgentBackend, socket_path: Path, *, bank: str = "sha256") -> None:
        self._backend = backend
        self.socket_path = Path(socket_path)
        self._bank = bank
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "identity": lambda _: self._backend.identity(),
            "activate": self._activate,
            "quote": self._quote,
            "status": lambda _: self._backend.status(),
            "shutdown": self._shutdown,
            "role": self._role,
        }

    def start(self) -> None:
        self._sock = self._bind()
        self._thread = threading.Thread(target=self._accept_loop, name="agent-accept",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and remove the socket; open connections end with the process."""
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() up
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def _bind(self) -> socket.socket:
        if self.socket_path.is_socket():
            self.socket_path.unlink()  # left by a node that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the socket is 0600 from the start, not after a chmod
        try:
            with sockaddr(self.socket_path) as address:
                sock.bind(address)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        sock.listen(LISTEN_BACKLOG)
        return sock

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, f"too many connections (limit {MAX_CONNECTIONS})")
                continue
            threading.Thread(target=self._connection, args=(conn,), name="agent-conn",
                             daemon=True).start()

    @staticmethod
    def _refuse(conn: socket.socket, reason: str) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(1.0)
            send_frame(conn, {"error": reason})

    def _connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(IDLE_TIMEOUT_S)
                self._serve_connection(conn)
        except OSError as exc:  # client vanished or idled out: only this connection ends
            log.debug("agent connection ended: %s", exc)
        finally:
            self._slots.release()

    def _serve_connection(self, conn: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                body = recv_frame(conn)
            except FrameError as exc:
                # Oversized or truncated: the stream is out of sync, so answer and hang up.
                with contextlib.suppress(OSError):
                    send_frame(conn, {"error": str(exc)})
                return
            if body is None:
                return
            response = self.handle(body)
            try:
                send_frame(conn, response)
            except FrameError as exc:  # a response too large to frame: say so instead
                send_frame(conn, {"error": str(exc)})

    def handle(self, body: bytes) -> dict[str, Any]:
        """One request body -> its response (errors included, never raised)."""
        try:
            request = decode_message(body)
            op = request.get("op")
            if not isinstance(op, str) or op not in self._handlers:
                raise _BadRequest(f"unknown op {str(op)[:40]!r}; known: {', '.join(_OPS)}")
            unknown = set(request) - {"op"} - _OPS[op]
            if unknown:
                raise _BadRequest(f"{op}: unknown keys {sorted(str(k)[:40] for k in unknown)}")
            return self._handlers[op](request)
        except (_BadRequest, TestbedError) as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a bug must not take the agent down with it
            log.exception("agent request failed")
            return {"error": f"internal error: {type(exc).__name__}"}

    def _activate(self, request: dict[str, Any]) -> dict[str, Any]:
        challenge = CredentialChallenge(
            credential_blob=_request_b64(request, "credential_blob"),
            encrypted_secret=_request_b64(request, "encrypted_secret"))
        return {"secret": _enc(self._backend.activate(challenge))}

    def _quote(self, request: dict[str, Any]) -> dict[str, Any]:
        nonce = _request_nonce(request.get("nonce"))
        selection = PcrSelection(self._bank, _request_pcrs(request.get("pcrs")))
        return self._backend.quote(nonce, selection).to_dict()

    def _shutdown(self, _: dict[str, Any]) -> dict[str, Any]:
        self._backend.shutdown()
        return {"stopping": True}

    def _role(self, request: dict[str, Any]) -> dict[str, Any]:
        action, args = request.get("action"), request.get("args", {})
        if not isinstance(action, str) or not isinstance(args, dict):
            raise _BadRequest("role: action must be a string and args an object")
        return self._backend.role_call(action, args)


def _request_b64(request: dict[str, Any], key: str) -> bytes:
    if key not in request:
        raise _BadRequest(f"activate: {key} missing")
    try:
        return _b64(request[key], key, MAX_CREDENTIAL_BYTES)
    except EvidenceFormatError as exc:
        raise _BadRequest(f"activate: {exc}") from None


def _request_nonce(value: object) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_NONCE_BYTES:
        raise _BadRequest(f"quote: nonce must be a hex string of at most {MAX_NONCE_BYTES} bytes")
    try:
        nonce = bytes.fromhex(value)
    except ValueError:
        raise _BadRequest("quote: nonce is not hexadecimal") from None
    if not nonce:
        raise _BadRequest("quote: nonce is empty")
    return nonce


def _request_pcrs(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= 24:
        raise _BadRequest("quote: pcrs must be a list of 1 to 24 PCR indices")
    if any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 23 for p in value):
        raise _BadRequest("quote: PCR indices must be integers 0..23")
    if len(set(value)) != len(value):
        raise _BadRequest("quote: PCR indices must not repeat")
    return tuple(sorted(value))
