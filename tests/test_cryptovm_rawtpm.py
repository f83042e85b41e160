"""The CryptoVM without tpm2-pytss: the raw-command TPM backend (cryptovm/rawtpm.py).

The guest path runs as it does in a Debian 12 QEMU guest: under Debian's own
/usr/bin/python3 (python3-cryptography 38, python3-openssl 23, no tpm2-pytss), in a
subprocess, against a real swtpm reached on its unix data socket instead of
/dev/tpmrm0. The host checks what the guest produced with the project's venv: the
signature, the registrar's credential activation, the quote and key attestation, and
the CVM1 wire protocol served by ``python3 -m cryptovm.server --raw-tpm``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.evidence import Evidence
from attestation.registrar import Registrar
from attestation.tpm import TpmClient
from attestation.tpm_types import parse_public
from attestation.verifier import QuoteVerifier
from cryptovm.client import CryptoVmClient
from cryptovm.errors import SealedStorageError
from cryptovm.keyattest import KeyAttestation, verify_key_attestation
from cryptovm.rawtpm import RawTpm, sealed_template, storage_primary_template
from cryptovm.sealing import (
    TpmSealer,
    _sealed_template,
    _storage_primary_template,
    parse_pcr_selection,
)
from cryptovm.state import StateDir
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm
from tests.test_qemu_guest_tp import GUEST_PYTHON, _debian_versions

REPO = Path(__file__).resolve().parents[1]
PCRS = "sha256:0-9,16"

# Runs under Debian's python3: one phase per invocation, JSON on stdout.
GUEST_SCRIPT = r'''
import base64, json, sys
from pathlib import Path

from attestation.credential import CredentialChallenge
from cryptovm.errors import SealedStorageError
from cryptovm.rawtpm import RawTpm
from cryptovm.vsm import CryptoVm

phase, spec, state = sys.argv[1], sys.argv[2], Path(sys.argv[3])
args = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
b64 = lambda data: base64.b64encode(data).decode()
out = {"modules": sorted(m for m in sys.modules if m.startswith("tpm2_pytss"))}
import cryptography
out["cryptography"] = cryptography.__version__
with RawTpm.open(spec) as raw:
    if phase == "init":
        vm, psk = CryptoVm.initialize(state, raw.name, pcrs=args["pcrs"], **raw.options())
        with vm:
            root = vm.local_root()
            key = root.generate("ec-p256", ["sign"], key_id="k1")
            signed = root.sign("k1", b"hello")
            identity = vm.identity()
            # the TLS CA and an enrolment: certificate code paths under cryptography 38
            ca = root.tls_ca_setup(common_name="guest CA")
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
            node_key = ec.generate_private_key(ec.SECP256R1())
            csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, "x")])).sign(node_key, hashes.SHA256())
            enrolled = vm.attested_session("web1").tls_enroll(
                csr.public_bytes(serialization.Encoding.DER), 3600)
            out.update(tls_ca=ca["certificate"].decode(), tls_ca_not_after=ca["not_after"],
                       node_certificate=enrolled["certificate"].decode(),
                       node_validity_s=enrolled["validity_s"])
        out.update(psk=b64(psk), public=b64(key["public_key"]),
                   signature=b64(signed["signature"]), tcti=vm.tcti,
                   identity={k: (b64(v) if isinstance(v, bytes) else v)
                             for k, v in identity.items()})
    elif phase == "open":
        try:
            vm = CryptoVm.open(state, raw.name, **raw.options())
        except SealedStorageError as exc:
            out["sealed_error"] = str(exc)
        else:
            with vm:
                root = vm.local_root()
                out["keys"] = [k["key_id"] for k in root.list_keys()["keys"]]
                out["signature"] = b64(root.sign("k1", b"again")["signature"])
                if "encrypted_secret" in args:
                    activated = root.activate_credential(
                        base64.b64decode(args["credential_blob"]),
                        base64.b64decode(args["encrypted_secret"]))
                    out["secret"] = b64(activated["secret"])
                nonce = bytes.fromhex(args.get("nonce", "00"))
                out["evidence"] = vm.quote(nonce).to_dict()
                out["attestation"] = root.attest("k1", nonce)["attestation"]
print(json.dumps(out))
'''


def _guest(phase: str, tpm: Swtpm, state: Path, script: Path, **args: Any) -> dict[str, Any]:
    run = subprocess.run([GUEST_PYTHON, str(script), phase, f"unix:{tpm.socket_path}",
                          str(state), json.dumps(args)],
                         capture_output=True, text=True, env=_guest_env(), timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    assert result["modules"] == [], "tpm2-pytss must not be imported in the guest"
    return result


def _guest_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VIRTUAL_ENV", None)
    return env


def _verify_signature(public_der: bytes, data: bytes, signature: bytes) -> None:
    key = serialization.load_der_public_key(public_der)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, data, ec.ECDSA(hashes.SHA256()))


def _extend(tpm: Swtpm, index: int) -> None:
    with TpmClient(tpm.tcti) as client:
        client.extend_pcr(index, {"sha256": hashlib.sha256(b"tampered").digest()})


# --- host-side: the raw backend in the project's venv -------------------------------------


def test_templates_match_tpm2_pytss() -> None:
    """Same templates, so both sealers derive the same primary and the same object."""
    assert storage_primary_template() == bytes(_storage_primary_template().marshal())[2:]
    policy = hashlib.sha256(b"policy").digest()
    assert sealed_template(policy) == bytes(_sealed_template(policy).marshal())[2:]


def test_blobs_unseal_across_implementations_and_nothing_is_left_loaded(
        swtpm: Swtpm) -> None:
    selection = parse_pcr_selection("sha256:0-9")
    with RawTpm.open(f"unix:{swtpm.socket_path}") as raw:
        by_raw = raw.sealer(selection).seal(b"r" * 32)
    by_pytss = TpmSealer(swtpm.tcti, selection).seal(b"p" * 32)
    assert TpmSealer(swtpm.tcti, selection).unseal(by_raw) == b"r" * 32
    with RawTpm.open(f"unix:{swtpm.socket_path}") as raw:
        sealer = raw.sealer(selection)
        assert sealer.unseal(by_pytss) == b"p" * 32
        assert sorted(sealer.read_pcrs()) == list(range(10))
    with TpmClient(swtpm.tcti) as client:
        assert client.transient_handles() == []


def test_raw_unseal_names_the_changed_pcr_and_flushes_on_failure(swtpm: Swtpm) -> None:
    selection = parse_pcr_selection("sha256:0,16")
    spec = f"unix:{swtpm.socket_path}"
    with RawTpm.open(spec) as raw:
        blob = raw.sealer(selection).seal(os.urandom(32))
    _extend(swtpm, 16)
    with RawTpm.open(spec) as raw, pytest.raises(SealedStorageError,
                                                  match=r"PCRs differ: \[16\]"):
        raw.sealer(selection).unseal(blob)
    with TpmClient(swtpm.tcti) as client:
        assert client.transient_handles() == []
    with pytest.raises(SealedStorageError, match=r"PCRs differ: \[16\]"):
        TpmSealer(swtpm.tcti, selection).unseal(blob)


# --- the guest: Debian's python3, raw commands ---------------------------------------------


def test_cryptovm_in_a_debian_guest_seals_attests_and_serves(
        swtpm: Swtpm, swtpm_ca: LocalCA, tmp_path: Path) -> None:
    versions = _debian_versions().split()[1]  # "OPENSSL CRYPTOGRAPHY"
    script = tmp_path / "guest_cryptovm.py"
    script.write_text(GUEST_SCRIPT)
    state = tmp_path / "state"

    init = _guest("init", swtpm, state, script, pcrs=PCRS)
    assert init["cryptography"] == versions
    assert init["tcti"] == f"swtpm:path={swtpm.socket_path}"
    public = base64.b64decode(init["public"])
    _verify_signature(public, b"hello", base64.b64decode(init["signature"]))
    ca_cert = x509.load_pem_x509_certificate(init["tls_ca"].encode())
    node_cert = x509.load_pem_x509_certificate(init["node_certificate"].encode())
    ca_cert.verify_directly_issued_by(ca_cert)
    node_cert.verify_directly_issued_by(ca_cert)
    assert init["tls_ca_not_after"] == ca_cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert node_cert.subject.rfc4514_string() == "CN=web1"
    assert init["node_validity_s"] == 3600 + 300  # the issuer's clock skew allowance
    # The same blob unseals through tpm2-pytss on the host (same templates, same TPM).
    blob = StateDir(state).read_sealed()
    assert len(TpmSealer(swtpm.tcti, blob.selection).unseal(blob)) == 32

    identity = {k: base64.b64decode(v) if k != "ek_algorithm" and k != "pcr_selection" else v
                for k, v in init["identity"].items()}
    assert identity["pcr_selection"] == "sha256:0,1,2,3,4,5,6,7,8,9,16"
    registrar = Registrar(swtpm_ca.ca_bundle())
    challenge = registrar.challenge(identity["ek_certificate"], identity["ek_public"],
                                    identity["ak_public"])
    nonce = os.urandom(32)
    opened = _guest("open", swtpm, state, script, nonce=nonce.hex(),
                    credential_blob=base64.b64encode(challenge.credential_blob).decode(),
                    encrypted_secret=base64.b64encode(challenge.encrypted_secret).decode())
    assert opened["keys"] == ["k1", "tls-ca"]
    _verify_signature(public, b"again", base64.b64decode(opened["signature"]))
    registrar.complete(parse_public(identity["ak_public"]).name,
                       base64.b64decode(opened["secret"]))
    verifier = QuoteVerifier(ak_trust=registrar)
    evidence = Evidence.from_dict(opened["evidence"])
    report = verifier.verify(evidence, nonce)
    assert report.ok, report
    assert sorted(evidence.pcrs) == [*range(10), 16]
    attestation = KeyAttestation.from_dict(opened["attestation"])
    assert attestation.public == public
    assert verify_key_attestation(attestation, nonce, verifier).ok

    _serve_and_call(swtpm, state, base64.b64decode(init["psk"]), public, tmp_path)

    _extend(swtpm, 16)
    refused = _guest("open", swtpm, state, script)
    assert "PCRs differ: [16]" in refused["sealed_error"]


def _serve_and_call(swtpm: Swtpm, state: Path, psk: bytes, public: bytes,
                    tmp_path: Path) -> None:
    """``python3 -m cryptovm.server --raw-tpm`` under Debian's python3; the venv's client."""
    port_file = tmp_path / "port"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [GUEST_PYTHON, "-m", "cryptovm.server", "--state", str(state), "--raw-tpm",
             f"unix:{swtpm.socket_path}", "--port-file", str(port_file)],
            stdout=out, stderr=subprocess.STDOUT, env=_guest_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        port = int(port_file.read_text())
        ca_pem = StateDir(state).ca_pem.read_bytes()
        with CryptoVmClient("127.0.0.1", port, ca_pem=ca_pem, account="root",
                            psk=psk) as client:
            assert client.public_key("k1") == public
            signature = client.sign("k1", b"over the wire")
            _verify_signature(public, b"over the wire", signature)
            assert client.verify("k1", b"over the wire", signature)
            identity = client.call("identity")
            assert identity["ek_algorithm"] == "rsa"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0, log.read_text()


def test_every_cryptovm_module_imports_without_tpm2_pytss() -> None:
    _debian_versions()
    modules = sorted(p.stem for p in (REPO / "cryptovm").glob("*.py") if p.stem != "__main__")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module('cryptovm.' + m)"
            "\nprint(sorted(m for m in sys.modules if m.startswith('tpm2_pytss')))")
    run = subprocess.run([GUEST_PYTHON, "-c", code], capture_output=True, text=True,
                         env=_guest_env(), check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# Runs under Debian's python3: ServerThread, the guest agent's way of serving CVM1.
SERVER_THREAD_SCRIPT = r'''
import json, sys, threading
from pathlib import Path

from cryptovm.client import CryptoVmClient
from cryptovm.rawtpm import RawTpm
from cryptovm.server import ServerThread
from cryptovm.vsm import CryptoVm

with RawTpm.open(sys.argv[1]) as raw:
    vm, psk = CryptoVm.initialize(Path(sys.argv[2]), raw.name, pcrs="sha256:0-9",
                                  **raw.options())
    with vm:
        before = set(threading.enumerate())
        with ServerThread(vm, "127.0.0.1", 0, idle_timeout=5.0) as server:
            with CryptoVmClient("127.0.0.1", server.port, ca_pem=vm.ca.pem, account="root",
                                psk=psk) as client:
                name = client.call("whoami")["name"]
        left = [t.name for t in set(threading.enumerate()) - before]
print(json.dumps({"whoami": name, "threads_left": left}))
'''


def test_server_thread_runs_under_debian_python(swtpm: Swtpm, tmp_path: Path) -> None:
    _debian_versions()
    script = tmp_path / "server_thread.py"
    script.write_text(SERVER_THREAD_SCRIPT)
    run = subprocess.run([GUEST_PYTHON, str(script), f"unix:{swtpm.socket_path}",
                          str(tmp_path / "state")],
                         capture_output=True, text=True, env=_guest_env(), timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"whoami": "root", "threads_left": []}
