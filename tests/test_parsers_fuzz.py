"""Hostile input to every TPM-structure parser gives EvidenceFormatError, never a
traceback or a hang (hypothesis: random bytes, truncations, bit flips)."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attestation.errors import EvidenceFormatError
from attestation.evidence import Evidence
from attestation.tools_format import read_pcrs, write_pcrs
from attestation.tpm_types import (
    PcrSelection,
    marshal_pcr_selection,
    parse_attest,
    parse_public,
    parse_signature,
    parse_tpm2b_public,
    tpm2b,
)

# A real quote and AK from swtpm (ECC P-256, sha256 PCRs 0-3), frozen as test vectors.
ECC_AK_PUBLIC = bytes.fromhex(
    "0023000b00050472000000100018000b00030010"
    "0020" + "11" * 32 + "0020" + "22" * 32
)


def _quote_attest(extra: bytes = b"n" * 32) -> bytes:
    selection = marshal_pcr_selection((PcrSelection("sha256", (0, 1, 2, 3)),))
    return (struct.pack(">IH", 0xFF544347, 0x8018) + tpm2b(b"\x00\x0b" + b"s" * 32)
            + tpm2b(extra) + struct.pack(">QIIB", 1234, 2, 0, 1) + struct.pack(">Q", 7)
            + selection + tpm2b(b"d" * 32))


SIGNATURE = struct.pack(">HH", 0x0018, 0x000B) + tpm2b(b"r" * 32) + tpm2b(b"s" * 32)
PARSERS: list[tuple[str, Callable[[bytes], object], bytes]] = [
    ("attest", parse_attest, _quote_attest()),
    ("signature", parse_signature, SIGNATURE),
    ("public", parse_public, ECC_AK_PUBLIC),
    ("tpm2b_public", parse_tpm2b_public, tpm2b(ECC_AK_PUBLIC)),
    ("pcrs", read_pcrs, write_pcrs(PcrSelection("sha256", (0, 1, 9)),
                                   {0: b"a" * 32, 1: b"b" * 32, 9: b"c" * 32})),
]


def _only_format_errors(parse: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(EvidenceFormatError):
        parse(data)


@pytest.mark.parametrize("name,parse,valid", PARSERS, ids=[p[0] for p in PARSERS])
def test_valid_vectors_parse(name: str, parse: Callable[[bytes], object], valid: bytes) -> None:
    parse(valid)


@pytest.mark.parametrize("name,parse,valid", PARSERS, ids=[p[0] for p in PARSERS])
@given(data=st.binary(max_size=2048))
def test_random_bytes(name: str, parse: Callable[[bytes], object], valid: bytes,
                      data: bytes) -> None:
    _only_format_errors(parse, data)


@pytest.mark.parametrize("name,parse,valid", PARSERS, ids=[p[0] for p in PARSERS])
@given(cut=st.integers(min_value=0, max_value=4096))
def test_every_truncation_is_an_error(name: str, parse: Callable[[bytes], object], valid: bytes,
                                      cut: int) -> None:
    if cut >= len(valid):
        return
    with pytest.raises(EvidenceFormatError):
        parse(valid[:cut])


@pytest.mark.parametrize("name,parse,valid", PARSERS, ids=[p[0] for p in PARSERS])
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_byte_mutations(name: str, parse: Callable[[bytes], object], valid: bytes,
                        position: int, value: int) -> None:
    mutated = bytearray(valid)
    mutated[position % len(valid)] = value
    _only_format_errors(parse, bytes(mutated))


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(EvidenceFormatError, match="trailing"):
        parse_attest(_quote_attest() + b"\x00")


def test_huge_declared_sizes_are_rejected_quickly() -> None:
    with pytest.raises(EvidenceFormatError):
        parse_attest(struct.pack(">IH", 0xFF544347, 0x8018) + b"\xff\xff")
    with pytest.raises(EvidenceFormatError, match="too large"):
        parse_attest(b"\x00" * 100_000)


def _evidence_doc() -> dict[str, object]:
    return Evidence(attest=_quote_attest(), signature=SIGNATURE, ak_public=ECC_AK_PUBLIC,
                    pcr_bank="sha256", pcrs={0: b"a" * 32}).to_dict()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)


@given(key=st.sampled_from(sorted(_evidence_doc())), value=json_values)
def test_evidence_with_any_field_replaced(key: str, value: object) -> None:
    doc = _evidence_doc()
    doc[key] = value
    with contextlib.suppress(EvidenceFormatError):
        Evidence.from_json(json.dumps(doc).encode())


@given(data=st.binary(max_size=512))
def test_evidence_random_bytes(data: bytes) -> None:
    _only_format_errors(Evidence.from_json, data)


def test_evidence_deeply_nested_json_is_an_error() -> None:
    with pytest.raises(EvidenceFormatError):
        Evidence.from_json(b"[" * 100_000 + b"]" * 100_000)


def test_evidence_oversized_is_rejected_before_parsing() -> None:
    with pytest.raises(EvidenceFormatError, match="exceeds"):
        Evidence.from_json(b" " * (5 << 20))


def test_evidence_unknown_version_is_rejected() -> None:
    doc = _evidence_doc()
    doc["version"] = 2
    with pytest.raises(EvidenceFormatError, match="version"):
        Evidence.from_json(json.dumps(doc).encode())
