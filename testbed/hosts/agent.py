"""The host agent: ``python -m testbed.hosts.agent``, run by the lab over SSH (an ``exec``
channel) inside the host, speaking :mod:`attestation.agent_wire` on stdin/stdout.

It serves ``identity``, ``activate``, ``quote`` (with the host's event log) and
``status`` from the host TPM, whose unix socket exists only in the host's mount
namespace (:data:`testbed.hosts.layout.HOST_RUN`): the lab reaches the TPM through SSH
or not at all. One process per channel; it serves requests until the channel closes
(the lab keeps the channel for its next request: :class:`testbed.hosts.remote.PooledChannel`).
A bad request gets ``{"error": ...}``; an oversized or truncated frame ends the channel.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from attestation.agent_wire import (
    FrameError,
    decode_message,
    parse_activate_request,
    parse_quote_request,
    recv_frame,
    send_frame,
)
from attestation.credential import CredentialChallenge
from attestation.encoding import b64encode
from attestation.errors import TestbedError
from attestation.evidence import Evidence
from attestation.files import read_bounded
from attestation.tpm import LocalAttester, TpmClient
from attestation.tpm_types import PcrSelection
from testbed.core.files import read_json
from testbed.hosts.layout import EVENT_LOG, TPM_INFO

__all__ = ["StdioStream", "main", "serve"]

MAX_EVENT_LOG = 1 << 20
BANK = "sha256"  # the bank of the host's measured boot (testbed.tpm.boot.BANK)
_KEYS = {"identity": set(), "activate": {"credential_blob", "encrypted_secret"},
         "quote": {"nonce", "pcrs"}, "status": set()}


class StdioStream:
    """stdin/stdout with the two socket methods the wire functions use."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read, self._write = read_fd, write_fd

    def recv(self, size: int) -> bytes:
        return os.read(self._read, size)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._write, view):]


class HostAttester:
    """The host TPM, opened per request (swtpm serves one connection at a time)."""

    def _client(self) -> TpmClient:
        doc = read_json(TPM_INFO)
        if not isinstance(doc, dict) or not isinstance(doc.get("tcti"), str):
            raise TestbedError("the host TPM is not running (no tpm.json: host not booted?)")
        return TpmClient(doc["tcti"])

    def identity(self) -> dict[str, Any]:
        with self._client() as client:
            ident = LocalAttester(client).identity()
        return {"node": os.uname().nodename, "role": "hypervisor-host", "ek_algorithm": "rsa",
                "ek_certificate": b64encode(ident.ek_certificate),
                "ek_public": b64encode(ident.ek_public), "ak_public": b64encode(ident.ak_public)}

    def activate(self, request: dict[str, Any]) -> dict[str, Any]:
        blob, secret = parse_activate_request(request)
        with self._client() as client:
            answer = LocalAttester(client).activate(CredentialChallenge(blob, secret))
        return {"secret": b64encode(answer)}

    def quote(self, request: dict[str, Any]) -> dict[str, Any]:
        nonce, pcrs = parse_quote_request(request)
        selection = PcrSelection(BANK, tuple(pcrs))
        event_log = read_bounded(EVENT_LOG, MAX_EVENT_LOG, what="host event log")
        with self._client() as client:
            ek = client.endorsement_key("rsa")
            ak = client.attestation_key("ecc")
            try:
                result = client.quote(ak, selection, nonce)
            finally:
                client.flush(ak)
        return Evidence(attest=result.attest, signature=result.signature, ak_public=ak.public,
                        pcr_bank=BANK, pcrs=result.pcrs, event_log=event_log,
                        ek_public=ek.public, ek_certificate=ek.certificate).to_dict()

    def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        """The host TPM answers a command (TPM2_GetRandom), or why not."""
        try:
            with self._client() as client:
                client.random(1)
        except TestbedError as exc:
            return {"role": "hypervisor-host", "agent_pid": os.getpid(),
                    "tpm": f"unresponsive: {str(exc)[:300]}"}
        return {"role": "hypervisor-host", "agent_pid": os.getpid(), "tpm": "answers"}


def handle(attester: HostAttester, body: bytes) -> dict[str, Any]:
    """One request -> its answer; every failure is an ``error`` answer."""
    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "identity": lambda _r: attester.identity(), "activate": attester.activate,
        "quote": attester.quote, "status": attester.status}
    try:
        request = decode_message(body)
        op = request.get("op")
        if not isinstance(op, str) or op not in handlers:
            return {"error": f"unknown op {str(op)[:40]!r}; known: {', '.join(handlers)}"}
        unknown = set(request) - {"op"} - _KEYS[op]
        if unknown:
            return {"error": f"{op}: unknown keys {sorted(str(k)[:40] for k in unknown)}"}
        return handlers[op](request)
    except TestbedError as exc:
        return {"error": str(exc)[:1000]}


def serve(stream: StdioStream, attester: HostAttester) -> int:
    while True:
        try:
            body = recv_frame(stream)  # type: ignore[arg-type]  # duck-typed socket
        except FrameError as exc:
            send_frame(stream, {"error": str(exc)})  # type: ignore[arg-type]
            return 3
        if body is None:
            return 0
        send_frame(stream, handle(attester, body))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    del argv  # no options: everything it needs is in the host's own /run
    os.umask(0o077)
    try:
        return serve(StdioStream(sys.stdin.fileno(), sys.stdout.fileno()), HostAttester())
    except OSError:
        return 4  # the channel went away


if __name__ == "__main__":
    sys.exit(main())
