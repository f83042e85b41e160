"""Hostile input to every parser in attestation/ gives the project's own error, never a
traceback or a hang (hypothesis: random bytes, truncations, bit flips, splices), and a
mutated genuine swtpm quote is refused unless the mutation left it meaning the same.

The properties are plain data (:data:`PROPERTIES`, :func:`verify_property`) so that
bench/fuzz_long.py runs exactly these with >= 10,000 cases each. The number of cases here
comes from the hypothesis profile (tests/conftest.py, ``HYPOTHESIS_PROFILE``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attestation.agent_wire import (
    activate_request,
    decode_message,
    parse_activate_request,
    parse_quote_request,
    quote_request,
)
from attestation.errors import EventLogError, EvidenceFormatError, PolicyError, TestbedError
from attestation.eventlog import (
    EV_NO_ACTION,
    EventLogBuilder,
    compare_with_pcrs,
    parse_event_log,
    replay,
)
from attestation.evidence import Evidence
from attestation.policy import (
    ReferencePolicy,
    dump_policy,
    evaluate_policy,
    load_policy,
    policy_from_evidence,
)
from attestation.registrar import AkRegistry
from attestation.tools_format import read_pcrs, write_pcrs
from attestation.tpm import TpmClient
from attestation.tpm_types import (
    PcrSelection,
    marshal_pcr_selection,
    parse_attest,
    parse_public,
    parse_signature,
    parse_tpm2b_public,
    tpm2b,
)
from attestation.verifier import QuoteVerifier
from testbed.tpm.swtpm import Swtpm, clone_state

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


# --- the shared properties (also run by bench/fuzz_long.py) -----------------------------


@dataclass(frozen=True)
class Property:
    """Inputs drawn from ``strategy`` must make ``check`` raise nothing but ``allowed``."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], object]
    allowed: type[TestbedError]

    def run(self, value: Any) -> None:
        with contextlib.suppress(self.allowed):
            self.check(value)


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with one to three damages: bit flips, byte sets, cuts, inserts, splices."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "dup"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


# Nesting that blows the recursion limit of json (and of a naive YAML walk).
DEEP = st.sampled_from([b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                        b"- " * 20_000 + b"x", b"[" * 5_000])


def hostile(valid: bytes, max_size: int = 2048) -> st.SearchStrategy[bytes]:
    return mutated(valid) | st.binary(max_size=max_size) | DEEP


def _sample_log() -> bytes:
    log = EventLogBuilder(("sha1", "sha256"), startup_locality=0)
    log.add(0, 0x8, "1.0\0".encode("utf-16-le"))
    log.add(7, 0x80000001, bytes(16) + struct.pack("<QQ", 10, 1) + "SecureBoot".encode(
        "utf-16-le") + b"\x01")
    for pcr in range(8):
        log.add(pcr, 0x4, bytes(4))
    log.add(4, 0x80000003, struct.pack("<QQQQ", 0, 0, 0, 8) + b"\x04\x04\x08\x00a\x00\x00\x00")
    log.add(9, 0xD, b"console=ttyS0\0")
    return log.to_bytes()


SAMPLE_LOG = _sample_log()


def _event_log_check(data: bytes) -> None:
    log = parse_event_log(data)
    for bank in log.banks:
        replayed = replay(log, bank)
        compare_with_pcrs(log, replayed, bank)
    for event in log.events:
        event.summary()


SAMPLE_POLICY = dump_policy(ReferencePolicy(
    "sample", "sha256", {0: bytes(32), 16: bytes(32)}, (), "fuzz seed", unlogged_pcrs=(23,))
).encode()
SAMPLE_POLICY_WITH_EVENTS = dump_policy(policy_from_evidence(
    replay(parse_event_log(SAMPLE_LOG)), parse_event_log(SAMPLE_LOG), name="sample")).encode()


def _policy_check(data: bytes) -> None:
    policy = load_policy(data)
    load_policy(dump_policy(policy))
    evaluate_policy(policy, {i: bytes(32) for i in range(24)}, parse_event_log(SAMPLE_LOG))


def _frame_check(data: bytes) -> None:
    message = decode_message(data)
    for parse in (parse_quote_request, parse_activate_request):
        with contextlib.suppress(EvidenceFormatError):
            parse(message)


SAMPLE_QUOTE_FRAME = json.dumps(quote_request(b"n" * 32, [0, 1, 2, 7])).encode()
SAMPLE_ACTIVATE_FRAME = json.dumps(activate_request(b"c" * 80, b"e" * 256)).encode()
SAMPLE_REGISTRY = AkRegistry({"node-a": parse_public(ECC_AK_PUBLIC)}).to_json().encode()


def _registry_check(data: bytes) -> None:
    registry = AkRegistry.from_json(data)
    for node in registry.nodes():
        registry.for_node(node)


def _evidence_check(data: bytes) -> None:
    Evidence.from_json(data)


PROPERTIES: list[Property] = [
    *[Property(name, hostile(valid), parse, EvidenceFormatError) for name, parse, valid in PARSERS],
    Property("event_log", hostile(SAMPLE_LOG, 4096), _event_log_check, EventLogError),
    Property("policy_yaml", hostile(SAMPLE_POLICY) | hostile(SAMPLE_POLICY_WITH_EVENTS),
             _policy_check, PolicyError),
    Property("evidence_json", hostile(Evidence(
        attest=_quote_attest(), signature=SIGNATURE, ak_public=ECC_AK_PUBLIC, pcr_bank="sha256",
        pcrs={0: b"a" * 32}, event_log=SAMPLE_LOG).to_json()), _evidence_check,
        EvidenceFormatError),
    Property("agent_frame", hostile(SAMPLE_QUOTE_FRAME) | hostile(SAMPLE_ACTIVATE_FRAME),
             _frame_check, EvidenceFormatError),
    Property("registrar_registry", hostile(SAMPLE_REGISTRY), _registry_check,
             EvidenceFormatError),
]


@pytest.mark.parametrize("prop", PROPERTIES, ids=[p.name for p in PROPERTIES])
@given(data=st.data())
def test_every_parser_raises_only_its_own_error(prop: Property, data: st.DataObject) -> None:
    prop.run(data.draw(prop.strategy, label=prop.name))


# --- mutated genuine evidence from a real swtpm -------------------------------------------


@dataclass(frozen=True)
class Genuine:
    """One genuine quote with its event log, and a verifier that accepts exactly it."""

    evidence: Evidence
    nonce: bytes
    verifier: QuoteVerifier


def genuine_from_tpm(tcti: str) -> Genuine:
    """Measure a small boot into the TPM, quote it, and pin AK and policy to the result."""
    with TpmClient(tcti) as client:
        builder = EventLogBuilder(("sha256",), startup_locality=0)
        for pcr, event_type, data in [(0, 0x8, b"fw"), *[(p, 0x4, bytes(4)) for p in range(8)],
                                      (4, 0x80000003, b"kernel"), (9, 0xD, b"cmdline")]:
            client.extend_pcr(pcr, builder.add(pcr, event_type, data).digests)
        ak = client.attestation_key("ecc")
        nonce = bytes(range(32))
        quote = client.quote(ak, PcrSelection("sha256", (0, 1, 2, 3, 4, 5, 6, 7, 9, 16)), nonce)
    log = builder.to_bytes()
    evidence = Evidence(attest=quote.attest, signature=quote.signature, ak_public=ak.public,
                        pcr_bank="sha256", pcrs=quote.pcrs, event_log=log)
    policy = policy_from_evidence(quote.pcrs, parse_event_log(log), name="genuine")
    # Trust by Name, as the testbed trusts its nodes: the whole TPMT_PUBLIC counts (a
    # PinnedAk trusts the bare key and ignores attribute bits beyond the required ones).
    trust = AkRegistry({"node": parse_public(ak.public)}).for_node("node")
    verifier = QuoteVerifier(ak_trust=trust, policy=policy)
    assert verifier.verify(evidence, nonce).ok, "the genuine evidence must pass"
    return Genuine(evidence, nonce, verifier)


def _meaning(evidence: Evidence) -> tuple[object, ...] | None:
    """What a verifier's acceptance vouches for (None: a part does not even decode).

    Not the raw bytes: a signature's integers may be re-encoded with leading zeros, event
    data is not measured (only the digests are) and EV_NO_ACTION events are never
    extended, so none of these changes the meaning.
    """
    try:
        sig = parse_signature(evidence.signature)
        log = parse_event_log(evidence.event_log) if evidence.event_log is not None else None
    except EvidenceFormatError:
        return None
    # EV_NO_ACTION events are never extended; what they say is in startup_locality.
    events = None if log is None else (log.startup_locality, tuple(
        (e.pcr, e.event_type, tuple(sorted(e.digests.items())))
        for e in log.events if e.event_type != EV_NO_ACTION))
    return (evidence.attest, evidence.ak_public, evidence.pcr_bank, evidence.pcrs,
            (sig.sig_alg, sig.hash_alg, int.from_bytes(sig.r), int.from_bytes(sig.s),
             int.from_bytes(sig.rsa_signature)), events)


_FIELDS = ("attest", "signature", "ak_public", "event_log")


@st.composite
def mutated_evidence(draw: st.DrawFn, genuine: Evidence) -> Evidence:
    """Bit flips, truncations and splices of one field, swapped fields or PCR values."""
    kind = draw(st.sampled_from(["bytes", "swap_fields", "pcr_value", "swap_pcrs", "json"]))
    if kind == "bytes":
        name = draw(st.sampled_from(_FIELDS))
        value = getattr(genuine, name)
        return dataclasses.replace(genuine, **{name: draw(mutated(value))})
    if kind == "swap_fields":
        a, b = draw(st.permutations(_FIELDS))[:2]
        return dataclasses.replace(genuine, **{a: getattr(genuine, b), b: getattr(genuine, a)})
    pcrs = dict(genuine.pcrs)
    if kind == "pcr_value":
        index = draw(st.sampled_from(sorted(pcrs)))
        pcrs[index] = draw(mutated(pcrs[index]).filter(lambda v: len(v) == 32)
                           | st.binary(min_size=32, max_size=32))
        return dataclasses.replace(genuine, pcrs=pcrs)
    if kind == "swap_pcrs":
        a, b = draw(st.permutations(sorted(pcrs)))[:2]
        pcrs[a], pcrs[b] = pcrs[b], pcrs[a]
        return dataclasses.replace(genuine, pcrs=pcrs)
    return Evidence.from_json(draw(mutated(genuine.to_json())))  # may raise: the caller's


def verify_property(genuine: Genuine) -> Property:
    """Mutated genuine evidence is accepted exactly when it still means the same."""
    reference = _meaning(genuine.evidence)

    def check(evidence: Evidence) -> None:
        report = genuine.verifier.verify(evidence, genuine.nonce)
        same = _meaning(evidence) == reference
        assert report.ok == same, (
            "accepted altered evidence" if report.ok else
            f"refused evidence that means the same: {report.failure}")

    return Property("verify_mutated_genuine", _evidence_or_error(genuine.evidence), check,
                    EvidenceFormatError)


@st.composite
def _evidence_or_error(draw: st.DrawFn, genuine: Evidence) -> Evidence:
    # A JSON mutation that no longer decodes is the parser's business (evidence_json).
    try:
        return draw(mutated_evidence(genuine))
    except EvidenceFormatError:
        return genuine


@pytest.fixture(scope="module")
def genuine(swtpm_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Genuine]:
    state = tmp_path_factory.mktemp("fuzz-swtpm") / "state"
    clone_state(swtpm_template, state)
    with Swtpm(state) as tpm:
        yield genuine_from_tpm(tpm.tcti)


@given(data=st.data())
def test_mutated_genuine_evidence_is_refused_or_means_the_same(genuine: Genuine,
                                                              data: st.DataObject) -> None:
    prop = verify_property(genuine)
    prop.run(data.draw(prop.strategy, label=prop.name))


@pytest.mark.parametrize("parse", [AkRegistry.from_json, Evidence.from_json, decode_message,
                                   load_policy], ids=["registry", "evidence", "frame", "policy"])
def test_deeply_nested_documents_are_one_clear_error(parse: Callable[[bytes], object]) -> None:
    with pytest.raises(TestbedError, match=r"nested too deeply|not JSON|not valid|larger than"):
        parse(b"[" * 100_000 + b"]" * 100_000)
