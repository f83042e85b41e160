"""Raw TPM 2.0 commands, standard library only: for Debian 12 guests (no tpm2-pytss).

The guest agent (testbed/qemu/guest/agent.py) and the CryptoVM's raw backend
(cryptovm/rawtpm.py) talk to ``/dev/tpmrm0`` (the kernel's resource manager) or, in
host-side tests, to an swtpm data channel (``unix:PATH``, the default swtpm of the
testbed, or ``tcp:HOST:PORT``) with these few commands: password sessions and one
unsalted policy session, so no cryptography is needed here.
On the host, everything else uses tpm2-pytss (attestation/tpm.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Sequence

__all__ = [
    "AK_ATTRIBUTES",
    "AK_HANDLE",
    "ALG_ECC",
    "ALG_ECDSA",
    "ALG_NULL",
    "ALG_SHA256",
    "BANK_ALGS",
    "CC",
    "DIGEST_SIZES",
    "ECC_NIST_P256",
    "EK_CERT_INDEX",
    "EK_HANDLE",
    "MAX_RESPONSE",
    "MAX_RETRIES",
    "NV_CHUNK",
    "RC_HANDLE",
    "RC_HANDLE_MASK",
    "RC_TRY_AGAIN",
    "RH_ENDORSEMENT",
    "RH_NULL",
    "RH_OWNER",
    "RS_PW",
    "SE_POLICY",
    "ST_NO_SESSIONS",
    "ST_SESSIONS",
    "DeviceTransport",
    "Reader",
    "SocketTransport",
    "StreamTransport",
    "Tpm",
    "TpmCommandError",
    "UnixSocketTransport",
    "ak_template",
    "open_transport",
    "password_session",
    "pcr_selection",
    "quoted_pcr_digest",
    "strip_nv_padding",
    "tpm2b",
    "u16",
    "u32",
]

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
      "PCR_Read": 0x17E, "PCR_Extend": 0x182}
RC_HANDLE_MASK = 0x0FF  # format-one error number
RC_HANDLE = 0x08B
# TPM_RC_YIELDED, TPM_RC_TESTING, TPM_RC_RETRY: send the same command again (libtpms
# answers RETRY to the first ActivateCredential; tpm2-tss's ESAPI retries silently).
RC_TRY_AGAIN = frozenset({0x908, 0x90A, 0x922})
MAX_RETRIES = 10
# restricted | sign | noDA | fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth:
# the same AK as attestation/tpm.py (ecc256:ecdsa-sha256:null, endorsement hierarchy),
# so the same TPM gives the same key either way. noDA for the reason given there: the
# AK's authValue is empty, and without noDA every unorderly vTPM stop (a VM killed)
# raises the lockout counter until the TPM refuses the AK.
AK_ATTRIBUTES = 0x00050472
AK_HANDLE = 0x81010002
EK_HANDLE = 0x81010001  # RSA-2048 EK, low range (swtpm_setup --create-ek-cert)
EK_CERT_INDEX = 0x01C00002
NV_CHUNK = 1024
MAX_RESPONSE = 8192
SOCKET_TIMEOUT_S = 30.0  # per send/recv on an swtpm socket: a stuck swtpm is an error
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


class StreamTransport:
    """An swtpm data channel (raw TPM commands, as the tpm2-tss swtpm TCTI sends them)
    on a connected stream socket; responses bounded by :data:`MAX_RESPONSE`."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.name = name
        self._sock = sock

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


class SocketTransport(StreamTransport):
    """swtpm's TCP data channel (``--server type=tcp``)."""

    def __init__(self, host: str, port: int) -> None:
        sock = socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S)
        super().__init__(sock, f"swtpm:host={host},port={port}")


class UnixSocketTransport(StreamTransport):
    """swtpm's data channel on a unix socket (``--server type=unixio``)."""

    def __init__(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(SOCKET_TIMEOUT_S)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        super().__init__(sock, f"swtpm:path={path}")


def open_transport(spec: str) -> DeviceTransport | StreamTransport:
    """``/dev/tpmrm0``, ``unix:PATH`` (an swtpm data socket) or ``tcp:HOST:PORT``."""
    if spec.startswith("unix:"):
        return UnixSocketTransport(spec[5:])
    if spec.startswith("tcp:"):
        host, _, port = spec[4:].rpartition(":")
        return SocketTransport(host or "127.0.0.1", int(port))
    return DeviceTransport(spec)


# --- TPM commands --------------------------------------------------------------------------


class Tpm:
    """The handful of TPM commands the agent needs; serialised by a lock."""

    def __init__(self, transport: DeviceTransport | StreamTransport) -> None:
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

    def pcr_extend(self, pcr: int, bank: str, digest: bytes) -> None:
        """TPM2_PCR_Extend of one bank of ``pcr`` (the guest's runtime log, PCR 10)."""
        if len(digest) != DIGEST_SIZES[bank]:
            raise ValueError(f"a {bank} digest is {DIGEST_SIZES[bank]} bytes, not {len(digest)}")
        values = u32(1) + u16(BANK_ALGS[bank]) + digest  # TPML_DIGEST_VALUES of one TPMT_HA
        self.command("PCR_Extend", u32(pcr), values, [password_session()])

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
