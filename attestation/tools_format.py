"""tpm2-tools' quote file formats, so our quotes and tpm2_quote's interoperate.

- ``quote.msg``: TPMS_ATTEST as the TPM returned it;
- ``quote.sig``: TPMT_SIGNATURE in TPM wire encoding;
- ``quote.pcrs``: tpm2-tools' "serialized" PCR format, which is the C structs as
  they lie in memory on a little-endian host: TPML_PCR_SELECTION (132 bytes),
  a u32 count of TPML_DIGESTs, then that many TPML_DIGESTs (532 bytes each).
"""

from __future__ import annotations

import struct

from attestation.errors import EvidenceFormatError
from attestation.tpm_types import ALG_BY_HASH, DIGEST_SIZE, HASH_BY_ALG, PcrSelection

_SELECTION_SLOTS = 16  # TPM2_NUM_PCR_BANKS
_SELECT_BYTES = 4  # TPM2_PCR_SELECT_MAX
_SELECTION_SIZE = 4 + _SELECTION_SLOTS * 8  # each TPMS_PCR_SELECTION is 7 bytes + 1 padding
_DIGESTS_PER_LIST = 8
_DIGEST_SLOT = 2 + 64  # TPM2B_DIGEST: u16 size + sizeof(TPMU_HA)
_DIGEST_LIST_SIZE = 4 + _DIGESTS_PER_LIST * _DIGEST_SLOT
MAX_PCRS_FILE = _SELECTION_SIZE + 4 + 8 * _DIGEST_LIST_SIZE


def write_pcrs(selection: PcrSelection, pcrs: dict[int, bytes]) -> bytes:
    """Encode PCR values as ``tpm2_quote -o quote.pcrs`` (format ``serialized``) does."""
    bitmap = bytearray(_SELECT_BYTES)
    for index in selection.indices:
        bitmap[index // 8] |= 1 << (index % 8)
    size_of_select = 3 if max(selection.indices, default=0) < 24 else 4
    sel = struct.pack("<IHB", 1, ALG_BY_HASH[selection.bank], size_of_select) + bytes(bitmap)
    sel += b"\x00" + bytes(_SELECTION_SIZE - len(sel) - 1)
    values = [pcrs[i] for i in selection.indices]
    lists = [values[i : i + _DIGESTS_PER_LIST] for i in range(0, len(values), _DIGESTS_PER_LIST)]
    out = sel + struct.pack("<I", len(lists))
    for chunk in lists:
        body = struct.pack("<I", len(chunk))
        for digest in chunk:
            body += struct.pack("<H", len(digest)) + digest.ljust(64, b"\x00")
        out += body.ljust(_DIGEST_LIST_SIZE, b"\x00")
    return out


def read_pcrs(data: bytes) -> tuple[PcrSelection, dict[int, bytes]]:
    """Decode a tpm2-tools ``serialized`` PCR file: one bank is supported."""
    if len(data) < _SELECTION_SIZE + 4 or len(data) > MAX_PCRS_FILE:
        raise EvidenceFormatError(f"PCR file of {len(data)} bytes is not in tpm2-tools' "
                                  "serialized format")
    count, hash_alg, size_of_select = struct.unpack_from("<IHB", data, 0)
    if count != 1:
        raise EvidenceFormatError(f"PCR file selects {count} banks; exactly one is supported")
    if hash_alg not in HASH_BY_ALG or size_of_select > _SELECT_BYTES:
        raise EvidenceFormatError("PCR file has an unknown bank or selection size")
    bank = HASH_BY_ALG[hash_alg]
    bitmap = data[7 : 7 + size_of_select]
    indices = tuple(b * 8 + i for b in range(size_of_select) for i in range(8)
                    if bitmap[b] >> i & 1)
    (lists,) = struct.unpack_from("<I", data, _SELECTION_SIZE)
    expected_lists = (len(indices) + _DIGESTS_PER_LIST - 1) // _DIGESTS_PER_LIST
    if lists != expected_lists or len(data) != _SELECTION_SIZE + 4 + lists * _DIGEST_LIST_SIZE:
        raise EvidenceFormatError(f"PCR file declares {lists} digest lists for {len(indices)} "
                                  f"PCRs in {len(data)} bytes")
    digests: list[bytes] = []
    for n in range(lists):
        base = _SELECTION_SIZE + 4 + n * _DIGEST_LIST_SIZE
        (in_list,) = struct.unpack_from("<I", data, base)
        if in_list > _DIGESTS_PER_LIST:
            raise EvidenceFormatError(f"PCR file digest list {n} claims {in_list} digests")
        for k in range(in_list):
            (size,) = struct.unpack_from("<H", data, base + 4 + k * _DIGEST_SLOT)
            if size != DIGEST_SIZE[bank]:
                raise EvidenceFormatError(f"PCR file digest of {size} bytes in the {bank} bank")
            start = base + 4 + k * _DIGEST_SLOT + 2
            digests.append(data[start : start + size])
    if len(digests) != len(indices):
        raise EvidenceFormatError(f"PCR file has {len(digests)} digests for {len(indices)} PCRs")
    return PcrSelection(bank, indices), dict(zip(indices, digests, strict=True))
