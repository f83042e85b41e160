"""Public keys no TPM could hold, given as an AK or inside an EK: one clear error each
(EvidenceFormatError, exit 3 from the CLI; EndorsementError for EK certificates), never a
struct.error, OverflowError or cryptography's UnsupportedAlgorithm."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation.credential import make_credential
from attestation.endorsement import load_ca_bundle, parse_certificate
from attestation.errors import EndorsementError, EvidenceFormatError, VerificationError
from attestation.registrar import PinnedAk
from attestation.tools_format import write_pcrs
from attestation.tpm_types import (
    PcrSelection,
    marshal_pcr_selection,
    marshal_public_key,
    parse_public,
    tpm2b,
    tpmt_public_from_pem,
)
from testbed.tpm.quote_files import load_ak

# secp112r1: OpenSSL knows it, cryptography refuses it with UnsupportedAlgorithm.
SECP112R1_PEM = b"""-----BEGIN PUBLIC KEY-----
MDIwEAYHKoZIzj0CAQYFK4EEAAYDHgAEQl1zB1p9repveC/axrdp/WkIz5xY8boL
YeXehw==
-----END PUBLIC KEY-----
"""


def _pem(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _rsa_public(bits: int, exponent: int) -> rsa.RSAPublicKey:
    # Any odd modulus of the right length makes a public key; no factoring needed.
    modulus = (1 << (bits - 1)) | 0xF1
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def _ec_public(curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(curve).public_key()


HOSTILE_KEYS: dict[str, tuple[bytes, str]] = {
    "exponent-above-32-bits": (_pem(_rsa_public(2048, (1 << 32) + 1)), "32-bit exponent"),
    "modulus-2047-bits": (_pem(_rsa_public(2047, 65537)), "modulus of 2047 bits"),
    "modulus-1536-bits": (_pem(_rsa_public(1536, 65537)), "modulus of 1536 bits"),
    "curve-secp256k1": (_pem(_ec_public(ec.SECP256K1())), "no TPM curve identifier"),
    "curve-brainpool": (_pem(_ec_public(ec.BrainpoolP256R1())), "no TPM curve identifier"),
    "curve-unknown-to-cryptography": (SECP112R1_PEM, "not a usable PEM public key"),
    "ed25519": (b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtr"
                b"bLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n", "neither an RSA nor an EC"),
    "garbage": (b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n",
                "not a usable PEM public key"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_KEYS))
def test_pem_keys_no_tpm_could_hold_are_format_errors(name: str) -> None:
    pem, reason = HOSTILE_KEYS[name]
    with pytest.raises(EvidenceFormatError, match=reason) as caught:
        tpmt_public_from_pem(pem, "ak.pem")
    assert str(caught.value).startswith("ak.pem: ")


@pytest.mark.parametrize("name", sorted(HOSTILE_KEYS))
def test_load_ak_names_the_file(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.pem"
    path.write_bytes(HOSTILE_KEYS[name][0])
    with pytest.raises(EvidenceFormatError, match=str(path)):
        load_ak(path)


def test_load_ak_of_a_damaged_tpmt_public_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ak.pub"
    path.write_bytes(b"\x00\x23\x00\x0b" + b"\x00" * 7)
    with pytest.raises(EvidenceFormatError, match=f"{path}: not a PEM key, TPM2B_PUBLIC"):
        load_ak(path)


@pytest.mark.parametrize("key", [_rsa_public(2048, 65537), _rsa_public(3072, 3),
                                 _ec_public(ec.SECP256R1()), _ec_public(ec.SECP384R1())],
                         ids=["rsa2048", "rsa3072-e3", "p256", "p384"])
def test_keys_a_tpm_can_hold_round_trip(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
                                        ) -> None:
    area = parse_public(tpmt_public_from_pem(_pem(key), "ak.pem"))
    assert area.public_key().public_numbers() == key.public_numbers()
    assert marshal_public_key(key) == area.raw


def test_pinned_ak_from_a_pem_cryptography_cannot_load_is_refused() -> None:
    with pytest.raises(VerificationError, match="not a PEM public key"):
        PinnedAk.from_pem(SECP112R1_PEM, "pinned AK")


def _quote_files(directory: Path) -> None:
    selection = PcrSelection("sha256", (0,))
    attest = (struct.pack(">IH", 0xFF544347, 0x8018) + tpm2b(b"") + tpm2b(b"\x01")
              + struct.pack(">QIIBQ", 1, 1, 0, 1, 0) + marshal_pcr_selection((selection,))
              + tpm2b(bytes(32)))
    directory.mkdir()
    (directory / "quote.msg").write_bytes(attest)
    (directory / "quote.sig").write_bytes(b"\x00\x18\x00\x0b" + tpm2b(b"r") + tpm2b(b"s"))
    (directory / "quote.pcrs").write_bytes(write_pcrs(selection, {0: bytes(32)}))


@pytest.mark.parametrize("name", ["exponent-above-32-bits", "modulus-2047-bits",
                                  "curve-unknown-to-cryptography", "curve-secp256k1"])
def test_verify_quote_cli_exits_3_naming_the_key_file(name: str, tmp_path: Path) -> None:
    _quote_files(tmp_path / "q")
    key = tmp_path / "ak.pem"
    key.write_bytes(HOSTILE_KEYS[name][0])
    run = subprocess.run([sys.executable, "-m", "testbed", "verify-quote", str(tmp_path / "q"),
                          "-u", str(key), "-q", "01"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr
    assert "Traceback" not in run.stderr
    assert str(key) in run.stderr and HOSTILE_KEYS[name][1] in run.stderr


# --- EK side ---------------------------------------------------------------------------


def test_ek_with_an_aes_key_size_no_tpm_has_is_a_format_error() -> None:
    ek = bytearray.fromhex(
        "0023000b000300b20020" + "00" * 32 + "0006" + "0000" + "0043"  # AES-0-CFB
        + "0010" + "0003" + "0010" + "0020" + "11" * 32 + "0020" + "22" * 32)
    area = parse_public(bytes(ek))
    with pytest.raises(EvidenceFormatError, match="AES-0"):
        make_credential(area, b"\x00\x0b" + bytes(32), b"s" * 16)


def test_ek_certificate_that_is_not_der_is_an_endorsement_error() -> None:
    with pytest.raises(EndorsementError):
        parse_certificate(b"\x30\x03\x02\x01\x01")


def test_ca_bundle_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "bundle.pem"
    os.mkfifo(fifo)
    with pytest.raises(EndorsementError, match="not a regular file"):
        load_ca_bundle(fifo)
