"""The event log must explain every quoted PCR (real swtpm quotes): a log with a PCR's
events removed fails the event_log check, naming the PCR, the bank and both values in
full, unless the policy says that PCR is not logged (``unlogged_pcrs``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from attestation.errors import PolicyError
from attestation.eventlog import EventLogBuilder, parse_event_log, replay
from attestation.evidence import Evidence
from attestation.policy import dump_policy, load_policy, policy_from_evidence
from attestation.registrar import PinnedAk
from attestation.tpm import TpmClient, TpmKey
from attestation.tpm_types import PcrSelection, parse_public
from attestation.verifier import QuoteVerifier
from tests.attestation_helpers import quote_evidence

EV_SEPARATOR = 0x4
EV_IPL = 0xD
SELECTION = PcrSelection("sha256", (0, 1, 2, 3, 4, 5, 6, 7, 16, 17))


@pytest.fixture
def client(swtpm) -> Iterator[TpmClient]:
    with TpmClient(swtpm.tcti) as c:
        yield c


def _boot(client: TpmClient, skip_pcr: int | None = None) -> bytes:
    """Extend PCRs 0-7 (a separator each, a kernel into 4, a config into 5); return the log,
    with the events of ``skip_pcr`` left out of it (but still extended)."""
    full = EventLogBuilder(("sha256",))
    shown = EventLogBuilder(("sha256",))
    steps = [(pcr, EV_SEPARATOR, b"\x00" * 4) for pcr in range(8)]
    steps += [(4, EV_IPL, b"kernel"), (5, EV_IPL, b"gpt table")]
    for pcr, event_type, data in steps:
        event = full.add(pcr, event_type, data)
        client.extend_pcr(pcr, event.digests)
        if pcr != skip_pcr:
            shown.add(pcr, event_type, data)
    return shown.to_bytes()


def _verify(client: TpmClient, ak: TpmKey, log: bytes, nonce: bytes,
            unlogged: tuple[int, ...] = ()) -> tuple[bool, str, Evidence]:
    evidence = quote_evidence(client, ak, nonce, SELECTION, event_log=log)
    policy = policy_from_evidence(evidence.pcrs, None, name="pinned", unlogged_pcrs=unlogged)
    trust = PinnedAk([parse_public(ak.public).public_key()])
    report = QuoteVerifier(ak_trust=trust, policy=policy).verify(evidence, nonce)
    return report.ok, report.check("event_log").detail, evidence


def test_genuine_log_explains_every_quoted_pcr(client: TpmClient, nonce: bytes) -> None:
    ak = client.attestation_key("ecc")
    ok, detail, _ = _verify(client, ak, _boot(client), nonce)
    assert ok, detail
    # 16 is never extended (all zero), 17 is a DRTM PCR (all ones): explained, not exempted.
    assert "explains all 10 quoted PCRs" in detail


def test_log_with_a_pcrs_events_removed_is_rejected(client: TpmClient, nonce: bytes) -> None:
    ak = client.attestation_key("ecc")
    ok, detail, evidence = _verify(client, ak, _boot(client, skip_pcr=5), nonce)
    assert not ok
    assert detail == (
        f"PCR 5 (sha256): the event log extends nothing into it, so it would hold its reset "
        f"value {'00' * 32}, but the quote says {evidence.pcrs[5].hex()}")


def test_policy_may_exempt_an_unlogged_pcr(client: TpmClient, nonce: bytes) -> None:
    ak = client.attestation_key("ecc")
    ok, detail, _ = _verify(client, ak, _boot(client, skip_pcr=5), nonce, unlogged=(5,))
    assert ok, detail
    assert "(PCRs 5 not logged, per the policy)" in detail


def test_a_pcr_extended_behind_the_logs_back_is_rejected(client: TpmClient,
                                                          nonce: bytes) -> None:
    ak = client.attestation_key("ecc")
    log = _boot(client)
    client.extend_pcr(16, {"sha256": b"\x16" * 32})  # a runtime extend nobody logged
    ok, detail, _ = _verify(client, ak, log, nonce)
    assert not ok and detail.startswith("PCR 16 (sha256): the event log extends nothing")


def test_log_lacking_the_quoted_bank_is_rejected(client: TpmClient, nonce: bytes) -> None:
    ak = client.attestation_key("ecc")
    _boot(client)
    sha1_log = EventLogBuilder(("sha1",))
    sha1_log.add(0, EV_SEPARATOR, b"\x00" * 4)
    ok, detail, _ = _verify(client, ak, sha1_log.to_bytes(), nonce)
    assert not ok and "has no sha256 digests" in detail


# --- the policy field ---------------------------------------------------------------------

SHA = "ab" * 32


@pytest.mark.parametrize(("value", "message"), [
    ("5", "unlogged_pcrs: expected a list of PCR indices, got the integer 5"),
    ("[5, 5]", "unlogged_pcrs[1]: PCR 5 is listed twice"),
    ("[24]", "unlogged_pcrs[0]: PCR index must be an integer 0..23, got the integer 24"),
    ("[true]", "unlogged_pcrs[0]: PCR index must be an integer 0..23, got a boolean true"),
    ("[5.0]", "unlogged_pcrs[0]: PCR index must be an integer 0..23, got a float 5.0"),
    ("['5']", "unlogged_pcrs[0]: PCR index must be an integer 0..23, got a string '5'"),
    ("[4]", "unlogged_pcrs: PCR 4 also has expected events"),
])
def test_unlogged_pcrs_is_validated_strictly(value: str, message: str) -> None:
    text = (f"version: 1\nname: p\npcrs: {{0: '{SHA}'}}\nunlogged_pcrs: {value}\n"
            f"events:\n  - {{pcr: 4, type: EV_IPL, digest: '{SHA}'}}\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(text)
    assert str(caught.value) == message


def test_unlogged_pcrs_round_trips_through_dump() -> None:
    policy = load_policy(f"version: 1\nname: p\npcrs: {{0: '{SHA}'}}\nunlogged_pcrs: [23, 16]\n")
    assert policy.unlogged_pcrs == (16, 23)
    assert "unlogged_pcrs: [16, 23]" in dump_policy(policy)
    assert load_policy(dump_policy(policy)) == policy
    assert dataclasses.replace(policy, unlogged_pcrs=()) != policy


def test_policy_from_evidence_refuses_a_log_that_does_not_explain_a_quoted_pcr() -> None:
    log = EventLogBuilder(("sha256",))
    log.add(4, EV_IPL, b"kernel")
    parsed = parse_event_log(log.to_bytes())
    pcrs = {4: replay(parsed)[4], 5: b"\x05" * 32}
    with pytest.raises(PolicyError, match=r"PCR 5 \(sha256\): the event log extends nothing"):
        policy_from_evidence(pcrs, parsed, name="p")
    policy = policy_from_evidence(pcrs, parsed, name="p", unlogged_pcrs=[5])
    assert policy.unlogged_pcrs == (5,) and policy.event_pcrs() == [4]
