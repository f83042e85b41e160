"""TLS Sign over Trusted Passages with real swtpm: signed messages whose proofs a third
party checks offline (our verifier, the `testbed sign verify` command, and the openssl
CLI reading the CMS), tampered proofs (hand-made and hypothesis mutations), a signing
key from another TPM or from software refused with a named check, both audit logs."""

# ruff: noqa: F811 - `lab` is test_tp_tpm's module fixture, imported and used by name

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import EvidenceFormatError, TestbedError, VerificationError
from testbed.cli import main as cli
from tests.test_tp_tpm import CLIENT_SELECTION, Lab, lab  # noqa: F401 - the fixture
from trusted_passages.blocking import AttestedChannel, establish
from trusted_passages.signing import (
    AuditLog,
    Proof,
    SignReceiver,
    SignSender,
    build_signed_data,
    read_signed_data,
    self_signed_certificate,
)
from trusted_passages.tpm_signing import TpmKeyChecker, TpmSigner, verify_proof


def channel_pair(lab: Lab) -> tuple[AttestedChannel, AttestedChannel]:
    """client (the signer) and server (the receiver), mutually attested with real quotes."""
    client_sock, server_sock = socket.socketpair()
    ends: dict[str, AttestedChannel] = {}
    server_cfg = lab.config("server", pin="client")
    client_cfg = lab.config("client", role="client", expected_peer="server", pin="server")

    def run() -> None:
        ends["server"] = establish(server_sock, server_cfg.connection("server"), 5)

    thread = threading.Thread(target=run)
    thread.start()
    ends["client"] = establish(client_sock, client_cfg.connection("client"), 5)
    thread.join(5)
    return ends["client"], ends["server"]


def signer_for(lab: Lab, node: str = "client") -> TpmSigner:
    n = lab.nodes[node]
    return TpmSigner(n.client, node, CLIENT_SELECTION if node == "client" else
                     n.issuer.selection, n.log, lock=n.issuer.tpm_lock)


@dataclass
class Signed:
    proofs: list[Proof]
    data: list[bytes]
    sender_log: AuditLog
    receiver_log: AuditLog


MESSAGES = [b"order 1: 100 shares of ACME at market", b"order 2: cancel order 1"]


@pytest.fixture(scope="module")
def signed(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    logs = tmp_path_factory.mktemp("audit")
    logs.chmod(0o700)
    sender_log, receiver_log = AuditLog(logs / "sent.jsonl"), AuditLog(logs / "received.jsonl")
    client_end, server_end = channel_pair(lab)
    signer = signer_for(lab)
    sent: list[BaseException] = []

    def sign_all() -> None:
        try:
            sender = SignSender.open(client_end, signer, sender_log)
            for message in MESSAGES:
                sender.sign_send(message)
        except BaseException as exc:
            sent.append(exc)

    thread = threading.Thread(target=sign_all)
    thread.start()
    receiver = SignReceiver.accept(server_end, TpmKeyChecker(lab.client_policy), "server",
                                   receiver_log)
    received = [receiver.sign_recv() for _ in MESSAGES]
    thread.join(10)
    assert not sent
    yield Signed([p for _, p in received], [d for d, _ in received], sender_log, receiver_log)
    signer.close()
    client_end.close()
    server_end.close()


def test_signed_messages_arrive_with_proofs_a_third_party_accepts(
        lab: Lab, signed: Signed) -> None:
    assert signed.data == MESSAGES
    result = verify_proof(signed.proofs[1].to_json(), lab.registry.for_node("client"),
                          lab.client_policy)
    assert result.report.ok and not result.report.skipped, result.report.to_dict()
    facts = result.facts
    assert facts["who"]["node"] == "client"
    assert facts["platform_state"]["policy"] == "tp-client-av"
    assert facts["session"]["sequence"] == 2 and facts["session"]["receiver"] == "server"
    assert facts["when"]["tpm_clock_ms"] > 0
    assert "registered to node 'client'" in result.report.check("ak_trust").detail
    unpinned = verify_proof(signed.proofs[0].to_json())
    assert unpinned.report.ok and [c.name for c in unpinned.report.skipped] == ["ak_trust"]


def test_both_sides_keep_an_audit_log(signed: Signed) -> None:
    sent, received = signed.sender_log.entries(), signed.receiver_log.entries()
    assert [e["sequence"] for e in sent] == [e["sequence"] for e in received] == [1, 2]
    assert {e["session"] for e in sent} == {e["session"] for e in received}
    assert sent[0]["peer"] == "server" and received[0]["peer"] == "client"
    assert stat.S_IMODE(signed.sender_log.path.stat().st_mode) == 0o600


def test_audit_log_is_bounded_by_one_rotation(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=400)
    for i in range(50):
        log.append(sequence=i)
    assert log.path.stat().st_size <= 400
    assert (tmp_path / "audit.jsonl.1").stat().st_size <= 400
    assert log.entries()[-1]["sequence"] == 49


def test_openssl_cms_reads_and_verifies_the_signature(signed: Signed, tmp_path: Path) -> None:
    proof = signed.proofs[0]
    (tmp_path / "msg.p7s").write_bytes(proof.cms)
    cert = x509.load_der_x509_certificate(proof.credentials.certificate)
    (tmp_path / "signer.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for trust in (["-noverify"], ["-CAfile", str(tmp_path / "signer.pem"), "-purpose", "any"]):
        out = subprocess.run(
            [shutil.which("openssl") or "openssl", "cms", "-verify", "-binary", "-inform",
             "DER", "-in", str(tmp_path / "msg.p7s"), *trust],
            capture_output=True, timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout == MESSAGES[0] and b"Verification successful" in out.stderr


def failed_check(data: bytes) -> str | None:
    failure = verify_proof(data).report.failure
    return None if failure is None else failure.name


def edited(proof: Proof, **changes: object) -> bytes:
    return replace(proof, **changes).to_json()  # type: ignore[arg-type]


def test_tampered_proofs_name_the_failed_check(signed: Signed) -> None:
    first, second = signed.proofs
    doc = json.loads(first.to_json())
    cms = bytearray(first.cms)
    cms[cms.index(MESSAGES[0])] ^= 1  # one bit of the data flipped
    assert failed_check(edited(first, cms=bytes(cms))) == "cms_signature"
    # Another signing session's nonces: the certification was for this one.
    other_nonce = bytes(32)
    report = verify_proof(edited(first, receiver_nonce=other_nonce)).report
    assert report.failure is not None and report.failure.name == "key_certification"
    assert report.failure.detail.startswith("qualifying_data: ")
    assert failed_check(edited(first, cms=second.cms)) is None  # same session, message 2
    doc["credentials"]["certify_signature"] = doc["credentials"]["certify_attest"]
    assert failed_check(json.dumps(doc).encode()) == "key_certification"
    doc["credentials"]["evidence"] = {"format": "nonsense"}
    assert failed_check(json.dumps(doc).encode()) == "structure"
    with pytest.raises(EvidenceFormatError):
        verify_proof(first.to_json()[:-40])


def test_a_message_re_signed_by_a_software_key_is_caught(signed: Signed) -> None:
    proof = signed.proofs[0]
    forger = ec.generate_private_key(ec.SECP256R1())

    def sign(message: bytes) -> bytes:
        return forger.sign(message, ec.ECDSA(hashes.SHA256()))

    certificate = self_signed_certificate(forger.public_key(), "client", sign, 7)
    forged = build_signed_data(b"order 1: 10000 shares", certificate, sign, proof.session, 1,
                               datetime.now(UTC).replace(microsecond=0))
    assert failed_check(edited(proof, cms=forged)) == "cms_signer"
    forged_creds = replace(proof.credentials, certificate=certificate)
    assert failed_check(edited(proof, cms=forged, credentials=forged_creds)) == \
        "signer_certificate"


def test_the_receiver_refuses_a_key_from_another_tpm(lab: Lab) -> None:
    client_end, server_end = channel_pair(lab)
    outsider = signer_for(lab, "mallory")  # a genuine TPM, not the one the channel attested
    try:
        thread = threading.Thread(target=lambda: _quietly(SignSender.open, client_end, outsider))
        thread.start()
        with pytest.raises(VerificationError) as caught:
            SignReceiver.accept(server_end, TpmKeyChecker(), "server")
        assert caught.value.check == "ak_trust"
        thread.join(5)
    finally:
        outsider.close()
        client_end.close()
        server_end.close()


def _quietly(fn: object, *args: object) -> None:
    with contextlib.suppress(TestbedError):  # the refusal is asserted on the other side
        fn(*args)  # type: ignore[operator]


def test_the_cli_verifies_and_names_failures(signed: Signed, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    good, bad, junk = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "junk.json"
    good.write_bytes(signed.proofs[0].to_json())
    bad.write_bytes(edited(signed.proofs[0], cms=signed.proofs[0].cms.replace(
        MESSAGES[0], MESSAGES[0].upper())))
    junk.write_bytes(b"{\"format\": 1")
    assert cli.main(["sign", "verify", str(good), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["establishes"]["who"]["node"] == "client"
    assert cli.main(["sign", "verify", str(bad)]) == 1
    assert "REJECTED (check 'cms_signature' failed)" in capsys.readouterr().out
    assert cli.main(["sign", "verify", str(junk), "--json"]) == 3


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_proofs_never_verify_with_altered_signed_parts(
        signed: Signed, data: st.DataObject) -> None:
    original = signed.proofs[0]
    wire = bytearray(original.to_json())
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    try:
        result = verify_proof(bytes(wire))
    except EvidenceFormatError:
        return
    if result.report.ok:  # only unsigned parts may differ (received_at, CMS framing, ...)
        mutated = Proof.from_json(bytes(wire))
        message, _, _ = read_signed_data(mutated.cms)
        assert (message.data, message.sequence, mutated.credentials, mutated.session) == \
            (MESSAGES[0], 1, original.credentials, original.session)
