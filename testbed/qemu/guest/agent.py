#!/usr/bin/python3
"""The guest agent: answers attestation requests from inside a QEMU guest.

Runs as the last step of the guest's ``/init`` with Debian's own python3, the
standard library and the project's stdlib-only :mod:`attestation.tpm_raw` (tpm2-pytss
is not packaged usably in Debian 12, and the agent must not depend on the host's
virtualenv). It talks to the TPM with raw
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

Protocol: the agent wire format of every node agent (attestation/agent_wire.py), over
TCP: a big-endian u32 length, then one UTF-8 JSON object; one response frame per request::

    {"op": "identity"}  -> {"node", "role", "ek_algorithm", "ek_certificate": b64 DER,
                            "ek_public": b64 TPMT_PUBLIC, "ak_public": b64 TPMT_PUBLIC}
    {"op": "activate", "credential_blob": b64, "encrypted_secret": b64} -> {"secret": b64}
    {"op": "quote", "nonce": hex, "pcrs": [0, ...]}
                        -> an Evidence dict (attestation/evidence.py) with the event log
    {"op": "status"}    -> {"node", "role", "state", "uptime", "tcti", "kernel_cmdline"}
    {"op": "shutdown"}  -> {"stopping": true}; the guest then powers off
    {"op": "runtime_log", "offset": N} -> {"offset": N, "data": b64, at most 256 KiB}
    {"op": "runtime_measure", "path": str, "content": b64}
                        -> the ima-ng entry: {"path", "digest", "offset", "template_hash"}
    {"op": "revocation_key", "public_key": PEM}
                        -> {"pinned": true}: the verifier's Ed25519 key, given at `up`
    {"op": "role", "action": "revoked" | "reinstated",
     "args": {"decision": b64, "signature": b64}}
                        -> {"node", "applied", "sequence", "effects" | "refused"}
    {"op": "hold_marker", "marker": b64 (8-64 bytes), "copies": N}
                        -> {"held": bytes}: the copies kept in RAM (migration proof)

Runtime integrity (docs/runtime.md): the agent keeps this boot's ima-ng log of PCR 10,
as a sim node does. It starts with the guest kernel's ``boot_aggregate`` (the kernel's
IMA extends PCR 10 with it before any user space runs), then the agent's own files;
``runtime_measure`` is a file the guest "executes": PCR 10 extended, the line appended,
both under the TPM lock, so a quote never sees a PCR 10 the log does not explain.

Revocation (docs/runtime.md): the host gives the verifier's public key when the VM
starts (``revocation_key``; the first key is pinned for the boot). ``role`` hands a
signed decision to the agent's :class:`attestation.revocation.DecisionLedger`, the same
verification as a sim node's gate; the role extensions then act on it (Trusted Passages
closes the channels to or from the revoked node, the CryptoVM disables its account).

Errors are ``{"error": "..."}``; the agent keeps serving. One thread per connection, at
most :data:`MAX_CONNECTIONS` (:class:`attestation.slots.ConnectionSlots`): each request
must arrive whole within :data:`IDLE_TIMEOUT_S` of accept or of the previous answer
(trickled bytes do not extend it); a newcomer finding every slot taken evicts the
connection idle the longest, and is refused only when all are busy with requests.
The TPM is serialised by its lock.

Role extensions: when ``tp_extension`` (Trusted Passages inside the guest, which needs
Debian's python3-openssl and the project's ``trusted_passages``) sits beside this
file, its ``install(agent)`` adds request ops and *stream* ops. A stream op answers
its request frame and then owns the raw connection: the host relays it to another
guest, so TLS runs end to end between guests through the host's untrusted network.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from attestation.agent_wire import (  # the wire format every node agent speaks
    FrameError,
    parse_activate_request,
    parse_quote_request,
    recv_frame,
    send_frame,
)
from attestation.encoding import b64decode, b64encode, require_int
from attestation.errors import EvidenceFormatError, TestbedError
from attestation.ima import (  # the ima-ng format the verifier reads (docs/runtime.md)
    BOOT_AGGREGATE,
    IMA_PCR,
    MAX_CHUNK,
    SIG_TEMPLATE,
    TEMPLATE,
    ImaEntry,
    boot_aggregate,
    make_entry,
)
from attestation.revocation import (  # the decisions, verified as on sim nodes
    ACTIONS,
    MAX_KEY_PEM,
    Decision,
    DecisionLedger,
    Reinstate,
    RevocationEvent,
)
from attestation.slots import ConnectionSlots, Slot, shutdown
from attestation.tpm_raw import (  # the raw TPM commands, shared with cryptovm/rawtpm.py
    EK_CERT_INDEX,
    EK_HANDLE,
    Tpm,
    TpmCommandError,
    open_transport,
    quoted_pcr_digest,
    strip_nv_padding,
)

MAX_EVENT_LOG = 2 << 20  # half a frame: the quote's other fields fit beside it
IDLE_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 16
RANK_IDLE = 0  # waiting for a request: evictable, the longest idle first
_SWEEP_S = 0.2  # how often deadlines are checked and a shutdown request is noticed
MAX_EXECUTED = 1 << 20  # bytes of one file a runtime_measure "executes" (as a sim node)
MAX_RUNTIME_LOG = 64 * MAX_CHUNK  # what one verifier check reads at most; then refuse
BANK = "sha256"  # the bank quoted and extended
_ZERO = bytes(32)
_OP_KEYS = {"runtime_log": {"op", "offset"}, "runtime_measure": {"op", "path", "content"},
            "revocation_key": {"op", "public_key"}, "role": {"op", "action", "args"},
            "hold_marker": {"op", "marker", "copies"}}
MAX_HELD = 8 << 20  # bytes of marker copies held in RAM at most (the migration proof)


def b64(data: bytes | None) -> str | None:
    return None if data is None else b64encode(data)


class RevocationListener(Protocol):
    """A role extension that acts on the verifier's decisions."""

    def revoked(self, event: RevocationEvent) -> dict[str, Any]: ...

    def reinstated(self, decision: Reinstate) -> dict[str, Any]: ...


class RuntimeLog:
    """This boot's ima-ng log of PCR 10, in memory (the guest's root is a RAM disk anyway),
    at most :data:`MAX_RUNTIME_LOG` bytes: a log the verifier could not read in one check
    is refused before it grows, not truncated."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self._data)

    def append(self, entry: ImaEntry) -> None:
        with self._lock:
            self._data += entry.line()

    def room_for(self, path: str) -> None:
        """Raise before extending PCR 10 with an entry the log could not keep."""
        if self.size + len(path.encode()) + 160 > MAX_RUNTIME_LOG:
            raise ValueError(f"the runtime log is full ({self.size} bytes; at most "
                             f"{MAX_RUNTIME_LOG}): reboot the VM to start a new one")

    def read(self, offset: int) -> bytes:
        """At most :data:`MAX_CHUNK` bytes of the log from ``offset``."""
        with self._lock:
            if offset > len(self._data):
                raise ValueError(f"runtime log offset {offset} is outside the log "
                                 f"(0-{len(self._data)} bytes)")
            return bytes(self._data[offset : offset + MAX_CHUNK])


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
            "runtime_log": self.runtime_log, "runtime_measure": self.runtime_measure,
            "revocation_key": self.revocation_key, "role": self.role_call,
            "hold_marker": self.hold_marker,
        }
        self.runtime = RuntimeLog()
        self._verifier_key: str | None = None  # given by the host at `up`
        self._key_lock = threading.Lock()
        self.revocations = DecisionLedger(self._provisioned_key)  # this boot's decisions
        self.revocation_listeners: dict[str, RevocationListener] = {}  # by extension
        # op -> handler(request, connection): answers the request and keeps the connection
        self.stream_handlers: dict[str, Callable[[dict[str, Any], socket.socket], None]] = {}
        self.extensions: list[str] = []
        self._held = b""  # hold_marker's copies (replaced by the next call)

    def identity(self, _request: dict[str, Any]) -> dict[str, Any]:
        with self.tpm.lock:
            ak = self.tpm.ensure_ak()
            ek = self.tpm.read_public(EK_HANDLE)
            cert = strip_nv_padding(self.tpm.nv_read(EK_CERT_INDEX))
        return {"node": self.node, "role": self.role, "ek_algorithm": "rsa",
                "ek_certificate": b64(cert), "ek_public": b64(ek), "ak_public": b64(ak)}

    def activate(self, request: dict[str, Any]) -> dict[str, Any]:
        blob, secret = parse_activate_request(request)
        with self.tpm.lock:
            self.tpm.ensure_ak()
            released = self.tpm.activate_credential(blob, secret)
        return {"secret": b64(released)}

    def quote(self, request: dict[str, Any]) -> dict[str, Any]:
        nonce, pcrs = parse_quote_request(request)
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
            return f.read(MAX_EVENT_LOG)

    def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {"node": self.node, "role": self.role, "state": "running",
                "uptime": _read_text("/proc/uptime").split(" ")[0],
                "tcti": self.tpm.transport.name,
                "kernel_cmdline": _read_text("/proc/cmdline").strip(),
                "extensions": list(self.extensions)}

    def shutdown(self, _request: dict[str, Any]) -> dict[str, Any]:
        self.stopping.set()
        return {"stopping": True}

    # --- runtime integrity (docs/runtime.md) ---------------------------------------------

    def start_runtime(self, files: Sequence[str]) -> None:
        """Begin this boot's log: the kernel's boot_aggregate, then ``files`` (the agent's
        own code) measured. A PCR 10 the boot_aggregate does not explain (a kernel with an
        IMA policy, an agent restarted) is left unexplained: the verifier fails closed."""
        with self.tpm.lock:
            pcrs = self.tpm.pcr_read(BANK, range(IMA_PCR + 1))
            aggregate = boot_aggregate(pcrs)
            if pcrs[IMA_PCR] == _ZERO:  # no IMA in this kernel (or no VM: a host test)
                self._measure(aggregate, BOOT_AGGREGATE)
            else:
                self._adopt_kernel_aggregate(aggregate, pcrs[IMA_PCR])
        for path in files:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").digest()
            with self.tpm.lock:
                self._measure(digest, path)

    def _adopt_kernel_aggregate(self, aggregate: bytes, pcr10: bytes) -> None:
        """Log the boot_aggregate entry the kernel extended PCR 10 with (ima-sig, Debian's
        default template, or ima-ng); the kernel's own log is not read."""
        for template in (SIG_TEMPLATE, TEMPLATE):
            entry = make_entry(aggregate, BOOT_AGGREGATE, 0, template)
            if hashlib.sha256(_ZERO + entry.template_hash).digest() == pcr10:
                self.runtime.append(entry)
                return
        print(f"guest agent: PCR {IMA_PCR} is not the kernel's boot_aggregate alone: the "
              "runtime log cannot explain it", file=sys.stderr, flush=True)

    def _measure(self, digest: bytes, path: str) -> ImaEntry:
        """Extend PCR 10, then append the line. Call with the TPM lock held."""
        self.runtime.room_for(path)
        entry = make_entry(digest, path, self.runtime.size)
        self.tpm.pcr_extend(IMA_PCR, BANK, entry.template_hash)
        self.runtime.append(entry)
        return entry

    def runtime_log(self, request: dict[str, Any]) -> dict[str, Any]:
        _only_keys(request)
        offset = require_int(request.get("offset"), "offset", EvidenceFormatError, minimum=0)
        return {"offset": offset, "data": b64(self.runtime.read(offset))}

    def runtime_measure(self, request: dict[str, Any]) -> dict[str, Any]:
        """The guest "executes" ``path`` (its bytes: ``content``): measured like IMA does."""
        _only_keys(request)
        path = request.get("path")
        if not isinstance(path, str):
            raise ValueError("runtime_measure: path must be a string")
        content = b64decode(request.get("content"), "content", limit=MAX_EXECUTED)
        with self.tpm.lock:
            return self._measure(hashlib.sha256(content).digest(), path).to_dict()

    # --- revocation (docs/runtime.md) ----------------------------------------------------

    def revocation_key(self, request: dict[str, Any]) -> dict[str, Any]:
        """The verifier's public key, pinned for this boot: a later, different key (the
        host is not trusted to change it) is refused."""
        _only_keys(request)
        pem = request.get("public_key")
        if not isinstance(pem, str) or len(pem) > MAX_KEY_PEM or \
                not pem.startswith("-----BEGIN PUBLIC KEY-----"):
            raise ValueError("revocation_key: public_key is the verifier's Ed25519 public "
                             f"key in PEM (at most {MAX_KEY_PEM} bytes)")
        with self._key_lock:
            pinned = self.revocations.pinned_key or self._verifier_key
            if pinned is not None and pinned != pem:
                raise ValueError("revocation_key: another verifier key is pinned for this "
                                 "boot; reboot the VM to change it")
            self._verifier_key = pem
        return {"pinned": True}

    def _provisioned_key(self) -> str:
        if self._verifier_key is None:
            raise ValueError("no verifier key: the host gives it when the VM starts "
                             "(`testbed up --backend qemu`, op revocation_key)")
        return self._verifier_key

    def role_call(self, request: dict[str, Any]) -> dict[str, Any]:
        """A signed decision from the verifier: verified, applied, acted on."""
        _only_keys(request)
        action, args = request.get("action"), request.get("args")
        if action not in ACTIONS or not isinstance(args, dict):
            raise ValueError(f"role: a guest takes the verifier's decisions "
                             f"({' or '.join(ACTIONS)}) with args {{decision, signature}}")
        decision, applied = self.revocations.receive_verified(str(action), args)
        answer: dict[str, Any] = {"node": self.node, "applied": applied,
                                  "sequence": self.revocations.sequence}
        if not applied:
            answer["refused"] = _refusal(decision, self.revocations.sequence)
            return answer
        answer["effects"] = {label: _act(listener, decision)
                             for label, listener in list(self.revocation_listeners.items())}
        return answer

    def hold_marker(self, request: dict[str, Any]) -> dict[str, Any]:
        """Keep ``copies`` copies of ``marker`` in this process's RAM (the guest's memory)
        until the next call: a known pattern a capture of the VM's migration looks for."""
        _only_keys(request)
        marker = b64decode(request.get("marker"), "marker", limit=64)
        copies = request.get("copies")
        if len(marker) < 8 or not isinstance(copies, int) or isinstance(copies, bool) \
                or not 1 <= copies <= MAX_HELD // len(marker):
            raise ValueError(f"hold_marker: a marker of 8-64 bytes and 1-{MAX_HELD} bytes "
                             "of copies")
        self._held = marker * copies
        return {"held": len(self._held)}

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
        except (ValueError, OSError, TpmCommandError, TestbedError) as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a bug must not take the guest (PID 1's child) down
            print(f"guest agent: internal error: {exc!r}", file=sys.stderr, flush=True)
            return {"error": f"internal error: {type(exc).__name__}"}


def _refusal(decision: Decision, last: int) -> str:
    """Why an authentic decision changes nothing: the same one again, or an older one."""
    if decision.sequence == last:
        return f"replay: decision {decision.sequence} was applied already"
    return f"stale: decision {decision.sequence} is older than {last}, the last applied"


def _act(listener: RevocationListener, decision: Decision) -> dict[str, Any]:
    if isinstance(decision, RevocationEvent):
        return listener.revoked(decision)
    return listener.reinstated(decision)


def _only_keys(request: dict[str, Any]) -> None:
    extra = set(request) - _OP_KEYS[str(request["op"])]
    if extra:
        raise ValueError(f"{request['op']}: unknown keys {sorted(extra)[:4]}")


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(4096)
    except OSError:
        return ""


def serve_connection(agent: Agent, conn: socket.socket, slots: ConnectionSlots | None = None,
                     slot: Slot | None = None, idle_timeout: float = IDLE_TIMEOUT_S) -> None:
    """Answer requests on ``conn`` until it ends; with ``slots``, mark ``slot`` busy while
    a request is served and idle (deadline ``idle_timeout``) while waiting for one."""
    with conn:
        conn.settimeout(idle_timeout)
        while slot is None or slot.active:
            try:
                body = recv_frame(conn)
            except (FrameError, OSError):
                return
            if body is None:
                return
            if slots is not None and slot is not None:
                slots.step(slot, timeout=None, rank=None)
            stream = _stream_handler(agent, body)
            if stream is not None:
                handler, request = stream
                handler(request, conn)  # it owns the connection now (deadlines of its own)
                return
            send_frame(conn, agent.handle(body))
            if agent.stopping.is_set():
                return
            if slots is not None and slot is not None:
                slots.step(slot, timeout=idle_timeout, rank=RANK_IDLE)


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


def _serve_and_release(agent: Agent, conn: socket.socket, slots: ConnectionSlots,
                       slot: Slot, idle_timeout: float) -> None:
    try:
        with contextlib.suppress(OSError):
            serve_connection(agent, conn, slots, slot, idle_timeout)
    except Exception as exc:  # a bug in one connection must not take the agent down
        print(f"guest agent: connection failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        slots.release(slot)


def serve(agent: Agent, host: str, port: int, *, idle_timeout: float = IDLE_TIMEOUT_S,
          max_connections: int = MAX_CONNECTIONS,
          listening: Callable[[int], None] | None = None) -> None:
    """Serve until a shutdown request: a thread per connection, the TPM under its lock.
    ``listening`` hears the port once the socket listens (tests use port 0)."""
    server = socket.create_server((host, port), reuse_port=False, backlog=256)
    slots = ConnectionSlots(max_connections)
    server.settimeout(_SWEEP_S)
    if listening is not None:
        listening(server.getsockname()[1])
    with server:
        while not agent.stopping.is_set():
            slots.expire()
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:  # e.g. out of descriptors: the peer waits in the backlog
                agent.stopping.wait(_SWEEP_S)
                continue
            slot = slots.admit(shutdown(conn), timeout=idle_timeout, rank=RANK_IDLE)
            if slot is None:
                conn.close()  # every slot busy with a request: the host retries
                continue
            threading.Thread(target=_serve_and_release,
                             args=(agent, conn, slots, slot, idle_timeout),
                             daemon=True).start()
        slots.drop_all()


EXTENSIONS = (("tp_extension", "trusted-passages"), ("cryptovm_extension", "cryptovm"),
              ("disk_extension", "disks"), ("net_extension", "network"))


def install_extensions(agent: Agent) -> list[str]:
    """Load the role extensions shipped beside this file (absent in minimal images);
    return their files (measured into the runtime log)."""
    files = []
    for module_name, label in EXTENSIONS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            print(f"guest agent: no {label} extension ({exc})", flush=True)
            continue
        module.install(agent, send_frame)
        agent.extensions.append(label)
        files.append(os.path.abspath(str(module.__file__)))
    return files


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
    files = [os.path.abspath(__file__), *install_extensions(agent)]
    try:
        agent.start_runtime(files)
    except (OSError, ValueError, TpmCommandError, TestbedError) as exc:
        # Still serve: the boot can be attested, and the runtime check fails closed.
        print(f"guest agent: the runtime log could not be started: {exc}", file=sys.stderr,
              flush=True)
    print(f"guest agent: serving on {host}:{port} with {tpm.transport.name}", flush=True)
    serve(agent, host, int(port))
    tpm.transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
