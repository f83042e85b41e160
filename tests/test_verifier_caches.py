"""The verifier's caches serve only what did not change (real swtpm quotes).

An unchanged boot event log is parsed, replayed and held against the policy once (keyed
by its exact bytes, the quoted PCR values and the policy's value): a changed log, the same
log against other PCR values, or another policy, is judged anew; the caches are bounded
in entries and in the size of what they keep; the cached parse agrees with the plain one
on any input (hypothesis).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation import verifier as verifier_module
from attestation.errors import EventLogError
from attestation.eventlog import (
    CACHED_LOG_BYTES,
    CACHED_LOGS,
    PARSED_LOGS,
    EventLogBuilder,
    parse_event_log,
    parse_event_log_cached,
)
from attestation.policy import policy_from_evidence
from attestation.registrar import PinnedAk
from attestation.tpm import TpmClient
from attestation.tpm_types import PcrSelection, parse_public
from attestation.verifier import QuoteVerifier
from tests.attestation_helpers import quote_evidence

EV_SEPARATOR = 0x4
EV_IPL = 0xD
SELECTION = PcrSelection("sha256", tuple(range(8)))


@pytest.fixture
def client(swtpm) -> Iterator[TpmClient]:
    with TpmClient(swtpm.tcti) as c:
        yield c


def _boot(client: TpmClient) -> EventLogBuilder:
    log = EventLogBuilder(("sha256",))
    for pcr, data in [*((p, b"\x00" * 4) for p in range(8)), (4, b"kernel")]:
        client.extend_pcr(pcr, log.add(pcr, EV_SEPARATOR if data[0] == 0 else EV_IPL,
                                       data).digests)
    return log


def test_a_changed_log_or_changed_pcrs_are_not_served_from_the_cache(
        client: TpmClient, nonce: bytes) -> None:
    ak = client.attestation_key("ecc")
    trust = PinnedAk([parse_public(ak.public).public_key()])
    boot = _boot(client)
    genuine = boot.to_bytes()
    first = quote_evidence(client, ak, nonce, SELECTION, event_log=genuine)
    policy = policy_from_evidence(first.pcrs, None, name="pinned")
    verifier = QuoteVerifier(ak_trust=trust, policy=policy)
    verifier_module._REPLAYS.clear()
    assert verifier.verify(first, nonce).ok
    again = quote_evidence(client, ak, nonce + b"2", SELECTION, event_log=genuine)
    assert QuoteVerifier(ak_trust=trust, policy=policy).verify(again, nonce + b"2").ok
    assert verifier_module._REPLAYS.hits >= 1  # the unchanged log: replayed once
    # The same evidence against another policy (PCR 4 expected otherwise): judged anew.
    other = dataclasses.replace(policy, name="other", pcrs={**policy.pcrs, 4: b"\x01" * 32})
    report = QuoteVerifier(ak_trust=trust, policy=other).verify(again, nonce + b"2")
    assert report.failure is not None and report.failure.name == "policy", report.to_dict()
    assert QuoteVerifier(ak_trust=trust, policy=policy).verify(again, nonce + b"2").ok
    # One byte of the log changed (the kernel's digest): judged anew, and refused.
    tampered = bytearray(genuine)
    tampered[-11] ^= 1  # the last byte of its digest (then a size, 6 bytes of data)
    bad = quote_evidence(client, ak, nonce + b"3", SELECTION, event_log=bytes(tampered))
    report = QuoteVerifier(ak_trust=trust, policy=policy).verify(bad, nonce + b"3")
    assert report.failure is not None and report.failure.name == "event_log"
    # The same log bytes, but PCR 4 extended behind the log's back: the quoted values
    # differ, so the cached replay does not apply.
    client.extend_pcr(4, EventLogBuilder(("sha256",)).add(4, EV_IPL, b"rootkit").digests)
    late = quote_evidence(client, ak, nonce + b"4", SELECTION, event_log=genuine)
    report = QuoteVerifier(ak_trust=trust, policy=policy).verify(late, nonce + b"4")
    assert report.failure is not None and report.failure.name == "event_log"
    assert "PCR 4" in report.failure.detail


def _one_event_log(i: int, size: int = 4) -> bytes:
    log = EventLogBuilder(("sha256",))
    log.add(i % 8, EV_IPL, i.to_bytes(size, "big"))
    return log.to_bytes()


def test_the_parse_cache_is_bounded_and_keeps_no_large_log() -> None:
    PARSED_LOGS.clear()
    for i in range(CACHED_LOGS + 50):
        parse_event_log_cached(_one_event_log(i))
    assert len(PARSED_LOGS) == CACHED_LOGS
    PARSED_LOGS.clear()
    large = _one_event_log(1, CACHED_LOG_BYTES)
    assert len(large) > CACHED_LOG_BYTES
    assert parse_event_log_cached(large) == parse_event_log(large)
    assert len(PARSED_LOGS) == 0


def _outcome(parse: object, data: bytes) -> object:
    try:
        return parse(data)  # type: ignore[operator]
    except EventLogError as exc:
        return ("error", str(exc))


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=400),
                      st.tuples(st.integers(0, 200), st.integers(0, 255)).map(
                          lambda m: _mutated(_one_event_log(7), *m))))
def test_the_cached_parse_agrees_with_the_plain_one(data: bytes) -> None:
    assert _outcome(parse_event_log_cached, data) == _outcome(parse_event_log, data)
    assert _outcome(parse_event_log_cached, data) == _outcome(parse_event_log, data)  # cached


def _mutated(log: bytes, at: int, value: int) -> bytes:
    changed = bytearray(log)
    changed[at % len(changed)] = value
    return bytes(changed)
