"""The pure-Python Authenticode digest against osslsigncode (Debian package osslsigncode).

A synthetic PE32+ image is built here, signed by osslsigncode with a throwaway
certificate, and osslsigncode's own "Calculated message digest" must equal ours
for both the signed and the unsigned file (signing must not change the digest).
The real Debian kernel is covered by the VM tests, where OVMF's PCR 4 event is the
reference.
"""

from __future__ import annotations

import datetime
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from testbed.qemu.predict.authenticode import PeFormatError, authenticode_digest, pe_layout

FILE_ALIGN = 0x200


def make_pe(sections: list[bytes], trailer: bytes = b"", headers_size: int = FILE_ALIGN) -> bytes:
    """A minimal valid PE32+ (x86-64 EFI application) with the given section contents."""
    raw, pointer = [], headers_size
    for data in sections:
        size = -(-len(data) // FILE_ALIGN) * FILE_ALIGN
        raw.append((pointer, size, data.ljust(size, b"\0")))
        pointer += size
    dos = b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40)
    coff = struct.pack("<HHIIIHH", 0x8664, len(sections), 0, 0, 0, 240, 0x0206)
    opt = struct.pack("<HBBIIIII", 0x20B, 2, 0, sum(s for _, s, _ in raw), 0, 0, 0x1000, 0x1000)
    opt += struct.pack("<QIIHHHHHHIIIIHHQQQQII", 0x10000, 0x1000, FILE_ALIGN, 0, 0, 0, 0, 0, 0,
                       0, 0x1000 * (len(sections) + 1), headers_size, 0, 10, 0,
                       0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    opt += bytes(16 * 8)
    table = b""
    for index, (ptr, size, _) in enumerate(raw):
        table += struct.pack("<8sIIIIIIHHI", f".s{index}".encode(), size, 0x1000 * (index + 1),
                             size, ptr, 0, 0, 0, 0, 0x60000020)
    header = (dos + b"PE\0\0" + coff + opt + table).ljust(headers_size, b"\0")
    return header + b"".join(data for _, _, data in raw) + trailer


def _certificate(tmp: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "testbed authenticode test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _osslsigncode() -> str:
    tool = shutil.which("osslsigncode")
    if tool is None:
        pytest.fail("osslsigncode is not installed (apt-get install osslsigncode): it is the "
                    "independent reference for the Authenticode digest", pytrace=False)
    return tool


def _calculated_digest(tool: str, signed: Path) -> bytes:
    out = subprocess.run([tool, "verify", "-in", str(signed)], capture_output=True, text=True,
                         check=False).stdout
    match = re.search(r"Calculated message digest\s*:\s*([0-9A-Fa-f]{64})", out)
    assert match, out
    return bytes.fromhex(match.group(1))


@pytest.mark.parametrize("trailer", [b"", b"extra data after sections", b"8 bytes!" * 3])
def test_digest_matches_osslsigncode_signed_and_unsigned(tmp_path: Path, trailer: bytes) -> None:
    tool = _osslsigncode()
    image = make_pe([b"\x90" * 1000, b"data" * 300, b"\xcc" * 10], trailer)
    unsigned, signed = tmp_path / "app.efi", tmp_path / "app-signed.efi"
    unsigned.write_bytes(image)
    cert, key = _certificate(tmp_path)
    subprocess.run([tool, "sign", "-certs", str(cert), "-key", str(key), "-h", "sha256",
                    "-in", str(unsigned), "-out", str(signed)], check=True, capture_output=True)
    reference = _calculated_digest(tool, signed)
    assert authenticode_digest(signed.read_bytes()) == reference
    if len(image) % 8 == 0:  # signing pads the file to 8 bytes, and the padding is hashed
        assert authenticode_digest(image) == reference
    assert pe_layout(signed.read_bytes()).cert_table[1] > 0


def test_checksum_and_certificate_directory_are_excluded() -> None:
    image = bytearray(make_pe([b"code" * 100]))
    layout = pe_layout(bytes(image))
    digest = authenticode_digest(bytes(image))
    image[layout.checksum_offset : layout.checksum_offset + 4] = b"\x12\x34\x56\x78"
    assert authenticode_digest(bytes(image)) == digest
    image[layout.size_of_headers + 5] ^= 1
    assert authenticode_digest(bytes(image)) != digest


@pytest.mark.parametrize("data", [b"", b"MZ", b"MZ" + bytes(0x3A) + struct.pack("<I", 10**6),
                                  b"ELF not a PE at all" * 10])
def test_malformed_images_raise(data: bytes) -> None:
    with pytest.raises(PeFormatError):
        authenticode_digest(data)


def test_section_past_end_of_file_is_rejected() -> None:
    image = make_pe([b"x" * 600])
    truncated = image[: len(image) - 100]
    with pytest.raises(PeFormatError, match="past the end"):
        pe_layout(truncated)
