"""The host agent: ``python -m testbed.hosts.agent``, run by the lab over SSH (an ``exec``
channel) inside the host, speaking :mod:`attestation.agent_wire` on stdin/stdout.

It serves ``identity``, ``activate``, ``quote`` (with the host's event log),
``status``, and for deep attestation (:mod:`testbed.hosts.deep`) ``intermediate_key``
(a signing key made in the host TPM, persisted there, certified by the AK) and
``intermediate_sign`` (TPM2_Sign of a certificate's digest with that key) from the host
TPM, whose unix socket exists only in the host's mount namespace
(:data:`testbed.hosts.layout.HOST_RUN`): the lab reaches the TPM through SSH or not at all.
One process per channel; it serves requests until the channel closes
(the lab keeps the channel for its next request: :class:`testbed.hosts.remote.PooledChannel`).
A bad request gets ``{"error": ...}``; an oversized or truncated frame ends the channel.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, overload

from tpm2_pytss import ESYS_TR, TSS2_Exception

from attestation.agent_wire import (
    FrameError,
    decode_message,
    parse_activate_request,
    parse_quote_request,
    recv_frame,
    send_frame,
)
from attestation.credential import CredentialChallenge
from attestation.encoding import b64decode, b64encode
from attestation.errors import TestbedError
from attestation.evidence import Evidence
from attestation.files import read_bounded
from attestation.tpm import LocalAttester, TpmClient, TpmKey
from attestation.tpm_types import PcrSelection
from testbed.core.files import read_json
from testbed.hosts.layout import EVENT_LOG, TPM_INFO

__all__ = ["StdioStream", "main", "serve"]

MAX_EVENT_LOG = 1 << 20
BANK = "sha256"  # the bank of the host's measured boot (testbed.tpm.boot.BANK)
_KEYS = {"identity": set(), "activate": {"credential_blob", "encrypted_secret"},
         "quote": {"nonce", "pcrs"}, "status": set(), "intermediate_key": {"nonce", "rotate"},
         "intermediate_sign": {"digest"}}
INTERMEDIATE_HANDLE = 0x81000020
"""The host intermediate CA's key: persistent in the owner hierarchy of the host TPM
(its NVRAM), so it survives the agent process and a host reboot, and never leaves it."""


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

    def intermediate_key(self, request: dict[str, Any]) -> dict[str, Any]:
        """The intermediate CA's key certified by the AK over the lab's nonce
        (TPM2_Certify): the one at :data:`INTERMEDIATE_HANDLE`, or with ``rotate`` (or
        when there is none) a new ECC P-256 signing key (fixedTPM, fixedParent,
        sensitiveDataOrigin) that replaces it."""
        nonce = b64decode(request.get("nonce"), "nonce", limit=64)
        rotate = request.get("rotate", False)
        if not isinstance(rotate, bool):
            raise TestbedError("intermediate_key: rotate must be true or false")
        with self._client() as client:
            key = None if rotate else _persistent_intermediate(client, missing_ok=True)
            if key is None:
                key = client.create_signing_key("ecc")
                _persist(client, key)
            try:
                ak = client.attestation_key("ecc")
                try:
                    attest, signature = client.certify(key, ak, nonce)
                finally:
                    client.flush(ak)
            finally:
                client.flush(key)
        return {"key_public": b64encode(key.public), "ak_public": b64encode(ak.public),
                "attest": b64encode(attest), "signature": b64encode(signature)}

    def intermediate_sign(self, request: dict[str, Any]) -> dict[str, Any]:
        """TPM2_Sign of a SHA-256 digest (a TBSCertificate's) with the intermediate key."""
        digest = b64decode(request.get("digest"), "digest", limit=64)
        if len(digest) != 32:
            raise TestbedError(f"intermediate_sign: a SHA-256 digest is 32 bytes, not "
                               f"{len(digest)}")
        with self._client() as client:
            key = _persistent_intermediate(client)
            try:
                signature = client.sign_digest(key, digest)
            finally:
                client.flush(key)
        return {"signature": b64encode(signature)}

    def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        """The host TPM answers a command (TPM2_GetRandom), or why not."""
        try:
            with self._client() as client:
                client.random(1)
        except TestbedError as exc:
            return {"role": "hypervisor-host", "agent_pid": os.getpid(),
                    "tpm": f"unresponsive: {str(exc)[:300]}"}
        return {"role": "hypervisor-host", "agent_pid": os.getpid(), "tpm": "answers"}


def _persist(client: TpmClient, key: TpmKey) -> None:
    """Make ``key`` the one at :data:`INTERMEDIATE_HANDLE` (evicting the previous one)."""
    esapi = client.esapi
    try:
        with contextlib.suppress(TSS2_Exception):  # no previous key
            old = esapi.tr_from_tpmpublic(INTERMEDIATE_HANDLE)
            esapi.evict_control(ESYS_TR.OWNER, old, INTERMEDIATE_HANDLE)
        esapi.tr_close(esapi.evict_control(ESYS_TR.OWNER, key.handle, INTERMEDIATE_HANDLE))
    except TSS2_Exception as exc:
        raise TestbedError(f"persisting the intermediate key failed: {exc}") from None


@overload
def _persistent_intermediate(client: TpmClient) -> TpmKey: ...


@overload
def _persistent_intermediate(client: TpmClient, *, missing_ok: bool) -> TpmKey | None: ...


def _persistent_intermediate(client: TpmClient, *, missing_ok: bool = False) -> TpmKey | None:
    try:
        handle = client.esapi.tr_from_tpmpublic(INTERMEDIATE_HANDLE)
        public, _, _ = client.esapi.read_public(handle)
    except TSS2_Exception:
        if missing_ok:
            return None
        raise TestbedError("this host has no intermediate key: the lab makes one with "
                           "testbed.hosts.deep.certify_host_intermediate") from None
    return TpmKey(handle, bytes(public.marshal())[2:], persistent=True)


def handle(attester: HostAttester, body: bytes) -> dict[str, Any]:
    """One request -> its answer; every failure is an ``error`` answer."""
    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "identity": lambda _r: attester.identity(), "activate": attester.activate,
        "quote": attester.quote, "status": attester.status,
        "intermediate_key": attester.intermediate_key,
        "intermediate_sign": attester.intermediate_sign}
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
