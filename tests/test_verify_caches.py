"""The verifier's caches (attestation.verifier.replayed_log) never serve a changed input:
a log with other bytes, or the same log against other quoted PCR values, is replayed
afresh and judged by name; the cache stays bounded. Real swtpm quotes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from attestation import verifier
from attestation.errors import EventLogError
from attestation.eventlog import EventLogBuilder
from attestation.registrar import PinnedAk
from attestation.tpm import TpmClient, TpmKey
from attestation.tpm_types import PcrSelection, parse_public
from attestation.verifier import REPLAY_CACHE_SIZE, QuoteVerifier, replayed_log
from tests.attestation_helpers import quote_evidence

EV_IPL = 0xD
SELECTION = PcrSelection("sha256", (4, 5, 16))


@pytest.fixture
def client(swtpm) -> Iterator[TpmClient]:  # type: ignore[no-untyped-def]
    with TpmClient(swtpm.tcti) as c:
        yield c


def _boot(client: TpmClient) -> tuple[bytes, bytes]:
    """Extend a kernel into 4 and a config into 5; (the full log, the log without PCR 5)."""
    full, partial = EventLogBuilder(("sha256",)), EventLogBuilder(("sha256",))
    for pcr, data in ((4, b"kernel"), (5, b"config")):
        event = full.add(pcr, EV_IPL, data)
        client.extend_pcr(pcr, event.digests)
        if pcr == 4:
            partial.add(pcr, EV_IPL, data)
    return full.to_bytes(), partial.to_bytes()


def _event_log_check(client: TpmClient, ak: TpmKey, log: bytes, nonce: bytes) -> tuple[str, str]:
    evidence = quote_evidence(client, ak, nonce, SELECTION, event_log=log)
    trust = PinnedAk([parse_public(ak.public).public_key()])
    check = QuoteVerifier(ak_trust=trust).verify(evidence, nonce).check("event_log")
    return check.state, check.detail


def test_a_changed_log_or_pcr_value_is_never_served_from_the_cache(client: TpmClient,
                                                                   nonce: bytes) -> None:
    ak = client.attestation_key("ecc")
    full, partial = _boot(client)
    assert _event_log_check(client, ak, full, nonce)[0] == "passed"
    assert _event_log_check(client, ak, full, nonce)[0] == "passed"  # served from the cache
    status, detail = _event_log_check(client, ak, partial, nonce)  # other bytes
    assert status == "failed" and detail.startswith("PCR 5 (sha256): the event log extends "
                                                    "nothing into it")
    client.extend_pcr(16, {"sha256": b"\x16" * 32})  # same log bytes, another PCR 16 value
    status, detail = _event_log_check(client, ak, full, nonce)
    assert status == "failed" and detail.startswith("PCR 16 (sha256)")


def test_an_unusable_log_is_refused_every_time_and_not_stored() -> None:
    before = len(verifier._REPLAYS)
    for _ in range(2):
        with pytest.raises(EventLogError, match="not a crypto-agile"):
            replayed_log(b"\x00" * 40, {}, "sha256", ())
    assert len(verifier._REPLAYS) == before


def test_the_replay_cache_is_bounded() -> None:
    for i in range(REPLAY_CACHE_SIZE + 20):
        log = EventLogBuilder(("sha256",))
        log.add(4, EV_IPL, i.to_bytes(4, "big"))
        replayed_log(log.to_bytes(), {}, "sha256", ())
        assert len(verifier._REPLAYS) <= REPLAY_CACHE_SIZE
    assert len(verifier._REPLAYS) == REPLAY_CACHE_SIZE
