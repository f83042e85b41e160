"""The one client of every node agent: a sim node's (unix socket) or a VM's (TCP).

The wire format is :mod:`attestation.agent_wire`. The client connects per request, so a
node that restarts between two calls is simply reached again. Every failure to reach
the agent or to read its answer is :class:`AgentUnavailable`; an answer that is an
error is :class:`AgentError`; a malformed answer is an ``EvidenceFormatError``.

Besides the requests every agent serves, a sim node's agent answers ``role`` requests
(its role service, :mod:`testbed.roles`), and a guest agent *stream* requests: their
answer frame is followed by a raw byte stream on the same connection
(:meth:`AgentClient.open_stream`, the host relaying Trusted Passages between guests).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from attestation.agent_wire import (
    MAX_CREDENTIAL_BYTES,
    MAX_FRAME,
    activate_request,
    decode_message,
    quote_request,
    recv_frame,
    send_frame,
)
from attestation.credential import CredentialChallenge
from attestation.encoding import b64decode
from attestation.errors import TestbedError
from attestation.evidence import Evidence
from attestation.ima import MAX_CHUNK as MAX_RUNTIME_CHUNK
from attestation.registrar import AttesterIdentity
from testbed.core.errors import StateError
from testbed.core.paths import SUN_PATH_MAX
from trusted_passages.batch import BatchProof

__all__ = [
    "AgentClient",
    "AgentError",
    "AgentTransport",
    "AgentUnavailable",
    "BatchedEvidence",
    "TcpTransport",
    "UnixTransport",
    "connect_unix",
    "sockaddr",
    "split_batch",
]



@dataclass(frozen=True)
class BatchedEvidence:
    """A quote that covers a batch of nonces (a node whose quotes are batched) and the
    inclusion path of one of them: on the wire, the evidence with a ``batch`` key."""

    evidence: Evidence
    proof: BatchProof

    def to_dict(self) -> dict[str, Any]:
        return {**self.evidence.to_dict(), "batch": self.proof.to_dict()}


def split_batch(doc: Mapping[str, Any]) -> tuple[Evidence, BatchProof | None]:
    """Evidence as an agent sends it: with its inclusion path when it is batched."""
    rest = dict(doc)
    batch = rest.pop("batch", None)
    return Evidence.from_dict(rest), None if batch is None else BatchProof.from_dict(batch)


class AgentError(TestbedError):
    """The agent answered a request with an error (its message is included)."""


class AgentUnavailable(StateError):
    """No agent answers: the node is down, starting or gone, or the connection broke."""


class AgentTransport(Protocol):
    """How to reach one agent: a connected stream socket per request."""

    def connect(self, timeout: float) -> socket.socket: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class UnixTransport:
    """A sim node's agent: a unix socket in its private run directory."""

    path: Path

    def connect(self, timeout: float) -> socket.socket:
        return connect_unix(self.path, timeout)

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class TcpTransport:
    """A guest agent: the VM's forwarded port on loopback."""

    port: int
    host: str = "127.0.0.1"

    def connect(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def describe(self) -> str:
        return f"{self.host}:{self.port}"


class AgentClient:
    """Talks to one node's agent; one connection per request."""

    def __init__(self, transport: AgentTransport, *, node: str, timeout: float = 30.0) -> None:
        self.transport = transport
        self.node = node
        self.timeout = timeout

    def with_timeout(self, timeout: float) -> AgentClient:
        return AgentClient(self.transport, node=self.node, timeout=timeout)

    # --- the requests every agent serves ------------------------------------------------

    def identity(self) -> AttesterIdentity:
        r = self.call({"op": "identity"})
        return AttesterIdentity(
            ek_certificate=b64decode(r.get("ek_certificate"), "ek_certificate", limit=MAX_FRAME),
            ek_public=b64decode(r.get("ek_public"), "ek_public", limit=MAX_FRAME),
            ak_public=b64decode(r.get("ak_public"), "ak_public", limit=MAX_FRAME))

    def activate(self, challenge: CredentialChallenge) -> bytes:
        r = self.call(activate_request(challenge.credential_blob, challenge.encrypted_secret))
        return b64decode(r.get("secret"), "secret", limit=MAX_CREDENTIAL_BYTES)

    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> Evidence:
        """The evidence only: a batched node's quote then covers its batch's root, not
        ``nonce``, and fails verification unless :meth:`quote_batched` is used."""
        return self.quote_batched(nonce, pcrs)[0]

    def quote_batched(self, nonce: bytes, pcrs: Sequence[int]
                      ) -> tuple[Evidence, BatchProof | None]:
        """The evidence and, from a node whose quotes are batched, ``nonce``'s path."""
        return split_batch(self.call(quote_request(nonce, list(pcrs))))

    def status(self) -> dict[str, Any]:
        return self.call({"op": "status"})

    def answers(self) -> bool:
        """Whether the agent answers ``status`` right now."""
        try:
            self.status()
        except TestbedError:
            return False
        return True

    def shutdown(self) -> None:
        self.call({"op": "shutdown"})

    def runtime_log(self, offset: int) -> bytes:
        """At most 256 KiB of the node's ima-ng runtime log from byte ``offset``."""
        r = self.call({"op": "runtime_log", "offset": offset})
        return b64decode(r.get("data"), "data", limit=MAX_RUNTIME_CHUNK)

    # --- role and stream requests -------------------------------------------------------

    def role(self, action: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Ask a sim node's role service to do ``action`` (see :mod:`testbed.roles`)."""
        return self.call({"op": "role", "action": action, "args": dict(args or {})})

    def open_stream(self, request: Mapping[str, Any]) -> tuple[socket.socket, dict[str, Any]]:
        """Send a stream request; return the connection (now a raw stream) and the answer."""
        sock = self._connect()
        try:
            send_frame(sock, request)
            answer = self._answer(sock)
        except BaseException:
            sock.close()
            raise
        return sock, answer

    # --- plumbing -------------------------------------------------------------------------

    def call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request; return the response, raising :class:`AgentError` on an error."""
        with self._connect() as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # The agent may answer (e.g. "too many connections") and hang up
                # before reading the request: its answer is still there to read.
                send_frame(sock, request)
            return self._answer(sock)

    def _answer(self, sock: socket.socket) -> dict[str, Any]:
        try:
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
            raise AgentError(f"node {self.node!r}: {str(response['error'])[:1000]}")
        return response

    def _connect(self) -> socket.socket:
        try:
            return self.transport.connect(self.timeout)
        except OSError as exc:
            raise AgentUnavailable(
                f"node {self.node!r}: no agent at {self.transport.describe()} "
                f"({exc.strerror or exc}); is the node up? (`testbed status`, `testbed up`)"
            ) from None


@contextlib.contextmanager
def sockaddr(path: Path) -> Iterator[str]:
    """An AF_UNIX address for ``path``, even when it is longer than sun_path allows.

    Deep work directories (pytest's tmp_path, long cluster names) easily exceed
    107 bytes; binding or connecting through ``/proc/self/fd/N/NAME`` of the
    directory opened with O_PATH reaches the same socket file.
    """
    text = str(path)
    if len(os.fsencode(text)) <= SUN_PATH_MAX:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{fd}/{path.name}"
        if len(os.fsencode(short)) > SUN_PATH_MAX:
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
