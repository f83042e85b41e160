"""The CryptoVM wire protocol, version 1: a sans-IO codec (no sockets here).

Transport: TLS 1.3 (Python's ``ssl``), server certificate from the CryptoVM's CA.

Frame::

    magic "CVM1" (4 bytes) | body length (u32, big-endian, <= 1 MiB) | body

Body: UTF-8 JSON. Byte strings are ``{"$b": "<base64>"}`` objects, everything else is
plain JSON. Requests::

    {"v": 1, "id": <int>, "op": "<op>", "account": "<name>" | null, "args": {...}}

Responses (same ``id``; responses may come in any order)::

    {"v": 1, "id": <int>, "ok": true,  "result": {...}}
    {"v": 1, "id": <int|null>, "ok": false,
     "error": {"code": "<code>", "message": "<text>", "check": "<check>" | null}}

On connect the server sends an unsolicited ``id: 0`` hello: ``{"hello": "cryptovm",
"protocol": 1, "challenge": <32 bytes>, "authenticated": <account|null>,
"max_frame": 1048576}``. A connection is authenticated either by a client certificate
the CryptoVM issued (``authenticated`` names the account) or by the PSK
challenge-response ``auth`` op::

    proof        = HMAC-SHA256(psk, "CVM1 psk-auth client\\0" || challenge || client_nonce
                               || account)
    server_proof = HMAC-SHA256(psk, "CVM1 psk-auth server\\0" || challenge || client_nonce
                               || account)           (returned: the server knows the PSK)

A request's ``account``, if not null, must be the connection's account.

Errors: a bad magic or an oversized length loses the framing: the server answers with
an error frame (``malformed_frame`` / ``frame_too_large``, id null) and closes. A frame
whose body is not a valid request (``malformed_request``), an unknown op
(``unknown_op``) or bad arguments (``bad_request``) get an error frame and the
connection stays usable. A frame left incomplete for the idle timeout gets
``timeout`` and the connection is closed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, TestbedError, TpmError, VerificationError
from cryptovm.errors import (
    AccessDenied,
    AlreadyExists,
    AuthenticationFailed,
    BadRequest,
    CryptoOperationFailed,
    CryptoVmError,
    KeyUsageError,
    NotFound,
    ProtocolError,
    ReleaseDenied,
    SealedStorageError,
    StorageError,
)

MAGIC = b"CVM1"
HEADER_SIZE = 8
MAX_BODY = 1 << 20
PROTOCOL_VERSION = 1
MAX_ID = (1 << 63) - 1

# Argument types: b bytes, s str, i int, f bool, l list of str.
_A = tuple[str, bool]
OPS: dict[str, dict[str, _A]] = {
    "ping": {},
    "auth": {"account": ("s", True), "client_nonce": ("b", True), "proof": ("b", True)},
    "whoami": {},
    "random": {"n": ("i", True)},
    "generate": {"algorithm": ("s", True), "usage": ("l", True), "exportable": ("f", False),
                 "key_id": ("s", False), "release_policy": ("s", False),
                 "release_node": ("s", False)},
    "rotate": {"key_id": ("s", True)},
    "delete": {"key_id": ("s", True)},
    "list_keys": {},
    "describe": {"key_id": ("s", True)},
    "public_key": {"key_id": ("s", True), "version": ("i", False)},
    "sign": {"key_id": ("s", True), "data": ("b", True), "algorithm": ("s", False),
             "prehashed": ("f", False)},
    "verify": {"key_id": ("s", True), "data": ("b", True), "signature": ("b", True),
               "algorithm": ("s", False), "prehashed": ("f", False), "version": ("i", False)},
    "decrypt": {"key_id": ("s", True), "ciphertext": ("b", True), "padding": ("s", False),
                "aad": ("b", False), "version": ("i", False)},
    "encrypt": {"key_id": ("s", True), "plaintext": ("b", True), "aad": ("b", False)},
    "derive": {"key_id": ("s", True), "peer_public_key": ("b", True), "version": ("i", False)},
    "export": {"key_id": ("s", True), "recipient_public_key": ("b", True), "scheme": ("s", True),
               "evidence": ("b", False), "version": ("i", False)},
    "import_wrapped": {"wrapping_key_id": ("s", True), "wrapped": ("b", True),
                       "scheme": ("s", True), "algorithm": ("s", True), "usage": ("l", True),
                       "exportable": ("f", False), "key_id": ("s", False)},
    "attest": {"key_id": ("s", True), "nonce": ("b", True), "version": ("i", False)},
    "identity": {},
    "activate_credential": {"credential_blob": ("b", True), "encrypted_secret": ("b", True)},
    "issue_nonce": {},
    "release_decrypt": {"key_id": ("s", True), "ciphertext": ("b", True),
                        "evidence": ("b", True), "nonce": ("b", True),
                        "recipient_public_key": ("b", True), "padding": ("s", False),
                        "aad": ("b", False), "version": ("i", False)},
    "record_write": {"name": ("s", True), "data": ("b", True)},
    "record_read": {"name": ("s", True)},
    "record_delete": {"name": ("s", True)},
    "record_list": {},
    "account_create": {"name": ("s", True), "privileges": ("l", False)},
    "account_delete": {"name": ("s", True)},
    "account_grant": {"name": ("s", True), "privileges": ("l", True)},
    "account_revoke": {"name": ("s", True), "privileges": ("l", True)},
    "account_enable": {"name": ("s", True), "enabled": ("f", True)},
    "account_set_psk": {"name": ("s", True), "psk": ("b", False)},
    "account_list": {},
    "account_issue_certificate": {"name": ("s", True)},
    "account_revoke_certificates": {"name": ("s", True)},
    "release_policy_set": {"name": ("s", True), "reference_policy": ("s", True),
                           "ak_registry": ("s", True)},
    "release_policy_list": {},
    "audit_verify": {},
    "tls_ca_setup": {"key_id": ("s", False), "common_name": ("s", False)},
    "tls_ca_certificate": {},
    "tls_enroll": {"csr": ("b", True), "validity": ("i", False)},
    "net_join": {"public_key": ("s", True), "wg_address": ("s", True), "endpoint": ("s", True)},
    "net_peers": {},
}
_TYPE_NAMES = {"b": "bytes", "s": "a string", "i": "an integer", "f": "a boolean",
               "l": "a list of strings"}


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    account: str | None
    args: dict[str, Any]


@dataclass(frozen=True)
class Response:
    id: int | None
    ok: bool
    result: dict[str, Any]
    error: dict[str, Any]


# --- framing ------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise ProtocolError(f"frame body of {len(body)} bytes exceeds {MAX_BODY}",
                            code="frame_too_large")
    return MAGIC + len(body).to_bytes(4, "big") + body


class FrameDecoder:
    """Feed bytes, take complete frame bodies. A :class:`ProtocolError` with ``fatal``
    set means the framing is lost and the stream cannot continue."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._buf = bytearray()
        self._max = max_body

    def __repr__(self) -> str:
        return f"FrameDecoder(buffered={len(self._buf)})"

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame waiting for the rest."""
        return len(self._buf)

    def feed(self, data: bytes) -> tuple[list[bytes], ProtocolError | None]:
        """Add ``data``; return the frame bodies it completes, and the fatal error that
        ended the stream, if any (frames before the error are still returned)."""
        buf = self._buf
        buf += data
        bodies: list[bytes] = []
        offset = 0
        error: ProtocolError | None = None
        while len(buf) - offset >= HEADER_SIZE:
            if buf[offset:offset + 4] != MAGIC:
                error = _bad_magic()
                break
            size = int.from_bytes(buf[offset + 4:offset + 8], "big")
            if size > self._max:
                error = ProtocolError(f"frame length {size} exceeds the {self._max}-byte limit",
                                      code="frame_too_large", fatal=True)
                break
            end = offset + HEADER_SIZE + size
            if len(buf) < end:
                break
            bodies.append(bytes(buf[offset + HEADER_SIZE:end]))
            offset = end
        if error is None and not MAGIC.startswith(bytes(buf[offset:offset + 4])[:4]) and (
                len(buf) - offset < HEADER_SIZE):
            error = _bad_magic()
        del buf[:offset]
        if error is not None:
            buf.clear()
        return bodies, error


def _bad_magic() -> ProtocolError:
    return ProtocolError("bad frame magic (expected CVM1): framing lost",
                         code="malformed_frame", fatal=True)


# --- bodies --------------------------------------------------------------------------------


def _default(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b": b64encode(bytes(value))}
    raise TypeError(f"cannot encode {type(value).__name__}")


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$b" in obj:
        return b64decode(obj["$b"], "$b")  # EvidenceFormatError: decode_body names it
    return obj


_ENCODER = json.JSONEncoder(default=_default, separators=(",", ":"))
_DECODER = json.JSONDecoder(object_hook=_hook)


def encode_body(doc: dict[str, Any]) -> bytes:
    return _ENCODER.encode(doc).encode()


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        doc = _DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"frame body is not valid JSON: {str(exc)[:120]}",
                            code="malformed_request") from None
    except EvidenceFormatError as exc:  # a {"$b": ...} that is not base64
        raise ProtocolError(f"frame body: {exc}", code="malformed_request") from None
    if not isinstance(doc, dict):
        raise ProtocolError("frame body must be a JSON object", code="malformed_request")
    if doc.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {str(doc.get('v'))[:20]!r} is not supported "
                            f"(this server speaks {PROTOCOL_VERSION})", code="malformed_request")
    return doc


def encode_request(request_id: int, op: str, account: str | None, args: dict[str, Any]) -> bytes:
    return frame(encode_body({"v": PROTOCOL_VERSION, "id": request_id, "op": op,
                              "account": account, "args": args}))


def encode_result(request_id: int | None, result: dict[str, Any]) -> bytes:
    return frame(encode_body({"v": PROTOCOL_VERSION, "id": request_id, "ok": True,
                              "result": result}))


def encode_error(request_id: int | None, code: str, message: str,
                 check: str | None = None) -> bytes:
    return frame(encode_body({"v": PROTOCOL_VERSION, "id": request_id, "ok": False,
                              "error": {"code": code, "message": message[:1000],
                                        "check": check}}))


def _request_id(doc: dict[str, Any]) -> int:
    rid = doc.get("id")
    if type(rid) is not int or not 0 <= rid <= MAX_ID:
        raise ProtocolError("id must be an integer within 0..2^63-1", code="malformed_request")
    return rid


def peek_id(body: bytes) -> int | None:
    """The request id of a body, if it can be read (for error frames)."""
    try:
        return _request_id(decode_body(body))
    except ProtocolError:
        return None


def decode_request(body: bytes) -> Request:
    doc = decode_body(body)
    rid = _request_id(doc)
    op, account, args = doc.get("op"), doc.get("account"), doc.get("args", {})
    if set(doc) - {"v", "id", "op", "account", "args"}:
        raise ProtocolError("unknown request fields", code="malformed_request")
    if not isinstance(op, str):
        raise ProtocolError("op must be a string", code="malformed_request")
    if account is not None and not isinstance(account, str):
        raise ProtocolError("account must be a string or null", code="malformed_request")
    if not isinstance(args, dict):
        raise ProtocolError("args must be an object", code="malformed_request")
    spec = OPS.get(op)
    if spec is None:
        raise ProtocolError(f"unknown operation {op[:40]!r}", code="unknown_op")
    return Request(rid, op, account, check_args(op, spec, args))


def check_args(op: str, spec: dict[str, _A], args: dict[str, Any]) -> dict[str, Any]:
    unknown = set(args) - set(spec)
    if unknown:
        raise ProtocolError(f"{op}: unknown arguments {sorted(unknown)[:5]}", code="bad_request")
    for name, (kind, required) in spec.items():
        if name not in args or args[name] is None:
            if required:
                raise ProtocolError(f"{op}: argument {name!r} is required", code="bad_request")
            args.pop(name, None)
            continue
        if not _type_ok(kind, args[name]):
            raise ProtocolError(f"{op}: argument {name!r} must be {_TYPE_NAMES[kind]}",
                                code="bad_request")
    return args


def _type_ok(kind: str, value: object) -> bool:
    if kind == "b":
        return isinstance(value, bytes)
    if kind == "s":
        return isinstance(value, str)
    if kind == "i":
        return type(value) is int
    if kind == "f":
        return type(value) is bool
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def decode_response(body: bytes) -> Response:
    doc = decode_body(body)
    rid, ok = doc.get("id"), doc.get("ok")
    if (rid is not None and type(rid) is not int) or type(ok) is not bool:
        raise ProtocolError("response needs an integer id and a boolean ok",
                            code="malformed_response")
    result, error = doc.get("result", {}), doc.get("error", {})
    if not isinstance(result, dict) or not isinstance(error, dict):
        raise ProtocolError("response result and error must be objects",
                            code="malformed_response")
    return Response(rid, ok, result, error)


# --- errors across the wire ---------------------------------------------------------------


def describe_error(exc: BaseException) -> tuple[str, str, str | None]:
    """(code, message, check) for an exception; internal errors say nothing internal."""
    if isinstance(exc, AccessDenied):
        return exc.code, exc.reason, exc.check
    if isinstance(exc, ProtocolError | CryptoVmError):
        return exc.code, str(exc), None
    if isinstance(exc, VerificationError):
        return "verification", exc.reason, exc.check
    if isinstance(exc, TpmError):
        return "tpm", str(exc), None
    if isinstance(exc, TestbedError):
        return "error", str(exc), None
    return "internal", f"internal error ({type(exc).__name__}); see the audit log", None


_BY_CODE: dict[str, type[CryptoVmError]] = {
    "not_found": NotFound, "exists": AlreadyExists, "bad_request": BadRequest,
    "crypto": CryptoOperationFailed, "sealed_storage": SealedStorageError,
    "storage": StorageError,
}


def error_from_wire(error: dict[str, Any]) -> TestbedError:
    """The exception a client raises for an error frame."""
    code, message = str(error.get("code")), str(error.get("message"))
    check = error.get("check")
    if code == "auth_failed":
        return AuthenticationFailed(message)
    if code in ("denied", "usage", "release_denied"):
        cls = {"denied": AccessDenied, "usage": KeyUsageError,
               "release_denied": ReleaseDenied}[code]
        return cls(str(check), message)
    if code in _BY_CODE:
        return _BY_CODE[code](message)
    if code == "verification":
        return VerificationError(str(check), message)
    if code == "tpm":
        return TpmError(message)
    return ProtocolError(message, code=code)
