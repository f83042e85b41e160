"""A sim node's agent: the requests of :mod:`attestation.agent_wire` on a unix socket.

The socket is ``nodes/NODE/run/agent.sock``, mode 0600 in a 0700 directory: only the
node's owner reaches it. Besides the requests every agent serves, it answers ``role``
(``{"op": "role", "action": str, "args": {...}}``), handed to the node's role service
(``revoked`` and ``reinstated``: the node's revocation gate first), ``runtime_log``
(``{"offset": int}``: the node's ima-ng log from that byte, base64, at most 256 KiB) and
``runtime_measure`` (``{"path": str, "content": base64}``: the node "executes" a file).
A node whose quotes are batched answers ``quote`` with the evidence plus ``batch`` (the
nonce's inclusion path, :class:`~testbed.cluster.agent.BatchedEvidence`).

Anything else (oversized or truncated frames, invalid JSON, unknown ops or keys, bad
values, a failing TPM command) gets ``{"error": "..."}`` and the agent keeps serving.
An oversized frame also closes that connection, since its body is not read and the
stream cannot be resynchronised. One thread per connection, at most
:data:`MAX_CONNECTIONS` at a time (:class:`attestation.slots.ConnectionSlots`): each
request must arrive whole within :data:`IDLE_TIMEOUT_S` of accept or of the previous
answer (bytes trickling in do not extend it), and a newcomer finding every slot taken
evicts the connection idle the longest; only when all are busy with a request is it
refused. The TPM behind it is serialised by the node (swtpm has no resource manager).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from attestation.agent_wire import (
    FrameError,
    decode_message,
    parse_activate_request,
    parse_quote_request,
    recv_frame,
    send_frame,
)
from attestation.credential import CredentialChallenge
from attestation.encoding import b64decode, b64encode, require_int
from attestation.errors import EvidenceFormatError, TestbedError
from attestation.evidence import Evidence
from attestation.slots import ConnectionSlots, Slot, shutdown
from attestation.tpm_types import PcrSelection
from testbed.cluster.agent import BatchedEvidence, sockaddr

__all__ = ["IDLE_TIMEOUT_S", "MAX_CONNECTIONS", "AgentBackend", "AgentServer"]

MAX_CONNECTIONS = 16
LISTEN_BACKLOG = 1024  # waiting for accept(); beyond it clients get EAGAIN: above a flood
IDLE_TIMEOUT_S = 30.0  # a silent client does not pin a thread forever
_SWEEP_S = 0.2  # how often deadlines are checked (and close() is noticed)
RANK_IDLE = 0  # waiting for a request: evictable, the longest idle first
_OPS: Mapping[str, frozenset[str]] = {
    "identity": frozenset(),
    "activate": frozenset({"credential_blob", "encrypted_secret"}),
    "quote": frozenset({"nonce", "pcrs"}),
    "status": frozenset(),
    "shutdown": frozenset(),
    "role": frozenset({"action", "args"}),
    "runtime_log": frozenset({"offset"}),
    "runtime_measure": frozenset({"path", "content"}),
}
MAX_EXECUTED = 1 << 20  # bytes of one file a tamper request "executes"

log = logging.getLogger("testbed.agent")


class _BadRequest(Exception):
    """A request the agent refuses; the message goes back to the client."""


class AgentBackend(Protocol):
    """What the agent serves; the node process implements it (TPM access serialised)."""

    def identity(self) -> dict[str, Any]: ...

    def activate(self, challenge: CredentialChallenge) -> bytes: ...

    def quote(self, nonce: bytes, selection: PcrSelection) -> Evidence | BatchedEvidence: ...

    def status(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...

    def role_call(self, action: str, args: dict[str, Any]) -> dict[str, Any]: ...

    def runtime_log(self, offset: int) -> bytes: ...

    def runtime_measure(self, path: str, content: bytes) -> dict[str, Any]: ...


class AgentServer:
    """Serves :class:`AgentBackend` on a unix socket (mode 0600) until :meth:`close`."""

    def __init__(self, backend: AgentBackend, socket_path: Path, *, bank: str = "sha256",
                 idle_timeout: float = IDLE_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self._backend = backend
        self.socket_path = Path(socket_path)
        self._bank = bank
        self.idle_timeout = idle_timeout
        self.slots = ConnectionSlots(max_connections)
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
            "runtime_log": self._runtime_log,
            "runtime_measure": self._runtime_measure,
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
        self.slots.drop_all()
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
        sock.settimeout(_SWEEP_S)
        return sock

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            self.slots.expire()
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed, or out of descriptors (the peer waits in the backlog)
                if self._closed.wait(_SWEEP_S):
                    return
                continue
            slot = self.slots.admit(shutdown(conn), timeout=self.idle_timeout, rank=RANK_IDLE)
            if slot is None:
                self._refuse(conn, f"too many connections (limit {self.slots.limit}), all "
                             "busy with requests")
                continue
            threading.Thread(target=self._connection, args=(conn, slot), name="agent-conn",
                             daemon=True).start()

    @staticmethod
    def _refuse(conn: socket.socket, reason: str) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(1.0)
            send_frame(conn, {"error": reason})

    def _connection(self, conn: socket.socket, slot: Slot) -> None:
        try:
            with conn:
                conn.settimeout(self.idle_timeout)  # besides the slot's deadline: sends
                self._serve_connection(conn, slot)
        except OSError as exc:  # client vanished or idled out: only this connection ends
            log.debug("agent connection ended: %s", exc)
        finally:
            self.slots.release(slot)

    def _serve_connection(self, conn: socket.socket, slot: Slot) -> None:
        while not self._closed.is_set() and slot.active:
            try:
                body = recv_frame(conn)
            except FrameError as exc:
                # Oversized or truncated: the stream is out of sync, so answer and hang up.
                with contextlib.suppress(OSError):
                    send_frame(conn, {"error": str(exc)})
                return
            if body is None:
                return
            self.slots.step(slot, timeout=None, rank=None)  # busy: neither late nor evicted
            response = self.handle(body)
            try:
                send_frame(conn, response)
            except FrameError as exc:  # a response too large to frame: say so instead
                send_frame(conn, {"error": str(exc)})
            self.slots.step(slot, timeout=self.idle_timeout, rank=RANK_IDLE)

    def handle(self, body: bytes) -> dict[str, Any]:
        """One request body -> its response (errors included, never raised)."""
        request: dict[str, Any] = {}
        try:
            request = decode_message(body)
            op = request.get("op")
            if not isinstance(op, str) or op not in self._handlers:
                raise _BadRequest(f"unknown op {str(op)[:40]!r}; known: {', '.join(_OPS)}")
            unknown = set(request) - {"op"} - _OPS[op]
            if unknown:
                raise _BadRequest(f"{op}: unknown keys {sorted(str(k)[:40] for k in unknown)}")
            return self._handlers[op](request)
        except _BadRequest as exc:
            return {"error": str(exc)}
        except TestbedError as exc:
            op = request.get("op")
            return {"error": f"{op}: {exc}" if isinstance(op, str) else str(exc)}
        except Exception as exc:  # a bug must not take the agent down with it
            log.exception("agent request failed")
            return {"error": f"internal error: {type(exc).__name__}"}

    def _activate(self, request: dict[str, Any]) -> dict[str, Any]:
        blob, secret = parse_activate_request(request)
        challenge = CredentialChallenge(credential_blob=blob, encrypted_secret=secret)
        return {"secret": b64encode(self._backend.activate(challenge))}

    def _quote(self, request: dict[str, Any]) -> dict[str, Any]:
        nonce, pcrs = parse_quote_request(request)
        return self._backend.quote(nonce, PcrSelection(self._bank, tuple(pcrs))).to_dict()

    def _shutdown(self, _: dict[str, Any]) -> dict[str, Any]:
        self._backend.shutdown()
        return {"stopping": True}

    def _runtime_log(self, request: dict[str, Any]) -> dict[str, Any]:
        offset = require_int(request.get("offset"), "offset", EvidenceFormatError, minimum=0)
        data = self._backend.runtime_log(offset)
        return {"offset": offset, "data": b64encode(data)}

    def _runtime_measure(self, request: dict[str, Any]) -> dict[str, Any]:
        path = request.get("path")
        if not isinstance(path, str):
            raise _BadRequest("runtime_measure: path must be a string")
        content = b64decode(request.get("content"), "content", limit=MAX_EXECUTED)
        return self._backend.runtime_measure(path, content)

    def _role(self, request: dict[str, Any]) -> dict[str, Any]:
        action, args = request.get("action"), request.get("args", {})
        if not isinstance(action, str) or not isinstance(args, dict):
            raise _BadRequest("role: action must be a string and args an object")
        return self._backend.role_call(action, args)
