"""CVM1 requests over a byte stream whose peer is already authenticated by attestation.

A testbed node reaches the CryptoVM over a Trusted Passages channel (mutual TLS bound to
both ends' TPM quotes). Once the channel is established, the stream carries the same
CVM1 frames as the TLS wire protocol (:mod:`cryptovm.wire`), with no ``auth`` step: the
session is the attested node's (:meth:`~cryptovm.vsm.CryptoVm.attested_session`), so
every request is privilege-checked and audited like any account's. This module only
moves frames; it knows nothing of sockets or of Trusted Passages (callers pass ``recv``
and ``send``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptovm.errors import AccessDenied, BadRequest, ProtocolError
from cryptovm.vsm import CryptoVm, VsmSession
from cryptovm.wire import (
    MAX_BODY,
    FrameDecoder,
    Request,
    decode_request,
    decode_response,
    describe_error,
    encode_error,
    encode_request,
    encode_result,
    error_from_wire,
    peek_id,
)

Recv = Callable[[], bytes]
"""The next bytes of the stream; b"" at its end."""
Send = Callable[[bytes], None]


def serve_stream(vm: CryptoVm, session: VsmSession, recv: Recv, send: Send) -> int:
    """Answer CVM1 requests until the stream ends or loses its framing; returns how many
    requests were answered. Answers leave only once their audit entries are durable."""
    decoder = FrameDecoder(MAX_BODY)
    answered = 0
    while data := recv():
        bodies, error = decoder.feed(data)
        frames = [_answer(vm, session, body) for body in bodies]
        answered += len(bodies)
        if error is not None:
            vm.audit.append(session.account, "frame", "error", check=error.code,
                            detail=str(error))
            frames.append(encode_error(None, error.code, str(error)))
        if frames:
            vm.audit.sync()
            send(b"".join(frames))
        if error is not None:
            break
    return answered


def refuse_stream(recv: Recv, send: Send, error: AccessDenied) -> None:
    """No session (e.g. the node's account is disabled): answer the first requests with
    ``error``, then stop. Answering before closing lets the peer read why."""
    bodies, _ = FrameDecoder(MAX_BODY).feed(recv())
    frames = [encode_error(peek_id(body), error.code, error.reason, error.check)
              for body in bodies] or [encode_error(None, error.code, error.reason, error.check)]
    send(b"".join(frames))


def _answer(vm: CryptoVm, session: VsmSession, body: bytes) -> bytes:
    try:
        request = decode_request(body)
    except ProtocolError as exc:
        vm.audit.append(session.account, "frame", "error", check=exc.code, detail=str(exc))
        return encode_error(peek_id(body), exc.code, str(exc))
    try:
        _admissible(vm, session, request)
        return encode_result(request.id, getattr(session, request.op)(**request.args))
    except Exception as exc:  # audited where it was raised
        code, message, check = describe_error(exc)
        return encode_error(request.id, code, message, check)


def _admissible(vm: CryptoVm, session: VsmSession, request: Request) -> None:
    refusal: Exception | None = None
    if request.op == "auth":
        refusal = BadRequest(f"this channel is authenticated by attestation as "
                             f"{session.account!r}: no auth step")
    elif request.account is not None and request.account != session.account:
        refusal = AccessDenied("authentication", f"the request names account "
                               f"{request.account[:64]!r} but the channel is attested as "
                               f"{session.account!r}")
    if refusal is not None:
        vm._audit_failure(session.account, request.op, refusal)
        raise refusal


class StreamClient:
    """The requesting side: one request at a time over ``recv``/``send``."""

    def __init__(self, recv: Recv, send: Send) -> None:
        self._recv = recv
        self._send = send
        self._decoder = FrameDecoder(MAX_BODY)
        self._bodies: list[bytes] = []
        self._next_id = 1

    def __repr__(self) -> str:
        return f"StreamClient(next_id={self._next_id})"

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request; raises the error frame's exception (AccessDenied, ...)."""
        request_id = self._next_id
        self._next_id += 1
        self._send(encode_request(request_id, op, None,
                                  {k: v for k, v in args.items() if v is not None}))
        while True:
            response = decode_response(self._next_body())
            if response.id in (request_id, None):
                break
        if not response.ok:
            raise error_from_wire(response.error)
        return response.result

    def _next_body(self) -> bytes:
        while not self._bodies:
            data = self._recv()
            if not data:
                raise ProtocolError("the CryptoVM closed the attested channel", fatal=True)
            bodies, error = self._decoder.feed(data)
            self._bodies.extend(bodies)
            if error is not None and not self._bodies:
                raise error
        return self._bodies.pop(0)


__all__ = ["Recv", "Send", "StreamClient", "refuse_stream", "serve_stream"]
