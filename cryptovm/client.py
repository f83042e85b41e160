"""A blocking CryptoVM client (one TLS connection, one request at a time).

Authenticates with a PSK (challenge-response, the server proves it knows the PSK
too) or with a client certificate issued by the CryptoVM. Error frames become the
same exceptions the VSM raises in-process (AccessDenied with its ``check``,
KeyUsageError, ReleaseDenied, NotFound, ProtocolError...).
"""

from __future__ import annotations

import hmac
import os
import socket
import ssl
from typing import Any

from attestation.errors import TestbedError
from cryptovm import tlsca
from cryptovm.accounts import psk_client_proof, psk_server_proof
from cryptovm.errors import AuthenticationFailed, ProtocolError
from cryptovm.wire import (
    HEADER_SIZE,
    MAGIC,
    MAX_BODY,
    Response,
    decode_response,
    encode_request,
    error_from_wire,
)


class CryptoVmClient:
    """``with CryptoVmClient(host, port, ca_pem=..., account=..., psk=...) as c: c.sign(...)``"""

    def __init__(self, host: str, port: int, *, ca_pem: bytes, account: str,
                 psk: bytes | None = None, cert_pem: bytes | None = None,
                 key_pem: bytes | None = None, timeout: float = 30.0,
                 io_timeout: float | None = None,
                 server_hostname: str = tlsca.SERVER_NAME) -> None:
        """``timeout`` bounds connecting, the handshake and authentication;
        ``io_timeout`` each later read or write (None: wait as long as the server takes)."""
        if psk is None and cert_pem is None:
            raise ValueError("give a psk or a client certificate (cert_pem, key_pem)")
        self.account = account
        self._next_id = 1
        self._buf = bytearray()
        context = tlsca.client_context(ca_pem, cert_pem, key_pem)
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._sock: ssl.SSLSocket = context.wrap_socket(raw, server_hostname=server_hostname)
            greeting = self._read_response()
            if not greeting.ok:  # e.g. a revoked client certificate
                raise _error(greeting)
            self.hello = greeting.result
            # Blocking mode from here on: with a timeout, every read becomes poll() plus
            # recv() inside the ssl module, which costs this client a third of its CPU.
            self._sock.settimeout(None if io_timeout is None else io_timeout)
            if self.hello.get("hello") != "cryptovm":
                raise ProtocolError("the server did not greet as a CryptoVM")
            if psk is not None and self.hello.get("authenticated") is None:
                self._auth(psk)
            elif self.hello.get("authenticated") != account:
                raise AuthenticationFailed(f"the certificate authenticates "
                                           f"{self.hello.get('authenticated')!r}, not {account!r}")
        except BaseException:
            raw.close()
            raise

    def __repr__(self) -> str:
        return f"CryptoVmClient(account={self.account!r})"

    def _auth(self, psk: bytes) -> None:
        challenge = self.hello["challenge"]
        client_nonce = os.urandom(32)
        result = self.call("auth", account=self.account, client_nonce=client_nonce,
                           proof=psk_client_proof(psk, challenge, client_nonce, self.account))
        expected = psk_server_proof(psk, challenge, client_nonce, self.account)
        if not hmac.compare_digest(expected, result.get("server_proof", b"")):
            raise AuthenticationFailed("the server could not prove it knows the PSK")

    # --- transport ----------------------------------------------------------------------

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> CryptoVmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        """Send arbitrary bytes (tests of the server's error handling)."""
        self._sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the CryptoVM closed the connection")
            self._buf += chunk

    def _read_response(self) -> Response:
        self._fill(HEADER_SIZE)
        if self._buf[:4] != MAGIC:
            raise ProtocolError("bad frame magic from the server", fatal=True)
        size = int.from_bytes(self._buf[4:8], "big")
        if size > MAX_BODY:
            raise ProtocolError("oversized frame from the server", fatal=True)
        self._fill(HEADER_SIZE + size)
        body = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + size])
        del self._buf[:HEADER_SIZE + size]
        return decode_response(body)

    def read_response(self) -> Response:
        """The next frame, whatever it is (tests)."""
        return self._read_response()

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request; raises the error frame's exception."""
        request_id = self._next_id
        self._next_id += 1
        self._sock.sendall(encode_request(request_id, op, self.account,
                                          {k: v for k, v in args.items() if v is not None}))
        while True:
            response = self._read_response()
            if response.id == request_id or response.id is None:
                break
        if not response.ok:
            raise _error(response)
        return response.result

    # --- typed conveniences ---------------------------------------------------------------

    def generate(self, algorithm: str, usage: list[str], **kw: Any) -> dict[str, Any]:
        return self.call("generate", algorithm=algorithm, usage=usage, **kw)

    def sign(self, key_id: str, data: bytes, **kw: Any) -> bytes:
        return bytes(self.call("sign", key_id=key_id, data=data, **kw)["signature"])

    def verify(self, key_id: str, data: bytes, signature: bytes, **kw: Any) -> bool:
        return bool(self.call("verify", key_id=key_id, data=data, signature=signature,
                              **kw)["valid"])

    def public_key(self, key_id: str, version: int | None = None) -> bytes:
        return bytes(self.call("public_key", key_id=key_id, version=version)["public_key"])

    def encrypt(self, key_id: str, plaintext: bytes, aad: bytes | None = None) -> bytes:
        return bytes(self.call("encrypt", key_id=key_id, plaintext=plaintext,
                               aad=aad)["ciphertext"])

    def decrypt(self, key_id: str, ciphertext: bytes, **kw: Any) -> bytes:
        return bytes(self.call("decrypt", key_id=key_id, ciphertext=ciphertext,
                               **kw)["plaintext"])

    def random(self, n: int) -> bytes:
        return bytes(self.call("random", n=n)["random"])


def _error(response: Response) -> TestbedError:
    return error_from_wire(response.error)
