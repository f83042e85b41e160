"""The CryptoVM server: asyncio + Python's ``ssl`` (C-level TLS 1.3), protocol in wire.py.

Design for a small machine (2 cores):

* one event loop thread does TLS, framing and the cheap operations (sign, verify,
  encrypt, decrypt, derive, ...) inline, on keys that are already decrypted and parsed
  in memory - no per-request thread hop, no disk access. TLS runs on non-blocking
  ``ssl.SSLSocket`` objects driven by the loop's selector (:mod:`cryptovm.tlsloop`):
  OpenSSL reads and writes the sockets itself, Python sees only application data;
* slow operations (key generation, TPM quotes, account and record changes: anything
  that writes files or talks to the TPM) run on a small thread pool;
* audit durability (:class:`GroupCommit`): with ``audit_sync="always"`` an answer
  leaves only once the audit entry of its operation is fsynced, one fsync per loop
  iteration covering every answer produced in it; with ``"state"`` (default) that
  holds for state changes, while answers to read-only use operations leave once their
  entry is written (it survives a crash of this process) and the fsync follows
  within ~2 ms from a background thread;
* everything a peer can get wrong - not TLS, bad magic, oversized or truncated
  frames, bad JSON, unknown ops, bad arguments, stalled connections - is answered with
  an error frame (when there is a TLS channel to answer on) and affects only that
  connection; before login, the first such error also closes it, and its audit entry
  is rate-limited (:meth:`AuditLog.append_unauthenticated`);
* every connection has a deadline per step, never reset by a byte arriving: the TLS
  handshake within ``handshake_timeout`` of accept, login (PSK ``auth``, unless a client
  certificate did it) within ``login_timeout`` of the handshake, then each request
  within ``idle_timeout`` of the previous one. At most ``max_connections`` at a time
  (:class:`attestation.slots.ConnectionSlots`): when all are taken, a newcomer evicts
  the oldest connection that has sent nothing, else the oldest still in its TLS
  handshake, else the oldest not logged in; a newcomer is refused only when every slot
  holds a logged-in connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from attestation.files import atomic_write
from attestation.slots import EVICTED, ConnectionSlots, Slot, has_data
from cryptovm import tlsca
from cryptovm.accounts import psk_server_proof
from cryptovm.audit import AuditLog
from cryptovm.errors import (
    AccessDenied,
    AuthenticationFailed,
    BadRequest,
    ProtocolError,
    ServerError,
)
from cryptovm.rawtpm import RawTpm
from cryptovm.tlsloop import TlsListener, TlsStream
from cryptovm.vsm import CryptoVm, VsmSession
from cryptovm.wire import (
    MAX_BODY,
    PROTOCOL_VERSION,
    FrameDecoder,
    Request,
    decode_request,
    describe_error,
    encode_error,
    encode_result,
    peek_id,
)

# Read-only operations on in-memory state: run inline on the event loop. With
# audit_sync="state" their answers leave once the audit entry is written (fsync follows
# within milliseconds); every other answer waits for the fsync.
FAST_OPS = frozenset({"ping", "whoami", "random", "sign", "verify", "public_key", "describe",
                      "encrypt", "decrypt", "derive", "issue_nonce", "list_keys"})
SERVER_ACCOUNT = "-"
# Eviction order of connections not logged in (attestation/slots.py): silent since accept
# first, then those in their TLS handshake, then those past it but not logged in.
RANK_SILENT, RANK_HANDSHAKE, RANK_LOGIN = 0, 1, 2


class GroupCommit:
    """When answers may leave, relative to their audit entries.

    :meth:`when_durable`: after one audit fsync at the end of the event-loop iteration
    that produced them - a batch of requests from any number of connections costs one
    fsync. The fsync runs on the loop thread (it releases the GIL; the loop pauses for
    it): cheaper on a 2-core machine than a hand-off to a thread and back per batch.

    :meth:`when_written`: after the entries are written (``write(2)``: they survive a
    crash of this process), with the fsync following within ``sync_interval`` from a
    background thread. Used for read-only use operations in ``audit_sync="state"``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, audit: AuditLog,
                 sync_interval: float = 0.002) -> None:
        self._loop = loop
        self._audit = audit
        self._pending: list[Callable[[bool], None]] = []
        self._scheduled = False
        self._interval = sync_interval
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._background, name="cryptovm-audit-sync",
                                        daemon=True)
        self._thread.start()

    def when_durable(self, callback: Callable[[bool], None]) -> None:
        self._pending.append(callback)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._commit)

    def when_written(self, callback: Callable[[bool], None]) -> None:
        try:
            self._audit.flush()
        except OSError:
            callback(False)
            return
        callback(True)
        if not self._wake.is_set():
            self._wake.set()

    def _commit(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        try:
            self._audit.sync()
            durable = True
        except OSError:
            durable = False  # answers are withheld: their audit entries may be lost
        for callback in pending:
            callback(durable)

    def _background(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self._interval)  # let a batch accumulate
            self._wake.clear()
            with contextlib.suppress(OSError):  # retried at the next wake-up
                self._audit.sync()
            if self._stopped:
                return

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join()


class CryptoVmServer:
    """Serves one :class:`CryptoVm` over TLS. ``await start()``, then ``await close()``."""

    def __init__(self, vm: CryptoVm, *, host: str = "127.0.0.1", port: int = 0,
                 idle_timeout: float = 60.0, handshake_timeout: float = 10.0,
                 login_timeout: float | None = None, max_connections: int = 512,
                 workers: int = 2, audit_sync: Literal["always", "state"] = "state") -> None:
        if audit_sync not in ("always", "state"):
            raise ValueError(f"audit_sync must be 'always' or 'state', not {audit_sync!r}")
        self.vm = vm
        self.audit_sync = audit_sync
        self.host, self._port = host, port
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.login_timeout = handshake_timeout if login_timeout is None else login_timeout
        self.max_connections = max_connections
        self.slots = ConnectionSlots(max_connections)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="cryptovm-op")
        self.connections: set[_Connection] = set()
        self._listener: TlsListener | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.commit: GroupCommit | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the server has not been started")
        return self._listener.port

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.commit = GroupCommit(self.loop, self.vm.audit)
        context = tlsca.server_context(self.vm.ca)
        self._listener = TlsListener(self.loop, context, self.host, self._port,
                                     self._admit)
        self._sweeper = self.loop.create_task(self._sweep())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.pool.shutdown(wait=True)
        if self.commit is not None:
            self.commit.close()
        self.vm.audit.sync()

    def _admit(self, sock: socket.socket) -> _Connection | None:
        """A new TCP connection: a slot (evicting the least proven if full) or None."""
        connection = _Connection(self)
        slot = self.slots.admit(connection.drop, timeout=self.handshake_timeout,
                                rank=RANK_HANDSHAKE if has_data(sock) else RANK_SILENT)
        if slot is None:
            return None
        connection.slot = slot
        self.connections.add(connection)
        return connection

    async def _sweep(self) -> None:
        interval = max(0.02, min(1.0, self.idle_timeout / 4, self.handshake_timeout / 4,
                                 self.login_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            assert self.loop is not None
            self.slots.expire()  # handshake and login deadlines
            self.vm.audit.flush_suppressed()
            now = self.loop.time()
            for connection in list(self.connections):
                stream = connection.stream
                if (stream is not None and not stream.handshaking and connection.pending == 0
                        and now - connection.last_active > self.idle_timeout):
                    connection.timed_out()


class _Connection:
    """One client connection: authentication state, framing, dispatch."""

    def __init__(self, server: CryptoVmServer) -> None:
        self.server = server
        self.vm = server.vm
        assert server.loop is not None
        self.loop = server.loop
        self.decoder = FrameDecoder(MAX_BODY)
        self.session: VsmSession | None = None
        self.challenge = os.urandom(32)
        self.stream: TlsStream | None = None
        self.slot: Slot | None = None
        self.last_active = self.loop.time()
        self.pending = 0
        self.closed = False

    # --- connection events ----------------------------------------------------------------

    def connection_started(self, stream: TlsStream) -> None:
        self.stream = stream

    def connection_made(self, stream: TlsStream) -> None:
        self.last_active = self.loop.time()
        cert = stream.peer_certificate()
        if cert is not None:
            try:
                self.session = self.vm.authenticate_certificate(cert)
            except AuthenticationFailed as exc:
                self._send([encode_error(None, exc.code, exc.reason, exc.check)], close=True)
                return
        if self.session is not None:
            self._logged_in()
        else:
            self._step(self.server.login_timeout, RANK_LOGIN)
        self._send([encode_result(0, {
            "hello": "cryptovm", "protocol": PROTOCOL_VERSION, "challenge": self.challenge,
            "authenticated": self.session.account if self.session else None,
            "max_frame": MAX_BODY})])

    def connection_lost(self) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.slot is not None:
            self.server.slots.release(self.slot)

    def _step(self, timeout: float | None, rank: int | None) -> None:
        if self.slot is not None:
            self.server.slots.step(self.slot, timeout=timeout, rank=rank)

    def _logged_in(self) -> None:
        self._step(None, None)  # from now on the idle timeout applies; never evicted

    def drop(self, reason: str) -> None:
        """Evicted or out of time before login (attestation/slots.py)."""
        stream = self.stream
        if stream is None or stream.handshaking or self.closed:
            self.abort()
        elif reason == EVICTED:
            self._send([encode_error(None, "busy", "too many connections: this one had "
                                     "not logged in")], close=True)
        else:
            self._send([encode_error(None, "timeout", f"not logged in within "
                                     f"{self.server.login_timeout:g} s")], close=True)

    def abort(self) -> None:
        if self.stream is not None:
            self.stream.abort()
        else:
            self.connection_lost()

    def timed_out(self) -> None:
        if self.decoder.buffered:
            message = (f"incomplete frame: {self.decoder.buffered} bytes received, then "
                       f"nothing for {self.server.idle_timeout:g} s")
            self._audit_frame_error(ProtocolError(message, code="timeout"))
        else:
            message = f"idle for {self.server.idle_timeout:g} s"
        self.last_active = self.loop.time()
        self._send([encode_error(None, "timeout", message)], close=True)

    # --- frames -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        frame_started = not self.decoder.buffered
        bodies, error = self.decoder.feed(data)
        if frame_started or bodies:  # a frame trickled in byte by byte does not count
            self.last_active = self.loop.time()
        self._needs_fsync = self.server.audit_sync == "always"
        frames = []
        for body in bodies:
            frame = self._handle(body)
            if frame is not None:
                frames.append(frame)
            if self._close_after_send:  # refused before login: the rest is not read
                error = None
                break
        if error is not None:
            self._audit_frame_error(error)
            frames.append(encode_error(None, error.code, str(error)))
            self._send(frames, close=True)
        elif frames:
            self._send(frames, durable=self._needs_fsync)

    def _handle(self, body: bytes) -> bytes | None:
        try:
            request = decode_request(body)
        except ProtocolError as exc:
            self._audit_frame_error(exc)
            self._needs_fsync = True
            self._close_after_send = self.session is None
            return encode_error(peek_id(body), exc.code, str(exc))
        if request.op not in FAST_OPS:
            self._needs_fsync = True
        try:
            return self._dispatch(request)
        except Exception as exc:  # already audited where it was raised
            code, message, check = describe_error(exc)
            self._close_after_send = self.session is None  # one mistake before login
            return encode_error(request.id, code, message, check)

    def _dispatch(self, request: Request) -> bytes | None:
        if request.op == "ping":
            return encode_result(request.id, {"account": self.session.account if self.session
                                              else None})
        if request.op == "auth":
            return self._auth(request)
        session = self._session_for(request)
        method = getattr(session, request.op)
        if request.op in FAST_OPS:
            return encode_result(request.id, method(**request.args))
        self.pending += 1
        future = self.server.pool.submit(functools.partial(method, **request.args))
        future.add_done_callback(functools.partial(self._from_thread, request.id))
        return None

    def _from_thread(self, request_id: int, future: Future[dict[str, Any]]) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            self.loop.call_soon_threadsafe(self._finished, request_id, future)

    def _finished(self, request_id: int, future: Future[dict[str, Any]]) -> None:
        self.pending -= 1
        try:
            frame = encode_result(request_id, future.result())
        except Exception as exc:
            code, message, check = describe_error(exc)
            frame = encode_error(request_id, code, message, check)
        self._send([frame])

    def _session_for(self, request: Request) -> VsmSession:
        if self.session is None:
            exc = AuthenticationFailed("not authenticated: send auth first (or connect with "
                                       "a client certificate)")
            self.vm.audit.append_unauthenticated(
                request.account or SERVER_ACCOUNT, request.op, "denied", check=exc.check,
                detail=f"{type(exc).__name__}: {exc}")
            raise exc
        if request.account is not None and request.account != self.session.account:
            denied = AccessDenied("authentication", f"the request names account "
                                  f"{request.account[:64]!r} but the connection is "
                                  f"authenticated as {self.session.account!r}")
            self.vm._audit_failure(self.session.account, request.op, denied)
            raise denied
        return self.session

    def _auth(self, request: Request) -> bytes:
        if self.session is not None:
            raise BadRequest(f"this connection is already authenticated as "
                             f"{self.session.account!r}")
        args = request.args
        try:
            self.session = self.vm.authenticate(args["account"], self.challenge,
                                                args["client_nonce"], args["proof"])
        except AuthenticationFailed as exc:
            self._close_after_send = True
            return encode_error(request.id, exc.code, exc.reason, exc.check)
        self._logged_in()
        psk = self.vm.accounts.get(self.session.account).psk
        return encode_result(request.id, {"account": self.session.account, "server_proof":
                                          psk_server_proof(psk, self.challenge,
                                                           args["client_nonce"],
                                                           self.session.account)})

    _close_after_send = False
    _needs_fsync = True

    def _audit_frame_error(self, exc: ProtocolError) -> None:
        if self.session is None:
            self.vm.audit.append_unauthenticated(SERVER_ACCOUNT, "frame", "error",
                                                 check=exc.code, detail=str(exc))
        else:
            self.vm.audit.append(self.session.account, "frame", "error", check=exc.code,
                                 detail=str(exc))

    def _send(self, frames: list[bytes], close: bool = False, durable: bool = True) -> None:
        data = b"".join(frames)
        close = close or self._close_after_send
        assert self.server.commit is not None

        def deliver(durable: bool) -> None:
            stream = self.stream
            if self.closed or stream is None:
                return
            if durable:
                stream.write(data)
            else:
                stream.write(encode_error(None, "storage", "the audit log could not "
                                          "be made durable; answer withheld"))
            if close or not durable:
                self.closed = True
                stream.close()

        if durable or close:
            self.server.commit.when_durable(deliver)
        else:
            self.server.commit.when_written(deliver)


# --- for synchronous callers: the server on an event loop and a thread of its own -----------

START_TIMEOUT_S = 30.0  # generous: a guest without KVM makes the TLS key in seconds
STOP_TIMEOUT_S = 10.0


class ServerThread:
    """A :class:`CryptoVmServer` on an event loop of its own, in a thread of its own.

    For synchronous programs (a testbed node, the guest agent): :meth:`start` returns
    once the server listens (:attr:`port`) or raises :class:`ServerError`; :meth:`stop`
    closes the server - connections, thread pool, audit sync - and ends the thread.
    The CryptoVm stays the caller's to close. Standard library only (Debian 12 guests).
    """

    def __init__(self, vm: CryptoVm, host: str = "127.0.0.1", port: int = 0,
                 idle_timeout: float = 60.0, *, start_timeout: float = START_TIMEOUT_S,
                 handshake_timeout: float = 10.0, login_timeout: float | None = None,
                 max_connections: int = 512) -> None:
        self.server = CryptoVmServer(vm, host=host, port=port, idle_timeout=idle_timeout,
                                     handshake_timeout=handshake_timeout,
                                     login_timeout=login_timeout,
                                     max_connections=max_connections)
        self.start_timeout = start_timeout
        self._address = f"{host}:{port}"
        # A loop made here, not in the calling thread's asyncio state; created by start().
        self._runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()  # bound to the server's loop on first use
        self._settled = threading.Event()  # listening, or done failing to
        self._start_error: Exception | None = None
        self._close_error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="cryptovm-server", daemon=True)

    def __repr__(self) -> str:
        return f"ServerThread({self._address}, running={self._thread.is_alive()})"

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self._loop = self._runner.get_loop()
        self._thread.start()
        if not self._settled.wait(self.start_timeout):
            self._request_stop()  # should it start after all, it stops at once
            raise ServerError(f"the CryptoVM server did not start on {self._address} "
                              f"within {self.start_timeout:g} s")
        if self._start_error is not None:
            self._thread.join()  # settled: it has closed what it had opened
            raise ServerError(f"the CryptoVM server could not start on {self._address}: "
                              f"{self._start_error}") from self._start_error

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Close the server and end its thread; does nothing if it is not running."""
        if not self._thread.is_alive():
            return
        self._request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ServerError(f"the CryptoVM server on {self._address} did not stop within "
                              f"{timeout:g} s")
        if self._close_error is not None:
            raise ServerError(f"the CryptoVM server did not close cleanly: "
                              f"{self._close_error}") from self._close_error

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _request_stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to stop
                self._loop.call_soon_threadsafe(self._stopping.set)

    def _run(self) -> None:
        try:
            with self._runner:  # closing it cancels what is left and closes the loop
                self._runner.run(self._serve())
        except Exception as exc:  # from CryptoVmServer.close(): reported by stop()
            self._close_error = exc
        finally:
            self._settled.set()

    async def _serve(self) -> None:
        try:
            await self.server.start()
        except Exception as exc:  # reported by start()
            self._start_error = exc
        else:
            self._settled.set()
            await self._stopping.wait()
        finally:
            await self.server.close()  # after a failed start too: its audit thread, pool


# --- command line (used by tests and the benchmark; the testbed CLI wraps admin.py) ---------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cryptovm.server",
                                description="Serve a CryptoVM state directory over TLS.")
    p.add_argument("--state", required=True, type=Path)
    tpm = p.add_mutually_exclusive_group(required=True)
    tpm.add_argument("--tcti", help="the TPM through tpm2-pytss, e.g. swtpm:port=2321")
    tpm.add_argument("--raw-tpm", metavar="DEVICE", help="the TPM through raw commands, "
                     "without tpm2-pytss (a Debian 12 guest): /dev/tpmrm0 or tcp:HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path, help="write the listening port here when ready")
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--event-log", type=Path, help="TCG event log to attach to quotes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus", help="pin the server to these CPUs (e.g. 0 or 0,1): on a small "
                   "machine a core of its own spares it a context switch per request")
    p.add_argument("--audit-sync", choices=("always", "state"), default="state",
                   help="fsync the audit log before every answer (always), or before "
                   "answers to state-changing operations only (state, default)")
    return p


async def serve(vm: CryptoVm, host: str, port: int, *, port_file: Path | None = None,
                idle_timeout: float = 60.0, workers: int = 2,
                audit_sync: Literal["always", "state"] = "state") -> None:
    """Serve until SIGTERM or SIGINT."""
    server = CryptoVmServer(vm, host=host, port=port, idle_timeout=idle_timeout,
                            workers=workers, audit_sync=audit_sync)
    await server.start()
    if port_file is not None:
        atomic_write(port_file, f"{server.port}\n".encode())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    event_log = args.event_log.read_bytes() if args.event_log else None
    if args.raw_tpm:
        raw = RawTpm.open(args.raw_tpm)
        vm = CryptoVm.open(args.state, raw.name, event_log=event_log, audit_sync_each=False,
                           **raw.options())
    else:
        vm = CryptoVm.open(args.state, args.tcti, event_log=event_log, audit_sync_each=False)
    try:
        asyncio.run(serve(vm, args.host, args.port, port_file=args.port_file,
                          idle_timeout=args.idle_timeout, workers=args.workers,
                          audit_sync=args.audit_sync))
    finally:
        vm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
