"""The CryptoVM over the wire (TLS 1.3 on loopback, real swtpm): PSK and certificate
authentication, denials and their audit entries, every kind of malformed input while
other clients keep being served, and kill -9 in the middle of a burst of key creations.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.registrar import PinnedAk
from attestation.tpm_types import parse_public
from attestation.verifier import QuoteVerifier
from cryptovm import tlsca
from cryptovm.accounts import psk_client_proof
from cryptovm.audit import read_entries
from cryptovm.client import CryptoVmClient
from cryptovm.errors import (
    AccessDenied,
    AuthenticationFailed,
    KeyUsageError,
    NotFound,
    ServerError,
)
from cryptovm.keyattest import KeyAttestation, verify_key_attestation
from cryptovm.server import CryptoVmServer, ServerThread
from cryptovm.vsm import CryptoVm
from cryptovm.wire import (
    MAGIC,
    FrameDecoder,
    Response,
    decode_response,
    encode_request,
    frame,
)
from testbed.tpm.swtpm import Swtpm
from tests.test_cryptovm_support import ServerProcess, boot, scan, start_tpm

IDLE_TIMEOUT = 1.0


@dataclass
class Served:
    vm: CryptoVm
    server: CryptoVmServer
    ca_pem: bytes
    psks: dict[str, bytes]
    key: str

    def client(self, account: str = "alice", **kw: Any) -> CryptoVmClient:
        if "cert_pem" not in kw and "psk" not in kw:
            kw["psk"] = self.psks[account]
        return CryptoVmClient("127.0.0.1", self.server.port, ca_pem=self.ca_pem,
                              account=account, **kw)

    def audit(self, op: str) -> list[dict[str, Any]]:
        self.vm.audit.sync()
        return [e for e in read_entries(self.vm.audit.path) if e["op"] == op]


@pytest.fixture(scope="module")
def served(swtpm_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("cryptovm-served")
    tpm = start_tpm(swtpm_template, base / "tpm")
    try:
        boot(tpm)
        vm, root_psk = CryptoVm.initialize(base / "state", tpm.tcti, audit_sync_each=False)
        root = vm.local_root()
        psks = {"root": root_psk,
                "alice": root.account_create("alice", ["keys:generate", "key:*:use"])["psk"],
                "bob": root.account_create("bob", [])["psk"]}
        key = root.generate("ec-p256", ["sign"], key_id="shared")["key_id"]
        with ServerThread(vm, idle_timeout=IDLE_TIMEOUT) as thread:
            yield Served(vm, thread.server, vm.ca.pem, psks, key)
        vm.close()
    finally:
        tpm.stop()


class Raw:
    """A TLS connection speaking raw bytes, for what a well-behaved client never sends."""

    def __init__(self, served: Served) -> None:
        context = tlsca.client_context(served.ca_pem)
        sock = socket.create_connection(("127.0.0.1", served.server.port), timeout=10)
        self.sock = context.wrap_socket(sock, server_hostname=tlsca.SERVER_NAME)
        self.decoder = FrameDecoder()
        self.frames: list[bytes] = []
        self.hello = self.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def login(self, served: Served, account: str) -> None:
        nonce = os.urandom(32)
        proof = psk_client_proof(served.psks[account], self.hello.result["challenge"], nonce,
                                 account)
        self.send(encode_request(1, "auth", None, {"account": account, "client_nonce": nonce,
                                                   "proof": proof}))
        assert self.read().ok

    def read(self) -> Response:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            bodies, error = self.decoder.feed(data)
            assert error is None
            self.frames += bodies
        return decode_response(self.frames.pop(0))

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


# --- authentication ---------------------------------------------------------------------------


def test_psk_clients_are_served_concurrently(served: Served) -> None:
    errors: list[BaseException] = []
    public = serialization.load_der_public_key(
        served.client().public_key(served.key))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    before = len(served.audit("sign"))

    def work(i: int) -> None:
        try:
            with served.client() as client:
                for n in range(25):
                    message = f"client {i} message {n}".encode()
                    public.verify(client.sign(served.key, message), message,
                                  ec.ECDSA(hashes.SHA256()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(served.audit("sign")) - before == 16 * 25


def test_client_certificate_authenticates_and_revocation_is_immediate(served: Served) -> None:
    issued = served.vm.local_root().account_issue_certificate("alice")
    with served.client(cert_pem=issued["certificate"], key_pem=issued["private_key"]) as c:
        assert c.hello["authenticated"] == "alice"
        assert c.call("whoami")["name"] == "alice"
        assert c.random(16) != c.random(16)
    served.vm.local_root().account_revoke_certificates("alice")
    with pytest.raises((AuthenticationFailed, ConnectionError)):
        served.client(cert_pem=issued["certificate"], key_pem=issued["private_key"])
    entry = served.audit("auth")[-1]
    assert (entry["outcome"], entry["check"]) == ("denied", "authentication")


def test_certificate_from_another_ca_fails_the_tls_handshake(served: Served) -> None:
    rogue = tlsca.make_ca("rogue")
    cert, key = tlsca.issue_client(rogue, "alice")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c = served.client(cert_pem=cert.public_bytes(serialization.Encoding.PEM),
                          key_pem=tlsca.pem_key(key))
        c.call("whoami")
    with served.client() as c:  # still serving
        c.call("ping")


@pytest.mark.parametrize("account", ["alice", "mallory"])
def test_wrong_psk_or_unknown_account_is_refused_and_audited(served: Served,
                                                             account: str) -> None:
    with pytest.raises(AuthenticationFailed):
        served.client(account, psk=os.urandom(32))
    entry = served.audit("auth")[-1]
    assert (entry["account"], entry["outcome"], entry["check"]) == (account, "denied",
                                                                     "authentication")


def test_requests_before_authentication_are_refused(served: Served) -> None:
    raw = Raw(served)
    try:
        assert raw.hello.result["authenticated"] is None
        raw.send(encode_request(5, "sign", "alice", {"key_id": served.key, "data": b"x"}))
        response = raw.read()
        assert (response.id, response.error["code"]) == (5, "auth_failed")
    finally:
        raw.close()
    entry = served.audit("sign")[-1]
    assert (entry["account"], entry["outcome"]) == ("alice", "denied")


def test_a_request_for_another_account_is_refused(served: Served) -> None:
    with served.client("bob") as bob:
        assert bob.call("whoami")["name"] == "bob"
        bob.account = "root"  # the frame names root; the connection is bob's
        with pytest.raises(AccessDenied) as denied:
            bob.call("account_list")
    assert denied.value.check == "authentication"
    entry = served.audit("account_list")[-1]
    assert (entry["account"], entry["outcome"], entry["check"]) == ("bob", "denied",
                                                                     "authentication")


def test_missing_privilege_and_key_usage_over_the_wire(served: Served) -> None:
    with served.client("bob") as bob:
        with pytest.raises(AccessDenied) as info:
            bob.sign(served.key, b"x")
        assert info.value.check == "privilege"
    with served.client() as alice:
        with pytest.raises(NotFound):
            alice.call("describe", key_id="no-such-key")
        kid = alice.generate("ec-p256", ["derive"])["key_id"]
        with pytest.raises(KeyUsageError):
            alice.sign(kid, b"x")
    sign = served.audit("sign")
    assert {(e["account"], e["check"]) for e in sign if e["outcome"] == "denied"} >= {
        ("bob", "privilege"), ("alice", "usage")}


def test_key_attestation_over_the_wire(served: Served) -> None:
    nonce = os.urandom(32)
    with served.client() as alice:
        identity = alice.call("identity")
        doc = alice.call("attest", key_id=served.key, nonce=nonce)["attestation"]
    ak = parse_public(identity["ak_public"]).public_key()
    verifier = QuoteVerifier(ak_trust=PinnedAk([ak], "the CryptoVM's AK"))
    report = verify_key_attestation(KeyAttestation.from_dict(doc), nonce, verifier)
    assert report.ok, report.to_dict()


# --- malformed input --------------------------------------------------------------------------


class Healthy:
    """A client signing in a loop, to show the server keeps serving others."""

    def __init__(self, served: Served) -> None:
        self.served, self.count = served, 0
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        try:
            with self.served.client() as client:
                while not self.stop.is_set():
                    client.sign(self.served.key, b"still here")
                    self.count += 1
        except BaseException as exc:
            self.errors.append(exc)

    def finish(self) -> int:
        """Stop once it has been served a few more times; return how often it was."""
        target, deadline = self.count + 3, time.monotonic() + 10
        while self.count < target and time.monotonic() < deadline and not self.errors:
            time.sleep(0.005)
        self.stop.set()
        self.thread.join(10)
        assert self.errors == []
        return self.count


@pytest.mark.parametrize("payload,code,closes", [
    (b"GET / HTTP/1.1\r\n\r\n", "malformed_frame", True),
    (MAGIC + (2**31).to_bytes(4, "big"), "frame_too_large", True),
    (MAGIC + (9).to_bytes(4, "big") + b"not json!", "malformed_request", False),
    (encode_request(9, "format_disk", None, {}), "unknown_op", False),
    (encode_request(9, "sign", None, {"key_id": 5}), "bad_request", False),
    (frame(b'{"v":1,"id":9,"op":"sign","args":{"key_id":"k","data":{"$b":"!!"}}}'),
     "malformed_request", False),
])
def test_malformed_frames_get_an_error_frame_and_others_are_still_served(
        served: Served, payload: bytes, code: str, closes: bool) -> None:
    """Logged in, a frame that keeps the framing leaves the connection usable; before
    login, any malformed frame closes it (tests/test_listener_floods.py: the flood)."""
    healthy = Healthy(served)
    raw, anonymous = Raw(served), Raw(served)
    try:
        raw.login(served, "alice")
        raw.send(payload)
        response = raw.read()
        assert not response.ok and response.error["code"] == code, response
        if closes:
            assert raw.closed()
        else:
            raw.send(encode_request(2, "ping", None, {}))
            assert raw.read().ok
        anonymous.send(payload + encode_request(2, "ping", None, {}))
        assert anonymous.read().error["code"] == code
        assert anonymous.closed()
    finally:
        raw.close()
        anonymous.close()
    assert healthy.finish() >= 3
    assert any(e.get("check") == code for e in served.audit("frame"))


def test_a_truncated_frame_times_out_with_an_error_frame(served: Served) -> None:
    healthy = Healthy(served)
    raw = Raw(served)
    try:
        raw.send(encode_request(3, "ping", None, {})[:-4])
        started = time.monotonic()
        response = raw.read()
        assert response.error["code"] == "timeout" and "incomplete frame" in response.error[
            "message"]
        assert IDLE_TIMEOUT <= time.monotonic() - started + 0.3 < IDLE_TIMEOUT + 3
        assert raw.closed()
    finally:
        raw.close()
    assert healthy.finish() >= 3


def test_plaintext_garbage_instead_of_tls_does_not_hurt_the_server(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.server.port), timeout=5) as sock:
        sock.sendall(os.urandom(300))
        try:
            while sock.recv(4096):
                pass
        except ConnectionError:
            pass
    with served.client() as c:
        c.call("ping")


# --- ServerThread: the server for synchronous callers -----------------------------------------


@pytest.fixture
def fresh_vm(swtpm: Swtpm, tmp_path: Path) -> Iterator[tuple[CryptoVm, bytes]]:
    vm, root_psk = CryptoVm.initialize(tmp_path / "state", swtpm.tcti, audit_sync_each=False)
    with vm:
        yield vm, root_psk


def test_server_thread_serves_and_stops_without_leaving_a_thread(
        fresh_vm: tuple[CryptoVm, bytes]) -> None:
    vm, root_psk = fresh_vm
    before = set(threading.enumerate())
    server = ServerThread(vm, "127.0.0.1", 0, idle_timeout=5.0)
    server.start()
    try:
        with CryptoVmClient("127.0.0.1", server.port, ca_pem=vm.ca.pem, account="root",
                            psk=root_psk) as client:
            assert client.call("whoami")["name"] == "root"
            assert len(client.random(16)) == 16
    finally:
        server.stop()
    server.stop()  # a second stop is harmless
    assert set(threading.enumerate()) == before
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    assert any(e["op"] == "whoami" for e in read_entries(vm.audit.path))


def test_server_thread_that_cannot_start_says_why_and_leaves_no_thread(
        fresh_vm: tuple[CryptoVm, bytes]) -> None:
    vm, _ = fresh_vm
    before = set(threading.enumerate())
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"could not start on 127.0.0.1:{port}: "):
            ServerThread(vm, "127.0.0.1", port).start()
    assert set(threading.enumerate()) == before


def test_server_thread_that_misses_its_start_deadline_stops_once_started(
        fresh_vm: tuple[CryptoVm, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    vm, _ = fresh_vm
    before = set(threading.enumerate())
    slow = ServerThread(vm, start_timeout=0.2)
    started = slow.server.start

    async def late_start() -> None:
        await asyncio.sleep(0.5)
        await started()

    monkeypatch.setattr(slow.server, "start", late_start)
    with pytest.raises(ServerError, match=r"did not start on 127.0.0.1:0 within 0.2 s"):
        slow.start()
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) == before


# --- crash safety -----------------------------------------------------------------------------


def test_kill9_during_a_burst_of_key_creations_loses_no_acknowledged_key(
        swtpm: Swtpm, tmp_path: Path) -> None:
    boot(swtpm)
    vm, psk = CryptoVm.initialize(tmp_path / "state", swtpm.tcti)
    vm.close()
    server = ServerProcess(tmp_path / "state", swtpm.tcti).start()
    acked: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def burst(worker: int) -> None:
        try:
            with CryptoVmClient("127.0.0.1", server.port, ca_pem=vm.ca.pem, account="root",
                                psk=psk) as client:
                for n in range(100000):
                    key = client.generate("ec-p256", ["sign"], key_id=f"w{worker}-{n}")
                    with lock:
                        acked.append((key["key_id"], key["public_key"]))
        except (ConnectionError, ssl.SSLError, OSError):
            pass  # the server died under us

    try:
        threads = [threading.Thread(target=burst, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill9()
        for t in threads:
            t.join(10)
        assert len(acked) >= 60
        server = ServerProcess(tmp_path / "state", swtpm.tcti).start()
        with CryptoVmClient("127.0.0.1", server.port, ca_pem=vm.ca.pem, account="root",
                            psk=psk) as client:
            for key_id, public in acked:
                assert client.public_key(key_id) == public
                key = serialization.load_der_public_key(public)
                assert isinstance(key, ec.EllipticCurvePublicKey)
                key.verify(client.sign(key_id, b"after the crash"), b"after the crash",
                           ec.ECDSA(hashes.SHA256()))
            assert client.call("audit_verify")["ok"]
    finally:
        server.stop()
    assert scan(tmp_path / "state", {"pem": b"PRIVATE KEY"}) == []
