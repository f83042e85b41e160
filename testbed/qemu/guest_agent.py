#!/usr/bin/python3
"""The guest agent: answers attestation requests from inside a QEMU guest.

Runs as the last step of the guest's ``/init`` with Debian's own python3 and
the standard library only (tpm2-pytss is not packaged in Debian 12, and the
agent must not depend on the host's virtualenv). It talks to the TPM with raw
TPM 2.0 commands on ``/dev/tpmrm0`` (the kernel's resource manager) or, for
host-side tests, on an swtpm TCP data port.

Why raw commands and not tpm2-tools: credential activation needs a policy
session (PolicySecret(TPM_RH_ENDORSEMENT)) that lives across three commands.
tpm2-tools runs one process per command, and the kernel's resource manager
flushes a connection's sessions when its file is closed, so
``tpm2_startauthsession``/``tpm2_policysecret``/``tpm2_activatecredential``
cannot share a session through ``/dev/tpmrm0``. Eleven commands with password
sessions and one unsalted policy session need no cryptography at all, so a
single process with one open ``/dev/tpmrm0`` is simpler and needs no extra
packages in the image.

Protocol (the sim node agent's, testbed/agent.py, over TCP): a big-endian u32
length, then one UTF-8 JSON object; one response frame per request::

    {"op": "identity"}  -> {"node", "role", "ek_algorithm", "ek_certificate": b64 DER,
                            "ek_public": b64 TPMT_PUBLIC, "ak_public": b64 TPMT_PUBLIC}
    {"op": "activate", "credential_blob": b64, "encrypted_secret": b64} -> {"secret": b64}
    {"op": "quote", "nonce": hex, "pcrs": [0, ...]}
                        -> an Evidence dict (attestation/evidence.py) with the event log
    {"op": "status"}    -> {"node", "role", "state", "uptime", "tcti", "kernel_cmdline"}
    {"op": "shutdown"}  -> {"stopping": true}; the guest then powers off

Errors are ``{"error": "..."}``; the agent keeps serving. One thread per connection
(at most :data:`MAX_CONNECTIONS`); the TPM is serialised by its lock.

Role extensions: when ``guest_tp`` (Trusted Passages inside the guest, which needs
Debian's python3-openssl and the project's ``trusted_passages``) sits beside this
file, its ``install(agent)`` adds request ops and *stream* ops. A stream op answers
its request frame and then owns the raw connection: the host relays it to another
guest, so TLS runs end to end between guests through the host's untrusted network.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import importlib
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

# --- TPM 2.0 constants (Part 2) -------------------------------------------------------------

ST_NO_SESSIONS, ST_SESSIONS = 0x8001, 0x8002
RS_PW = 0x40000009
RH_OWNER, RH_NULL, RH_ENDORSEMENT = 0x40000001, 0x40000007, 0x4000000B
ALG_SHA256, ALG_NULL, ALG_ECC, ALG_ECDSA = 0x000B, 0x0010, 0x0023, 0x0018
ECC_NIST_P256 = 0x0003
SE_POLICY = 0x01
CC = {"EvictControl": 0x120, "CreatePrimary": 0x131, "ActivateCredential": 0x147,
      "NV_Read": 0x14E, "PolicySecret": 0x151, "Quote": 0x158, "FlushContext": 0x165,
      "NV_ReadPublic": 0x169, "ReadPublic": 0x173, "StartAuthSession": 0x176,
      "PCR_Read": 0x17E}
RC_HANDLE_MASK = 0x0FF  # format-one error number
RC_HANDLE = 0x08B
# TPM_RC_YIELDED, TPM_RC_TESTING, TPM_RC_RETRY: send the same command again (libtpms
# answers RETRY to the first ActivateCredential; tpm2-tss's ESAPI retries silently).
RC_TRY_AGAIN = frozenset({0x908, 0x90A, 0x922})
MAX_RETRIES = 10
# restricted | sign | fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth:
# the same AK as attestation/tpm.py (ecc256:ecdsa-sha256:null, endorsement hierarchy).
AK_ATTRIBUTES = 0x00050072
AK_HANDLE = 0x81010002
EK_HANDLE = 0x81010001  # RSA-2048 EK, low range (swtpm_setup --create-ek-cert)
EK_CERT_INDEX = 0x01C00002
NV_CHUNK = 1024
MAX_RESPONSE = 8192
MAX_FRAME = 4 << 20
MAX_NONCE = 64
IDLE_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 16
DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
BANK_ALGS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}


class TpmCommandError(Exception):
    """A TPM command failed; ``rc`` is the TPM response code."""

    def __init__(self, command: str, rc: int) -> None:
        super().__init__(f"TPM2_{command} failed with response code 0x{rc:03x}")
        self.rc = rc


# --- marshalling ---------------------------------------------------------------------------


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def tpm2b(data: bytes) -> bytes:
    return u16(len(data)) + data


def pcr_selection(bank: str, pcrs: Sequence[int]) -> bytes:
    """TPML_PCR_SELECTION with one bank."""
    bitmap = bytearray(3)
    for pcr in pcrs:
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return u32(1) + u16(BANK_ALGS[bank]) + bytes([3]) + bytes(bitmap)


def password_session() -> bytes:
    """TPMS_AUTH_COMMAND for an empty password."""
    return u32(RS_PW) + tpm2b(b"") + b"\x00" + tpm2b(b"")


class Reader:
    """Bounds-checked big-endian cursor over a TPM response."""

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data = data
        self.offset = offset

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ValueError("TPM response truncated")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())


def ak_template() -> bytes:
    """TPMT_PUBLIC of the AK: ECC P-256, ECDSA-SHA256, restricted signing, no symmetric."""
    parameters = u16(ALG_NULL) + u16(ALG_ECDSA) + u16(ALG_SHA256) + u16(ECC_NIST_P256) \
        + u16(ALG_NULL)
    return u16(ALG_ECC) + u16(ALG_SHA256) + u32(AK_ATTRIBUTES) + tpm2b(b"") + parameters \
        + tpm2b(b"") + tpm2b(b"")


# --- transports ----------------------------------------------------------------------------


class DeviceTransport:
    """``/dev/tpmrm0``: one write per command, one read per response."""

    def __init__(self, path: str) -> None:
        self.name = f"device:{path}"
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def transact(self, command: bytes) -> bytes:
        os.write(self._fd, command)
        return os.read(self._fd, MAX_RESPONSE)

    def close(self) -> None:
        os.close(self._fd)


class SocketTransport:
    """swtpm's TCP data channel (raw TPM commands, as the tpm2-tss swtpm TCTI sends)."""

    def __init__(self, host: str, port: int) -> None:
        self.name = f"swtpm:host={host},port={port}"
        self._sock = socket.create_connection((host, port), timeout=30)

    def transact(self, command: bytes) -> bytes:
        self._sock.sendall(command)
        header = self._exactly(10)
        size = struct.unpack(">I", header[2:6])[0]
        if not 10 <= size <= MAX_RESPONSE:
            raise ValueError(f"TPM response size {size} out of range")
        return header + self._exactly(size - 10)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("swtpm closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        self._sock.close()


def open_transport(spec: str) -> DeviceTransport | SocketTransport:
    """``/dev/tpmrm0`` or ``tcp:HOST:PORT``."""
    if spec.startswith("tcp:"):
        host, _, port = spec[4:].rpartition(":")
        return SocketTransport(host or "127.0.0.1", int(port))
    return DeviceTransport(spec)


# --- TPM commands --------------------------------------------------------------------------


class Tpm:
    """The handful of TPM commands the agent needs; serialised by a lock."""

    def __init__(self, transport: DeviceTransport | SocketTransport) -> None:
        self.transport = transport
        self.lock = threading.Lock()

    def command(self, name: str, handles: bytes, params: bytes,
                sessions: Sequence[bytes] = ()) -> tuple[bytes, Reader]:
        """Send one command; return (response handle area, reader over the parameters)."""
        if sessions:
            auth = b"".join(sessions)
            body = handles + u32(len(auth)) + auth + params
            tag = ST_SESSIONS
        else:
            body, tag = handles + params, ST_NO_SESSIONS
        command = u16(tag) + u32(10 + len(body)) + u32(CC[name]) + body
        for _ in range(MAX_RETRIES):
            response = self.transport.transact(command)
            if len(response) < 10:
                raise ValueError(f"TPM2_{name}: short response")
            rc = struct.unpack(">I", response[6:10])[0]
            if rc not in RC_TRY_AGAIN:
                break
        if rc != 0:
            raise TpmCommandError(name, rc)
        return response, Reader(response, 10)

    def _params(self, response: Reader, handle_count: int, sessions: bool) -> Reader:
        response.take(4 * handle_count)
        if sessions:
            size = response.u32()
            return Reader(response.take(size))
        return Reader(response.data, response.offset)

    def read_public(self, handle: int) -> bytes:
        """TPMT_PUBLIC of a loaded object."""
        _, r = self.command("ReadPublic", u32(handle), b"")
        public = r.tpm2b()
        return public

    def exists(self, handle: int) -> bool:
        try:
            self.read_public(handle)
        except TpmCommandError as exc:
            if exc.rc & RC_HANDLE_MASK == RC_HANDLE:
                return False
            raise
        return True

    def nv_read(self, index: int) -> bytes:
        _, r = self.command("NV_ReadPublic", u32(index), b"")
        nv_public = Reader(r.tpm2b())
        nv_public.take(4 + 2 + 4)  # nvIndex, nameAlg, attributes
        nv_public.tpm2b()  # authPolicy
        size = nv_public.u16()
        data = b""
        while len(data) < size:
            chunk = min(NV_CHUNK, size - len(data))
            _, resp = self.command("NV_Read", u32(index) + u32(index),
                                   u16(chunk) + u16(len(data)), [password_session()])
            data += self._params(resp, 0, True).tpm2b()
        return data

    def flush(self, handle: int) -> None:
        self.command("FlushContext", b"", u32(handle))

    def ensure_ak(self) -> bytes:
        """The AK's TPMT_PUBLIC; created in the endorsement hierarchy and persisted once."""
        if not self.exists(AK_HANDLE):
            sensitive = tpm2b(tpm2b(b"") + tpm2b(b""))
            params = sensitive + tpm2b(ak_template()) + tpm2b(b"") + u32(0)
            _, r = self.command("CreatePrimary", u32(RH_ENDORSEMENT), params,
                                [password_session()])
            transient = r.u32()
            try:
                self.command("EvictControl", u32(RH_OWNER) + u32(transient), u32(AK_HANDLE),
                             [password_session()])
            finally:
                self.flush(transient)
        return self.read_public(AK_HANDLE)

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """ActivateCredential(AK, EK) with PolicySecret(TPM_RH_ENDORSEMENT) for the EK."""
        params = (tpm2b(os.urandom(32)) + tpm2b(b"") + bytes([SE_POLICY]) + u16(ALG_NULL)
                  + u16(ALG_SHA256))
        _, r = self.command("StartAuthSession", u32(RH_NULL) + u32(RH_NULL), params)
        session = r.u32()
        try:
            self.command("PolicySecret", u32(RH_ENDORSEMENT) + u32(session),
                         tpm2b(b"") + tpm2b(b"") + tpm2b(b"") + u32(0), [password_session()])
            policy_auth = u32(session) + tpm2b(os.urandom(32)) + b"\x00" + tpm2b(b"")
            _, resp = self.command(
                "ActivateCredential", u32(AK_HANDLE) + u32(EK_HANDLE),
                tpm2b(credential_blob) + tpm2b(encrypted_secret),
                [password_session(), policy_auth])
        except BaseException:
            with contextlib.suppress(Exception):
                self.flush(session)
            raise
        return self._params(resp, 0, True).tpm2b()  # continueSession clear: flushed

    def pcr_read(self, bank: str, pcrs: Sequence[int]) -> dict[int, bytes]:
        values: dict[int, bytes] = {}
        wanted = sorted(set(pcrs))
        for start in range(0, len(wanted), 8):
            chunk = wanted[start : start + 8]
            _, r = self.command("PCR_Read", b"", pcr_selection(bank, chunk))
            r.u32()  # pcrUpdateCounter
            got = _selected(r)
            count = r.u32()
            digests = [r.tpm2b() for _ in range(count)]
            values.update(zip(got, digests, strict=True))
        return values

    def quote(self, nonce: bytes, bank: str, pcrs: Sequence[int]) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE) of the AK over ``pcrs``."""
        params = tpm2b(nonce) + u16(ALG_NULL) + pcr_selection(bank, pcrs)
        _, r = self.command("Quote", u32(AK_HANDLE), params, [password_session()])
        body = self._params(r, 0, True)
        attest = body.tpm2b()
        return attest, body.data[body.offset :]


def _selected(r: Reader) -> list[int]:
    indices: list[int] = []
    for _ in range(r.u32()):
        r.u16()
        bitmap = r.take(r.take(1)[0])
        indices += [i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]
    return indices


def quoted_pcr_digest(attest: bytes) -> bytes:
    """pcrDigest of a TPMS_ATTEST of type quote."""
    r = Reader(attest)
    r.take(4 + 2)  # magic, type
    r.tpm2b()  # qualifiedSigner
    r.tpm2b()  # extraData
    r.take(17 + 8)  # clockInfo, firmwareVersion
    for _ in range(r.u32()):
        r.u16()
        r.take(r.take(1)[0])
    return r.tpm2b()


# --- the agent -----------------------------------------------------------------------------


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def unb64(value: object, name: str) -> bytes:
    if not isinstance(value, str) or len(value) > 16384:
        raise ValueError(f"{name}: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: not valid base64") from None


class Agent:
    """Request handlers over one TPM connection."""

    def __init__(self, tpm: Tpm, event_log: str | None, node: str, role: str) -> None:
        self.tpm = tpm
        self.event_log_path = event_log
        self.node = node
        self.role = role
        self.stopping = threading.Event()
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "identity": self.identity, "activate": self.activate, "quote": self.quote,
            "status": self.status, "shutdown": self.shutdown,
        }
        # op -> handler(request, connection): answers the request and keeps the connection
        self.stream_handlers: dict[str, Callable[[dict[str, Any], socket.socket], None]] = {}
        self.extensions: list[str] = []

    def identity(self, _request: dict[str, Any]) -> dict[str, Any]:
        with self.tpm.lock:
            ak = self.tpm.ensure_ak()
            ek = self.tpm.read_public(EK_HANDLE)
            cert = strip_nv_padding(self.tpm.nv_read(EK_CERT_INDEX))
        return {"node": self.node, "role": self.role, "ek_algorithm": "rsa",
                "ek_certificate": b64(cert), "ek_public": b64(ek), "ak_public": b64(ak)}

    def activate(self, request: dict[str, Any]) -> dict[str, Any]:
        blob = unb64(request.get("credential_blob"), "credential_blob")
        secret = unb64(request.get("encrypted_secret"), "encrypted_secret")
        with self.tpm.lock:
            self.tpm.ensure_ak()
            released = self.tpm.activate_credential(blob, secret)
        return {"secret": b64(released)}

    def quote(self, request: dict[str, Any]) -> dict[str, Any]:
        nonce = _nonce(request.get("nonce"))
        pcrs = _pcr_list(request.get("pcrs"))
        bank = "sha256"
        with self.tpm.lock:
            ak = self.tpm.ensure_ak()
            for _ in range(3):  # retry if a PCR changed between quote and read
                attest, signature = self.tpm.quote(nonce, bank, pcrs)
                values = self.tpm.pcr_read(bank, pcrs)
                composite = b"".join(values[i] for i in sorted(values))
                if hashlib.sha256(composite).digest() == quoted_pcr_digest(attest):
                    break
            else:
                raise ValueError("PCRs kept changing during 3 quote attempts")
            ek = self.tpm.read_public(EK_HANDLE)
            cert = strip_nv_padding(self.tpm.nv_read(EK_CERT_INDEX))
        return {
            "format": "tpm2-evidence", "version": 1, "attest": b64(attest),
            "signature": b64(signature), "ak_public": b64(ak), "pcr_bank": bank,
            "pcrs": {str(i): v.hex() for i, v in sorted(values.items())},
            "event_log": b64(self._event_log()), "ek_public": b64(ek),
            "ek_certificate": b64(cert), "platform_certificate": None,
            "key_certification": None,
        }

    def _event_log(self) -> bytes | None:
        if self.event_log_path is None:
            return None
        with open(self.event_log_path, "rb") as f:
            return f.read(MAX_FRAME // 2)

    def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {"node": self.node, "role": self.role, "state": "running",
                "uptime": _read_text("/proc/uptime").split(" ")[0],
                "tcti": self.tpm.transport.name,
                "kernel_cmdline": _read_text("/proc/cmdline").strip(),
                "extensions": list(self.extensions)}

    def shutdown(self, _request: dict[str, Any]) -> dict[str, Any]:
        self.stopping.set()
        return {"stopping": True}

    def handle(self, body: bytes) -> dict[str, Any]:
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            op = request.get("op")
            if not isinstance(op, str) or op not in self.handlers:
                known = ", ".join([*self.handlers, *self.stream_handlers])
                raise ValueError(f"unknown op {str(op)[:40]!r}; known: {known}")
            return self.handlers[op](request)
        except (ValueError, OSError, TpmCommandError) as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a bug must not take the guest (PID 1's child) down
            print(f"guest agent: internal error: {exc!r}", file=sys.stderr, flush=True)
            return {"error": f"internal error: {type(exc).__name__}"}


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(4096)
    except OSError:
        return ""


def _nonce(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError("nonce: expected hex")
    try:
        nonce = bytes.fromhex(value)
    except ValueError:
        raise ValueError("nonce: not hexadecimal") from None
    if len(nonce) > MAX_NONCE:
        raise ValueError(f"nonce: at most {MAX_NONCE} bytes")
    return nonce


def _pcr_list(value: object) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 23 for p in value):
        raise ValueError("pcrs: expected a non-empty list of PCR indices 0..23")
    return sorted(set(value))


def strip_nv_padding(data: bytes) -> bytes:
    """NV certificate areas may be larger than the DER; keep exactly one DER SEQUENCE."""
    if len(data) < 4 or data[0] != 0x30:
        return data
    if data[1] < 0x80:
        return data[: 2 + data[1]]
    n = data[1] & 0x7F
    if n > 4 or len(data) < 2 + n:
        return data
    return data[: 2 + n + int.from_bytes(data[2 : 2 + n], "big")]


# --- framing and serving -------------------------------------------------------------------


def send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 16))
        if not chunk:
            return None
        data += chunk
    return data


def recv_frame(sock: socket.socket) -> bytes | None:
    """One frame's body; None on a clean end of stream."""
    header = recv_exactly(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    body = recv_exactly(sock, length)
    if body is None:
        raise ValueError("truncated frame")
    return body


def serve_connection(agent: Agent, conn: socket.socket) -> None:
    with conn:
        conn.settimeout(IDLE_TIMEOUT_S)
        while True:
            try:
                body = recv_frame(conn)
            except (ValueError, OSError):
                return
            if body is None:
                return
            stream = _stream_handler(agent, body)
            if stream is not None:
                handler, request = stream
                handler(request, conn)  # it owns the connection now
                return
            send_frame(conn, agent.handle(body))
            if agent.stopping.is_set():
                return


def _stream_handler(agent: Agent, body: bytes
                    ) -> tuple[Callable[[dict[str, Any], socket.socket], None],
                               dict[str, Any]] | None:
    try:
        request = json.loads(body)
    except ValueError:
        return None  # agent.handle() answers the error
    if not isinstance(request, dict):
        return None
    handler = agent.stream_handlers.get(str(request.get("op")))
    return None if handler is None else (handler, request)


def _serve_and_release(agent: Agent, conn: socket.socket, slots: threading.BoundedSemaphore
                       ) -> None:
    try:
        with contextlib.suppress(OSError):
            serve_connection(agent, conn)
    except Exception as exc:  # a bug in one connection must not take the agent down
        print(f"guest agent: connection failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        slots.release()


def serve(agent: Agent, host: str, port: int) -> None:
    """Serve until a shutdown request: a thread per connection, the TPM under its lock."""
    server = socket.create_server((host, port), reuse_port=False)
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    server.settimeout(1.0)  # to notice a shutdown request served by another thread
    with server:
        while not agent.stopping.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            if not slots.acquire(blocking=False):
                conn.close()  # too many: the host retries
                continue
            threading.Thread(target=_serve_and_release, args=(agent, conn, slots),
                             daemon=True).start()


EXTENSIONS = (("guest_tp", "trusted-passages"), ("guest_cryptovm", "cryptovm"))


def install_extensions(agent: Agent) -> None:
    """Load the role extensions shipped beside this file (absent in minimal images)."""
    for module_name, label in EXTENSIONS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            print(f"guest agent: no {label} extension ({exc})", flush=True)
            continue
        module.install(agent, send_frame)
        agent.extensions.append(label)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="testbed guest attestation agent")
    parser.add_argument("--listen", default="0.0.0.0:9301", help="HOST:PORT")
    parser.add_argument("--tpm", default="/dev/tpmrm0", help="/dev/tpmrm0 or tcp:HOST:PORT")
    parser.add_argument("--event-log", default=None)
    parser.add_argument("--node", default=socket.gethostname())
    parser.add_argument("--role", default="generic")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    tpm = Tpm(open_transport(args.tpm))
    agent = Agent(tpm, args.event_log, args.node, args.role)
    install_extensions(agent)
    print(f"guest agent: serving on {host}:{port} with {tpm.transport.name}", flush=True)
    serve(agent, host, int(port))
    tpm.transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
