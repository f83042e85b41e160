"""In-process: the TPM access injection, the VSM's TLS-issuing CA, attested-node sessions
and CVM1 over an attested byte stream (the pieces the `cryptovm` node role is made of)."""

from __future__ import annotations

import datetime
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestation.tpm import TpmClient
from attestation.tpm_types import PcrSelection
from cryptovm import tlsca
from cryptovm.attested import StreamClient, serve_stream
from cryptovm.audit import read_entries
from cryptovm.errors import (
    AccessDenied,
    AlreadyExists,
    AuthenticationFailed,
    BadRequest,
    KeyUsageError,
)
from cryptovm.tlsissuer import certificate_info
from cryptovm.vsm import NODE_PRIVILEGES, CryptoVm, VsmSession
from cryptovm.wire import FrameDecoder, decode_response, encode_request
from testbed.tpm.swtpm import Swtpm

PCRS = "sha256:0-7,9"


@pytest.fixture
def shared(swtpm: Swtpm) -> Iterator[tuple[TpmClient, threading.Lock]]:
    """One long-lived connection, as a testbed node holds it."""
    with TpmClient(swtpm.tcti) as client:
        yield client, threading.Lock()


@pytest.fixture
def vm(shared: tuple[TpmClient, threading.Lock], swtpm: Swtpm,
       tmp_path: Path) -> Iterator[CryptoVm]:
    client, lock = shared

    @contextmanager
    def access() -> Iterator[TpmClient]:
        with lock:
            yield client

    vm, _ = CryptoVm.initialize(tmp_path / "state", swtpm.tcti, pcrs=PCRS, tpm_access=access)
    try:
        vm.local_root().tls_ca_setup(common_name="test VSM CA")
        yield vm
    finally:
        vm.close()


def csr_for(key: ec.EllipticCurvePrivateKey, cn: str = "someone-else") -> bytes:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


# --- TPM access ----------------------------------------------------------------------------


def test_an_injected_connection_is_used_and_left_clean(vm: CryptoVm, swtpm: Swtpm,
                                                        shared: tuple[TpmClient, threading.Lock]
                                                        ) -> None:
    client, lock = shared
    ak = client.attestation_key("ecc")  # the node's own handle on its AK
    root = vm.local_root()
    root.attest("tls-ca", b"n" * 16)
    vm.identity()
    with lock:
        # still usable after the CryptoVM quoted with the same AK on the same connection
        assert client.quote(ak, PcrSelection("sha256", (0,)), b"q" * 32).attest
        assert client.transient_handles() == []
    state = vm.state.path
    vm.close()

    @contextmanager
    def access() -> Iterator[TpmClient]:
        with lock:
            yield client

    with CryptoVm.open(state, swtpm.tcti, tpm_access=access) as reopened:
        assert reopened.tls_ca is not None and "tls-ca" in reopened.keys.ids()
    assert client.transient_handles() == []


# --- the TLS CA ----------------------------------------------------------------------------


def test_the_cvm1_certificates_name_and_allow_what_they_are_for() -> None:
    """The CryptoVM's own CA (tlsca, built on trusted_passages.pki): server auth for the
    names a client dials, client auth for an account, nothing more."""
    ca = tlsca.make_ca("t")
    server = tlsca.issue_server(ca, ec.generate_private_key(ec.SECP256R1()))
    client, _ = tlsca.issue_client(ca, "alice")
    for cert in (server, client):
        cert.verify_directly_issued_by(ca.certificate)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cryptovm", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client.subject.rfc4514_string() == "CN=alice"
    with pytest.raises(x509.ExtensionNotFound):
        client.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_the_ca_key_is_a_non_exportable_sign_only_vsm_key(vm: CryptoVm) -> None:
    assert vm.tls_ca is not None
    ca = vm.tls_ca.certificate
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    kv = vm.keys.get("tls-ca")
    assert kv.public == ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert (kv.attributes.usage, kv.attributes.exportable, kv.origin) == (("sign",), False,
                                                                          "generated")
    with pytest.raises(AlreadyExists):
        vm.local_root().tls_ca_setup()
    entries = read_entries(vm.audit.path)
    assert [(e["account"], e["op"], e["outcome"]) for e in entries
            if e.get("key") == "tls-ca"] == [
        ("root", "generate", "ok"), ("tls-issuer", "sign", "ok"), ("root", "tls_ca_setup", "ok"),
        ("root", "tls_ca_setup", "error")]


def test_an_attested_node_gets_a_short_lived_certificate_for_its_own_name(vm: CryptoVm) -> None:
    session = vm.attested_session("web-1")
    assert session.account == "node.web-1"
    assert set(vm.accounts.get("node.web-1").privileges) == set(NODE_PRIVILEGES)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = session.tls_enroll(csr_for(key, cn="admin"), validity=600)
    cert = x509.load_pem_x509_certificate(issued["certificate"])
    assert vm.tls_ca is not None
    cert.verify_directly_issued_by(vm.tls_ca.certificate)
    assert certificate_info(cert)["subject"] == "web-1"  # the attested name, not the CSR's
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(minutes=9) < lifetime <= datetime.timedelta(minutes=10)
    entries = read_entries(vm.audit.path)
    assert ("node.web-1", "tls_enroll", "ok") in [(e["account"], e["op"], e["outcome"])
                                                  for e in entries]


def test_enrollment_is_refused_without_attestation_privilege_or_issuer(vm: CryptoVm) -> None:
    request = csr_for(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(AccessDenied) as denied:
        vm.local_root().tls_enroll(request)  # root, but not an attested node
    assert denied.value.check == "attestation"
    session = vm.attested_session("web-2")
    with pytest.raises(AccessDenied) as denied:  # may not sign with the CA key itself
        session.sign("tls-ca", b"a forged certificate")
    assert denied.value.check == "privilege"
    with pytest.raises(KeyUsageError):
        vm.local_root().export("tls-ca", b"", scheme="ecdh-es-a256gcm")
    vm.local_root().account_revoke("node.web-2", ["tls:enroll"])
    with pytest.raises(AccessDenied, match="tls:enroll"):
        session.tls_enroll(request)
    vm.local_root().account_grant("node.web-2", ["tls:enroll"])
    vm.local_root().account_enable("tls-issuer", False)  # the kill switch
    with pytest.raises(AuthenticationFailed, match="tls-issuer"):
        session.tls_enroll(request)
    vm.local_root().account_enable("tls-issuer", True)
    vm.local_root().account_enable("node.web-2", False)
    with pytest.raises(AuthenticationFailed):
        vm.attested_session("web-2")


@pytest.mark.parametrize("bad, message", [
    (b"not a request", "does not parse"),
    (b"", "1..16384"),
])
def test_malformed_requests_are_refused(vm: CryptoVm, bad: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        vm.attested_session("web-3").tls_enroll(bad)


def test_a_request_not_signed_by_its_key_and_bad_validity_are_refused(vm: CryptoVm) -> None:
    session = vm.attested_session("web-4")
    good = csr_for(ec.generate_private_key(ec.SECP256R1()))
    forged = bytearray(good)
    forged[-5] ^= 1  # inside the signature
    with pytest.raises(BadRequest, match="signature"):
        session.tls_enroll(bytes(forged))
    with pytest.raises(BadRequest, match="validity"):
        session.tls_enroll(good, validity=10**6)


def test_reserved_names_and_refused_channels_in_the_audit(vm: CryptoVm) -> None:
    with pytest.raises(BadRequest, match="reserved"):
        vm.local_root().account_create("node.fake")
    with pytest.raises(BadRequest, match="reserved"):
        vm.local_root().account_create("tls-issuer2")
    vm.audit_attestation_failure("web-5", "policy", "PCR 9 differs")
    vm.audit_attestation_failure("../../etc", "ak_trust", "unknown")
    last = read_entries(vm.audit.path)[-2:]
    assert [(e["account"], e["op"], e["outcome"], e["check"]) for e in last] == [
        ("node.web-5", "auth", "denied", "policy"), ("-", "auth", "denied", "ak_trust")]
    assert "claimed node '../../etc'" in last[1]["detail"]


# --- CVM1 over an attested stream ----------------------------------------------------------


@contextmanager
def stream(vm: CryptoVm, session: VsmSession) -> Iterator[socket.socket]:
    near, far = socket.socketpair()
    near.settimeout(10)

    def serve() -> None:
        with far:  # the far end closes when the server is done: the near end reads EOF
            serve_stream(vm, session, lambda: far.recv(65536), far.sendall)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        yield near
    finally:
        near.close()
        worker.join(5)


def test_cvm1_over_an_attested_stream(vm: CryptoVm) -> None:
    session = vm.attested_session("web-6")
    with stream(vm, session) as sock:
        client = StreamClient(lambda: sock.recv(65536), sock.sendall)
        assert client.call("whoami")["name"] == "node.web-6"
        issued = client.call("tls_enroll", csr=csr_for(ec.generate_private_key(ec.SECP256R1())))
        assert issued["subject"] == "web-6"
        assert client.call("public_key", key_id="tls-ca")["public_key"]
        with pytest.raises(AccessDenied, match="keys:generate"):
            client.call("generate", algorithm="ec-p256", usage=["sign"])
        with pytest.raises(BadRequest, match="no auth step"):
            client.call("auth", account="root", client_nonce=b"x", proof=b"y")
        sock.sendall(encode_request(99, "whoami", "root", {}))
        answer = decode_response(FrameDecoder().feed(sock.recv(65536))[0][0])
        assert answer.id == 99 and not answer.ok
        assert "attested as 'node.web-6'" in answer.error["message"]
        sock.sendall(b"JUNKJUNK")
        assert sock.recv(65536)  # an error frame, then the stream ends
        assert sock.recv(65536) == b""
    denied = [e for e in read_entries(vm.audit.path) if e["account"] == "node.web-6"
              and e["outcome"] != "ok"]
    assert {e["op"] for e in denied} >= {"generate", "auth", "whoami", "frame"}
