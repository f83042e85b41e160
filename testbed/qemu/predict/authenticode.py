"""The Authenticode digest of a PE/COFF image, in pure Python (hashlib).

This is what UEFI firmware (OVMF's DxeTpm2MeasureBootLib) extends into PCR 4
for an EV_EFI_BOOT_SERVICES_APPLICATION, and what a signature on the image
covers: Microsoft's "Windows Authenticode Portable Executable Signature Format",
section "Calculating the PE Image Hash":

1. hash the headers up to the CheckSum field, skip its 4 bytes;
2. hash on up to the Certificate Table data-directory entry, skip its 8 bytes;
3. hash the rest of the headers (up to SizeOfHeaders);
4. hash every section with raw data, in ascending PointerToRawData order;
5. hash whatever follows the last section (extra data), except the
   attribute certificate table (the signatures) the directory entry points to.

The firmware follows edk2's reading of the rules (``HashPeImage`` in
DxeImageVerificationLib / Tcg2Dxe's ``MeasurePeImageAndExtend``): the bytes hashed
so far are counted as SizeOfHeaders plus every section's ``SizeOfRawData``, and
the trailing data is what lies between that count and the file size minus the
certificate table's size (the table is always last in a signed image). Signing
pads the file to a multiple of 8 bytes before appending the table, and that
padding is hashed: a signed image and its unsigned original have the same digest
when the original's size was already a multiple of 8.

The parser treats the file as untrusted: every offset is bounds-checked and
malformed images raise :class:`PeFormatError`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from attestation.errors import EvidenceFormatError

__all__ = ["PeFormatError", "PeLayout", "authenticode_digest", "pe_layout"]

_PE32 = 0x10B
_PE32_PLUS = 0x20B
_CERT_TABLE_INDEX = 4  # IMAGE_DIRECTORY_ENTRY_SECURITY
_SECTION_HEADER = 40
MAX_SECTIONS = 96  # the PE format's own limit


class PeFormatError(EvidenceFormatError):
    """The file is not a PE/COFF image this module can hash."""


@dataclass(frozen=True)
class PeLayout:
    """Where the fields the Authenticode digest skips are, and the section ranges."""

    checksum_offset: int
    cert_dir_offset: int
    size_of_headers: int
    cert_table: tuple[int, int]  # (file offset, size); (0, 0) when unsigned
    sections: tuple[tuple[int, int], ...]  # (PointerToRawData, SizeOfRawData), sorted


def _u16(data: bytes, offset: int) -> int:
    if offset + 2 > len(data):
        raise PeFormatError(f"PE image truncated at offset {offset}")
    return int(struct.unpack_from("<H", data, offset)[0])


def _u32(data: bytes, offset: int) -> int:
    if offset + 4 > len(data):
        raise PeFormatError(f"PE image truncated at offset {offset}")
    return int(struct.unpack_from("<I", data, offset)[0])


def pe_layout(data: bytes) -> PeLayout:
    """Parse the headers of a PE/COFF image (bounds-checked)."""
    if data[:2] != b"MZ":
        raise PeFormatError("not a PE image: no MZ header")
    pe = _u32(data, 0x3C)
    if data[pe : pe + 4] != b"PE\0\0":
        raise PeFormatError("not a PE image: no PE signature at e_lfanew")
    coff = pe + 4
    n_sections = _u16(data, coff + 2)
    opt_size = _u16(data, coff + 16)
    opt = coff + 20
    magic = _u16(data, opt)
    if magic not in (_PE32, _PE32_PLUS):
        raise PeFormatError(f"unknown optional header magic 0x{magic:x}")
    dirs = opt + (96 if magic == _PE32 else 112)
    n_dirs = _u32(data, dirs - 4)
    if n_sections > MAX_SECTIONS:
        raise PeFormatError(f"{n_sections} sections; the format allows {MAX_SECTIONS}")
    cert_dir = dirs + 8 * _CERT_TABLE_INDEX
    cert_table = (_u32(data, cert_dir), _u32(data, cert_dir + 4)) if n_dirs > 4 else (0, 0)
    size_of_headers = _u32(data, opt + 60)
    if n_dirs <= _CERT_TABLE_INDEX or size_of_headers > len(data):
        raise PeFormatError("PE headers have no certificate directory or are truncated")
    return PeLayout(opt + 64, cert_dir, size_of_headers, cert_table,
                    _sections(data, opt + opt_size, n_sections))


def _sections(data: bytes, table: int, count: int) -> tuple[tuple[int, int], ...]:
    found = []
    for index in range(count):
        header = table + index * _SECTION_HEADER
        size, pointer = _u32(data, header + 16), _u32(data, header + 20)
        if size == 0:
            continue
        if pointer + size > len(data):
            raise PeFormatError(f"section {index} runs past the end of the file")
        found.append((pointer, size))
    return tuple(sorted(found))


def authenticode_digest(data: bytes, hash_name: str = "sha256") -> bytes:
    """The Authenticode digest of the PE/COFF image ``data``."""
    layout = pe_layout(data)
    h = hashlib.new(hash_name)
    h.update(data[: layout.checksum_offset])
    h.update(data[layout.checksum_offset + 4 : layout.cert_dir_offset])
    h.update(data[layout.cert_dir_offset + 8 : layout.size_of_headers])
    hashed = layout.size_of_headers
    for pointer, size in layout.sections:
        h.update(data[pointer : pointer + size])
        hashed += size
    cert_size = layout.cert_table[1]
    trailer_end = len(data) - cert_size
    if trailer_end > hashed:
        h.update(data[hashed:trailer_end])
    return h.digest()
