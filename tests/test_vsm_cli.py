"""`testbed vsm`: the CryptoVM from the command line, on a state directory sealed to a
managed swtpm (`testbed tpm start`) and on a running sim cluster's cryptovm node."""

from __future__ import annotations

import base64
import datetime
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptovm import admin


def run_testbed(workdir: Path, *args: str, stdin: bytes | None = None
            ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "testbed", "--workdir", str(workdir), *args],
                            capture_output=True, timeout=90, input=stdin,
                            env={**os.environ, "TESTBED_TCTI": ""})
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(errors="replace"),
                                       result.stderr.decode())


def vsm(workdir: Path, *args: str, stdin: bytes | None = None
        ) -> subprocess.CompletedProcess[str]:
    return run_testbed(workdir, "vsm", *args, stdin=stdin)


def data_of(result: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
    assert result.returncode == 0, result.stderr
    doc: dict = json.loads(result.stdout)  # type: ignore[type-arg]
    return doc


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int,
                          *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed vsm: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def openssl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], capture_output=True, input=stdin, timeout=30)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A work directory with a managed swtpm and a CryptoVM sealed to it (key k1)."""
    workdir = tmp_path_factory.mktemp("vsm") / "wd"
    started = run_testbed(workdir, "tpm", "start")
    assert started.returncode == 0, started.stderr
    try:
        assert data_of(vsm(workdir, "init", "--json"))["state_dir"] == \
            str(workdir / "cryptovm" / "state")
        assert data_of(vsm(workdir, "key", "generate", "ec-p256", "--id", "k1", "--json"))
        yield workdir
    finally:
        run_testbed(workdir, "tpm", "stop", "--all")


def test_init_writes_the_root_psk_to_a_file_only(local: Path) -> None:
    psk_file = local / "cryptovm" / "root.psk"
    assert stat.S_IMODE(psk_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(psk_file.parent.stat().st_mode) == 0o700
    assert len(bytes.fromhex(psk_file.read_text())) == 32


def test_bad_values_are_exit_3_in_one_line(local: Path, tmp_path: Path) -> None:
    # A PCR selection without a bank is refused before a directory or the TPM is touched
    # (the TCTI names nothing that listens).
    fresh = tmp_path / "fresh"
    pcrs = vsm(fresh, "-T", "swtpm:host=127.0.0.1,port=1", "init", "--pcrs", "0-7")
    assert_one_line_error(pcrs, 3, "'0-7'", "sha256:")
    assert not fresh.exists()
    assert_one_line_error(vsm(local, "key", "sign", "k1", "--data", str(tmp_path / "nofile")),
                          3, "nofile", "does not exist")
    data = tmp_path / "data"
    data.write_bytes(b"x")
    assert_one_line_error(vsm(local, "key", "verify", "k1", "--data", str(data),
                              "--signature", "notbase64!!"), 3, "--signature", "base64")
    assert_one_line_error(vsm(local, "key", "public", "nokey"), 3, "nokey")
    assert_one_line_error(vsm(local, "key", "verify", "k1", "--data", "-",
                              "--signature-file", "-"), 2, "stdin")
    big = tmp_path / "big.sig"
    big.write_bytes(bytes(5000))
    assert_one_line_error(vsm(local, "key", "verify", "k1", "--data", str(data),
                              "--signature-file", str(big)), 3, "larger than")
    missing = vsm(tmp_path / "empty", "key", "list")
    assert_one_line_error(missing, 4, "vsm init")
    assert not (tmp_path / "empty").exists()  # a read command creates nothing


def test_public_key_is_pem_for_openssl_and_other_formats(local: Path, tmp_path: Path) -> None:
    pem = vsm(local, "key", "public", "k1")
    assert pem.returncode == 0, pem.stderr
    assert pem.stdout.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert openssl("pkey", "-pubin", "-noout", stdin=pem.stdout.encode()).returncode == 0
    key = serialization.load_pem_public_key(pem.stdout.encode())
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    out = tmp_path / "k1.der"
    written = data_of(vsm(local, "key", "public", "k1", "--format", "der", "-o", str(out),
                          "--json"))
    assert written["file"] == str(out) and out.read_bytes() == der
    assert openssl("pkey", "-pubin", "-inform", "DER", "-in", str(out), "-noout"
                   ).returncode == 0
    raw = vsm(local, "key", "public", "k1", "--format", "der")  # stdout is a pipe here
    assert raw.returncode == 0 and raw.stdout and not raw.stdout.startswith("-----")
    b64 = data_of(vsm(local, "key", "public", "k1", "--format", "base64", "--json"))
    assert base64.b64decode(b64["public_key"]) == der
    jwk = data_of(vsm(local, "key", "public", "k1", "--format", "jwk", "--json"))["public_key"]
    assert isinstance(key, ec.EllipticCurvePublicKey)
    numbers = key.public_numbers()
    assert (jwk["kty"], jwk["crv"], jwk["kid"]) == ("EC", "P-256", "k1")
    assert int.from_bytes(base64.urlsafe_b64decode(jwk["x"] + "=="), "big") == numbers.x


def test_signatures_as_files_and_on_stdin(local: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"to be signed")
    sig_file = tmp_path / "k1.sig"
    signed = data_of(vsm(local, "key", "sign", "k1", "--data", str(data), "-o", str(sig_file),
                         "--json"))
    assert signed["signature_file"] == str(sig_file)
    assert base64.b64decode(signed["signature"]) == sig_file.read_bytes()
    public = tmp_path / "k1.pem"
    public.write_text(vsm(local, "key", "public", "k1").stdout)
    assert openssl("dgst", "-sha256", "-verify", str(public), "-signature", str(sig_file),
                   str(data)).returncode == 0
    for how in (("--signature-file", str(sig_file)), ("--signature", signed["signature"])):
        ok = vsm(local, "key", "verify", "k1", "--data", str(data), *how, "--json")
        assert data_of(ok)["valid"] is True
    piped = vsm(local, "key", "verify", "k1", "--data", str(data), "--signature-file", "-",
                "--json", stdin=sig_file.read_bytes())
    assert data_of(piped)["valid"] is True
    from_stdin = vsm(local, "key", "sign", "k1", "--data", "-", "--json", stdin=b"to be signed")
    assert data_of(from_stdin)["key_id"] == "k1"
    bad = vsm(local, "key", "verify", "k1", "--data", "-", "--signature-file", str(sig_file),
              "--json", stdin=b"tampered")
    assert bad.returncode == 1 and json.loads(bad.stdout)["valid"] is False


def _iso_utc(value: str) -> datetime.datetime:
    assert value.endswith("Z"), value  # the testbed's one output time format
    moment = datetime.datetime.fromisoformat(value)
    assert moment.utcoffset() == datetime.timedelta(0), value
    return moment


def test_json_is_data_pem_and_iso_times(local: Path) -> None:
    generated = data_of(vsm(local, "key", "generate", "ed25519", "--id", "e1", "--json"))
    _iso_utc(generated["created"])
    assert isinstance(serialization.load_pem_public_key(generated["public_key"].encode()),
                      ed25519.Ed25519PublicKey)
    listed = data_of(vsm(local, "key", "list", "--json"))["keys"]
    assert {k["key_id"] for k in listed} >= {"k1", "e1"}
    for k in listed:
        _iso_utc(k["created"])
        assert k["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    status = data_of(vsm(local, "status", "--json"))
    assert (status["node"], status["state_dir"]) == (None, str(local / "cryptovm" / "state"))
    assert status["keys"] >= 2 and status["audit"]["ok"]
    assert data_of(vsm(local, "audit", "--json"))["ok"]
    human = vsm(local, "key", "list")
    assert human.returncode == 0 and "k1" in human.stdout and "ec-p256" in human.stdout


def test_accounts_psk_file_and_certificate_files(local: Path, tmp_path: Path) -> None:
    psk_file = tmp_path / "alice.psk"
    created = data_of(vsm(local, "account", "create", "alice", "--privilege", "key:k1:sign",
                          "--psk-file", str(psk_file), "--json"))
    psk = psk_file.read_text().strip()
    assert len(bytes.fromhex(psk)) == 32 and stat.S_IMODE(psk_file.stat().st_mode) == 0o600
    assert "psk" not in created and psk not in json.dumps(created)
    accounts = data_of(vsm(local, "account", "list", "--json"))["accounts"]
    alice = next(a for a in accounts if a["name"] == "alice")
    assert alice["privileges"] == ["key:k1:sign"]
    _iso_utc(alice["created"])
    out = tmp_path / "certs"
    issued = data_of(vsm(local, "account", "certificate", "alice", "-o", str(out), "--json"))
    assert "private_key" not in issued
    cert = x509.load_pem_x509_certificate(issued["certificate"].encode())
    assert cert.fingerprint(hashes.SHA256()).hex() == issued["fingerprint"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "alice.key").stat().st_mode) == 0o600
    assert openssl("verify", "-CAfile", str(out / "ca.crt"), str(out / "alice.crt")
                   ).returncode == 0
    key = serialization.load_pem_private_key((out / "alice.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=2**255))
def test_public_key_pem_and_jwk_describe_the_same_key(scalar: int) -> None:
    key = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    assert serialization.load_pem_public_key(admin.public_key_pem(der).encode()) == key
    jwk = admin.public_key_jwk(der)
    assert len(base64.urlsafe_b64decode(jwk["x"] + "=")) == 32  # padded to the field size
    point = b"\x04" + base64.urlsafe_b64decode(jwk["x"] + "=") + \
        base64.urlsafe_b64decode(jwk["y"] + "=")
    assert ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point) == key


def test_rsa_jwk_is_minimal_big_endian() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk = admin.public_key_jwk(der, "r")
    assert (jwk["kty"], jwk["e"], jwk["kid"]) == ("RSA", "AQAB", "r")
    assert int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=="), "big") == \
        key.public_numbers().n


# --- a running cluster's CryptoVM, over the wire -----------------------------------------------


@dataclass
class Cluster:
    workdir: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("vsm-cluster") / "wd"
    up = run_testbed(workdir, "up", "--json")
    try:
        assert up.returncode == 0, up.stderr
        yield Cluster(workdir)
    finally:
        run_testbed(workdir, "down")


def test_node_commands_go_over_the_wire(cluster: Cluster, tmp_path: Path) -> None:
    wd = cluster.workdir
    listed = data_of(vsm(wd, "--node", "cryptovm", "key", "list", "--json"))
    assert "tls-ca" in {k["key_id"] for k in listed["keys"]}  # the node's own CryptoVM
    generated = data_of(vsm(wd, "key", "generate", "ec-p256", "--id", "op1", "--node",
                            "cryptovm", "--json"))  # --node after the action too
    pem = vsm(wd, "--node", "cryptovm", "key", "public", "op1")
    assert pem.stdout == generated["public_key"]
    assert openssl("pkey", "-pubin", "-noout", stdin=pem.stdout.encode()).returncode == 0
    data = tmp_path / "data"
    data.write_bytes(b"over the wire")
    sig = tmp_path / "sig"
    assert data_of(vsm(wd, "--node", "cryptovm", "key", "sign", "op1", "--data", str(data),
                       "-o", str(sig), "--json"))
    verified = vsm(wd, "--node", "cryptovm", "key", "verify", "op1", "--data", str(data),
                   "--signature-file", str(sig), "--json")
    assert data_of(verified)["valid"] is True
    status = data_of(vsm(wd, "--node", "cryptovm", "status", "--json"))
    assert status["node"] == "cryptovm" and status["state_dir"] is None
    assert status["endpoint"].startswith("127.0.0.1:") and status["audit"]["ok"]
    assert "node.server" in status["accounts"]
    audit = data_of(vsm(wd, "--node", "cryptovm", "audit", "--json"))
    assert audit["ok"] and audit["entries"] > 0
    attested = data_of(vsm(wd, "--node", "cryptovm", "key", "attest", "op1", "--nonce",
                           "00112233", "--json"))
    assert attested["format"] == "cryptovm-key-attestation"
    assert_one_line_error(vsm(wd, "--node", "cryptovm", "key", "public", "nokey"), 3, "nokey")


def test_node_errors(cluster: Cluster, tmp_path: Path) -> None:
    wd = cluster.workdir
    assert_one_line_error(vsm(wd, "--node", "nosuch", "key", "list"), 3, "nosuch",
                          "cryptovm")
    assert_one_line_error(vsm(wd, "--node", "server", "key", "list"), 3, "server",
                          "not a cryptovm node")
    assert_one_line_error(vsm(wd, "--node", "cryptovm", "init"), 2, "testbed up")
    assert_one_line_error(vsm(wd, "--node", "cryptovm", "-T", "swtpm:port=1", "key", "list"),
                          2, "--tcti")
    assert_one_line_error(vsm(tmp_path / "none", "--node", "cryptovm", "key", "list"), 3,
                          "testbed up")
    # The node holds its state directory; opening it here says how to reach it instead.
    state = next(wd.glob("clusters/*/nodes/cryptovm/state/cryptovm"))
    assert_one_line_error(vsm(wd, "--state", str(state), "-T", "swtpm:port=1", "key", "list"),
                          4, "in use", "--node cryptovm")


def test_node_down_is_exit_4(cluster: Cluster) -> None:
    """Run last in this module: stops the cluster."""
    down = run_testbed(cluster.workdir, "down")
    assert down.returncode == 0, down.stderr
    assert_one_line_error(vsm(cluster.workdir, "--node", "cryptovm", "key", "list"), 4,
                          "testbed up")
